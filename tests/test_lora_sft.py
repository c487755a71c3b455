"""LoRA voice SFT trains a tiny speech LM for a few steps and saves an adapter the pipeline loads."""

import json
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
import torch

from vocalign.policies.checkpoints import write_tiny_checkpoint
from vocalign.policies.pipeline import SynthesisSettings, TTSPipeline
from vocalign.sft.finetune import load_sft_config

from .conftest import REPO

pytestmark = pytest.mark.slow


def test_lora_sft_adapter_trains_and_loads(tmp_path):
    ckpt = write_tiny_checkpoint(tmp_path / "ckpt")
    t = np.arange(24000) / 24000
    rows = []
    for i, text in enumerate(["good morning", "see you soon", "thank you very much", "how are you"]):
        sf.write(tmp_path / f"v{i}.wav", (0.2 * np.sin(2 * np.pi * (140 + 10 * i) * t)).astype(np.float32), 24000)
        rows.append({"text": text, "audio": f"v{i}.wav"})
    (tmp_path / "voice.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "sft"
    result = subprocess.run([sys.executable, "-m", "vocalign.launch.cli", "sft", str(REPO / "configs/lora_voice.yaml"),
                             "--set", f"ckpt={ckpt}", "--set", f"data={tmp_path / 'voice.jsonl'}",
                             "--set", f"output_dir={out}", "--set", "trust_remote_code=false", "--set", "epochs=8",
                             "--set", "batch_size=2", "--set", "learning_rate=3e-3"],
                            cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "sft_summary.json").read_text())
    assert summary["steps"] == 16 and summary["last_loss"] < summary["first_loss"]
    assert (out / "adapter" / "adapter_config.json").is_file()
    assert (out / "adapter" / "adapter_model.safetensors").is_file()

    base = TTSPipeline.from_pretrained(ckpt)
    voiced = TTSPipeline.from_pretrained(ckpt, adapter=out / "adapter")
    changed = [n for n, p in voiced.lm.model.named_parameters()
               if not torch.equal(p, dict(base.lm.model.named_parameters())[n])]
    assert changed and not any("lora" in n for n in dict(voiced.lm.model.named_parameters()))  # merged
    prompt = voiced.prepare_prompt(np.sin(2 * np.pi * 150 * t).astype(np.float32) * 0.2, 24000, "hello")
    assert len(voiced.synthesize("good morning", prompt, SynthesisSettings(flow_steps=1))) > 0


def test_sft_config_errors(tmp_path):
    with pytest.raises(ValueError, match=r"unknown key\(s\) in sft: 'epoch' \(did you mean 'epochs'\?\)"):
        load_sft_config(REPO / "configs/lora_voice.yaml", {"epoch": 2})
