"""LoRA voice customisation: supervised fine-tuning of the speech LM on one speaker's (text, speech) pairs.

The report trains a "premium voice" by fine-tuning a LoRA adapter (plus embeddings and LM head) on recordings of
one speaker. Each example is laid out as the speech LM reads it at inference, without a voice prompt:
``[text, <|begin_of_audio|>, speech tokens, <|user|>]``, and the loss covers the speech tokens and the stop token.
Recordings are tokenised by the checkpoint's own speech tokenizer; the result is a peft adapter folder that
``TTSPipeline.from_pretrained(..., adapter=...)`` loads.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from ..common.audio import read_audio
from ..common.settings import apply_overrides, from_dict, load_yaml
from ..policies.pipeline import TTSPipeline
from ..policies.speech_lm import TTSPrompt
from ..rlhf.config import LoraSettings, wrap_lora

logger = logging.getLogger(__name__)


@dataclass
class SFTConfig:
    ckpt: str = "ckpt"  # a GLM-TTS checkpoint folder in the release's layout (its speech tokenizer encodes the audio)
    data: str = "data/voice.jsonl"  # rows: {"text": ..., "audio": path relative to the file}
    output_dir: str = "runs/lora_voice"  # adapter/ (a peft folder) and sft_summary.json go here
    trust_remote_code: bool = False  # let transformers run code shipped with the checkpoint
    seed: int = 0  # LoRA initialisation and batch order
    epochs: int = 3  # passes over the rows
    batch_size: int = 4  # examples per optimizer step
    learning_rate: float = 1e-4  # AdamW
    weight_decay: float = 0.0  # AdamW's decoupled weight decay
    max_grad_norm: float = 1.0  # gradients clipped to this global norm (0: not clipped)
    lora: LoraSettings = field(default_factory=lambda: LoraSettings(
        r=8, lora_alpha=16, lora_dropout=0.1, modules_to_save=["embed_tokens", "lm_head"]))


def load_voice_data(path: str | Path, pipeline: TTSPipeline) -> list[tuple[list[int], list[int]]]:
    """(input ids, labels) per example, laid out without a voice prompt; labels are -100 on the text part."""
    path = Path(path)
    examples = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        row = json.loads(line)
        if not row.get("text") or not row.get("audio"):
            raise ValueError(f"{path}:{n}: every row needs `text` and `audio`")
        wav = Path(row["audio"]) if Path(row["audio"]).is_absolute() else path.parent / row["audio"]
        codes = pipeline.codec.tokenize(*read_audio(wav))
        examples.append(pipeline.lm.training_example(TTSPrompt(pipeline.text_input(row["text"]), "", []), codes))
    if not examples:
        raise ValueError(f"{path} holds no examples")
    return examples


Example = tuple[list[int], list[int]]


def collate(batch: Sequence[Example], pad: int) -> dict[str, torch.Tensor]:
    """Right-padded ids, labels (-100 on padding) and attention mask."""
    width = max(len(ids) for ids, _ in batch)
    ids = torch.full((len(batch), width), pad, dtype=torch.long)
    labels = torch.full((len(batch), width), -100, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, (x, y) in enumerate(batch):
        ids[i, : len(x)], labels[i, : len(y)], mask[i, : len(x)] = torch.tensor(x), torch.tensor(y), 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def shuffled_batches(examples: Sequence[Example], batch_size: int, seed: int) -> Iterator[list[Example]]:
    """Endless batches, each epoch a fresh seeded permutation (a last short batch is kept)."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(len(examples), generator=generator).tolist()
        for start in range(0, len(order), batch_size):
            yield [examples[i] for i in order[start:start + batch_size]]


def sft_step(model: torch.nn.Module, batch: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer,
             accelerator: Accelerator, max_grad_norm: float,
             lr_scheduler: torch.optim.lr_scheduler.LRScheduler | None = None) -> float:
    """One optimizer step of next-token cross-entropy on the labelled positions; returns the loss."""
    loss = model(**{k: v.to(accelerator.device) for k, v in batch.items()}).loss
    accelerator.backward(loss)
    if max_grad_norm > 0:
        accelerator.clip_grad_norm_(model.parameters(), max_grad_norm)
    optimizer.step()
    optimizer.zero_grad()
    if lr_scheduler is not None:
        lr_scheduler.step()
    return loss.item()


def train_voice(cfg: SFTConfig) -> dict[str, Any]:
    set_seed(cfg.seed)
    accelerator = Accelerator()
    pipeline = TTSPipeline.from_pretrained(cfg.ckpt, trust_remote_code=cfg.trust_remote_code)
    examples = load_voice_data(cfg.data, pipeline)
    model = wrap_lora(pipeline.lm.model, cfg.lora)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    logger.info("training %d of %d parameters (%.1f%%)", trainable, total, 100 * trainable / total)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.learning_rate,
                                  weight_decay=cfg.weight_decay)
    model, optimizer = accelerator.prepare(model, optimizer)
    steps = cfg.epochs * math.ceil(len(examples) / cfg.batch_size)
    batches = shuffled_batches(examples, cfg.batch_size, cfg.seed)
    model.train()
    losses = [sft_step(model, collate(next(batches), pipeline.lm.vocab.pad), optimizer, accelerator,
                       cfg.max_grad_norm)
              for _ in tqdm(range(steps), desc="sft", disable=not accelerator.is_local_main_process)]
    out = Path(cfg.output_dir) / "adapter"
    accelerator.unwrap_model(model).save_pretrained(str(out), is_main_process=accelerator.is_main_process)
    summary = {"adapter": str(out), "trainable_parameters": trainable, "total_parameters": total,
               "first_loss": losses[0], "last_loss": losses[-1], "steps": len(losses)}
    if accelerator.is_main_process:
        (Path(cfg.output_dir) / "sft_summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def load_sft_config(path: str | Path, overrides: Mapping[str, Any] | None = None) -> SFTConfig:
    """The SFT file with ``overrides`` (dotted keys, e.g. ``epochs`` or ``lora.r``) applied."""
    data = apply_overrides(load_yaml(path), (overrides or {}).items())
    config = from_dict(SFTConfig, data, "sft")
    if not config.learning_rate > 0 or config.epochs < 1 or config.batch_size < 1:
        raise ValueError("learning_rate must be > 0, epochs and batch_size >= 1")
    return config
