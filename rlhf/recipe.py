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
import yaml

from .config import GRPOConfig, from_dict, load_yaml
from .rollout import RolloutEnv, Scorer
from .toy_env import ToyConfig, ToyEnv, ToyScorer, build_toy_model, toy_prompts

logger = logging.getLogger(__name__)


@dataclass
class Run:
    model: torch.nn.Module
    env: RolloutEnv
    scorer: Scorer
    prompts: Sequence[Any]


def build_toy(settings: dict[str, Any], rewards: list[dict[str, Any]], config: GRPOConfig) -> Run:
    if rewards:
        raise ValueError("the toy environment scores its own tokens; remove the `rewards` section")
    cfg = from_dict(ToyConfig, settings, "env")
    return Run(build_toy_model(cfg), ToyEnv(cfg), ToyScorer(cfg), toy_prompts(cfg))


def build_glmtts(settings: dict[str, Any], rewards: list[dict[str, Any]], config: GRPOConfig) -> Run:
    """``ckpt``: a folder in the published layout, or ``tiny`` (a random tiny one written under output_dir);
    ``data``: a JSON-lines/parquet prompt file, or ``demo``; ``flow_steps``; ``trust_remote_code``."""
    from vocalign.policies.checkpoints import write_tiny_checkpoint
    from vocalign.policies.pipeline import SynthesisSettings, TTSPipeline

    from .tts_env import RewardScorer, TTSEnv, build_plugin, load_prompt_rows, write_demo_prompts

    known = {"ckpt", "data", "flow_steps", "trust_remote_code"}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise ValueError(f"unknown env setting(s) {unknown} for glmtts; known: {sorted(known)}")
    output = Path(config.output_dir)
    ckpt = settings.get("ckpt")
    if ckpt is None:
        raise ValueError("env.ckpt is required: a GLM-TTS checkpoint folder, or `tiny` for a random tiny one")
    if ckpt == "tiny":
        ckpt = output / "tiny-ckpt"
        if not (ckpt / "llm" / "config.json").is_file():
            write_tiny_checkpoint(ckpt)
    data = settings.get("data", "demo")
    data = write_demo_prompts(output / "demo-prompts") if data == "demo" else Path(data)
    pipeline = TTSPipeline.from_pretrained(ckpt, trust_remote_code=bool(settings.get("trust_remote_code", False)))
    env = TTSEnv(pipeline, SynthesisSettings(flow_steps=int(settings.get("flow_steps", 10))))
    scorer = RewardScorer([build_plugin(spec) for spec in rewards])
    return Run(pipeline.lm.model, env, scorer, load_prompt_rows(data))


Builder = Callable[[dict[str, Any], list[dict[str, Any]], GRPOConfig], Run]
ENVIRONMENTS: dict[str, Builder] = {"toy": build_toy, "glmtts": build_glmtts}


def apply_overrides(recipe: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """``section.key=value`` pairs (value parsed as YAML) applied on top of the recipe."""
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like trainer.max_steps=10")
        dotted, raw = item.split("=", 1)
        *parents, leaf = dotted.split(".")
        node = recipe
        for key in parents:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {item!r}: {key!r} is not a section")
        node[leaf] = yaml.safe_load(raw)
    return recipe


def load_recipe(path: str | Path, overrides: Sequence[str] = ()) -> tuple[Run, GRPOConfig]:
    recipe = apply_overrides(load_yaml(path), overrides)
    unknown = sorted(set(recipe) - {"env", "trainer", "rewards"})
    if unknown:
        raise ValueError(f"{path}: unknown top-level section(s) {unknown}; a recipe has env, trainer and rewards")
    env_settings = dict(recipe.get("env") or {})
    name = env_settings.pop("name", None)
    if name not in ENVIRONMENTS:
        raise ValueError(f"{path}: env.name must be one of {sorted(ENVIRONMENTS)}, got {name!r}")
    config = from_dict(GRPOConfig, recipe.get("trainer") or {}, "trainer")
    rewards = recipe.get("rewards") or []
    if not isinstance(rewards, list):
        raise ValueError(f"{path}: `rewards` must be a list of {{name: ..., ...settings}}")
    return ENVIRONMENTS[name](env_settings, rewards, config), config
