"""Build a run from a recipe file: which environment, which model, which prompts, which trainer settings.

A recipe YAML has an ``env`` section (``name`` picks the builder, the rest are its settings) and a ``trainer``
section (:class:`GRPOConfig`). Builders are registered by name so that the toy environment and the GLM-TTS
environment are launched the same way.
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


def build_toy(settings: dict[str, Any]) -> Run:
    cfg = from_dict(ToyConfig, settings, "env")
    return Run(build_toy_model(cfg), ToyEnv(cfg), ToyScorer(cfg), toy_prompts(cfg))


ENVIRONMENTS: dict[str, Callable[[dict[str, Any]], Run]] = {"toy": build_toy}


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
    unknown = sorted(set(recipe) - {"env", "trainer"})
    if unknown:
        raise ValueError(f"{path}: unknown top-level section(s) {unknown}; a recipe has 'env' and 'trainer'")
    env_settings = dict(recipe.get("env") or {})
    name = env_settings.pop("name", None)
    if name not in ENVIRONMENTS:
        raise ValueError(f"{path}: env.name must be one of {sorted(ENVIRONMENTS)}, got {name!r}")
    config = from_dict(GRPOConfig, recipe.get("trainer") or {}, "trainer")
    return ENVIRONMENTS[name](env_settings), config
