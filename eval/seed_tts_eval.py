"""seed-tts-eval-compatible evaluation of a checkpoint: synthesise a list file, score, report.

List lines are ``utt|prompt_text|prompt_wav|text`` (seed-tts-eval's format; ``prompt_wav`` relative to the list
file), optionally ``|emotion`` for CV3-eval-style emotion accuracy. CER (Chinese) or WER (otherwise) and SIM are
computed per utterance by the reward plugins and reported as the mean of per-utterance values, as seed-tts-eval does;
emotion accuracy is the share of utterances whose predicted emotion is the intended one.
"""

from __future__ import annotations

import csv
import json
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from ..common.audio import read_audio, write_audio
from ..policies.pipeline import SynthesisSettings, TTSPipeline
from ..rewards.base import RewardPlugin, Sample, score_all
from .heldout import role_plugins, role_value

logger = logging.getLogger(__name__)


@dataclass
class EvalItem:
    utt: str
    prompt_text: str
    prompt_wav: Path
    text: str
    emotion: str | None = None

    @property
    def language(self) -> str:
        return "zh" if re.search(r"[\u4e00-\u9fff]", self.text) else "en"


def read_list(path: str | Path) -> list[EvalItem]:
    path = Path(path)
    items = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split("|")
        if len(fields) not in (4, 5):
            raise ValueError(f"{path}:{n}: expected utt|prompt_text|prompt_wav|text[|emotion], got {len(fields)} fields")
        wav = Path(fields[2])
        items.append(EvalItem(fields[0], fields[1], wav if wav.is_absolute() else path.parent / wav, fields[3],
                              fields[4] if len(fields) == 5 and fields[4] else None))
    if not items:
        raise ValueError(f"{path} lists no utterances")
    return items


def summarize(rows: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Means over utterances of every per-utterance metric present (None values are skipped)."""
    keys = [k for k in ("cer", "wer", "sim", "emotion_correct") if any(r.get(k) is not None for r in rows)]
    return {k: float(np.mean([r[k] for r in rows if r.get(k) is not None])) for k in keys}


def evaluate(pipeline: TTSPipeline, items: Sequence[EvalItem], plugins: Sequence[RewardPlugin], out_dir: str | Path,
             settings: SynthesisSettings = SynthesisSettings()) -> tuple[list[dict[str, Any]], dict[str, float]]:
    out_dir = Path(out_dir)
    (out_dir / "wavs").mkdir(parents=True, exist_ok=True)
    roles = role_plugins(plugins)  # CER/WER and SIM from the plugins in those roles, whatever they are called
    rows = []
    for item in tqdm(items, desc="eval", unit="utt"):
        audio, rate = read_audio(item.prompt_wav)
        prompt = pipeline.prepare_prompt(audio, rate, item.prompt_text)
        wav = pipeline.synthesize(item.text, prompt, settings)
        write_audio(out_dir / "wavs" / f"{item.utt}.wav", wav, pipeline.sample_rate)
        sample = Sample(wav, pipeline.sample_rate, item.text, item.language, audio, rate, item.emotion)
        results = {name: r[0] for name, r in score_all(plugins, [sample]).items()}
        row: dict[str, Any] = {"utt": item.utt, "language": item.language, "text": item.text,
                               "seconds": len(wav) / pipeline.sample_rate}
        if "error_rate" in roles:
            name, key = roles["error_rate"]
            row["transcript"] = results[name].info.get("transcript", "")
            row["cer" if item.language == "zh" else "wer"] = role_value(results[name], name, key, "error_rate", f"utterance {item.utt}")
        if "similarity" in roles:
            name, key = roles["similarity"]
            row["sim"] = role_value(results[name], name, key, "similarity", f"utterance {item.utt}")
        if "emotion" in results and item.emotion:
            row["emotion_predicted"] = results["emotion"].info.get("predicted")
            row["emotion_correct"] = float(str(row["emotion_predicted"]).split("/")[-1].lower() == item.emotion.lower())
        rows.append(row)
    means = summarize(rows)
    write_report(rows, means, out_dir)
    return rows, means


def write_report(rows: Sequence[Mapping[str, Any]], means: Mapping[str, float], out_dir: Path) -> None:
    columns = list(dict.fromkeys(k for r in rows for k in r))
    with (out_dir / "results.csv").open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        writer.writerows(rows)
    (out_dir / "summary.json").write_text(json.dumps(means, indent=2))
    lines = ["# Evaluation", "", f"{len(rows)} utterances; means of per-utterance values.", "",
             "| metric | mean |", "|---|---|"]
    lines += [f"| {k} | {v:.4f} |" for k, v in means.items()]
    lines += ["", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(r.get(c)) for c in columns) + " |" for r in rows]
    (out_dir / "report.md").write_text("\n".join(lines) + "\n", encoding="utf-8")


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return "" if value is None else str(value).replace("|", "/")
