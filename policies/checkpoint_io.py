"""Strict, safe loading of raw torch state dicts (flow.pt, hift.pt): weights only, every key accounted for."""

from __future__ import annotations

from pathlib import Path

import torch


def _modern_weight_norm_name(key: str, expected: dict) -> str:
    """Checkpoints written with the old ``torch.nn.utils.weight_norm`` name its parts ``weight_g``/``weight_v``;
    the parametrized modules of current torch expect ``parametrizations.weight.original0``/``original1``."""
    for old, new in (("weight_g", "original0"), ("weight_v", "original1")):
        if key.endswith("." + old):
            modern = key[: -len(old)] + "parametrizations.weight." + new
            if modern in expected:
                return modern
    return key


def load_torch_state(module: torch.nn.Module, path: str | Path, ignore: tuple[str, ...] = ()) -> None:
    """Load ``path`` (a state dict, or a dict holding one under ``"model"`` or ``"state_dict"``) into ``module``.

    ``torch.load(weights_only=True)`` never runs pickled code. A missing, unexpected or misshapen key raises a
    ValueError naming the file and the key, instead of leaving a layer at its random initial value.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    state = torch.load(path, map_location="cpu", weights_only=True)
    for wrapper in ("model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    state = {k.removeprefix("module."): v for k, v in state.items() if not k.startswith(ignore)}
    expected = module.state_dict()
    state = {_modern_weight_norm_name(k, expected): v for k, v in state.items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{path} does not match the model: missing keys {missing[:5]}"
                         f"{' ...' if len(missing) > 5 else ''}, unexpected keys {unexpected[:5]}"
                         f"{' ...' if len(unexpected) > 5 else ''}")
    for key, value in state.items():
        if value.shape != expected[key].shape:
            raise ValueError(f"{path}: key {key!r} has shape {tuple(value.shape)}, the model expects "
                             f"{tuple(expected[key].shape)}")
    module.load_state_dict(state, strict=True)
