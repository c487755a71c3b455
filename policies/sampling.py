"""Batched autoregressive sampling with a KV cache, returning the log-probs of what was sampled.

One loop serves every prompt and every generation of a GRPO batch at once (the released GLM-TTS code samples one
sequence at a time). Each row has its own minimum and maximum length, because GLM-TTS bounds the speech length by
the text length. The reported log-probs are those of ``softmax(logits / T)`` over the whole vocabulary, the same
quantity the trainer recomputes, so the first PPO ratio is exactly 1; top-k, top-p, the minimum-length stop mask
and the optional allowed-token mask shape what is drawn but not the reported probability (TRL makes the same choice).
What is drawn follows the released nucleus sampling (cosyvoice ``nucleus_sampling`` + ``ras_sampling``), so a policy
is trained on the distribution it was tuned with.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..common.generation import SamplingParams
from .decoding import make_decoder, resolve_decoding

RELEASED_SAMPLING = SamplingParams(temperature=1.0, top_k=25, top_p=0.8)  # the released GLM-TTS inference defaults


@dataclass(frozen=True)
class RepetitionAwareSampling:
    """RAS (VALL-E 2 / CosyVoice): if the drawn token already occurs at least ``window * tau`` times among the last
    ``window`` tokens, draw again from the untruncated distribution to break loops of one speech token. With the
    released defaults a single earlier occurrence is enough."""

    window: int = 10
    tau: float = 0.1


@dataclass
class Sampled:
    tokens: torch.Tensor  # [N, C] right-padded with pad_token_id
    mask: torch.Tensor  # [N, C] 1 for sampled tokens (the stop token included)
    logps: torch.Tensor  # [N, C] float32, 0 where mask is 0
    stopped: torch.Tensor  # [N] bool: the row ended with the stop token (not by max length)
    entropy: torch.Tensor  # [N, C] float32: entropy of softmax(logits / T) where each token was drawn, 0 where mask is 0


def filter_logits(logits: torch.Tensor, top_k: int | None, top_p: float | None) -> torch.Tensor:
    """Keep the released nucleus of each row; removed entries become -inf.

    As in GLM-TTS (cosyvoice ``nucleus_sampling``): tokens are ranked by probability (ties by index), and the i-th
    is kept while fewer than ``top_k`` are kept and the probability mass of those kept before it, under the *full*
    distribution, is still below ``top_p``; so the token that crosses ``top_p`` is kept. Renormalising inside the
    top-k before accumulating (the order of HF's warpers) reaches ``top_p`` sooner and keeps fewer tokens.
    """
    k = logits.shape[-1] if top_k is None or top_k <= 0 else min(top_k, logits.shape[-1])
    p = 1.0 if top_p is None else top_p
    if k == logits.shape[-1] and p >= 1.0:
        return logits
    probs, order = logits.softmax(-1).sort(dim=-1, descending=True, stable=True)
    mass_before = F.pad(probs[..., :-1], (1, 0)).cumsum(-1)
    rank = torch.arange(logits.shape[-1], device=logits.device)
    keep_sorted = (rank < k) & ((mass_before < p) | (rank == 0))
    keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
    return logits.masked_fill(~keep, float("-inf"))


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


def _draw(logits: torch.Tensor, temperature: float, min_len: torch.Tensor, t: int, stop_token_id: int | None,
          top_k: int | None, top_p: float | None, allowed_tokens: torch.Tensor | None,
          ras: RepetitionAwareSampling | None, recent: torch.Tensor
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One token per row, its log-prob under ``softmax(logits / T)`` and that distribution's entropy (the
    exploration figure GRPO users read first, free here since the log-probs are at hand), with no host
    synchronisation (RAS's fallback is drawn for every row and used where a loop is detected, rather than asking
    the device whether any row loops)."""
    logits = logits.float() / temperature
    full_logp = logits.log_softmax(-1)
    probs = full_logp.exp()
    entropy = -(probs * full_logp.masked_fill(probs == 0, 0.0)).sum(-1)
    drawable = logits
    if allowed_tokens is not None:
        drawable = drawable.masked_fill(~allowed_tokens, float("-inf"))
    if stop_token_id is not None:
        too_short = (t < min_len).unsqueeze(-1)
        stop_column = torch.zeros_like(drawable, dtype=torch.bool)
        stop_column[:, stop_token_id] = True
        drawable = drawable.masked_fill(too_short & stop_column, float("-inf"))
    token = torch.multinomial(filter_logits(drawable, top_k, top_p).softmax(-1), 1).squeeze(-1)
    if ras is not None:
        loop = (recent == token.unsqueeze(-1)).sum(-1) >= ras.window * ras.tau
        fallback = torch.multinomial(drawable.softmax(-1), 1).squeeze(-1)
        token = torch.where(loop, fallback, token)
    return token, full_logp.gather(-1, token.unsqueeze(-1)).squeeze(-1), entropy


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
    decoding: str = "auto",
    compact_finished: bool | None = None,
) -> Sampled:
    """Sample continuations of left-padded prompts.

    ``allowed_tokens`` is an optional ``[V]`` bool mask of what may be drawn (the released GLM-TTS draws from the
    whole vocabulary; :class:`~vocalign.policies.speech_lm.SpeechLM` can restrict it to speech tokens and the stop
    token). ``synced_processes`` keeps every process stepping until all are done, which DeepSpeed ZeRO-3 needs
    because each forward gathers parameters collectively. ``decoding`` picks the KV cache and step
    (:mod:`vocalign.policies.decoding`; ``auto``: CUDA graphs on CUDA, else the dynamic cache).
    ``compact_finished`` drops finished rows from the batch once at most half of it is still decoding (default: with
    the static cache); rows then draw from a smaller batch, so their random numbers differ from an uncompacted run.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    n, device = prompt_ids.shape[0], prompt_ids.device
    max_len = _as_row_tensor(max_new_tokens, n, device)
    min_len = _as_row_tensor(min_new_tokens, n, device)
    if (min_len > max_len).any():
        raise ValueError("min_new_tokens exceeds max_new_tokens for some rows")
    steps = int(max_len.max().item()) if n else 0
    decoding = resolve_decoding(decoding, model, device, synced_processes)
    compact = decoding != "dynamic" if compact_finished is None else compact_finished
    # asking the device whether rows are left is a host synchronisation; on CUDA it is done every few tokens
    check_every = 8 if device.type == "cuda" and not synced_processes else 1
    if allowed_tokens is not None:
        allowed_tokens = allowed_tokens.to(device)

    decoder = make_decoder(decoding, model, steps)
    logits = decoder.prefill(prompt_ids, prompt_mask) if steps or synced_processes else None
    rows = torch.arange(n, device=device)  # the rows the decoder still runs, in its order
    tokens, logps, entropies, masks = [], [], [], []
    finished = max_len <= 0
    stopped = torch.zeros(n, dtype=torch.bool, device=device)
    for t in itertools.count():
        if t >= steps and not synced_processes:
            break
        window = ras.window if ras is not None else 0
        recent = torch.stack(tokens[-window:], dim=1)[rows] if tokens and window else rows.new_empty(len(rows), 0)
        token, logp, entropy = _draw(logits, temperature, min_len[rows], t, stop_token_id, top_k, top_p, allowed_tokens,
                            ras, recent)
        done = finished[rows]
        token = torch.where(done, pad_token_id, token)
        tokens.append(torch.full((n,), pad_token_id, dtype=torch.long, device=device).index_copy(0, rows, token))
        logps.append(torch.zeros(n, device=device).index_copy(0, rows, torch.where(done, 0.0, logp)))
        entropies.append(torch.zeros(n, device=device).index_copy(0, rows, torch.where(done, 0.0, entropy)))
        masks.append(torch.zeros(n, dtype=torch.long, device=device).index_copy(0, rows, (~done).long()))
        if stop_token_id is not None:
            stopped[rows] |= ~done & (token == stop_token_id)
        finished[rows] = done | stopped[rows] | (t + 1 >= max_len[rows])
        if t + 1 >= steps and not synced_processes:
            break
        if t % check_every == check_every - 1:
            running = ~finished[rows]
            left = int(running.sum().item())
            if not _any_process_running(left > 0, device, synced_processes):
                break
            if compact and 0 < left <= len(rows) // 2:
                kept = running.nonzero().squeeze(-1)
                decoder.keep(kept)
                rows, token = rows[kept], token[kept]
        logits = decoder.step(token)

    if not tokens:
        empty = torch.zeros(n, 0, dtype=torch.long, device=device)
        return Sampled(empty, empty.clone(), empty.float(), stopped, empty.float())
    mask = torch.stack(masks, 1)
    width = int(mask.sum(-1).max().item()) if n else 0  # steps taken only to keep other processes company
    return Sampled(torch.stack(tokens, 1)[:, :width], mask[:, :width], torch.stack(logps, 1)[:, :width], stopped,
                   torch.stack(entropies, 1)[:, :width])
