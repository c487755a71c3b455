"""Trainer configuration: YAML mapped onto dataclasses, names following TRL's GRPOConfig where one exists.

Unknown keys are errors with a suggestion, not silently ignored: a typo in ``epsilon_hgih`` would otherwise run a
whole experiment with the default. Every config file takes overrides in one syntax, ``section.key=value`` (the value
read as YAML): ``vocalign train --set``, ``vocalign sft --set``, ``make-demo-tts --set`` and sweep files.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, Union

import yaml

if TYPE_CHECKING:
    import torch

from .loss import canonical_loss_type
from .resampling import ResampleConfig
from .schedules import Schedule

T = TypeVar("T")


@dataclass
class LoraSettings:
    """peft LoRA; the released GLM-TTS adapter is r 8, alpha 16, dropout 0.1 on attention and MLP projections."""

    r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.1
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "down_proj"])
    modules_to_save: list[str] = field(default_factory=list)
    init_lora_weights: bool | str = True


def wrap_lora(model: "torch.nn.Module", lora: LoraSettings) -> "torch.nn.Module":
    """The model with a fresh peft LoRA adapter; only the adapter (and ``modules_to_save``) stays trainable."""
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(
        r=lora.r, lora_alpha=lora.lora_alpha, lora_dropout=lora.lora_dropout, target_modules=lora.target_modules,
        modules_to_save=lora.modules_to_save or None, init_lora_weights=lora.init_lora_weights,
        task_type="CAUSAL_LM"))


@dataclass
class GRPOConfig:
    output_dir: str = "runs/grpo"
    seed: int = 0
    max_steps: int = 100

    # batch: each step takes `prompts_per_step` prompts per process, `num_generations` samples each
    prompts_per_step: int = 4
    num_generations: int = 8
    micro_batch_size: int = 8  # sequences per forward/backward; accumulation covers the rest of the batch
    num_iterations: int = 1  # optimizer steps per generated batch (PPO epochs)

    # optimisation
    learning_rate: float = 1e-6
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    weight_decay: float = 0.0
    max_grad_norm: float = 5.0
    lr_scheduler_type: str = "constant"
    warmup_steps: int = 0
    gradient_checkpointing: bool = False
    bf16: bool = False  # mixed precision; DeepSpeed configs with "auto" follow it

    # objective
    loss_type: str = "token_mean"
    epsilon: float = 0.2
    epsilon_high: float = 0.3
    beta: float = 0.0
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    max_completion_length: int = 256
    min_completion_length: int = 0
    disable_dropout: bool = True  # as TRL: dropout off in every forward of policy and reference, so the first ratio is 1
    mask_truncated_completions: bool = False  # as TRL: completions that hit the length cap are left out of the loss
    group_by_length: bool = True  # micro-batches of similar completion lengths, each padded to its own widest row

    # rewards
    reward_weights: dict[str, float] = field(default_factory=dict)  # a reward not listed weighs 1.0
    # token-level credit: rewards whose spans (where in the output they found errors) add a per-token term, z-scored
    # within the group, with this weight, to the sequence-level advantage (advantages.token_advantages); {}: off
    token_reward_weights: dict[str, float] = field(default_factory=dict)
    # "add": the term as it is; "redistribute": centred within each sample, so it only moves credit between the
    # tokens of one utterance (advantages.token_advantages)
    token_credit_composition: str = "add"
    normalization: str = "hierarchical"
    scale_rewards: str = "group"
    std_tolerance: float = 1e-6
    advantage_eps: float = 1e-4
    resample: ResampleConfig = field(default_factory=ResampleConfig)
    # Samples no reward could score (a server refused them, a model failed) are masked out of advantages and loss;
    # above this share of a step's samples the run stops. Invalid samples (the policy's fault: empty audio, too long)
    # are trained on at the reward's minimum; above max_invalid_frac the run stops too (1.0: never).
    max_masked_frac: float = 0.1
    max_invalid_frac: float = 1.0
    schedule: Schedule = field(default_factory=Schedule)

    lora: LoraSettings | None = None

    # bookkeeping
    save_steps: int = 50
    save_total_limit: int | None = 2
    # continue from the newest checkpoint in output_dir when there is one, if it was saved with the same settings
    # (beyond length, logging and saving); "force": continue it even under changed settings, listing them
    resume: bool | str = True
    logging_steps: int = 1
    report_to: str = "wandb"  # "wandb" (offline unless WANDB_MODE says otherwise) or "none"; JSONL is always written
    wandb_project: str = "vocalign"
    run_name: str | None = None
    log_completions: int = 4  # samples per logging step shown in wandb (audio for TTS)

    def __post_init__(self) -> None:
        self.loss_type = canonical_loss_type(self.loss_type)
        positive = ("max_steps", "prompts_per_step", "num_generations", "micro_batch_size", "num_iterations",
                    "max_completion_length", "save_steps", "logging_steps")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.epsilon < 1:
            raise ValueError(f"epsilon (lower clip bound) must be in [0, 1), got {self.epsilon}")
        if self.epsilon_high < 0:
            raise ValueError(f"epsilon_high must be >= 0, got {self.epsilon_high}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.beta < 0:
            raise ValueError(f"beta must be >= 0, got {self.beta}")
        if self.min_completion_length > self.max_completion_length:
            raise ValueError("min_completion_length exceeds max_completion_length")
        if self.normalization not in ("hierarchical", "sum_then_normalize"):
            raise ValueError(f"normalization must be 'hierarchical' or 'sum_then_normalize', got {self.normalization!r}")
        if self.token_credit_composition not in ("add", "redistribute"):
            raise ValueError(f"token_credit_composition must be 'add' or 'redistribute', got "
                             f"{self.token_credit_composition!r}")
        if self.scale_rewards not in ("group", "batch", "none"):
            raise ValueError(f"scale_rewards must be 'group', 'batch' or 'none', got {self.scale_rewards!r}")
        if self.save_total_limit is not None and self.save_total_limit < 1:
            raise ValueError(f"save_total_limit must be >= 1 (checkpoints kept), or null to keep all; got "
                             f"{self.save_total_limit}")
        if not isinstance(self.resume, bool) and self.resume != "force":
            raise ValueError(f"resume must be true, false or \"force\", got {self.resume!r}")
        for name in ("max_masked_frac", "max_invalid_frac"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} is a share of a step's samples, in [0, 1]; got {getattr(self, name)}")
        if self.report_to not in ("wandb", "none"):
            raise ValueError(f"report_to must be 'wandb' or 'none', got {self.report_to!r}")

    def weights_for(self, names: typing.Sequence[str]) -> list[float]:
        unknown = sorted(set(self.reward_weights) - set(names))
        if unknown:
            raise ValueError(f"reward_weights names {unknown} but the rewards are {list(names)}")
        return [float(self.reward_weights.get(name, 1.0)) for name in names]


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _convert(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _convert(value, args[0], where) if len(args) == 1 else value
    if _is_dataclass_type(tp):
        if not isinstance(value, dict):
            raise ValueError(f"{where} must be a mapping, got {type(value).__name__}")
        return from_dict(tp, value, where)
    if origin is tuple and isinstance(value, list):
        return tuple(value)
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):  # YAML reads 1e-6 as a string
        try:
            return float(value)
        except ValueError:
            raise ValueError(f"{where} must be a number, got {value!r}") from None
    return value


def _key_path(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def from_dict(cls: type[T], data: dict[str, Any], where: str = "config") -> T:
    """Build dataclass ``cls`` from a mapping, recursing into nested dataclasses; unknown keys are errors, and so
    are missing ones for fields without a default. Every config section is read through here, so a typo or an
    omission reads the same in every section. ``where`` is the section's dotted path ("": the top level)."""
    hints = typing.get_type_hints(cls)
    fields = dataclasses.fields(cls)  # type: ignore[arg-type]
    names = [f.name for f in fields]
    unknown = [k for k in data if k not in names]
    if unknown:
        hints_text = "; ".join(
            f"{k!r}" + (f" (did you mean {m[0]!r}?)" if (m := difflib.get_close_matches(k, names, 1)) else "")
            for k in unknown)
        raise ValueError(f"unknown key(s) in {where or 'the top level'}: {hints_text}")
    missing = [f.name for f in fields if f.init and data.get(f.name) is None  # `key:` with no value is YAML's null
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ValueError(f"missing required key(s) {', '.join(_key_path(where, k) for k in missing)} "
                         f"({cls.__name__} has no default for them)")
    kwargs = {k: _convert(v, hints[k], _key_path(where, k)) for k, v in data.items()}
    return cls(**kwargs)


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a YAML mapping at the top level")
    return data


def load_yaml_list(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    data = yaml.safe_load(path.read_text()) or []
    if not isinstance(data, list) or not all(isinstance(d, dict) for d in data):
        raise ValueError(f"{path} must hold a YAML list of mappings")
    return data


def parse_override(item: str) -> tuple[str, Any]:
    """``section.key=value`` -> ``("section.key", value)``, the value read as YAML (``3`` is an int, ``[0, 1]`` a
    list, ``null`` None)."""
    dotted, sep, raw = item.partition("=")
    if not sep or not dotted:
        raise ValueError(f"override {item!r} must look like section.key=value, e.g. trainer.max_steps=10")
    return dotted, yaml.safe_load(raw)


def format_override(key: str, value: Any) -> str:
    """The ``key=value`` item that :func:`parse_override` reads back as ``(key, value)`` (strings quoted where YAML
    would read them as something else)."""
    text = yaml.safe_dump(value, default_flow_style=True, width=float("inf"))
    text = text.removesuffix("...\n").strip()  # a lone scalar is dumped as a document ending in "..."
    return f"{key}={text}"


def apply_overrides(data: dict[str, Any], overrides: Iterable[tuple[str, Any]]) -> dict[str, Any]:
    """Set each dotted key in ``data`` in order, making missing sections; ``data`` is changed and returned."""
    for dotted, value in overrides:
        *parents, leaf = dotted.split(".")
        node = data
        for key in parents:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {dotted}: {key!r} is not a section")
        node[leaf] = value
    return data


def to_dict(obj: Any) -> dict[str, Any]:
    return dataclasses.asdict(obj)
