"""Everything a GRPO run holds before its first step: processes, policy, optimizer, reference model, LR schedule, and
where a resumed run starts.

Kept out of ``trainer.py`` so the loop reads top to bottom without accelerate, DeepSpeed and peft details. The order
of the steps in :func:`prepare_training` is part of the run's reproducibility: the seed is set before the LoRA
adapter is initialised, and the reference is copied before the policy is wrapped for training.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, set_seed
from transformers import get_scheduler
from trl.models.utils import prepare_deepspeed
from trl.trainer.utils import disable_dropout_in_model

from .checkpointing import config_changes, config_record, latest_checkpoint, load_checkpoint, read_state
from .config import GRPOConfig, wrap_lora

logger = logging.getLogger(__name__)


@dataclass
class TrainingSetup:
    """What the loop holds from the first step to the last."""

    accelerator: Accelerator
    model: torch.nn.Module  # the policy as accelerate prepared it (DDP or a DeepSpeed engine)
    optimizer: torch.optim.Optimizer
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler  # stepped by the trainer, saved in its JSON state
    ref_model: torch.nn.Module | None  # frozen copy for the KL term; None with LoRA (adapter off) or beta 0
    accumulation_steps: int  # micro-batches per optimizer step
    synced_generation: bool  # every process must keep sampling until all are done (see generation_is_collective)
    config: GRPOConfig  # the run's settings, which a resume compares with the checkpoint's


def accumulation_steps(config: GRPOConfig) -> int:
    """Micro-batches in one optimizer step: a step's samples (this process) over the micro-batch size."""
    return math.ceil(config.prompts_per_step * config.num_generations / config.micro_batch_size)


def generation_is_collective(accelerator: Accelerator) -> bool:
    """Under DeepSpeed ZeRO-3 each process holds a shard of the weights, so a forward pass is a collective: with
    several processes, one that finished sampling (or resampling) must keep step with the others until all have."""
    return (accelerator.distributed_type == DistributedType.DEEPSPEED
            and accelerator.state.deepspeed_plugin.zero_stage == 3 and accelerator.num_processes > 1)


def make_accelerator(config: GRPOConfig) -> Accelerator:
    """The run's Accelerator when none is given: accumulation fixed by the batch shape, bf16 and wandb from the
    recipe; the process layout (DDP, DeepSpeed ZeRO) comes from ``accelerate launch`` or torchrun."""
    return Accelerator(
        gradient_accumulation_steps=accumulation_steps(config),
        mixed_precision="bf16" if config.bf16 else "no",
        log_with="wandb" if config.report_to == "wandb" else None,
        project_dir=config.output_dir,
    )


def prepare_training(model: torch.nn.Module, config: GRPOConfig, accelerator: Accelerator | None = None
                     ) -> TrainingSetup:
    """The policy (LoRA-wrapped when configured), its optimizer and reference, prepared for the processes.

    A given ``accelerator`` must accumulate as many micro-batches as a step has; DeepSpeed's ``"auto"`` batch,
    accumulation and clipping settings are filled from the recipe."""
    steps = accumulation_steps(config)
    accelerator = accelerator or make_accelerator(config)
    if accelerator.gradient_accumulation_steps != steps:
        raise ValueError(
            f"the Accelerator accumulates {accelerator.gradient_accumulation_steps} micro-batches but a step "
            f"has {steps} (prompts_per_step * num_generations / micro_batch_size); "
            "leave gradient_accumulation_steps to the trainer (\"auto\" in DeepSpeed configs)")
    deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
    if deepspeed:
        ds_config = accelerator.state.deepspeed_plugin.deepspeed_config
        ds_config["train_micro_batch_size_per_gpu"] = config.micro_batch_size
        ds_config["gradient_accumulation_steps"] = steps
        ds_config["gradient_clipping"] = config.max_grad_norm
    set_seed(config.seed, device_specific=True)

    if config.lora is not None:
        model = wrap_lora(model, config.lora)
    if config.disable_dropout:  # before the reference is copied, so both are deterministic
        disable_dropout(model)
    if config.gradient_checkpointing:
        # transformers 5.23 renamed it (the old name goes in v6); releases before 5.23 have only the old one
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable()
    # The reference for the KL term: the adapter switched off with LoRA, otherwise a frozen copy.
    ref_model = None
    if config.beta > 0 and config.lora is None:
        ref_model = copy.deepcopy(model).eval().requires_grad_(False)

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, betas=(config.adam_beta1, config.adam_beta2),
                                  weight_decay=config.weight_decay)
    model, optimizer = accelerator.prepare(model, optimizer)
    if ref_model is not None and deepspeed:
        # DeepSpeed needs its own inference engine for a second model (sharded too under ZeRO-3)
        ref_model = prepare_deepspeed(ref_model, accelerator)
    elif ref_model is not None:
        ref_model = accelerator.prepare_model(ref_model, evaluation_mode=True)
    # Stepped once per optimizer step by the trainer (not prepared): its position is part of the JSON state.
    lr_scheduler = get_scheduler(config.lr_scheduler_type, optimizer, config.warmup_steps,
                                 config.max_steps * config.num_iterations)

    logger.info("%d process(es), %s, %d micro-batches of %d per optimizer step", accelerator.num_processes,
                accelerator.distributed_type.value, steps, config.micro_batch_size)
    return TrainingSetup(accelerator, model, optimizer, lr_scheduler, ref_model, steps,
                         generation_is_collective(accelerator), config)


def disable_dropout(model: torch.nn.Module) -> None:
    """Dropout off for good, in training mode too: the update's log-probs must be those the sampler saw (ratio 1 at
    the first iteration) and the reference's must not be noisy. TRL's helper zeroes ``nn.Dropout`` modules (LoRA's
    ``lora_dropout`` among them); attention dropout in transformers is a float attribute read at each forward."""
    disable_dropout_in_model(model)
    for module in model.modules():
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0


@contextlib.contextmanager
def reference_policy(setup: TrainingSetup) -> Iterator[torch.nn.Module]:
    """The model the KL term compares with: the frozen copy, or the policy with its LoRA adapter switched off."""
    if setup.ref_model is not None:
        yield setup.ref_model
        return
    with setup.accelerator.unwrap_model(setup.model).disable_adapter():
        yield setup.model


def resume(setup: TrainingSetup, output_dir: str | Path) -> tuple[int, str | None] | None:
    """Load the newest complete checkpoint in ``output_dir`` (model, optimizer, RNG, LR schedule), if there is
    one; returns the step to continue from and the run's wandb id, or None when there is nothing to resume.

    A checkpoint written under other settings (beyond how long the run is and how it logs and saves) is refused
    before any weights are loaded, unless ``resume: force``: continuing it would train a mix of two recipes."""
    path = latest_checkpoint(output_dir)
    if path is None:
        return None
    check_resumable(read_state(path), setup.config, path)
    state = load_checkpoint(setup.accelerator, path)
    setup.lr_scheduler.load_state_dict(state["lr_scheduler"])
    return state["step"], state.get("wandb_id")


def check_resumable(state: dict[str, Any], config: GRPOConfig, path: Path) -> None:
    """Raise if ``config`` differs from the one ``state`` was saved with, naming each setting; with
    ``resume: force`` log the differences and go on."""
    if "config" not in state:
        logger.warning("%s holds no config (written before checkpoints saved one): resuming without comparing "
                       "settings", path)
        return
    changes = config_changes(state["config"], config_record(config))
    if not changes:
        return
    listed = "\n".join(f"  {key}: {old!r} in the checkpoint, {new!r} now" for key, (old, new) in changes.items())
    if config.resume == "force":
        logger.warning("resuming %s under changed settings (resume: force):\n%s", path, listed)
        return
    raise ValueError(
        f"{path} was written with other settings than this run's:\n{listed}\n"
        "Set them back to the checkpoint's values to continue the run; or set trainer.resume=force to continue it "
        "under the new ones; or give a new trainer.output_dir (or trainer.resume=false) to start afresh.")
