"""Build FunASR models (Paraformer, emotion2vec) from their published folder layout, offline and strictly.

A published FunASR folder holds ``config.yaml`` (component names and their settings), ``model.pt`` (state dict)
and the files the config names (``tokens.json``/``tokens.txt``, ``am.mvn``). FunASR's own loader reaches for a
hub when given a name and silently skips mismatched weights; here the components are built from the config
through FunASR's registry and the weights are loaded strictly by :mod:`vocalign.common.weights`, so a wrong
or truncated checkpoint fails with the file and the key named.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from ..common.weights import load_torch_state

_FILE_KEYS = {("tokenizer_conf", "token_list"), ("frontend_conf", "cmvn_file")}


def _read_token_list(path: Path) -> list[str]:
    if path.suffix == ".json":
        return list(json.loads(path.read_text()))
    return [line.split()[0] for line in path.read_text().splitlines() if line.strip()]


def read_funasr_config(model_dir: str | Path) -> dict[str, Any]:
    """config.yaml with the file names it holds made absolute (token lists read in)."""
    model_dir = Path(model_dir)
    config_path = model_dir / "config.yaml"
    if not config_path.is_file():
        raise FileNotFoundError(f"{model_dir} is not a FunASR model folder: config.yaml is missing")
    config = yaml.safe_load(config_path.read_text())
    for section, key in _FILE_KEYS:
        value = (config.get(section) or {}).get(key)
        if isinstance(value, str):
            path = model_dir / value if not Path(value).is_absolute() else Path(value)
            if not path.is_file():
                raise FileNotFoundError(f"{config_path}: {section}.{key} names {value}, which is not in {model_dir}")
            config[section][key] = _read_token_list(path) if key == "token_list" else str(path)
    return config


def build_funasr(config: dict[str, Any], device: str = "cpu"):
    """A FunASR AutoModel from a config dict, random weights; nothing is downloaded."""
    from funasr import AutoModel

    settings = {k: v for k, v in config.items() if k not in ("init_param", "model_path")}
    return AutoModel(**settings, disable_update=True, disable_pbar=True, device=device)


def load_funasr_folder(model_dir: str | Path, device: str = "cpu"):
    """The published layout: build from config.yaml, then load model.pt strictly."""
    model_dir = Path(model_dir)
    auto = build_funasr(read_funasr_config(model_dir), device)
    load_torch_state(auto.model, model_dir / "model.pt")
    return auto
