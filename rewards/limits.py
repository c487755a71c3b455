"""What one reward server lets its clients claim: the limits, their defaults and their checks, in one place.

Kept free of heavy imports so that the command line can offer every limit as a flag (``max_batch`` is
``--max-batch``) with its default and help, without loading aiohttp or numpy for every ``vocalign`` command.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

# Where the general defaults are wrong for the model a plugin serves. One model call runs to its end whatever
# happens meanwhile (a newer request waits for it, an abandoned one's call still runs), so a call must take seconds.
# The CER reward's default ASR is pocketsphinx on the CPU: measured here at up to 2 s per second of audio per worker
# on a busy core (10 s of noise: 19.8 s), so 5 s of audio a call (about 10 s of one worker, 5 s of two) and
# utterances of at most 20 s; the general 320 s would hold the model for minutes. GPU models (sim, emotion) score
# 320 s of audio in about a second and keep the general defaults.
PLUGIN_LIMITS: Mapping[str, Mapping[str, float]] = {
    "cer": {"max_batch_audio_s": 5.0, "max_audio_seconds": 20.0},
}


def _limit(default: float, text: str, zero_ok: bool = False) -> Any:
    return field(default=default, metadata={"help": text, "zero_ok": zero_ok})


@dataclass(frozen=True)
class ServerLimits:
    max_batch: int = _limit(32, "samples per model call")
    max_batch_audio_s: float = _limit(
        320.0, "seconds of audio (and prompt audio) per model call; a long request is scored over several calls, "
               "with other requests' samples in between (cer: 5)")
    max_wait_ms: float = _limit(5.0, "longest wait for a batch to fill", zero_ok=True)
    max_request_mb: float = _limit(64.0, "request body size; larger requests get 413 before their body is read")
    max_inflight_mb: float = _limit(
        256.0, "request bodies held at once (being read, decoded or queued); further requests wait for room, so "
               "memory stays bounded (peak RSS is about 4x this, plus the model)")
    max_samples_per_request: int = _limit(256, "samples in one request (413 beyond)")
    max_queued_samples: int = _limit(2048, "samples waiting to be scored; beyond it a request gets 503 at once, "
                                           "so its client tries another server")
    max_audio_seconds: float = _limit(60.0, "length of one utterance; a longer one is scored invalid (cer: 20)")
    max_text_chars: int = _limit(2000, "characters of one sample's text (422 naming the sample beyond)")
    body_timeout_s: float = _limit(30.0, "longest wait for room for a request body, then longest time to receive "
                                         "it (503, 408); a stalled upload cannot hold a connection")
    header_timeout_s: float = _limit(10.0, "longest a connection stays open without a complete request (half-sent "
                                           "headers, an idle keep-alive), so connections cannot pile up")
    max_connections: int = _limit(
        512, "connections open at once, lowered to fit the open-file limit (ulimit -n); at the cap, the one open "
             "longest without a request in progress makes room for a newcomer")
    upload_idle_s: float = _limit(5.0, "longest pause in an upload once its bytes are reserved (408): a client that "
                                       "sends a little and stops holds room in max_inflight_mb this long at most")

    def __post_init__(self) -> None:
        for limit in fields(self):
            value, zero_ok = getattr(self, limit.name), limit.metadata["zero_ok"]
            kind = int if isinstance(limit.default, int) else (int, float)
            if (not isinstance(value, kind) or isinstance(value, bool) or not math.isfinite(value)
                    or value < 0 or (value == 0 and not zero_ok)):
                raise ValueError(f"server limit {limit.name} must be {'an integer' if kind is int else 'a number'} "
                                 f"{'>=' if zero_ok else '>'} 0, got {value!r}")
        if self.max_inflight_mb < self.max_request_mb:
            raise ValueError(f"max_inflight_mb ({self.max_inflight_mb:g}) must be at least max_request_mb "
                             f"({self.max_request_mb:g}): a request of the largest size must fit")
        if self.max_queued_samples < self.max_samples_per_request:
            raise ValueError(f"max_queued_samples ({self.max_queued_samples}) must be at least "
                             f"max_samples_per_request ({self.max_samples_per_request})")

    @classmethod
    def for_plugin(cls, name: str, **given: Any) -> ServerLimits:
        """The limits for serving plugin ``name``: ``given`` ones, else the plugin's own (:data:`PLUGIN_LIMITS`),
        else the general defaults."""
        return cls(**{**PLUGIN_LIMITS.get(name, {}), **given})

    @property
    def max_request_bytes(self) -> int:
        return int(self.max_request_mb * 2**20)

    @property
    def max_inflight_bytes(self) -> int:
        return int(self.max_inflight_mb * 2**20)
