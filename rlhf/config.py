"""Trainer configuration: the ``trainer`` section of a recipe, names following TRL's GRPOConfig where one exists.

It is read like every config section, by ``common.settings.from_dict`` (unknown keys and wrong types are
errors); each field's trailing comment is what ``docs/reference/configuration.md`` says about it.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

from .loss import canonical_loss_type
from .resampling import ResampleConfig
from .schedules import Schedule


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
