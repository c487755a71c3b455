"""PocketSphinx, the recogniser that ships its US-English model inside its PyPI package: a weak but real judge that
runs with no hub, for the embedded CPU demo and for tests on real speech.

A pocketsphinx decoder carries state from one utterance to the next (the cepstral mean, feature buffers), so the
same audio can be transcribed differently depending on what was decoded before it (3 of 40 Griffin-Lim clips here).
A reward must be a function of its sample, so every utterance here starts from the decoder's initial state, which
gives exactly what a freshly loaded decoder gives, at ~8% more time.

A decoder holds the GIL while it decodes, so threads do not parallelise it; ``workers > 1`` decodes in that many
processes instead (each with its own decoder). On the demo's 2 cores that halves the CER reward's share of a GRPO
step. This module imports nothing heavier than numpy, so a worker process starts in a fraction of a second.
"""

from __future__ import annotations

import logging
import math
import multiprocessing
import os
import re
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

import numpy as np

from .timed_transcript import TimedTranscript, TimedWord

logger = logging.getLogger(__name__)
_PRONUNCIATION = re.compile(r"\(\d+\)$")  # "read(2)": the dictionary's second pronunciation of "read"


def _is_word(name: str) -> bool:
    """Not a filler: <s>, </s>, <sil>, [NOISE] and the like."""
    return not (name.startswith("<") or name.startswith("["))


def _make_decoder(vocabulary: Sequence[str] | None, jsgf: str | None, options: Mapping[str, Any]) -> Any:
    from pocketsphinx import Decoder

    try:
        decoder = Decoder(samprate=16000, logfn="/dev/null", **options)
    except (KeyError, ValueError) as err:  # an unknown option or a value of the wrong type
        raise ValueError(f"pocketsphinx rejected decoder_options {dict(options)}: {err}") from None
    if vocabulary:
        words = sorted({w.lower() for w in vocabulary})
        unknown = [w for w in words if decoder.lookup_word(w) is None]
        if unknown:
            raise ValueError(f"pocketsphinx's dictionary has no {unknown}; use words it knows or a jsgf grammar")
        grammar = "#JSGF V1.0;\ngrammar words;\npublic <utterance> = ( " + " | ".join(words) + " )+ ;\n"
        decoder.set_jsgf_string("words", grammar)
        decoder.activate_search("words")
    elif jsgf:
        decoder.set_jsgf_file("grammar", jsgf)
        decoder.activate_search("grammar")
    return decoder


class _Recogniser:
    """A decoder and its initial cepstral mean, restored with the feature state before every utterance."""

    def __init__(self, vocabulary: Sequence[str] | None, jsgf: str | None, options: Mapping[str, Any]) -> None:
        self.decoder = _make_decoder(vocabulary, jsgf, options)
        self.initial_cmn = self.decoder.get_cmn(False)

    def __call__(self, pcm: bytes) -> TimedTranscript:
        decoder = self.decoder
        decoder.reinit_feat()
        decoder.set_cmn(self.initial_cmn)
        decoder.start_utt()
        decoder.process_raw(pcm, full_utt=True)
        decoder.end_utt()
        hyp = decoder.hyp()
        if hyp is None:
            return TimedTranscript("", ())
        return TimedTranscript(hyp.hypstr, self._words())

    def _words(self) -> tuple[TimedWord, ...]:
        """The best path's words (silences, noises and sentence marks left out; ``word(2)``, an alternative
        pronunciation, read as ``word``), timed by their frames: a frame is 1/frate s, ``end_frame`` inclusive."""
        frame_s = 1.0 / float(self.decoder.config["frate"])
        return tuple(TimedWord(_PRONUNCIATION.sub("", seg.word), seg.start_frame * frame_s,
                               (seg.end_frame + 1) * frame_s)
                     for seg in self.decoder.seg() if _is_word(seg.word))


def _pcm(audio: np.ndarray) -> bytes:
    return (np.clip(audio, -1.0, 1.0) * 32767).astype("<i2").tobytes()


_worker_recogniser: _Recogniser | None = None  # a pool worker's own, made once by _start_worker


_OWNER_POLL_S = 0.5


def _start_worker(owner: int, vocabulary: Sequence[str] | None, jsgf: str | None,
                  options: Mapping[str, Any]) -> None:
    global _worker_recogniser
    threading.Thread(target=_exit_with_owner, args=(owner,), name="exit-with-owner", daemon=True).start()
    _worker_recogniser = _Recogniser(vocabulary, jsgf, options)


def _exit_with_owner(owner: int) -> None:
    """End this worker once the process that made the pool is gone, however that ended (SIGTERM, SIGKILL, a crash):
    the pool's own shutdown runs only when its owner exits cleanly, and neither the worker's parent (the forkserver)
    nor its work queue tells it otherwise, so a worker left waiting for work would hold its memory for good."""
    while True:
        time.sleep(_OWNER_POLL_S)
        try:
            os.kill(owner, 0)
        except ProcessLookupError:
            os._exit(0)


def _worker_decode(pcm: bytes) -> TimedTranscript:
    assert _worker_recogniser is not None, "_start_worker runs first in every pool worker"
    return _worker_recogniser(pcm)


def _worker_ready() -> None:
    """Nothing: submitted once per worker so that the pool starts its processes."""


class PocketSphinxASR:
    """Offline US-English recogniser with the acoustic model, LM and dictionary pocketsphinx ships.

    Its general-English language model is a weak judge of isolated words (word error rate about 1.0 on espeak-ng
    digit strings); restricted to a task's words it is a sharp one (about 0.2). ``vocabulary`` makes a grammar that
    accepts any sequence of the given words; ``jsgf`` loads a JSGF grammar file; without either the shipped LM is
    used.
    """

    times_words = True  # its word segmentation

    def __init__(self, vocabulary: Sequence[str] | None = None, jsgf: str | Path | None = None,
                 decoder_options: Mapping[str, Any] | None = None, workers: int = 1) -> None:
        """``decoder_options``: pocketsphinx settings, e.g. ``{beam: 1.0e-30, wbeam: 1.0e-20}`` (narrower beams than
        the defaults 1e-48 and 7e-29 decode a grammar of ten words 1.6x faster at the same error rate).
        ``workers``: processes that decode in parallel (1: decode in this process). The transcripts do not depend
        on it, nor on the order or company of the audio."""
        if vocabulary and jsgf:
            raise ValueError("give pocketsphinx either `vocabulary` or `jsgf`, not both")
        if jsgf and not Path(jsgf).is_file():
            raise FileNotFoundError(f"JSGF grammar {jsgf} does not exist")
        if not isinstance(workers, int) or workers < 1:
            raise ValueError(f"pocketsphinx workers must be a whole number >= 1 (processes), got {workers!r}")
        options = dict(decoder_options or {})
        if "samprate" in options or "logfn" in options:
            raise ValueError("pocketsphinx decoder_options cannot set samprate or logfn (16 kHz audio, no log file)")
        self._settings = (list(vocabulary) if vocabulary else None, str(jsgf) if jsgf else None, options)
        self.recogniser = _Recogniser(*self._settings)  # checks the settings here, before any worker starts
        self.workers = workers
        self._pool = self._start_pool() if workers > 1 else None

    def _start_pool(self) -> ProcessPoolExecutor:
        # forkserver: workers do not inherit this process's threads (torch's, a logger's), which fork would copy.
        # Like any forkserver or spawn pool, it imports the main script in each worker: a script that builds one
        # must keep its work under `if __name__ == "__main__":` (vocalign's CLI and pytest do).
        pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("forkserver"),
                                   initializer=_start_worker, initargs=(os.getpid(), *self._settings))
        for _ in range(self.workers):  # start them now, while the caller loads its models, not at the first batch
            pool.submit(_worker_ready)
        return pool

    def transcribe(self, audios: Sequence[np.ndarray]) -> list[str]:
        return [t.text for t in self.transcribe_timed(audios)]

    def transcribe_timed(self, audios: Sequence[np.ndarray]) -> list[TimedTranscript]:
        """Transcripts with each word's time (pocketsphinx's word segmentation, 10 ms frames)."""
        pcms = [_pcm(a) for a in audios]
        if self._pool is None:
            return [self.recogniser(pcm) for pcm in pcms]
        chunk = max(1, math.ceil(len(pcms) / (4 * self.workers)))  # a few chunks per worker evens out lengths
        try:
            return list(self._pool.map(_worker_decode, pcms, chunksize=chunk))
        except BrokenProcessPool:  # a worker was killed (out of memory, a signal): start afresh once
            logger.warning("a pocketsphinx worker process died; restarting %d workers and decoding the batch again",
                           self.workers)
            self._pool = self._start_pool()
            return list(self._pool.map(_worker_decode, pcms, chunksize=chunk))
