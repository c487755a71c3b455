"""Build a run from a recipe file: which environment, which model, which prompts, which trainer settings.

A recipe YAML has an ``env`` section (``name`` picks the environment, the rest are its settings), a ``trainer``
section (:class:`GRPOConfig`), for environments scored by reward plugins a ``rewards`` list, and for a held-out
evaluation an ``eval`` section (:class:`HeldoutSettings`). Every section is a dataclass read by ``from_dict``, so an
unknown or missing key reads the same wherever it is.

Environments are registered as rewards are, by entry point: a package names an :class:`Environment` under the group
``vocalign.environments`` (vocalign's own ``glmtts`` and ``toy`` are in its ``pyproject.toml``), and ``env.name``
picks it, so an environment outside vocalign runs with ``vocalign train`` unchanged::

    [project.entry-points."vocalign.environments"]
    mine = "my_package.env:ENVIRONMENT"   # ENVIRONMENT = Environment(settings=MySettings, build=build_mine)
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState
from accelerate.utils import parse_flag_from_env

from ..common.settings import apply_overrides, from_dict, load_yaml, parse_override
from ..demo import DEMO_CKPT, DEMO_PROMPTS
from ..eval.heldout import HeldoutEvaluation, HeldoutSettings
from ..rlhf.config import GRPOConfig
from ..rlhf.rollout import RolloutEnv, Scorer
from ..rlhf.toy_env import ToyConfig, ToyEnv, ToyScorer, build_toy_model, toy_prompts

logger = logging.getLogger(__name__)

ENVIRONMENT_GROUP = "vocalign.environments"


@dataclass
class Run:
    model: torch.nn.Module
    env: RolloutEnv
    scorer: Scorer
    prompts: Sequence[Any]
    heldout: HeldoutEvaluation | None = None  # the recipe's `eval` section: before/after scores on held-out data


@dataclass
class Recipe:
    """A recipe file's sections. ``env`` stays a mapping here: which dataclass reads it depends on ``env.name``."""

    env: dict[str, Any]
    trainer: GRPOConfig = field(default_factory=GRPOConfig)
    rewards: list[dict[str, Any]] = field(default_factory=list)
    eval: HeldoutSettings | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.env, dict):
            raise ValueError(f"env must be a mapping (name: and the environment's settings), got {self.env!r:.100}")
        if not isinstance(self.rewards, list) or not all(isinstance(spec, dict) for spec in self.rewards):
            raise ValueError("rewards must be a list of {name: ..., ...settings}")


@dataclass(frozen=True)
class Environment:
    """What ``env.name`` names: the dataclass that reads the rest of the ``env`` section, and how a run is built
    from it and the other sections."""

    settings: type[Any]
    build: Callable[[Any, Recipe], Run]

    def __post_init__(self) -> None:
        if not dataclasses.is_dataclass(self.settings) or not isinstance(self.settings, type):
            raise TypeError(f"Environment settings must be a dataclass (read with from_dict, as every config section "
                            f"is), got {self.settings!r}")


def available_environments() -> dict[str, EntryPoint]:
    """Name -> entry point of every environment the installed packages register."""
    found: dict[str, EntryPoint] = {}
    for ep in entry_points(group=ENVIRONMENT_GROUP):
        found.setdefault(ep.name, ep)
    return found


def find_environment(name: str) -> Environment:
    """The environment registered as ``name``; only that one is imported, so another package's broken or heavy
    environment costs nothing to a recipe that does not name it."""
    known = available_environments()
    if name not in known:
        close = difflib.get_close_matches(str(name), known, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown environment env.name={name!r}{hint}; known: {sorted(known)}. A package registers "
                         f"one under the entry-point group {ENVIRONMENT_GROUP!r} (reinstall vocalign with "
                         f"`pip install -e .` if its own glmtts and toy are missing)")
    ep = known[name]
    try:
        environment = ep.load()
    except (ImportError, AttributeError) as err:
        raise ValueError(f"environment {name!r} cannot be loaded from {ep.value!r}: {err}") from err
    if not isinstance(environment, Environment):
        raise ValueError(f"environment {name!r} ({ep.value}) is a {type(environment).__name__}, not a "
                         f"vocalign.launch.recipe.Environment(settings=..., build=...)")
    return environment


def process_state() -> PartialState:
    """The processes' shared state, made as :class:`accelerate.Accelerator` makes it. Whoever creates it first
    fixes it for the run: without ``cpu`` set from ``ACCELERATE_USE_CPU`` (what ``accelerate launch --cpu`` sets),
    torchrun's CPU processes would each think they run alone."""
    return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))


def build_toy(settings: ToyConfig, recipe: Recipe) -> Run:
    if recipe.rewards:
        raise ValueError("the toy environment scores its own tokens; remove the `rewards` section")
    if recipe.eval is not None:
        raise ValueError("the toy environment has no held-out evaluation; remove the `eval` section")
    return Run(build_toy_model(settings), ToyEnv(settings), ToyScorer(settings), toy_prompts(settings))


@dataclass
class GLMTTSSettings:
    """The ``env`` section of ``name: glmtts``."""

    # a checkpoint folder, `demo` (the demo TTS vocalign ships, see `vocalign make-demo-tts`) or `tiny` (a random
    # tiny one in the published layout, written under trainer.output_dir)
    ckpt: str
    data: str  # a JSON-lines/parquet prompt file, or `demo` (the demo's GRPO prompts)
    # flow-matching steps per decoded utterance (null: 10); refused for a checkpoint with the demo's mel-unit codec,
    # which has no flow model and would ignore it
    flow_steps: int | None = None
    trust_remote_code: bool = False  # run the checkpoint's own tokenizer code (the released GLM-TTS tokenizer has some)
    # 24000 (HiFT) or 32000 (Vocos2D); null: as the checkpoint's files allow (rewards get the audio at that rate and
    # resample it themselves)
    sample_rate: int | None = None
    # phoneme-in: a folder with the release's G2P tables (its `configs/`), applied to rollouts and the held-out
    # evaluation alike (a `tiny` checkpoint then gets the phoneme tokens)
    phonemes: str | None = None

    def __post_init__(self) -> None:
        if self.flow_steps is not None and self.flow_steps < 1:
            raise ValueError(f"env.flow_steps must be >= 1 (or null for the default), got {self.flow_steps}")


def heldout_rows_path(settings: GLMTTSSettings, heldout: HeldoutSettings) -> Path:
    """Where the held-out rows are: ``eval.data``, which only the demo checkpoint may leave out (its own held-out
    set), so that a real recipe with ``eval: {}`` does not quietly evaluate the demo's digit strings."""
    if heldout.data is None and settings.ckpt != "demo":
        raise ValueError("eval.data is required: a JSON-lines/parquet file of held-out prompt rows (texts and voices "
                         "not trained on), or `demo` for the demo's digit strings; only env.ckpt: demo defaults to it")
    return DEMO_PROMPTS / "heldout.jsonl" if heldout.data in (None, "demo") else Path(heldout.data)


def build_glmtts(settings: GLMTTSSettings, recipe: Recipe) -> Run:
    from ..policies.checkpoints import write_tiny_checkpoint
    from ..policies.codec import MelUnitCodec
    from ..policies.frontend.g2p import RELEASE_TABLES, PhonemeFrontend
    from ..policies.pipeline import TTSPipeline
    from ..rewards.scorer import RewardScorer, build_plugin
    from ..rlhf.tts_env import TTSEnv, load_prompt_rows

    heldout_path = None if recipe.eval is None else heldout_rows_path(settings, recipe.eval)
    phonemes = None if settings.phonemes is None else PhonemeFrontend.from_release_configs(settings.phonemes)
    state = process_state()
    ckpt = {"demo": DEMO_CKPT, "tiny": Path(recipe.trainer.output_dir) / "tiny-ckpt"}.get(settings.ckpt,
                                                                                         Path(settings.ckpt))
    if settings.ckpt == "tiny":
        with state.main_process_first():  # one process writes it, the others read it
            if state.is_main_process and not (ckpt / "llm" / "config.json").is_file():
                write_tiny_checkpoint(ckpt, phonemes_file=None if phonemes is None else
                                      Path(settings.phonemes) / RELEASE_TABLES[0])
    data = DEMO_PROMPTS / "train.jsonl" if settings.data == "demo" else Path(settings.data)
    pipeline = TTSPipeline.from_pretrained(ckpt, trust_remote_code=settings.trust_remote_code,
                                           device=str(state.device), phonemes=phonemes,
                                           sample_rate=settings.sample_rate)
    if settings.flow_steps is not None and isinstance(pipeline.codec, MelUnitCodec):
        raise ValueError(f"env.flow_steps: {ckpt} decodes with the demo's mel-unit codec (k-means mel units and "
                         "Griffin-Lim), which has no flow-matching model, so the setting would be ignored; remove it")
    env = TTSEnv(pipeline) if settings.flow_steps is None else TTSEnv(pipeline, flow_steps=settings.flow_steps)
    scorer = RewardScorer([build_plugin(spec) for spec in recipe.rewards])
    evaluation = None
    if recipe.eval is not None:
        evaluation = HeldoutEvaluation(env, scorer.plugins, load_prompt_rows(heldout_path, scorer.plugins), recipe.eval,
                                       ckpt / "llm")
    return Run(pipeline.lm.model, env, scorer, load_prompt_rows(data, scorer.plugins), evaluation)


# vocalign's own environments, registered in its pyproject.toml as any package would register one
TOY_ENVIRONMENT = Environment(settings=ToyConfig, build=build_toy)
GLMTTS_ENVIRONMENT = Environment(settings=GLMTTSSettings, build=build_glmtts)


def read_recipe(path: str | Path, overrides: Sequence[str] = ()) -> tuple[Recipe, Environment, Any]:
    """A recipe file's sections, its environment and that environment's settings, each checked (errors name the
    file), with ``section.key=value`` overrides applied; nothing is built."""
    data = apply_overrides(load_yaml(path), map(parse_override, overrides))
    try:
        recipe = from_dict(Recipe, data, "")
        settings = dict(recipe.env)
        environment = find_environment(settings.pop("name", None))
        return recipe, environment, from_dict(environment.settings, settings, "env")
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None


def load_recipe(path: str | Path, overrides: Sequence[str] = ()) -> tuple[Run, GRPOConfig]:
    """The run and trainer settings a recipe file describes, with ``section.key=value`` overrides applied."""
    recipe, environment, settings = read_recipe(path, overrides)
    return environment.build(settings, recipe), recipe.trainer
