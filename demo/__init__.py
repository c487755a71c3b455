"""The demo TTS vocalign ships: a small GLM-TTS-shaped model trained from espeak-ng, and its prompt sets.

``ckpt/`` (speech LM, tokenizer, mel-unit codec), ``prompts/`` (voice prompts, ``train.jsonl`` for GRPO,
``heldout.jsonl`` for evaluation) and ``provenance.json`` are package data, so an installed vocalign finds them.
:mod:`vocalign.demo.build` rebuilds them (``vocalign make-demo-tts configs/demo_tts.yaml``); recipes that only need
the paths import them from here without loading the builder.
"""

from importlib.resources import files
from pathlib import Path

DEMO_DIR = Path(str(files("vocalign.demo")))
DEMO_CKPT = DEMO_DIR / "ckpt"
DEMO_PROMPTS = DEMO_DIR / "prompts"
