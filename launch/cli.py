"""The ``vocalign`` command."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence


def _train(args: argparse.Namespace) -> int:
    from vocalign.eval.plots import plot_reward_curves, read_metrics
    from vocalign.rlhf.recipe import load_recipe
    from vocalign.rlhf.trainer import GRPOTrainer

    run, config = load_recipe(args.config, args.set)
    trainer = GRPOTrainer(run.model, run.env, run.scorer, run.prompts, config)
    trainer.train()
    if trainer.accelerator.is_main_process:
        png = plot_reward_curves({config.run_name or "run": read_metrics(trainer.metrics_path)},
                                 trainer.output_dir / "reward_curves.png")
        logging.getLogger("vocalign").info("metrics: %s  plot: %s", trainer.metrics_path, png)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vocalign", description="GRPO alignment for LLM-based TTS")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="run a GRPO recipe (use `accelerate launch -m vocalign.launch.cli` "
                                         "for several processes)")
    train.add_argument("config", help="recipe YAML, e.g. configs/grpo_toy.yaml")
    train.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                       help="override a recipe value, e.g. --set trainer.max_steps=10")
    train.set_defaults(func=_train)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as err:  # bad input: say what, without a traceback unless asked
        logging.getLogger("vocalign").error("%s", err, exc_info=args.verbose)
        return 2


if __name__ == "__main__":
    sys.exit(main())
