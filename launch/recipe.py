"""Build a run from a recipe file: which environment, which model, which prompts, which trainer settings.

A recipe YAML has an ``env`` section (``name`` picks the builder, the rest are its settings), a ``trainer``
section (:class:`GRPOConfig`) and, for environments scored by reward plugins, a ``rewards`` list. Builders are
registered by name so that the toy environment and the GLM-TTS environment are launched the same way.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState
from accelerate.utils import parse_flag_from_env

from ..eval.heldout import HeldoutEvaluation, HeldoutSettings
from ..rlhf.config import GRPOConfig, apply_overrides, from_dict, load_yaml, parse_override
from ..rlhf.rollout import RolloutEnv, Scorer
from ..rlhf.toy_env import ToyConfig, ToyEnv, ToyScorer, build_toy_model, toy_prompts

logger = logging.getLogger(__name__)


@dataclass
class Run:
    model: torch.nn.Module
    env: RolloutEnv
    scorer: Scorer
    prompts: Sequence[Any]
    heldout: HeldoutEvaluation | None = None  # the recipe's `eval` section: before/after scores on held-out data


def build_toy(settings: dict[str, Any], rewards: list[dict[str, Any]], config: GRPOConfig,
              heldout: dict[str, Any] | None) -> Run:
    if rewards:
        raise ValueError("the toy environment scores its own tokens; remove the `rewards` section")
    if heldout is not None:
        raise ValueError("the toy environment has no held-out evaluation; remove the `eval` section")
    cfg = from_dict(ToyConfig, settings, "env")
    return Run(build_toy_model(cfg), ToyEnv(cfg), ToyScorer(cfg), toy_prompts(cfg))


def process_state() -> PartialState:
    """The processes' shared state, made as :class:`accelerate.Accelerator` makes it. Whoever creates it first
    fixes it for the run: without ``cpu`` set from ``ACCELERATE_USE_CPU`` (what ``accelerate launch --cpu`` sets),
    torchrun's CPU processes would each think they run alone."""
    return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))


def build_glmtts(settings: dict[str, Any], rewards: list[dict[str, Any]], config: GRPOConfig,
                 heldout: dict[str, Any] | None) -> Run:
    """``ckpt``: a checkpoint folder, ``demo`` (the demo TTS vocalign ships, see ``vocalign make-demo-tts``) or
    ``tiny`` (a random tiny one in the published layout, written under output_dir); ``data``: a JSON-lines/parquet
    prompt file, or ``demo`` (the demo's GRPO prompts); ``flow_steps``; ``trust_remote_code``; ``sample_rate``:
    24000 (HiFT) or 32000 (Vocos2D), default as the checkpoint's files allow (rewards get the audio at that rate and
    resample it themselves); ``phonemes``: phoneme-in, a folder with the release's G2P tables (its ``configs/``),
    applied to rollouts and the held-out evaluation alike (a ``tiny`` checkpoint then gets the phoneme tokens)."""
    from ..demo import DEMO_CKPT, DEMO_PROMPTS
    from ..policies.checkpoints import write_tiny_checkpoint
    from ..policies.frontend.g2p import RELEASE_TABLES, PhonemeFrontend
    from ..policies.pipeline import TTSPipeline
    from ..rewards.scorer import RewardScorer, build_plugin
    from ..rlhf.tts_env import TTSEnv, load_prompt_rows

    known = {"ckpt", "data", "flow_steps", "trust_remote_code", "sample_rate", "phonemes"}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise ValueError(f"unknown env setting(s) {unknown} for glmtts; known: {sorted(known)}")
    for required in ("ckpt", "data"):
        if settings.get(required) is None:
            raise ValueError(f"env.{required} is required: "
                             + ("a checkpoint folder, `demo` or `tiny`" if required == "ckpt"
                                else "a JSON-lines/parquet prompt file, or `demo`"))
    phonemes = None if settings.get("phonemes") is None else PhonemeFrontend.from_release_configs(settings["phonemes"])
    state = process_state()
    ckpt = {"demo": DEMO_CKPT, "tiny": Path(config.output_dir) / "tiny-ckpt"}.get(settings["ckpt"],
                                                                                  Path(settings["ckpt"]))
    if settings["ckpt"] == "tiny":
        with state.main_process_first():  # one process writes it, the others read it
            if state.is_main_process and not (ckpt / "llm" / "config.json").is_file():
                write_tiny_checkpoint(ckpt, phonemes_file=None if phonemes is None else
                                      Path(settings["phonemes"]) / RELEASE_TABLES[0])
    data = DEMO_PROMPTS / "train.jsonl" if settings["data"] == "demo" else Path(settings["data"])
    sample_rate = settings.get("sample_rate")
    pipeline = TTSPipeline.from_pretrained(ckpt, trust_remote_code=bool(settings.get("trust_remote_code", False)),
                                           device=str(state.device), phonemes=phonemes,
                                           sample_rate=None if sample_rate is None else int(sample_rate))
    env = TTSEnv(pipeline, flow_steps=int(settings.get("flow_steps", 10)))
    scorer = RewardScorer([build_plugin(spec) for spec in rewards])
    evaluation = None
    if heldout is not None:
        eval_settings = from_dict(HeldoutSettings, heldout, "eval")
        rows_path = DEMO_PROMPTS / "heldout.jsonl" if eval_settings.data == "demo" else Path(eval_settings.data)
        evaluation = HeldoutEvaluation(env, scorer.plugins, load_prompt_rows(rows_path), eval_settings,
                                       ckpt / "llm")
    return Run(pipeline.lm.model, env, scorer, load_prompt_rows(data), evaluation)


Builder = Callable[[dict[str, Any], list[dict[str, Any]], GRPOConfig, dict[str, Any] | None], Run]
ENVIRONMENTS: dict[str, Builder] = {"toy": build_toy, "glmtts": build_glmtts}


def load_recipe(path: str | Path, overrides: Sequence[str] = ()) -> tuple[Run, GRPOConfig]:
    """The run and trainer settings a recipe file describes, with ``section.key=value`` overrides applied."""
    recipe = apply_overrides(load_yaml(path), map(parse_override, overrides))
    unknown = sorted(set(recipe) - {"env", "trainer", "rewards", "eval"})
    if unknown:
        raise ValueError(f"{path}: unknown top-level section(s) {unknown}; a recipe has env, trainer, rewards and eval")
    env_settings = dict(recipe.get("env") or {})
    name = env_settings.pop("name", None)
    if name not in ENVIRONMENTS:
        raise ValueError(f"{path}: env.name must be one of {sorted(ENVIRONMENTS)}, got {name!r}")
    config = from_dict(GRPOConfig, recipe.get("trainer") or {}, "trainer")
    rewards = recipe.get("rewards") or []
    if not isinstance(rewards, list):
        raise ValueError(f"{path}: `rewards` must be a list of {{name: ..., ...settings}}")
    heldout = recipe.get("eval")
    if heldout is not None and not isinstance(heldout, dict):
        raise ValueError(f"{path}: `eval` must be a mapping (data, seeds, ...)")
    return ENVIRONMENTS[name](env_settings, rewards, config, heldout), config
