"""A transcript with the time of each recognised word: what an ASR backend gives the CER reward to localise errors.

Its own module, importing nothing, because pocketsphinx's worker processes build these and must start fast.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TimedWord:
    """A recognised word and where it was heard, in seconds of the audio given to the recogniser."""

    word: str
    start_s: float
    end_s: float


@dataclass(frozen=True)
class TimedTranscript:
    text: str  # exactly what the backend's untimed transcription gives, so the scalar reward does not change
    words: tuple[TimedWord, ...]
