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

    r: int = 8  # as peft's LoraConfig: rank of the adapter's low-rank update
    lora_alpha: int = 16  # as peft's: the update is scaled by lora_alpha / r
    lora_dropout: float = 0.1  # as peft's: dropout on the adapter's input
    # as peft's: names of the linear layers that get an adapter
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "down_proj"])
    modules_to_save: list[str] = field(default_factory=list)  # as peft's: modules trained in full and saved beside the adapter
    init_lora_weights: bool | str = True  # as peft's: true starts the adapter at zero (the model unchanged); a string names a scheme


def wrap_lora(model: "torch.nn.Module", lora: LoraSettings) -> "torch.nn.Module":
    """The model with a fresh peft LoRA adapter; only the adapter (and ``modules_to_save``) stays trainable."""
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(
        r=lora.r, lora_alpha=lora.lora_alpha, lora_dropout=lora.lora_dropout, target_modules=lora.target_modules,
        modules_to_save=lora.modules_to_save or None, init_lora_weights=lora.init_lora_weights,
        task_type="CAUSAL_LM"))


@dataclass
class GRPOConfig:
    output_dir: str = "runs/grpo"  # as TRL's: checkpoints, metrics.jsonl and the final adapter or model go here
    seed: int = 0  # as TRL's: seeds model init, sampling and the prompt order (each epoch reshuffled from seed + epoch)
    max_steps: int = 100  # training steps, each one generated batch (and num_iterations optimizer steps on it)

    # batch: each step takes `prompts_per_step` prompts per process, `num_generations` samples each
    prompts_per_step: int = 4  # prompts each process takes per step
    num_generations: int = 8  # as TRL's: completions sampled per prompt, the group its advantages are taken within
    micro_batch_size: int = 8  # sequences per forward/backward; accumulation covers the rest of the batch
    num_iterations: int = 1  # optimizer steps per generated batch (PPO epochs)

    # optimisation
    learning_rate: float = 1e-6  # as TRL's: AdamW's peak learning rate
    adam_beta1: float = 0.9  # as TRL's: AdamW's first-moment decay
    adam_beta2: float = 0.95  # as TRL's: AdamW's second-moment decay
    weight_decay: float = 0.0  # as TRL's: AdamW's decoupled weight decay
    max_grad_norm: float = 5.0  # as TRL's: gradients clipped to this global norm before each optimizer step
    lr_scheduler_type: str = "constant"  # as TRL's: a transformers get_scheduler name ("constant", "cosine", "linear", ...)
    warmup_steps: int = 0  # as TRL's: optimizer steps of linear warm-up to learning_rate
    gradient_checkpointing: bool = False  # as TRL's: recompute activations in the backward pass, trading compute for memory
    bf16: bool = False  # mixed precision; DeepSpeed configs with "auto" follow it

    # objective
    loss_type: str = "token_mean"  # as TRL's: "token_mean" (TRL's "dapo": over the batch's tokens), "seq_mean" ("grpo") or "dr_grpo"
    epsilon: float = 0.2  # as TRL's: the ratio is clipped below at 1 - epsilon
    epsilon_high: float = 0.3  # as TRL's: the ratio is clipped above at 1 + epsilon_high (DAPO's clip-higher)
    beta: float = 0.0  # as TRL's: weight of the k3 KL penalty to the reference model; 0: no KL term, no reference copy
    temperature: float = 1.0  # as TRL's: sampling temperature, also applied to the logits the loss scores
    top_k: int | None = None  # as TRL's: sample from the k likeliest tokens only; null: no cut
    top_p: float | None = None  # as TRL's: sample from the smallest set of tokens holding this probability; null: no cut
    max_completion_length: int = 256  # as TRL's: most tokens generated per completion
    min_completion_length: int = 0  # fewest tokens generated per completion (the end token is suppressed before)
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
    # "hierarchical": each reward z-scored within its group, weighted, summed, and the sum normalised again;
    # "sum_then_normalize": TRL's, the weighted sum of raw rewards normalised (advantages.compute_advantages)
    normalization: str = "hierarchical"
    scale_rewards: str = "group"  # as TRL's: divide advantages by the std of the "group", the "batch", or "none"
    std_tolerance: float = 1e-6  # a reward whose std within a group is at most this is flat there: 0 advantage, and flat for resample
    advantage_eps: float = 1e-4  # added to every std before dividing by it
    resample: ResampleConfig = field(default_factory=ResampleConfig)  # regenerate groups whose rewards are all equal
    # Samples no reward could score (a server refused them, a model failed) are masked out of advantages and loss;
    # above this share of a step's samples the run stops. Invalid samples (the policy's fault: empty audio, too long)
    # are trained on at the reward's minimum; above max_invalid_frac the run stops too (1.0: never).
    max_masked_frac: float = 0.1
    max_invalid_frac: float = 1.0  # the largest share of a step's samples that may be invalid (1.0: no limit)
    schedule: Schedule = field(default_factory=Schedule)  # epsilon, epsilon_high and temperature ramped over steps

    lora: LoraSettings | None = None  # train a peft LoRA adapter instead of the full model; null: full fine-tuning

    # bookkeeping
    save_steps: int = 50  # as TRL's: a checkpoint every this many steps, and at the last
    save_total_limit: int | None = 2  # as TRL's: checkpoints kept, the oldest deleted; null: keep all
    # continue from the newest checkpoint in output_dir when there is one, if it was saved with the same settings
    # (beyond length, logging and saving); "force": continue it even under changed settings, listing them
    resume: bool | str = True
    logging_steps: int = 1  # as TRL's: metrics logged every this many steps, and at the last
    report_to: str = "wandb"  # "wandb" (offline unless WANDB_MODE says otherwise) or "none"; JSONL is always written
    wandb_project: str = "vocalign"  # the wandb project runs are logged under
    run_name: str | None = None  # as TRL's: the run's name in wandb; null: wandb picks one
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
