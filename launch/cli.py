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


def _serve_reward(args: argparse.Namespace) -> int:
    from vocalign.rewards.base import build_reward
    from vocalign.rewards.server import ServerLimits, serve
    from vocalign.rlhf.config import load_yaml

    settings = load_yaml(args.config) if args.config else {}
    target = settings.pop("target", None)
    plugin = build_reward(args.name, target, **settings)
    limits = ServerLimits(max_batch=args.max_batch, max_wait_ms=args.max_wait_ms,
                          max_request_bytes=int(args.max_request_mb * 2**20),
                          max_samples_per_request=args.max_samples_per_request)
    serve(plugin, host=args.host, port=args.port, limits=limits)
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

    reward = sub.add_parser("serve-reward", help="serve a reward plugin over HTTP with dynamic batching")
    reward.add_argument("name", help="reward name: cer, sim, emotion, laughter, energy, or an entry point")
    reward.add_argument("--config", help="YAML with the plugin's settings (and `target: pkg.module:Class`)")
    reward.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    reward.add_argument("--port", type=int, default=8100)
    reward.add_argument("--max-batch", type=int, default=32, help="samples per model call")
    reward.add_argument("--max-wait-ms", type=float, default=5.0, help="longest wait for a batch to fill")
    reward.add_argument("--max-request-mb", type=float, default=64.0)
    reward.add_argument("--max-samples-per-request", type=int, default=256)
    reward.set_defaults(func=_serve_reward)
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
