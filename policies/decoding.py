"""How the sampling loop runs the LM one token at a time: its KV cache and its per-token forward.

Two decoders behind one interface (:class:`Decoder`):

- :class:`DynamicDecoder`, HF's ``DynamicCache`` with the attention mask grown by a column per token: the reference,
  and what CPUs and DeepSpeed ZeRO-3 (whose every forward gathers parameters collectively) use.
- :class:`StaticDecoder`, a ``StaticCache`` preallocated for the prompt width plus the longest output, an additive
  4D attention mask in a fixed-size buffer and fixed-shape inputs updated in place. Every per-token forward then has
  the same shapes and memory addresses, so on CUDA it is captured once as a CUDA graph and replayed: a 28-layer
  Llama step is hundreds of kernel launches, and at GRPO batch sizes that launch overhead, not memory bandwidth,
  is what limits eager decoding.

Both can drop rows that have finished (:meth:`Decoder.keep`), so that they stop costing compute; a graphed decoder
captures a new graph at each batch size compaction leads to (the batch sizes halve, so there are few).
"""

from __future__ import annotations

from typing import Protocol

import torch
import transformers
from packaging.version import Version
from transformers import DynamicCache, StaticCache

from ..common.generation import left_padded_positions

# The forward's KV-cache argument: transformers 5.24 renamed ``past_key_values`` to ``cache`` (the old name warns,
# and goes in 5.40). Each decoder keeps the cache object it made: the forward fills it in place, whatever the
# output calls it.
CACHE_ARGUMENT = "cache" if Version(transformers.__version__) >= Version("5.24") else "past_key_values"
DECODINGS = ("auto", "dynamic", "static", "graph")
# attention implementations that take an additive 4D mask, which the static decoder builds itself
_MASKABLE_ATTENTION = ("sdpa", "eager")


class Decoder(Protocol):
    def prefill(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Run the left-padded prompts; logits ``[N, V]`` of the first new token."""

    def step(self, token: torch.Tensor) -> torch.Tensor:
        """Feed one token per row still decoding; logits ``[rows, V]`` of the next."""

    def keep(self, rows: torch.Tensor) -> None:
        """Go on with these rows only (indices into the rows decoding now, in order)."""


class DynamicDecoder:
    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model

    def prefill(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        self.attention = mask.long()
        position = left_padded_positions(mask)
        self.cache = DynamicCache(config=getattr(self.model, "config", None))
        out = self.model(input_ids=ids, attention_mask=self.attention, position_ids=position, use_cache=True,
                         logits_to_keep=1, **{CACHE_ARGUMENT: self.cache})
        self.position = position[:, -1:] + 1
        return out.logits[:, -1, :]

    def step(self, token: torch.Tensor) -> torch.Tensor:
        self.attention = torch.cat([self.attention, torch.ones_like(self.attention[:, :1])], dim=1)
        out = self.model(input_ids=token.unsqueeze(-1), attention_mask=self.attention, position_ids=self.position,
                         use_cache=True, **{CACHE_ARGUMENT: self.cache})
        self.position = self.position + 1
        return out.logits[:, -1, :]

    def keep(self, rows: torch.Tensor) -> None:
        self.cache.reorder_cache(rows)
        self.attention, self.position = self.attention[rows], self.position[rows]


class StaticDecoder:
    """Fixed-shape decoding; ``cuda_graph`` replays each step as a CUDA graph (CUDA only)."""

    def __init__(self, model: torch.nn.Module, max_new_tokens: int, cuda_graph: bool = False) -> None:
        implementation = getattr(model.config, "_attn_implementation", None)
        if implementation not in _MASKABLE_ATTENTION:
            raise ValueError(f"static-cache decoding needs an attention implementation that takes a 4D mask "
                             f"{_MASKABLE_ATTENTION}, the model uses {implementation!r}; use decoding='dynamic'")
        self.model, self.max_new_tokens, self.cuda_graph = model, max_new_tokens, cuda_graph
        self.dtype = model.get_input_embeddings().weight.dtype
        self.graph: torch.cuda.CUDAGraph | None = None
        self.pool = torch.cuda.graph_pool_handle() if cuda_graph else None

    def prefill(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        n, self.width = ids.shape
        length = self.width + self.max_new_tokens
        self.cache = StaticCache(config=self.model.config, max_cache_len=length)
        blocked = torch.finfo(self.dtype).min
        attend = mask.bool()
        # prompt query i sees prompt keys j <= i that are not padding, and always itself (a padding query that saw
        # nothing would give NaN keys and values, which a later 0 x NaN would spread)
        keys = torch.arange(length, device=ids.device)
        queries = torch.arange(self.width, device=ids.device)
        seen = (keys[None] <= queries[:, None])[None] & torch.nn.functional.pad(attend, (0, length - self.width))[:, None]
        seen |= (keys[None] == queries[:, None])[None]
        prefill_mask = torch.zeros(n, 1, self.width, length, dtype=self.dtype, device=ids.device)
        prefill_mask.masked_fill_(~seen[:, None], blocked)
        position = left_padded_positions(mask)
        out = self.model(input_ids=ids, attention_mask=prefill_mask, position_ids=position, use_cache=True,
                         logits_to_keep=1, **{CACHE_ARGUMENT: self.cache})
        # the buffers every step reads; updated in place so that a captured graph keeps reading them
        self.mask = torch.full((n, 1, 1, length), blocked, dtype=self.dtype, device=ids.device)
        self.mask[:, 0, 0, :self.width].masked_fill_(attend, 0.0)
        self.position = position[:, -1:] + 1
        self.token = torch.zeros(n, 1, dtype=torch.long, device=ids.device)
        self.steps_taken = 0
        return out.logits[:, -1, :]

    def _forward(self) -> torch.Tensor:
        return self.model(input_ids=self.token, attention_mask=self.mask, position_ids=self.position,
                          use_cache=True, **{CACHE_ARGUMENT: self.cache}).logits

    def step(self, token: torch.Tensor) -> torch.Tensor:
        if self.steps_taken >= self.max_new_tokens:
            raise RuntimeError(f"the static cache holds {self.max_new_tokens} new tokens; one more was fed")
        self.mask[:, :, :, self.width + self.steps_taken] = 0.0  # the slot this step's key and value go to
        self.token.copy_(token.unsqueeze(-1))
        if self.cuda_graph:
            if self.graph is None:
                self._capture()
            self.graph.replay()
            logits = self.logits
        else:
            logits = self._forward()
        self.position.add_(1)
        self.steps_taken += 1
        return logits[:, -1, :]

    def _capture(self) -> None:
        # Warm-up forwards (on a side stream, as capture requires) write this step's slot, which the replay
        # overwrites, and advance each layer's write position (transformers 5: ``cumulative_length``), which is
        # put back so the replay writes where the mask expects.
        positions = [layer.cumulative_length.clone() for layer in self.cache.layers]
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._forward()
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=self.pool):
            self.logits = self._forward()
        for layer, position in zip(self.cache.layers, positions, strict=True):
            layer.cumulative_length.copy_(position)

    def keep(self, rows: torch.Tensor) -> None:
        self.cache.reorder_cache(rows)  # new, smaller tensors: the next step captures a graph at this batch size
        self.mask, self.position, self.token = self.mask[rows], self.position[rows], self.token[rows]
        self.graph = None


def resolve_decoding(decoding: str, model: torch.nn.Module, device: torch.device, synced_processes: bool) -> str:
    """``auto``: CUDA graphs on CUDA; the dynamic cache on CPU, wherever processes decode in lockstep (ZeRO-3
    gathers parameters inside every forward, which a captured graph cannot do) and for attention implementations
    that take no 4D mask (flash attention)."""
    if decoding not in DECODINGS:
        raise ValueError(f"decoding must be one of {DECODINGS}, got {decoding!r}")
    if decoding == "auto":
        maskable = getattr(getattr(model, "config", None), "_attn_implementation", None) in _MASKABLE_ATTENTION
        return "graph" if device.type == "cuda" and not synced_processes and maskable else "dynamic"
    if decoding == "graph" and device.type != "cuda":
        raise ValueError(f"decoding='graph' needs a CUDA device, the model is on {device}; use 'static' or 'dynamic'")
    if decoding != "dynamic" and synced_processes:
        raise ValueError(f"decoding={decoding!r} cannot keep step with other processes (synced_processes, as under "
                         f"ZeRO-3); use 'dynamic'")
    return decoding


def make_decoder(decoding: str, model: torch.nn.Module, max_new_tokens: int) -> Decoder:
    """A decoder for a resolved ``decoding`` (:func:`resolve_decoding`)."""
    if decoding == "dynamic":
        return DynamicDecoder(model)
    return StaticDecoder(model, max_new_tokens, cuda_graph=decoding == "graph")
