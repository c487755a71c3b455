"""Batched autoregressive sampling with a KV cache, returning the log-probs of what was sampled.

One loop serves every prompt and every generation of a GRPO batch at once (the released GLM-TTS code samples one
sequence at a time). Each row has its own minimum and maximum length, because GLM-TTS bounds the speech length by
the text length. The reported log-probs are those of ``softmax(logits / T)`` over the whole vocabulary, the same
quantity the trainer recomputes, so the first PPO ratio is exactly 1; top-k, top-p, the minimum-length stop mask
and the allowed-token mask shape what is drawn but not the reported probability (TRL makes the same choice).
"""

from __future__ import annotations

from dataclasses import dataclass

import itertools

import torch
import torch.distributed as dist
from transformers import DynamicCache


@dataclass(frozen=True)
class RepetitionAwareSampling:
    """RAS (VALL-E 2 / CosyVoice): if the drawn token already fills more than ``window * tau`` of the last
    ``window`` tokens, draw again from the untruncated distribution to break loops of one speech token."""

    window: int = 10
    tau: float = 0.1


@dataclass
class Sampled:
    tokens: torch.Tensor  # [N, C] right-padded with pad_token_id
    mask: torch.Tensor  # [N, C] 1 for sampled tokens (the stop token included)
    logps: torch.Tensor  # [N, C] float32, 0 where mask is 0
    stopped: torch.Tensor  # [N] bool: the row ended with the stop token (not by max length)


def filter_logits(logits: torch.Tensor, top_k: int | None, top_p: float | None) -> torch.Tensor:
    """Top-k then nucleus filtering; removed entries become -inf."""
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        remove_sorted = cumulative - sorted_logits.softmax(-1) >= top_p  # keep the token that crosses top_p
        remove = remove_sorted.scatter(-1, order, remove_sorted)
        logits = logits.masked_fill(remove, float("-inf"))
    return logits


def _as_row_tensor(value: int | torch.Tensor, n: int, device: torch.device) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        if value.shape != (n,):
            raise ValueError(f"per-row lengths must have shape ({n},), got {tuple(value.shape)}")
        return value.to(device=device, dtype=torch.long)
    return torch.full((n,), int(value), dtype=torch.long, device=device)


def _any_process_running(running: bool, device: torch.device, synced: bool) -> bool:
    if not (synced and dist.is_available() and dist.is_initialized()):
        return running
    flag = torch.tensor(1.0 if running else 0.0, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.SUM)
    return flag.item() > 0


@torch.no_grad()
def sample(
    model: torch.nn.Module,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    *,
    max_new_tokens: int | torch.Tensor,
    min_new_tokens: int | torch.Tensor = 0,
    stop_token_id: int | None,
    pad_token_id: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    allowed_tokens: torch.Tensor | None = None,
    ras: RepetitionAwareSampling | None = None,
    synced_processes: bool = False,
    generator: torch.Generator | None = None,
) -> Sampled:
    """Sample continuations of left-padded prompts.

    ``allowed_tokens`` is a ``[V]`` bool mask of what may be drawn (the speech LM allows speech tokens and the stop
    token only). ``synced_processes`` keeps every process stepping until all are done, which DeepSpeed ZeRO-3 needs
    because each forward gathers parameters collectively.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    n, device = prompt_ids.shape[0], prompt_ids.device
    max_len = _as_row_tensor(max_new_tokens, n, device)
    min_len = _as_row_tensor(min_new_tokens, n, device)
    if (min_len > max_len).any():
        raise ValueError("min_new_tokens exceeds max_new_tokens for some rows")
    steps = int(max_len.max().item()) if n else 0

    attention = prompt_mask.long()
    position = (attention.cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache(config=getattr(model, "config", None))
    out = model(input_ids=prompt_ids, attention_mask=attention, position_ids=position,
                past_key_values=cache, use_cache=True, logits_to_keep=1)
    next_position = position[:, -1:] + 1

    tokens, logps, masks = [], [], []
    finished = max_len <= 0
    stopped = torch.zeros(n, dtype=torch.bool, device=device)
    for t in itertools.count():
        if t >= steps and not synced_processes:
            break
        logits = out.logits[:, -1, :].float() / temperature
        full_logp = logits.log_softmax(-1)
        drawable = logits
        if allowed_tokens is not None:
            drawable = drawable.masked_fill(~allowed_tokens.to(device), float("-inf"))
        if stop_token_id is not None:
            too_short = (t < min_len).unsqueeze(-1)
            stop_column = torch.zeros_like(drawable, dtype=torch.bool)
            stop_column[:, stop_token_id] = True
            drawable = drawable.masked_fill(too_short & stop_column, float("-inf"))
        probs = filter_logits(drawable, top_k, top_p).softmax(-1)
        token = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
        if ras is not None and tokens:
            recent = torch.stack(tokens[-ras.window:], dim=1)
            repeats = (recent == token.unsqueeze(-1)).sum(-1)
            loop = repeats >= max(1, int(ras.window * ras.tau))
            if loop.any():
                fallback = torch.multinomial(drawable.softmax(-1), 1, generator=generator).squeeze(-1)
                token = torch.where(loop, fallback, token)
        token = torch.where(finished, torch.full_like(token, pad_token_id), token)
        tokens.append(token)
        logps.append(torch.where(finished, 0.0, full_logp.gather(-1, token.unsqueeze(-1)).squeeze(-1)))
        masks.append((~finished).long())
        if stop_token_id is not None:
            stopped |= ~finished & (token == stop_token_id)
        finished = finished | stopped | (t + 1 >= max_len)
        if not _any_process_running(not bool(finished.all()), device, synced_processes):
            break
        attention = torch.cat([attention, torch.ones_like(attention[:, :1])], dim=1)
        out = model(input_ids=token.unsqueeze(-1), attention_mask=attention, position_ids=next_position,
                    past_key_values=out.past_key_values, use_cache=True)
        next_position = next_position + 1

    if not tokens:
        empty = torch.zeros(n, 0, dtype=torch.long, device=device)
        return Sampled(empty, empty.clone(), empty.float(), stopped)
    mask = torch.stack(masks, 1)
    width = int(mask.sum(-1).max().item()) if n else 0  # steps taken only to keep other processes company
    return Sampled(torch.stack(tokens, 1)[:, :width], mask[:, :width], torch.stack(logps, 1)[:, :width], stopped)
