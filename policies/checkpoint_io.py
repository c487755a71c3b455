"""Strict, safe loading of state dicts: weights only, every key accounted for, the file and key named on error.

Used for every checkpoint that is not a Hugging Face folder (flow.pt, hift.pt, FunASR's model.pt, the speaker
verifier) and for the speech tokenizer's safetensors. A missing, unexpected or misshapen key raises a ValueError
instead of leaving a layer at its random initial value, which is what a non-strict load silently does.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """``torch.load(weights_only=True)`` (never runs pickled code); unwraps ``{"model"|"state_dict": ...}`` and
    DataParallel's ``module.`` prefix."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    state = torch.load(path, map_location="cpu", weights_only=True)
    for wrapper in ("model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    return {k.removeprefix("module."): v for k, v in state.items()}


def _modern_weight_norm_name(key: str, expected: Mapping[str, torch.Tensor]) -> str:
    """Checkpoints written with the old ``torch.nn.utils.weight_norm`` name its parts ``weight_g``/``weight_v``;
    the parametrized modules of current torch expect ``parametrizations.weight.original0``/``original1``."""
    for old, new in (("weight_g", "original0"), ("weight_v", "original1")):
        if key.endswith("." + old):
            modern = key[: -len(old)] + "parametrizations.weight." + new
            if modern in expected:
                return modern
    return key


def load_strict(module: torch.nn.Module, state: Mapping[str, torch.Tensor], source: str | Path) -> None:
    expected = module.state_dict()
    state = {_modern_weight_norm_name(k, expected): v for k, v in state.items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{source} does not match the model: missing keys {missing[:5]}"
                         f"{' ...' if len(missing) > 5 else ''}, unexpected keys {unexpected[:5]}"
                         f"{' ...' if len(unexpected) > 5 else ''}")
    for key, value in state.items():
        if value.shape != expected[key].shape:
            raise ValueError(f"{source}: key {key!r} has shape {tuple(value.shape)}, the model expects "
                             f"{tuple(expected[key].shape)}")
    module.load_state_dict(state, strict=True)


def load_torch_state(module: torch.nn.Module, path: str | Path) -> None:
    load_strict(module, read_state_dict(path), path)
