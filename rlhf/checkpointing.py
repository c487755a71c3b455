"""Checkpoints that resume exactly: model, optimizer, RNG (through ``accelerate.save_state``) plus our own state.

Our state is JSON (step, LR-scheduler state, wandb run id, the run's trainer config): nothing of ours is pickled.
accelerate writes the model with safetensors and reads optimizer and RNG files with
``torch.load(weights_only=True)``. The data position needs no saving: the prompts of a step are a pure function of
the seed and the step.

A checkpoint directory counts only once ``trainer_state.json`` is in it; that file is written last, so a run killed
while saving resumes from the previous complete checkpoint.

The saved config lets a resume refuse to continue a run under settings other than those it was trained with
(:func:`config_changes`): only the keys in :data:`RESUMABLE_CHANGES` may differ.
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

from ..common.settings import to_dict
from .config import GRPOConfig

logger = logging.getLogger(__name__)

STATE_FILE = "trainer_state.json"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
# Settings a resumed run may change: how long it runs (a longer run also stretches max_steps-relative schedules,
# which is what extending a run means), how often it logs and saves, where and under which name it reports.
# Anything else changes what is being trained and needs `resume: force`.
RESUMABLE_CHANGES = frozenset({"max_steps", "logging_steps", "save_steps", "save_total_limit", "report_to",
                               "run_name", "wandb_project", "log_completions", "resume", "output_dir"})


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


def config_record(config: GRPOConfig) -> dict[str, Any]:
    """The config as a checkpoint stores it: JSON types only (tuples become lists), so that a saved record and a
    current one compare equal when the settings are the same."""
    return json.loads(json.dumps(to_dict(config)))


def _flatten(record: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in record.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


MISSING = "<not set>"  # a key one of the two configs lacks (e.g. a setting added since the checkpoint was written)


def config_changes(saved: dict[str, Any], current: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """``{dotted key: (saved value, current value)}`` for every setting that differs, nested sections by their
    dotted keys (``schedule.epsilon``), leaving out :data:`RESUMABLE_CHANGES`."""
    old, new = _flatten(saved), _flatten(current)
    return {key: (old.get(key, MISSING), new.get(key, MISSING)) for key in sorted(old.keys() | new.keys())
            if key.split(".")[0] not in RESUMABLE_CHANGES and old.get(key, MISSING) != new.get(key, MISSING)}


def save_checkpoint(accelerator: Accelerator, output_dir: str | Path, step: int, state: dict[str, Any],
                    keep: int | None, config: GRPOConfig | None = None) -> Path:
    """Everything a resume needs; with ``config``, the run's settings too, which a resume compares with its own."""
    path = Path(output_dir) / f"checkpoint-{step}"
    accelerator.save_state(str(path), safe_serialization=True)
    if accelerator.is_main_process:
        tmp = path / (STATE_FILE + ".tmp")
        record = {"config": config_record(config)} if config is not None else {}
        tmp.write_text(json.dumps({"step": step, **state, **record}, indent=2))
        tmp.replace(path / STATE_FILE)
        if keep is not None:
            for old in checkpoint_dirs(output_dir)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        logger.info("saved checkpoint %s", path)
    return path


def read_state(path: str | Path) -> dict[str, Any]:
    """A checkpoint's JSON state, read without loading any weights."""
    state_file = Path(path) / STATE_FILE
    if not state_file.is_file():
        raise FileNotFoundError(f"{path} is not a complete checkpoint: {STATE_FILE} is missing")
    return json.loads(state_file.read_text())


def load_checkpoint(accelerator: Accelerator, path: str | Path) -> dict[str, Any]:
    state = read_state(path)
    accelerator.load_state(str(path))
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
