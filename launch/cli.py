"""The ``vocalign`` command."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import fields
from importlib.resources import files

from ..rewards.limits import ServerLimits


def _train(args: argparse.Namespace) -> int:
    from ..eval.heldout import compare
    from ..eval.plots import plot_reward_curves, read_metrics
    from ..rlhf.trainer import GRPOTrainer
    from .recipe import load_recipe, process_state

    log = logging.getLogger("vocalign")
    run, config = load_recipe(args.config, args.set)
    processes, heldout = process_state(), run.heldout
    # every process scores its share of the held-out rows; the starting policy before the trainer wraps it (LoRA,
    # DeepSpeed) or a resume loads trained weights, the policy being trained every eval.every_steps steps
    before = heldout.score(run.model, processes) if heldout is not None else None
    trainer = GRPOTrainer(run.model, run.env, run.scorer, run.prompts, config,
                          step_callbacks=[heldout.during_training] if heldout is not None else [])
    trainer.train()
    if heldout is not None:  # every process scores its share once final/ is written
        trainer.accelerator.wait_for_everyone()
        after = heldout.score(heldout.trained_policy(trainer.output_dir / "final", trainer.accelerator.device),
                              processes)
    trainer.close()
    if processes.is_main_process:
        label = config.run_name or "run"
        ends = {label: {0: before.summary(), trainer.step: after.summary()}} if heldout is not None else None
        png = plot_reward_curves({label: read_metrics(trainer.metrics_path)}, trainer.output_dir / "reward_curves.png",
                                 ends)
        log.info("metrics: %s  plot: %s", trainer.metrics_path, png)
        if heldout is not None:
            compare({"sft": before, "grpo": after}, trainer.output_dir)
    return 0


def _serve_reward(args: argparse.Namespace) -> int:
    import yaml

    from ..rewards.base import build_reward
    from ..rewards.server import serve

    # everything the command line says is checked before a model is loaded
    limits = ServerLimits.for_plugin(args.name, **{limit.name: getattr(args, limit.name)
                                                   for limit in fields(ServerLimits) if getattr(args, limit.name) is not None})
    if not 1 <= args.port <= 65535:
        raise ValueError(f"--port must be between 1 and 65535, got {args.port}")
    settings = {}
    if args.config:
        from ..common.settings import load_yaml

        try:
            settings = load_yaml(args.config)
        except yaml.YAMLError as err:
            raise ValueError(f"--config {args.config} is not valid YAML: {' '.join(str(err).split())}") from None
    target = settings.pop("target", None)
    try:
        plugin = build_reward(args.name, target, **settings)
    except (TypeError, AttributeError) as err:  # a setting of the wrong type or shape, a target that is no plugin
        where = f"--config {args.config}" if args.config else "its defaults"
        raise ValueError(f"reward {args.name!r} cannot be built from {where}: {err}") from None
    try:
        serve(plugin, host=args.host, port=args.port, limits=limits)
    except OSError as err:  # the address is taken, or not one of this host's
        logging.getLogger("vocalign").error("cannot serve on %s port %d: %s", args.host, args.port,
                                            os.strerror(err.errno) if err.errno else err, exc_info=args.verbose)
        return 2
    return 0


def _synth(args: argparse.Namespace) -> int:
    import torch
    from tqdm.auto import tqdm

    from ..common.audio import audio_writer, read_audio
    from ..policies.frontend.g2p import PhonemeFrontend
    from ..policies.pipeline import SynthesisSettings, TTSPipeline

    if args.seed is not None:
        torch.manual_seed(args.seed)
    phonemes = None if args.phonemes is None else PhonemeFrontend.from_release_configs(args.phonemes)
    pipeline = TTSPipeline.from_pretrained(args.ckpt, trust_remote_code=args.trust_remote_code, adapter=args.adapter,
                                           phonemes=phonemes, sample_rate=args.sample_rate)
    prompt = pipeline.prepare_prompt(*read_audio(args.prompt_wav), args.prompt_text)
    settings = SynthesisSettings(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                                 flow_steps=args.flow_steps)
    with audio_writer(args.out, pipeline.sample_rate) as out:
        pieces = pipeline.stream(args.text, prompt, settings) if args.stream else iter(
            [pipeline.synthesize(args.text, prompt, settings)])
        for piece in tqdm(pieces, desc="synth", unit="piece"):
            out.write(piece)
    logging.getLogger("vocalign").info("wrote %s", args.out)
    return 0


def _eval(args: argparse.Namespace) -> int:
    import torch

    from ..common.settings import load_yaml_list
    from ..eval.seed_tts_eval import evaluate, read_list
    from ..policies.frontend.g2p import PhonemeFrontend
    from ..policies.pipeline import SynthesisSettings, TTSPipeline
    from ..rewards.scorer import build_plugin

    if args.seed is not None:
        torch.manual_seed(args.seed)
    plugins = [build_plugin(spec) for spec in load_yaml_list(args.rewards)]
    phonemes = None if args.phonemes is None else PhonemeFrontend.from_release_configs(args.phonemes)
    pipeline = TTSPipeline.from_pretrained(args.ckpt, trust_remote_code=args.trust_remote_code, phonemes=phonemes,
                                           sample_rate=args.sample_rate)
    _, means = evaluate(pipeline, read_list(args.list), plugins, args.out, SynthesisSettings(flow_steps=args.flow_steps))
    logging.getLogger("vocalign").info("means: %s; report: %s/report.md", means, args.out)
    return 0


def _sweep(args: argparse.Namespace) -> int:
    from .sweep import run_sweep

    out = run_sweep(args.sweep)
    logging.getLogger("vocalign").info("results: %s/results.md  plot: %s/reward_curves.png", out, out)
    return 0


def _sft(args: argparse.Namespace) -> int:
    from ..common.settings import parse_override
    from ..sft.finetune import load_sft_config, train_voice

    summary = train_voice(load_sft_config(args.config, dict(map(parse_override, args.set))))
    logging.getLogger("vocalign").info("adapter: %s (%.1f%% of parameters trained; loss %.3f -> %.3f)",
                                       summary["adapter"],
                                       100 * summary["trainable_parameters"] / summary["total_parameters"],
                                       summary["first_loss"], summary["last_loss"])
    return 0


def _tiny_ckpt(args: argparse.Namespace) -> int:
    from ..policies.checkpoints import TinySizes, write_tiny_checkpoint

    root = write_tiny_checkpoint(args.dir, TinySizes(num_codes=args.num_codes), args.phonemes, args.seed)
    logging.getLogger("vocalign").info("tiny checkpoint in the published layout: %s", root)
    return 0


def _demo_tts(args: argparse.Namespace) -> int:
    from ..common.settings import parse_override
    from ..demo.build import build_demo_tts, load_demo_config

    out = build_demo_tts(load_demo_config(args.config, dict(map(parse_override, args.set))))
    logging.getLogger("vocalign").info("demo TTS: %s/ckpt, prompts in %s/prompts, provenance %s/provenance.json",
                                       out, out, out)
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
    for limit in fields(ServerLimits):
        reward.add_argument(f"--{limit.name.replace('_', '-')}", type=type(limit.default),
                            help=f"{limit.metadata['help']} (default: {limit.default})")
    reward.set_defaults(func=_serve_reward)

    synth = sub.add_parser("synth", help="text + voice prompt -> wav with a GLM-TTS checkpoint")
    synth.add_argument("--ckpt", required=True, help="checkpoint folder in the published layout")
    synth.add_argument("--text", required=True)
    synth.add_argument("--prompt-wav", required=True, help="3-10 s of the voice to imitate")
    synth.add_argument("--prompt-text", required=True, help="what the prompt says")
    synth.add_argument("--out", required=True, help="output wav (at --sample-rate)")
    synth.add_argument("--sample-rate", type=int, choices=(24000, 32000),
                       help="24000: HiFT, 32000: Vocos2D (the release's --sample_rate); default: 24000 if the "
                            "checkpoint has hift/, else 32000")
    synth.add_argument("--phonemes", metavar="DIR",
                       help="phoneme-in (the release's --use_phoneme): a folder with the release's G2P tables "
                            "(G2P_all_phonemes.json, G2P_replace_dict.jsonl, G2P_able_1word.json, from its configs/)")
    synth.add_argument("--stream", action="store_true",
                       help="stream as released (token blocks 25/50/200, look-ahead 12/25/100, 0.1 s fades), "
                            "writing each piece as it is ready")
    synth.add_argument("--temperature", type=float, default=1.0)
    synth.add_argument("--top-k", type=int, default=25)
    synth.add_argument("--top-p", type=float, default=0.8)
    synth.add_argument("--flow-steps", type=int, default=10)
    synth.add_argument("--seed", type=int)
    synth.add_argument("--trust-remote-code", action="store_true",
                       help="run the tokenizer code shipped in the checkpoint (the released tokenizer needs it)")
    synth.add_argument("--adapter", help="a LoRA voice adapter folder from `vocalign sft`")
    synth.set_defaults(func=_synth)

    ev = sub.add_parser("eval", help="seed-tts-eval-style CER/WER, SIM (and emotion accuracy) of a checkpoint")
    ev.add_argument("--ckpt", required=True)
    ev.add_argument("--list", required=True, help="utt|prompt_text|prompt_wav|text[|emotion] per line")
    ev.add_argument("--out", required=True, help="folder for wavs, results.csv, summary.json, report.md")
    ev.add_argument("--rewards", default=str(files("vocalign.configs") / "rewards" / "eval_cpu.yaml"),
                    help="YAML list of scoring plugins (default: offline pocketsphinx CER + resemblyzer SIM)")
    ev.add_argument("--flow-steps", type=int, default=10)
    ev.add_argument("--sample-rate", type=int, choices=(24000, 32000), help="as for synth")
    ev.add_argument("--phonemes", metavar="DIR", help="phoneme-in, as for synth")
    ev.add_argument("--seed", type=int)
    ev.add_argument("--trust-remote-code", action="store_true")
    ev.set_defaults(func=_eval)

    sweep = sub.add_parser("sweep", help="run a grid of recipe overrides; writes a results table and reward curves")
    sweep.add_argument("sweep", help="sweep YAML, e.g. configs/sweeps/demo_ablation.yaml")
    sweep.set_defaults(func=_sweep)

    sft = sub.add_parser("sft", help="LoRA voice customisation of the speech LM on one speaker's recordings")
    sft.add_argument("config", help="SFT YAML, e.g. configs/lora_voice.yaml")
    sft.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                     help="override a setting, e.g. --set epochs=3 --set lora.r=16")
    sft.set_defaults(func=_sft)

    tiny = sub.add_parser("make-tiny-ckpt", help="write a random tiny checkpoint in the published GLM-TTS layout")
    tiny.add_argument("dir")
    tiny.add_argument("--num-codes", type=int, default=64, help="speech codebook size (the release has 32768)")
    tiny.add_argument("--phonemes", help="G2P_all_phonemes.json, to give the tokenizer the released phoneme tokens")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.set_defaults(func=_tiny_ckpt)

    demo = sub.add_parser("make-demo-tts", help="train the demo TTS from espeak-ng speech (CPU, about 20 minutes)")
    demo.add_argument("config", nargs="?", default=str(files("vocalign.configs") / "demo_tts.yaml"),
                      help="demo TTS recipe (default: configs/demo_tts.yaml)")
    demo.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                      help="override a setting, e.g. --set output_dir=runs/my_demo --set sft.steps=600")
    demo.set_defaults(func=_demo_tts)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    # bad input or a reward service that is down: say what, without a traceback unless asked
    except (ValueError, FileNotFoundError, ConnectionError) as err:
        logging.getLogger("vocalign").error("%s", err, exc_info=args.verbose)
        return 2


if __name__ == "__main__":
    sys.exit(main())
