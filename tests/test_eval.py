"""`vocalign eval` on a small list file: per-utterance CER/WER and SIM, and means equal to a hand computation."""

import csv
import json
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf

from vocalign.eval.seed_tts_eval import read_list, summarize
from vocalign.policies.checkpoints import write_tiny_checkpoint
from vocalign.rewards.base import Sample
from vocalign.rewards.scorer import build_plugin
from vocalign.rewards.text_norm import error_rate

from .conftest import REPO

pytestmark = pytest.mark.slow


def test_eval_cli_writes_per_utterance_scores_and_their_means(tmp_path):
    ckpt = write_tiny_checkpoint(tmp_path / "ckpt")
    t = np.arange(2 * 24000) / 24000
    for i, f0 in enumerate((150.0, 220.0)):
        sf.write(tmp_path / f"p{i}.wav", (0.2 * np.sin(2 * np.pi * f0 * t)).astype(np.float32), 24000)
    (tmp_path / "list.txt").write_text("u1|hello there|p0.wav|good morning to you\n"
                                       "u2|hello there|p1.wav|see you tomorrow\n")
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "-m", "vocalign.launch.cli", "eval", "--ckpt", str(ckpt), "--list",
                             str(tmp_path / "list.txt"), "--out", str(out), "--flow-steps", "2", "--seed", "0"],
                            cwd=REPO, check=False, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [r["utt"] for r in rows] == ["u1", "u2"] and all((out / "wavs" / f"{r['utt']}.wav").is_file() for r in rows)
    wer = [float(r["wer"]) for r in rows]
    sim = [float(r["sim"]) for r in rows]
    # each WER is that of the transcript it reports; each SIM is the cosine (not the reward (1 + cos) / 2) between
    # the written wav and its prompt, scored again here by the same plugin
    assert wer == [pytest.approx(error_rate(r["text"], r["transcript"], "en")) for r in rows]
    similarity = build_plugin({"name": "sim", "encoder": {"kind": "resemblyzer"}})  # as in rewards/eval_cpu.yaml
    for r, s in zip(rows, sim):
        wav, rate = sf.read(out / "wavs" / f"{r['utt']}.wav", dtype="float32")
        prompt, prompt_rate = sf.read(tmp_path / f"p{int(r['utt'][1:]) - 1}.wav", dtype="float32")
        again = similarity.score([Sample(wav, rate, r["text"], "en", prompt, prompt_rate)])[0]
        assert s == pytest.approx(again.info["cosine"], abs=0.02)  # the wav went through 16-bit PCM
    summary = json.loads((out / "summary.json").read_text())
    assert summary["wer"] == pytest.approx(sum(wer) / 2) and summary["sim"] == pytest.approx(sum(sim) / 2)
    assert "| wer |" in (out / "report.md").read_text()


def test_summary_by_hand_and_list_errors(tmp_path):
    rows = [{"cer": 0.1, "sim": 0.5}, {"cer": 0.3, "sim": 0.7, "emotion_correct": 1.0}, {"wer": 0.2}]
    assert summarize(rows) == pytest.approx({"cer": 0.2, "wer": 0.2, "sim": 0.6, "emotion_correct": 1.0})
    bad = tmp_path / "bad.txt"
    bad.write_text("only|three|fields\n")
    with pytest.raises(ValueError, match=r"bad\.txt:1: expected utt\|prompt_text\|prompt_wav\|text"):
        read_list(bad)
