"""Checkpoints that resume exactly: model, optimizer, RNG (through ``accelerate.save_state``) plus our own state.

Our state is JSON (step, LR-scheduler state, wandb run id): nothing of ours is pickled. accelerate writes the model
with safetensors and reads optimizer and RNG files with ``torch.load(weights_only=True)``. The data position needs
no saving: the prompts of a step are a pure function of the seed and the step.

A checkpoint directory counts only once ``trainer_state.json`` is in it; that file is written last, so a run killed
while saving resumes from the previous complete checkpoint.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

logger = logging.getLogger(__name__)

STATE_FILE = "trainer_state.json"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def checkpoint_dirs(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints in ``output_dir``, oldest first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if (m := _CHECKPOINT.match(p.name)) and (p / STATE_FILE).is_file()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    dirs = checkpoint_dirs(output_dir)
    return dirs[-1] if dirs else None


def save_checkpoint(accelerator: Accelerator, output_dir: str | Path, step: int, state: dict[str, Any],
                    keep: int | None) -> Path:
    path = Path(output_dir) / f"checkpoint-{step}"
    accelerator.save_state(str(path), safe_serialization=True)
    if accelerator.is_main_process:
        tmp = path / (STATE_FILE + ".tmp")
        tmp.write_text(json.dumps({"step": step, **state}, indent=2))
        tmp.replace(path / STATE_FILE)
        if keep is not None:
            for old in checkpoint_dirs(output_dir)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        logger.info("saved checkpoint %s", path)
    return path


def load_checkpoint(accelerator: Accelerator, path: str | Path) -> dict[str, Any]:
    path = Path(path)
    state_file = path / STATE_FILE
    if not state_file.is_file():
        raise FileNotFoundError(f"{path} is not a complete checkpoint: {STATE_FILE} is missing")
    accelerator.load_state(str(path))
    state = json.loads(state_file.read_text())
    if accelerator.is_main_process:
        logger.info("resumed from %s (step %d)", path, state["step"])
    return state


def save_final(accelerator: Accelerator, model: torch.nn.Module, path: str | Path) -> None:
    """The trained policy (or its LoRA adapter) in Hugging Face format, safetensors; under ZeRO-3 the shards are
    gathered first (every process must call it)."""
    accelerator.wait_for_everyone()
    unwrapped = accelerator.unwrap_model(model)
    unwrapped.save_pretrained(str(path), is_main_process=accelerator.is_main_process, save_function=accelerator.save,
                              state_dict=accelerator.get_state_dict(model))
