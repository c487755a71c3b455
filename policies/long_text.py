"""The LM prompt of one chunk of a long text, as the released GLM-TTS builds it (``glmtts_inference.py``).

Chunks are generated in turn. Each chunk's prompt carries the voice prompt and the earlier chunks still in the
history: their token ids exactly as they were fed (``prompt text + " "`` for the voice prompt, each chunk's own ids;
nothing is re-tokenised) and their speech tokens. Before a chunk, the history is pruned: with ``r`` = speech tokens
per text token over everything kept so far, the chunk is expected to need ``int(r * len(chunk ids))`` speech tokens,
and while the kept speech tokens plus that estimate exceed the budget (750), the oldest earlier chunk is dropped
(the voice prompt never is). Pruning is not undone: the caller keeps the pruned history, so a dropped chunk stays
dropped even when a later, shorter chunk would leave room for it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

MAX_PROMPT_TOKENS = 750


@dataclass(frozen=True)
class Turn:
    """Text token ids fed to the LM and the speech tokens (codes) that go with them."""

    text_ids: tuple[int, ...]
    codes: tuple[int, ...]

    @classmethod
    def of(cls, text_ids: Sequence[int], codes: Sequence[int]) -> Turn:
        return cls(tuple(text_ids), tuple(codes))


@dataclass(frozen=True)
class ChunkPrompt:
    """What the LM is given before a chunk's own text, and the history to carry on with."""

    text_ids: list[int]  # voice prompt text ids, then each kept chunk's ids
    codes: list[int]  # voice prompt codes, then each kept chunk's generated codes
    history: list[Turn]  # the earlier chunks kept; append this chunk's Turn to it for the next chunk


def chunk_prompt(voice: Turn, history: Sequence[Turn], chunk_ids: Sequence[int],
                 max_tokens: int = MAX_PROMPT_TOKENS) -> ChunkPrompt:
    """Prune ``history`` (earlier chunks, oldest first) for the chunk with ids ``chunk_ids`` and lay out the LM
    prompt. ``voice`` holds the ids of ``prompt_text + " "`` and the voice prompt's codes."""
    if max_tokens <= 0:
        raise ValueError(f"max_tokens must be positive, got {max_tokens}")
    kept = list(history)
    if kept:
        text_tokens = len(voice.text_ids) + sum(len(t.text_ids) for t in kept)
        ratio = (len(voice.codes) + sum(len(t.codes) for t in kept)) / (text_tokens or 1)
        expected = int(ratio * len(chunk_ids))
        while kept and len(voice.codes) + sum(len(t.codes) for t in kept) + expected > max_tokens:
            kept.pop(0)
    turns = [voice, *kept]
    return ChunkPrompt([i for t in turns for i in t.text_ids], [c for t in turns for c in t.codes], kept)
