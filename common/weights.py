"""State dicts read safely and loaded strictly.

``torch.load(weights_only=True)`` never runs pickled code. A missing, unexpected or misshapen key raises a ValueError
naming the file and the key, instead of leaving a layer at its random initial value, which is what a non-strict load
silently does. torch is imported when a state dict is read, so importing this module costs nothing.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """``torch.load(weights_only=True)`` (never runs pickled code); unwraps ``{"model"|"state_dict": ...}`` and
    DataParallel's ``module.`` prefix."""
    import torch

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
    """Load ``state`` into ``module`` only if every key matches in name and shape; ``source`` names it on error."""
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
    """A ``.pt`` state dict file into ``module``, strictly."""
    load_strict(module, read_state_dict(path), path)
