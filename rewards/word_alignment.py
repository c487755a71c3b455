"""Where a transcript went wrong: align a timed hypothesis to the reference and give each error its time.

The CER reward's scalar says how much an utterance was misread; these spans say where, so that training can credit
the speech tokens that made the misread stretch of audio. The alignment is jiwer's (``process_words``), the same
one the scalar's error rate counts, over the same seed-tts-eval normalisation (:mod:`text_norm`).

Span values (the convention the trainer normalises within a group): a span's value is minus the word errors it
holds, so the values of an utterance sum to ``-(S + D + I)``, the error rate's numerator.

- a hypothesis word heard as the reference says: its time, value 0 (checked and right);
- a substituted or inserted hypothesis word: its time, value -1;
- a run of k deleted reference words: the gap where they should have been, between the neighbouring hypothesis
  words (from the audio's start or to its end at the edges), value -k. A gap shorter than :data:`MIN_SPAN_S` (the
  neighbours touch) cannot hold a span: the deletion is charged to the hypothesis word before it (after it, at the
  start), which is where the missing word's sound was swallowed.

What the recognisers give (each backend's module says how it gets them):

- pocketsphinx: word segments in 10 ms frames from its Viterbi search, exact for what it decoded;
- Whisper (transformers): word times from cross-attention (dynamic time warping over the alignment heads), good to
  about 0.1 s, sometimes overlapping their neighbours; overlaps are clipped here to keep spans apart;
- Paraformer (FunASR): a time per character from its CIF predictor's firing points.

Approximations: a recognised word whose normalised form is several tokens (Whisper's "twenty-five", a multi-character
Chinese word) has its time split evenly among them; a word shorter than :data:`MIN_SPAN_S` after clipping has its
value charged to its neighbour the same way a deletion with no gap is.
"""

from __future__ import annotations

from collections.abc import Sequence

import jiwer

from .base import Span
from .text_norm import normalize
from .timed_transcript import TimedWord

RIGHT, WRONG = 0.0, -1.0
MIN_SPAN_S = 0.01  # one pocketsphinx frame; below this a span would credit no speech token reliably


def _timed_tokens(words: Sequence[TimedWord], language: str, duration_s: float) -> list[tuple[str, float, float]]:
    """Normalised hypothesis tokens with times: clipped to the audio and to after the previous word, a word of k
    tokens split evenly in k."""
    tokens: list[tuple[str, float, float]] = []
    previous_end = 0.0
    for w in words:
        parts = normalize(w.word, language, hypothesis=True)
        if not parts:
            continue
        start = min(max(w.start_s, previous_end), duration_s)
        end = min(max(w.end_s, start), duration_s)
        step = (end - start) / len(parts)
        tokens.extend((p, start + k * step, start + (k + 1) * step) for k, p in enumerate(parts))
        previous_end = end
    return tokens


def error_spans(reference: str, words: Sequence[TimedWord], language: str, duration_s: float) -> list[Span]:
    """Spans (start_s, end_s, value) of ``duration_s`` seconds of audio whose timed transcript is ``words``; see the
    module docstring for the values. Sorted, non-overlapping, inside the audio."""
    ref = normalize(reference, language)
    tokens = _timed_tokens(words, language, duration_s)
    slots = [[start, end, RIGHT] for _, start, end in tokens]  # [start_s, end_s, value], made spans at the end
    if not ref:
        for slot in slots:
            slot[2] = WRONG  # every heard word is an insertion
    elif not tokens:
        slots = [[0.0, duration_s, -float(len(ref))]]
    else:
        gaps: list[list[float]] = []
        alignment = jiwer.process_words(" ".join(ref), " ".join(t for t, _, _ in tokens)).alignments[0]
        for chunk in alignment:
            if chunk.type in ("substitute", "insert"):
                for j in range(chunk.hyp_start_idx, chunk.hyp_end_idx):
                    slots[j][2] = WRONG
            elif chunk.type == "delete":
                j = chunk.hyp_start_idx  # the missing words belong before hypothesis token j
                start = slots[j - 1][1] if j > 0 else 0.0
                end = slots[j][0] if j < len(slots) else duration_s
                gaps.append([start, end, -float(chunk.ref_end_idx - chunk.ref_start_idx)])
        slots = sorted(slots + gaps, key=lambda s: (s[0], s[1]))
    return _charge_short_slots(slots)


def _charge_short_slots(slots: list[list[float]]) -> list[Span]:
    """Spans of the slots long enough to hold one; a short slot's value goes to the slot before it (after it, when
    first). With nothing long enough (the recogniser heard nothing timed), there are no spans."""
    spans: list[list[float]] = []
    carried = 0.0  # short slots' values met before the first long one
    for start, end, value in slots:
        if spans:  # a recogniser's words may overlap their neighbours' by a frame: spans must not
            start = max(start, spans[-1][1])
        if end - start >= MIN_SPAN_S:
            spans.append([start, end, value + carried])
            carried = 0.0
        elif spans:
            spans[-1][2] += value
        else:
            carried += value
    return [(float(s), float(e), float(v)) for s, e, v in spans]
