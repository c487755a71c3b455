"""The GLM-TTS rollout environment: prompts -> G speech-token samples each -> audio, with what rewards need.

The speech LM samples (with the trainer's policy, temperature and length bounds), then the codec's decoder (flow
matching and the vocoder for GLM-TTS) turns every sample into audio, all batched and kept in memory. Each sample's
extras hold the audio, its text, language, voice prompt and emotion, which is what
:class:`vocalign.rewards.scorer.RewardScorer` turns into reward plugin samples, and the codec's ``token_rate_hz`` and
``token_delay_s``, which map a reward's spans (seconds of that audio) to the sample's tokens
(:mod:`vocalign.rlhf.token_credit`).

Prompt rows come from a ``datasets`` source (JSON lines or parquet) with ``text``, ``language``, ``prompt_wav``
(a path, relative to the data file), ``prompt_text`` and an optional ``emotion``. Any other column is a
per-utterance field for the reward plugins that declare it (``sample_fields``, e.g. a ``target_pitch`` column for a
plugin declaring ``{"target_pitch": float}``): it reaches them in each sample's ``fields``, in-process or through a
reward server; a column that no plugin declares is refused when the rows load (:func:`load_prompt_rows`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..common.audio import check_audio_file, read_audio
from ..policies.codec import GLMTTSCodec, MelUnitCodec, SpeechCodec
from ..policies.pipeline import TTSPipeline, VoicePrompt
from ..rewards.base import Span, check_field_value, declared_sample_fields, describe_sample_fields
from .rollout import RolloutEnv, Rollouts, SamplingParams
from .token_credit import rollout_token_values

REQUIRED_COLUMNS = ("text", "language", "prompt_wav", "prompt_text")
ENV_COLUMNS = (*REQUIRED_COLUMNS, "emotion")  # what the environment reads itself; other columns are plugins' fields
# for people reading the file (the demo's builder names each prompt's espeak-ng voice): not refused, and passed to a
# plugin only if it declares one
DESCRIPTIVE_COLUMNS = ("voice",)


def row_fields(row: Mapping[str, Any]) -> dict[str, Any]:
    """The per-utterance fields of a prompt row: its columns the environment does not read, without empty cells
    (``datasets`` fills a column missing from some rows with None; a plugin needing it then says it is missing)."""
    return {key: value for key, value in row.items() if key not in ENV_COLUMNS and value is not None}


def check_row_fields(rows: Sequence[Mapping[str, Any]], plugins: Sequence[Any], where: str) -> None:
    """Raise a ``ValueError`` naming the column and what reads what, when ``rows`` have a column that neither the
    environment nor any of ``plugins`` reads (a misspelt field, or a plugin missing from the recipe), or when a row
    lacks a field a plugin declares or has one of the wrong type."""
    declared = declared_sample_fields(plugins)
    columns = dict.fromkeys(key for row in rows for key in row)
    unknown = [c for c in columns if c not in (*ENV_COLUMNS, *DESCRIPTIVE_COLUMNS) and c not in declared]
    if unknown:
        raise ValueError(f"{where}: column(s) {unknown} are read by no reward plugin; the environment reads "
                         f"{list(ENV_COLUMNS)} and the rewards declare the fields {{{describe_sample_fields(plugins)}}}. "
                         "Declare the column in a plugin's `sample_fields` (or the remote reward's `sample_fields` "
                         "setting), or remove it")
    for n, row in enumerate(rows):
        for name, kind in declared.items():
            if row.get(name) is None:
                raise ValueError(f"{where} row {n}: no value in column {name!r}, which a reward reads "
                                 f"({describe_sample_fields(plugins)}); every row needs it")
            check_field_value(name, row[name], kind, f"{where} row {n}")


def load_prompt_rows(path: str | Path, plugins: Sequence[Any] | None = None) -> list[dict[str, Any]]:
    """Rows of a JSON-lines or parquet prompt set, with ``prompt_wav`` made absolute; with the reward ``plugins``
    that will score them, checked against the fields those declare (:func:`check_row_fields`)."""
    from datasets import load_dataset
    from datasets.exceptions import DatasetGenerationError

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt data {path} does not exist")
    kind = "parquet" if path.suffix == ".parquet" else "json"
    try:
        rows = [dict(r) for r in load_dataset(kind, data_files=str(path), split="train")]
    except StopIteration:  # what `datasets` raises for an empty JSON-lines file
        rows = []
    except DatasetGenerationError as err:
        raise ValueError(f"prompt data {path} cannot be read: {_broken_json_line(path) or err.__cause__ or err}") \
            from None
    if not rows:
        raise ValueError(f"prompt data {path} holds no rows; every row needs {list(REQUIRED_COLUMNS)}")
    for n, row in enumerate(rows):
        missing = [c for c in REQUIRED_COLUMNS if not row.get(c)]
        if missing:
            raise ValueError(f"{path} row {n}: missing {missing}; every row needs {list(REQUIRED_COLUMNS)}")
        wrong = [c for c in (*REQUIRED_COLUMNS, "emotion") if row.get(c) is not None and not isinstance(row[c], str)]
        if wrong:
            raise ValueError(f"{path} row {n}: {wrong[0]} must be a string (quote it), got {row[wrong[0]]!r}")
        wav = Path(row["prompt_wav"])
        row["prompt_wav"] = str(wav if wav.is_absolute() else path.parent / wav)
    if plugins is not None:
        check_row_fields(rows, plugins, str(path))
    for wav in sorted({r["prompt_wav"] for r in rows}):  # at load, not at the first rollout
        try:
            check_audio_file(wav)
        except ValueError as err:
            raise ValueError(f"{path}: prompt_wav {err}") from None
    return rows


def token_timing(codec: SpeechCodec) -> dict[str, float]:
    """``{"token_rate_hz", "token_delay_s"}`` of the audio ``codec`` decodes: 25 Hz and no delay for both built-in
    codecs (see :mod:`vocalign.rlhf.token_credit` for why no delay); empty for a codec this does not know, whose
    samples then get no token-level credit."""
    if isinstance(codec, MelUnitCodec):
        return {"token_rate_hz": float(codec.units.cfg.code_rate), "token_delay_s": 0.0}
    if isinstance(codec, GLMTTSCodec):
        return {"token_rate_hz": float(codec.flow.cfg.input_frame_rate), "token_delay_s": 0.0}
    return {}


def _broken_json_line(path: Path) -> str | None:
    """Which line of a JSON-lines file is not JSON, and why (None when every line is, or the file is not lines)."""
    with path.open(encoding="utf-8", errors="replace") as lines:
        for n, line in enumerate(lines, 1):
            if line.strip():
                try:
                    json.loads(line)
                except json.JSONDecodeError as err:
                    return f"line {n} is not valid JSON ({err.msg}, column {err.colno}); each line holds one object"
    return None


class TTSEnv(RolloutEnv):
    def __init__(self, pipeline: TTSPipeline, flow_steps: int = 10) -> None:
        self.pipeline, self.flow_steps = pipeline, flow_steps
        self.token_timing = token_timing(pipeline.codec)
        self._voices: dict[tuple[str, str], VoicePrompt] = {}
        self._prompt_audio: dict[str, tuple[np.ndarray, int]] = {}
        self._timings: dict[str, float] = {}

    def _voice(self, row: Mapping[str, Any]) -> tuple[VoicePrompt, np.ndarray, int]:
        path = row["prompt_wav"]
        if path not in self._prompt_audio:
            self._prompt_audio[path] = read_audio(path)
        audio, rate = self._prompt_audio[path]
        key = (path, row["prompt_text"])
        if key not in self._voices:  # tokenising and embedding a prompt once per run is enough
            self._voices[key] = self.pipeline.prepare_prompt(audio, rate, row["prompt_text"])
        return self._voices[key], audio, rate

    def rollout(self, model: torch.nn.Module, prompts: Sequence[Mapping[str, Any]], num_generations: int,
                sampling: SamplingParams) -> Rollouts:
        voices = [self._voice(row) for row in prompts]
        t0 = time.perf_counter()
        ids, mask, sampled, codes = self.pipeline.generate_codes([r["text"] for r in prompts], [v[0] for v in voices],
                                                                 num_generations, sampling, model=model)
        t1 = time.perf_counter()
        per_sample = [v for v in voices for _ in range(num_generations)]
        audio = self.pipeline.codec.decode(codes, [v[0] for v in per_sample], self.flow_steps)
        self._timings = {"time/speech_lm_s": t1 - t0, "time/token_to_audio_s": time.perf_counter() - t1}
        rows = [r for r in prompts for _ in range(num_generations)]
        extras = [{"audio": a, "sample_rate": self.pipeline.sample_rate, "text": row["text"],
                   "language": row["language"], "prompt_audio": v[1], "prompt_sample_rate": v[2],
                   "emotion": row.get("emotion"), "fields": row_fields(row), **self.token_timing}
                  for a, row, v in zip(audio, rows, per_sample)]
        return Rollouts(ids.cpu(), mask.cpu(), sampled.tokens.cpu(), sampled.mask.cpu(), sampled.logps.cpu(),
                        num_generations, extras, entropies=sampled.entropy.cpu(), stopped=sampled.stopped.cpu())

    def metrics(self) -> dict[str, float]:
        """Seconds the latest rollout spent in the speech LM and in turning tokens into audio."""
        return dict(self._timings)

    def localise(self, rollouts: Rollouts, spans: Sequence[Sequence[Span]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Spans in seconds of each sample's audio -> per-token values and touched flags at the codec's token rate
        (:mod:`vocalign.rlhf.token_credit`)."""
        if not self.token_timing:
            raise NotImplementedError(f"{type(self.pipeline.codec).__name__} has no known token rate; token-level "
                                      "credit needs one (see tts_env.token_timing)")
        return rollout_token_values(rollouts, spans, self.token_timing["token_rate_hz"],
                                    self.token_timing["token_delay_s"])
