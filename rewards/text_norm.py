"""Text normalisation and error rates as seed-tts-eval computes them.

Punctuation (ASCII and CJK) is removed except the apostrophe, English is lower-cased and scored by words, Chinese
by characters, numbers are left alone (no number normalisation), and the Chinese hypothesis is converted from
traditional to simplified characters before comparison. The corpus figure is the mean of per-utterance rates.
"""

from __future__ import annotations

import re
import unicodedata

import jiwer

_KEEP = {"'"}


def strip_punctuation(text: str) -> str:
    return "".join(" " if unicodedata.category(ch).startswith("P") and ch not in _KEEP else ch for ch in text)


def to_simplified(text: str) -> str:
    import zhconv

    return zhconv.convert(text, "zh-cn")


def normalize(text: str, language: str, *, hypothesis: bool = False) -> list[str]:
    """Tokens to compare: characters for Chinese, lower-cased words otherwise."""
    if language == "zh" and hypothesis:
        text = to_simplified(text)
    text = strip_punctuation(text)
    if language == "zh":
        return [ch for ch in text if not ch.isspace()]
    return re.sub(r"\s+", " ", text.lower()).split()


def error_rate(reference: str, hypothesis: str, language: str) -> float:
    """CER for Chinese, WER otherwise; an empty reference scores 0 for an empty hypothesis, else 1 per token."""
    ref = normalize(reference, language)
    hyp = normalize(hypothesis, language, hypothesis=True)
    if not ref:
        return float(len(hyp) > 0)
    return float(jiwer.wer(" ".join(ref), " ".join(hyp))) if hyp else 1.0
