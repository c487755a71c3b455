"""Loading a Hugging Face audio model and its feature extractor, shared by the reward backends."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def load_audio_model(auto_class: str, model: str | Path | None, device: str,
                     parts: tuple[Any, Any] | None = None) -> tuple[Any, Any]:
    """``(model, feature_extractor)`` from a folder or hub id, or ``parts`` already built (a tiny random model in
    tests), moved to ``device`` in eval mode. ``auto_class`` names a transformers Auto class."""
    import transformers

    if parts is not None:
        built, extractor = parts
    else:
        if model is None:
            raise ValueError(f"give a model folder or hub id for the {auto_class} backend")
        extractor = transformers.AutoFeatureExtractor.from_pretrained(str(model))
        built = getattr(transformers, auto_class).from_pretrained(str(model))
    return built.to(device).eval(), extractor
