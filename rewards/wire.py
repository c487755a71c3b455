"""The reward server's wire format: JSON or msgpack, audio as little-endian PCM bytes, never pickle.

A sample is a mapping ``{"audio": bytes, "encoding": "f32"|"s16", "sample_rate": int, "text": str,
"language": str, "prompt_audio"?: bytes, "prompt_encoding"?, "prompt_sample_rate"?, "emotion"?, "fields"?: {name:
str | int | float}}`` (``fields``: the per-utterance values the served plugin declares, see
:func:`~.base.plugin_sample_fields`); JSON carries the bytes as base64 strings. A request is
``{"samples": [...], "upstream"?: {reward: [{"value", "info"}]}}``, a reply
``{"results": [{"value", "info", "spans"?: [[start_s, end_s, value]], "status"?, "reason"?}]}`` or
``{"error": str, "samples"?: [{"index", "reason"}]}``. A result without ``status`` is ok; one that is ``invalid``
(the policy's fault, valued at the reward's minimum) or ``failed`` (not scored, ``value`` null) says why in
``reason``.

Both ends read with the same strict checks: anything that does not follow the format raises :class:`WireError`
saying where, so a server answers 400 (never 500) and a client rejects a reply with the wrong number of results or a
value that is not a finite number.
"""

from __future__ import annotations

import base64
import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

import msgpack
import numpy as np

from .base import FAILED, INVALID, OK, STATUSES, RewardResult, Sample, Span, check_field_value, check_spans

JSON = "application/json"
MSGPACK = "application/msgpack"
_DTYPES = {"f32": "<f4", "s16": "<i2"}
MAX_LABEL_CHARS = 64  # a language or emotion label; a longer one is no label and would be echoed into replies and logs
MAX_REASON_CHARS = 500  # a result's or refusal's reason, cut so that no reason can grow a reply or a log line
MAX_FIELDS = 32  # per-utterance fields of one sample; a plugin reads a few
MAX_FIELD_CHARS = 1000  # a string field (a speaker id, a style description); the text has its own server limit
ENCODINGS = tuple(_DTYPES)


class WireError(ValueError):
    """A request or reply that does not follow the format; the message says where."""


def _pcm_bytes(audio: np.ndarray, encoding: str) -> bytes:
    if encoding == "s16":
        return (np.clip(audio, -1.0, 1.0) * 32767).astype("<i2").tobytes()
    return np.asarray(audio, dtype="<f4").tobytes()


def _pcm_array(data: Any, encoding: Any, where: str) -> np.ndarray:
    if not isinstance(encoding, str) or encoding not in _DTYPES:
        raise WireError(f"{where}: encoding must be one of {sorted(_DTYPES)}, got {encoding!r}")
    if isinstance(data, str):
        try:
            data = base64.b64decode(data, validate=True)
        except ValueError:
            raise WireError(f"{where}: audio is not valid base64") from None
    if not isinstance(data, (bytes, bytearray)):
        raise WireError(f"{where}: audio must be bytes (msgpack) or a base64 string (JSON)")
    width = np.dtype(_DTYPES[encoding]).itemsize
    if len(data) % width:
        raise WireError(f"{where}: {len(data)} audio bytes is not a whole number of {encoding} samples")
    audio = np.frombuffer(data, dtype=_DTYPES[encoding])
    return (audio.astype(np.float32) / 32768.0) if encoding == "s16" else audio.astype(np.float32)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def sample_to_wire(sample: Sample, encoding: str = "f32") -> dict[str, Any]:
    out: dict[str, Any] = {"audio": _pcm_bytes(sample.audio, encoding), "encoding": encoding,
                           "sample_rate": int(sample.sample_rate), "text": sample.text, "language": sample.language}
    if sample.prompt_audio is not None:
        out.update(prompt_audio=_pcm_bytes(sample.prompt_audio, encoding), prompt_encoding=encoding,
                   prompt_sample_rate=int(sample.prompt_sample_rate or 0))
    if sample.emotion is not None:
        out["emotion"] = sample.emotion
    if sample.fields:
        out["fields"] = dict(sample.fields)
    return out


def _fields_from_wire(raw: Any, where: str) -> dict[str, Any]:
    """A sample's ``fields``: at most :data:`MAX_FIELDS` names (labels) with strings of at most
    :data:`MAX_FIELD_CHARS`, integers or finite numbers; whether the served plugin declares them is the server's
    check (:func:`~.base.fields_for`)."""
    if raw is None:
        return {}
    if not isinstance(raw, Mapping) or len(raw) > MAX_FIELDS:
        raise WireError(f"{where}: 'fields' must be an object of at most {MAX_FIELDS} named values, got "
                        f"{raw!r:.100}")
    out = {}
    for name, value in raw.items():
        if not isinstance(name, str) or not 0 < len(name) <= MAX_LABEL_CHARS:
            raise WireError(f"{where}: a field name must be a string of 1 to {MAX_LABEL_CHARS} characters, got "
                            f"{name!r:.100}")
        kind = str if isinstance(value, str) else int if _is_int(value) else float
        try:
            out[name] = check_field_value(name, value, kind, where)
        except ValueError as err:
            raise WireError(f"{err} (a field is a string, an integer or a finite number)") from None
        if kind is str and len(value) > MAX_FIELD_CHARS:
            raise WireError(f"{where}: field {name!r} has {len(value)} characters; a field has at most "
                            f"{MAX_FIELD_CHARS}")
        if kind is int and abs(value) >= 2**63:
            raise WireError(f"{where}: field {name!r} is an integer beyond 64 bits")
    return out


def sample_from_wire(item: Any, index: int) -> Sample:
    where = f"sample {index}"
    if not isinstance(item, Mapping):
        raise WireError(f"{where} must be an object")
    for key in ("audio", "sample_rate", "text", "language"):
        if key not in item:
            raise WireError(f"{where}: missing field {key!r}")
    if not _is_int(item["sample_rate"]):
        raise WireError(f"{where}: field 'sample_rate' must be an integer, got {type(item['sample_rate']).__name__}")
    for key in ("text", "language"):
        if not isinstance(item[key], str):
            raise WireError(f"{where}: field {key!r} must be a string, got {type(item[key]).__name__}")
    emotion = item.get("emotion")
    if emotion is not None and not isinstance(emotion, str):
        raise WireError(f"{where}: field 'emotion' must be a string, got {type(emotion).__name__}")
    for key, label in (("language", item["language"]), ("emotion", emotion or "")):
        if len(label) > MAX_LABEL_CHARS:
            raise WireError(f"{where}: field {key!r} has {len(label)} characters; a label has at most "
                            f"{MAX_LABEL_CHARS}")
    prompt = None
    if item.get("prompt_audio") is not None:
        if not _is_int(item.get("prompt_sample_rate")):
            raise WireError(f"{where}: prompt_audio needs an integer prompt_sample_rate")
        prompt = _pcm_array(item["prompt_audio"], item.get("prompt_encoding", "f32"), f"{where} prompt")
    return Sample(audio=_pcm_array(item["audio"], item.get("encoding", "f32"), where),
                  sample_rate=item["sample_rate"], text=item["text"], language=item["language"],
                  prompt_audio=prompt, prompt_sample_rate=item.get("prompt_sample_rate"), emotion=emotion,
                  fields=_fields_from_wire(item.get("fields"), where))


def encode(payload: Mapping[str, Any], content_type: str) -> bytes:
    if content_type == MSGPACK:
        return msgpack.packb(payload, use_bin_type=True)

    def default(obj: Any) -> Any:
        if isinstance(obj, (bytes, bytearray)):
            return base64.b64encode(obj).decode("ascii")
        raise TypeError(f"cannot encode {type(obj).__name__}")

    return json.dumps(payload, default=default).encode()


def decode(body: bytes | bytearray, content_type: str) -> Any:
    what = "msgpack" if content_type == MSGPACK else "JSON"
    try:
        if content_type == MSGPACK:
            return msgpack.unpackb(body, raw=False, strict_map_key=True)
        return json.loads(body)
    except RecursionError:  # JSON nested deeper than the interpreter's stack (msgpack's own limit is a ValueError)
        raise WireError(f"body is not valid {what}: nested too deeply") from None
    except (ValueError, TypeError) as err:  # msgpack errors derive from ValueError
        raise WireError(f"body is not valid {what}: {err}") from None


def request_payload(samples: Sequence[Sample], upstream: Mapping[str, Sequence[RewardResult]] | None = None,
                    encoding: str = "f32") -> dict[str, Any]:
    payload: dict[str, Any] = {"samples": [sample_to_wire(s, encoding) for s in samples]}
    if upstream:
        payload["upstream"] = {k: results_to_wire(v) for k, v in upstream.items()}
    return payload


def results_to_wire(results: Sequence[RewardResult]) -> list[dict[str, Any]]:
    """Spans, and a status with its reason, go out only when a result has them, so an ok reply reads as it always
    did; a failed result's NaN value goes out as null (JSON has no NaN)."""
    return [{"value": None if r.status == FAILED else r.value, "info": r.info,
             **({"status": r.status, "reason": r.reason[:MAX_REASON_CHARS]} if r.status != OK else {}),
             **({"spans": [list(s) for s in r.spans]} if r.spans else {})}
            for r in results]


def _spans_from_wire(raw: Any, where: str) -> list[Span]:
    """A result's optional ``spans``: ``[[start_s, end_s, value], ...]``, checked as :func:`check_spans` checks them
    (the end bound waits for the sample's duration, which :func:`score_all` knows)."""
    if raw is None:
        return []
    if not isinstance(raw, list) or not all(isinstance(s, list) for s in raw):
        raise WireError(f"{where}: 'spans' must be a list of [start_s, end_s, value] lists, got {raw!r:.100}")
    spans = [tuple(s) for s in raw]
    try:
        check_spans(spans, None, where)
    except ValueError as err:
        raise WireError(str(err)) from None
    return [(float(a), float(b), float(v)) for a, b, v in spans]


def results_from_wire(rows: Any, n: int, where: str) -> list[RewardResult]:
    """Exactly ``n`` results, each with a finite number ``value`` and an object (or null) ``info``."""
    if not isinstance(rows, list) or len(rows) != n:
        got = f"{len(rows)} results" if isinstance(rows, list) else type(rows).__name__
        raise WireError(f"{where} must hold one result per sample ({n}), got {got}")
    out = []
    for i, row in enumerate(rows):
        status = row.get("status", OK) if isinstance(row, Mapping) else OK
        if status not in STATUSES:
            raise WireError(f"{where}: result {i} 'status' must be one of {list(STATUSES)}, got {status!r:.100}")
        if status == FAILED:
            out.append(RewardResult.failed(_reason(row.get("reason"), f"{where}: result {i}")))
            continue
        value = _finite(row.get("value") if isinstance(row, Mapping) else None)
        if value is None:
            raise WireError(f"{where}: result {i} must be an object with a finite number 'value', got {row!r:.100}")
        info = row.get("info")
        if info is not None and not isinstance(info, Mapping):
            raise WireError(f"{where}: result {i} 'info' must be an object, got {type(info).__name__}")
        out.append(RewardResult(value, dict(info or {}), status,
                                _reason(row.get("reason"), f"{where}: result {i}") if status == INVALID else "",
                                spans=_spans_from_wire(row.get("spans"), f"{where}: result {i}")))
    return out


def _finite(value: Any) -> float | None:
    """``value`` as a float if it is a finite number; an integer too large for a float is not one."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


def _reason(raw: Any, where: str) -> str:
    if not isinstance(raw, str) or not raw:
        raise WireError(f"{where}: a result that is not ok needs a 'reason' string, got {raw!r:.100}")
    return raw[:MAX_REASON_CHARS]


def upstream_from_wire(raw: Any, n: int) -> dict[str, list[RewardResult]]:
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise WireError("upstream must map reward names to result lists")
    return {name: results_from_wire(rows, n, f"upstream {name!r}") for name, rows in raw.items()}
