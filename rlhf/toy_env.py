"""A toy environment on the rollout contract: a tiny random Llama whose rewards are functions of its tokens.

It exists to show that the trainer learns (the tests assert the reward rises) and to benchmark a GRPO step against
TRL on equal terms. Two rewards exercise the multi-reward machinery: ``hits`` (share of completion tokens in a target
set, the one that matters) and ``sim`` (share of distinct tokens, a weakly weighted second reward named like the
speaker-similarity reward, which ``configs/grpo_toy.yaml`` leaves out of resampling as the GLM-TTS recipes do).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from ..policies.sampling import sample
from .rollout import RolloutEnv, Rollouts, SamplingParams, Scorer, Scores
from .token_credit import rollout_token_values


@dataclass
class ToyConfig:
    """The ``env`` section of ``name: toy``: the model's size and the prompts, all seeded."""

    vocab_size: int = 16  # token 0 is the stop (and padding) token
    hidden_size: int = 32  # the Llama model's width
    num_layers: int = 2  # its decoder layers
    num_heads: int = 4  # its attention heads
    prompt_length: int = 4  # tokens per prompt
    num_prompts: int = 64  # distinct prompts training draws from
    target_tokens: tuple[int, ...] = (1, 2, 3)  # the tokens `hits` rewards
    seed: int = 0  # the model's random weights and (with seed + 1) the prompts

    @property
    def stop_token_id(self) -> int:
        return 0  # also the padding id


def build_toy_model(cfg: ToyConfig) -> LlamaForCausalLM:
    """A tiny Llama with random weights (seeded); the same class the GLM-TTS speech LM uses."""
    torch.manual_seed(cfg.seed)
    config = LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.hidden_size * 2,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_heads,
        max_position_embeddings=128, pad_token_id=cfg.stop_token_id, eos_token_id=cfg.stop_token_id,
        bos_token_id=None, tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config)


def toy_tokenizer(vocab_size: int):
    """A word-level tokenizer over the toy vocabulary ("t1" .. "tN", "<pad>" = 0), for running TRL on the same
    model and prompts when comparing against it."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, **{f"t{i}": i for i in range(1, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<pad>")


def toy_prompts(cfg: ToyConfig) -> list[dict[str, list[int]]]:
    """Random prompts of non-stop tokens, seeded, as dataset rows."""
    g = torch.Generator().manual_seed(cfg.seed + 1)
    ids = torch.randint(1, cfg.vocab_size, (cfg.num_prompts, cfg.prompt_length), generator=g)
    return [{"prompt_ids": row.tolist()} for row in ids]


class ToyEnv(RolloutEnv):
    """Rollouts of a causal LM on fixed token prompts."""

    def __init__(self, cfg: ToyConfig) -> None:
        self.cfg = cfg

    def rollout(
        self, model: torch.nn.Module, prompts: Sequence[Mapping[str, list[int]]], num_generations: int,
        sampling: SamplingParams,
    ) -> Rollouts:
        if sampling.max_new_tokens is None:
            raise ValueError("the toy environment has no length bound of its own: set SamplingParams.max_new_tokens "
                             "(the trainer's max_completion_length)")
        device = next(model.parameters()).device
        ids = torch.tensor([p["prompt_ids"] for p in prompts], device=device).repeat_interleave(num_generations, 0)
        mask = torch.ones_like(ids)
        out = sample(
            model, ids, mask, max_new_tokens=sampling.max_new_tokens, min_new_tokens=sampling.min_new_tokens,
            stop_token_id=self.cfg.stop_token_id, pad_token_id=self.cfg.stop_token_id,
            temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p,
            synced_processes=sampling.synced_processes,
        )
        return Rollouts(ids, mask, out.tokens, out.mask, out.logps, num_generations, entropies=out.entropy,
                        stopped=out.stopped)

    def localise(self, rollouts: Rollouts, spans: Sequence[Sequence[tuple[float, float, float]]]
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """The toy's output is its tokens: span ``(a, b, v)`` covers completion tokens a to b - 1 (one per unit)."""
        return rollout_token_values(rollouts, spans, token_rate_hz=1.0)


class ToyScorer(Scorer):
    """Rewards computed from the sampled tokens alone."""

    reward_names = ("hits", "sim")

    def __init__(self, cfg: ToyConfig) -> None:
        self.targets = torch.tensor(cfg.target_tokens)

    def score(self, rollouts: Rollouts) -> Scores:
        """``hits`` says where, too: a span of value 1 on each target token, 0 on every other (one unit a token)."""
        tokens, mask = rollouts.completion_ids.cpu(), rollouts.completion_mask.cpu().bool()
        lengths = mask.sum(-1).clamp(min=1)
        on_target = torch.isin(tokens, self.targets) & mask
        hits = on_target.sum(-1) / lengths
        distinct = torch.tensor([len(set(row[m].tolist())) for row, m in zip(tokens, mask)]) / lengths
        spans = [[(float(t), float(t + 1), float(on_target[i, t])) for t in range(int(mask[i].sum()))]
                 for i in range(len(tokens))]
        return Scores({"hits": hits.tolist(), "sim": distinct.tolist()}, spans={"hits": spans})
