"""Alignment check: does the CER reward's span marked wrong fall on the word that was actually wrong?

Why: token-level credit is only as good as the times the CER reward gives its errors; a span on the wrong word
would push the policy away from speech that was right. Here the truth is known by construction: a digit string
(the demo's domain: 3-6 of zero..nine) is spoken by espeak-ng (the demo's voices, 150 words/min) with one word
replaced by another digit or one digit inserted, and the altered word is rendered on its own between forced
silences (``--pad-s``), so its true time is where its own audio is loud (frames within 40 dB of its peak). The
reward is the demo's: pocketsphinx restricted to the ten digits, the demo's beams, scoring the altered audio against
the unaltered text. A case is a hit when some span with a negative value overlaps the true word's time.

An inserted digit is never the same as a neighbour: "one two two three" against "one two three" is ambiguous (either
"two" is the extra one), which no aligner can settle.

``--codec`` passes every utterance through the demo TTS's codec (mel units and Griffin-Lim, 25 Hz codes), so the
recogniser hears what the demo policy's speech sounds like; the codec keeps time, so the true word times hold.

Reported: the hit rate (target >= 90%), per alteration; how often pocketsphinx heard the altered text exactly; the
mean number of negative spans per utterance that miss the true word (false alarms, mostly the recogniser's own
errors elsewhere); the mean share of an utterance's audio marked wrong (marking everything would hit every time: this
says how much narrower the spans are).

Run: .venv/bin/python bench/span_alignment.py [--n 60] [--seed 0] [--codec] [--quick]   (--quick: 8 utterances)
"""

from __future__ import annotations

import argparse
import io
import json
import random
import subprocess
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import soundfile as sf

from vocalign.common.audio import to_model_rate
from vocalign.policies.mel_units import MelUnits
from vocalign.rewards.base import Sample
from vocalign.rewards.cer import CERReward
from vocalign.rewards.pocketsphinx_asr import PocketSphinxASR

DIGITS = "zero one two three four five six seven eight nine".split()
VOICES = ["en-us+klatt", "en-us+f4", "en-us+m5", "en-us+david"]
SPEED = 150  # espeak-ng words per minute, as the demo speaks
QUIET_DB = 40.0  # a frame more than this below the altered word's loudest frame is silence around it
FRAME_S = 0.005
DEMO_UNITS = Path(__file__).resolve().parents[1] / "demo" / "ckpt" / "mel_units"


@dataclass(frozen=True)
class Case:
    reference: str  # what the reward compares with
    spoken: str  # what was said: the reference with one word replaced or inserted
    kind: str  # "replace" | "insert"
    audio: np.ndarray
    sample_rate: int
    word_start_s: float  # where the altered word is loud
    word_end_s: float


def speak(text: str, voice: str) -> tuple[np.ndarray, int]:
    wav = subprocess.run(["espeak-ng", "-v", voice, "-s", str(SPEED), "--stdout", text],
                         check=True, capture_output=True).stdout
    audio, rate = sf.read(io.BytesIO(wav), dtype="float32")
    return audio, rate


def loud_interval(audio: np.ndarray, rate: int) -> tuple[float, float]:
    """Start and end (s) of the frames within :data:`QUIET_DB` of the loudest one."""
    hop = int(FRAME_S * rate)
    frames = audio[: len(audio) // hop * hop].reshape(-1, hop)
    level = 10 * np.log10(np.mean(frames ** 2, axis=1) + 1e-12)
    loud = np.flatnonzero(level > level.max() - QUIET_DB)
    return loud[0] * FRAME_S, (loud[-1] + 1) * FRAME_S


def make_case(rng: random.Random, voice: str, pad_s: float) -> Case:
    words = [rng.choice(DIGITS) for _ in range(rng.randint(3, 6))]
    kind = rng.choice(["replace", "insert"])
    if kind == "replace":
        position = rng.randrange(len(words))
        altered = rng.choice([d for d in DIGITS if d != words[position]])
        before, after = words[:position], words[position + 1:]
    else:
        position = rng.randint(0, len(words))
        neighbours = set(words[max(0, position - 1):position + 1])
        altered = rng.choice([d for d in DIGITS if d not in neighbours])
        before, after = words[:position], words[position:]
    pieces, rate = [], None
    for text in (" ".join(before), altered, " ".join(after)):
        if text:
            audio, rate = speak(text, voice)
            pieces.append(audio)
        else:
            pieces.append(np.zeros(0, np.float32))
    silence = np.zeros(int(pad_s * rate), np.float32)
    head = np.concatenate([pieces[0], silence]) if before else np.zeros(0, np.float32)
    start, end = loud_interval(pieces[1], rate)
    offset = len(head) / rate
    audio = np.concatenate([head, pieces[1], silence if after else np.zeros(0, np.float32), pieces[2]])
    return Case(" ".join(words), " ".join(before + [altered] + after), kind, audio, rate, offset + start,
                offset + end)


def make_cases(n: int, seed: int = 0, pad_s: float = 0.25) -> list[Case]:
    rng = random.Random(seed)
    return [make_case(rng, VOICES[i % len(VOICES)], pad_s) for i in range(n)]


def through_demo_codec(cases: list[Case]) -> list[Case]:
    """The cases as the demo's codec renders them: 16 kHz, encoded to mel units and decoded by Griffin-Lim."""
    units = MelUnits.load(DEMO_UNITS)
    rate = units.cfg.sample_rate
    return [replace(c, audio=units.decode(units.encode(to_model_rate(c.audio, c.sample_rate, rate))), sample_rate=rate)
            for c in cases]


def demo_cer_reward() -> CERReward:
    """The demo recipe's CER reward (configs/grpo_demo_cpu.yaml), in this process."""
    return CERReward(transcribers={"en": PocketSphinxASR(vocabulary=DIGITS,
                                                         decoder_options={"beam": 1e-30, "wbeam": 1e-20})})


def measure(cases: list[Case], reward: CERReward) -> dict[str, float]:
    results = reward.score([Sample(c.audio, c.sample_rate, c.reference, "en") for c in cases])
    hits: dict[str, list[bool]] = {"replace": [], "insert": []}
    false_alarms, heard_exactly, marked_share = 0, 0, 0.0
    for case, result in zip(cases, results, strict=True):
        wrong = [(s, e) for s, e, v in result.spans if v < 0]
        on_word = [s < case.word_end_s and e > case.word_start_s for s, e in wrong]
        hits[case.kind].append(any(on_word))
        false_alarms += on_word.count(False)
        heard_exactly += result.info["transcript"] == case.spoken
        marked_share += sum(e - s for s, e in wrong) / (len(case.audio) / case.sample_rate)
    every = hits["replace"] + hits["insert"]
    return {"cases": len(cases), "hit_rate": float(np.mean(every)),
            "hit_rate_replace": float(np.mean(hits["replace"])) if hits["replace"] else float("nan"),
            "hit_rate_insert": float(np.mean(hits["insert"])) if hits["insert"] else float("nan"),
            "heard_exactly": heard_exactly / len(cases), "false_alarms_per_utterance": false_alarms / len(cases),
            "share_of_audio_marked_wrong": marked_share / len(cases)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=60, help="utterances (at least 50 for the check)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pad-s", type=float, default=0.25, help="silence each side of the altered word")
    parser.add_argument("--codec", action="store_true", help="through the demo TTS's codec (Griffin-Lim speech)")
    parser.add_argument("--quick", action="store_true", help="8 utterances, a smoke run")
    args = parser.parse_args()
    n = 8 if args.quick else args.n
    t0 = time.perf_counter()
    cases = make_cases(n, args.seed, args.pad_s)
    if args.codec:
        cases = through_demo_codec(cases)
    figures = measure(cases, demo_cer_reward())
    figures["seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
