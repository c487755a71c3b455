"""Text normalisation and long-text splitting for GLM-TTS input.

Normalisation is deliberately conservative (the speech LM was trained on lightly normalised text): full-width ASCII
becomes half-width, runs of whitespace collapse, invisible characters go. Numbers are left for the model.
Long text is split at sentence punctuation into chunks of about 30-60 characters, the size the model was trained
on; a chunk never ends inside a word.
"""

from __future__ import annotations

import re
import unicodedata

_INVISIBLE = re.compile(r"[\u200b-\u200f\u2028-\u202f\ufeff]")
_SENTENCE_END = re.compile(r"(?<=[。！？!?；;…])|(?<=\.)(?=\s)")
_CLAUSE_END = re.compile(r"(?<=[，,、：:])")


def is_chinese(ch: str) -> bool:
    return "\u4e00" <= ch <= "\u9fff" or "\u3400" <= ch <= "\u4dbf"


def normalize_text(text: str) -> str:
    text = _INVISIBLE.sub("", text)
    # NFKC maps full-width Latin letters and digits to ASCII but keeps CJK punctuation as it is
    text = "".join(unicodedata.normalize("NFKC", ch) if "\uff01" <= ch <= "\uff5e" and ch.isalnum() else ch
                   for ch in text)
    return re.sub(r"\s+", " ", text).strip()


def join_text(left: str, right: str) -> str:
    """No space after Chinese text or CJK punctuation, one space otherwise."""
    last = left[-1:]
    return left + right if is_chinese(last) or unicodedata.east_asian_width(last) in ("W", "F") else f"{left} {right}"


def split_text(text: str, min_chars: int = 30, max_chars: int = 60) -> list[str]:
    """Greedy packing of sentences (then clauses, for over-long sentences) into chunks of at most ``max_chars``
    characters; a trailing chunk shorter than ``min_chars`` joins its neighbour when that stays within the bound.
    """
    text = normalize_text(text)
    if not text:
        return []
    pieces: list[str] = []
    for sentence in filter(None, (s.strip() for s in _SENTENCE_END.split(text))):
        if len(sentence) <= max_chars:
            pieces.append(sentence)
        else:
            pieces.extend(filter(None, (c.strip() for c in _CLAUSE_END.split(sentence))))
    chunks: list[str] = []
    for piece in pieces:
        if chunks and len(join_text(chunks[-1], piece)) <= max_chars:
            chunks[-1] = join_text(chunks[-1], piece)
        else:
            chunks.append(piece)
    if len(chunks) > 1 and len(chunks[-1]) < min_chars and len(join_text(chunks[-2], chunks[-1])) <= max_chars:
        tail = chunks.pop()
        chunks[-1] = join_text(chunks[-1], tail)
    return chunks
