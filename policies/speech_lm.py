"""Stage 1 of GLM-TTS: a Llama LM that continues text + a voice prompt's speech tokens with new speech tokens.

Input layout (no BOS): ``[prompt text + " ", target text, <|begin_of_audio|>, prompt speech tokens]``; the model
then emits speech tokens until ``<|user|>``. The stop token is masked until the output has twice as many tokens as
the target text, and generation stops at twenty times. As released, the whole vocabulary may be drawn: a non-speech
token does not stop generation and stays in the LM's context (the release prints a warning and hands ``token -
<|audio_0|>`` to the flow, which fails on it); ``speech_only`` restricts draws to speech tokens and the stop token,
which an untrained LM (the tiny checkpoint) needs. Sampling is batched over every prompt and generation (see
:mod:`sampling`), and returns the log-probs the GRPO trainer needs.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import LlamaForCausalLM, PreTrainedTokenizerBase

from ..common.generation import SamplingParams
from .frontend.tokenizer import SpeechVocab, load_tokenizer
from .sampling import RELEASED_SAMPLING, RepetitionAwareSampling, Sampled, sample

logger = logging.getLogger(__name__)

NUM_CODES = 32768
# Key of ``llm/generation_config.json`` that makes a checkpoint sample speech tokens (and the stop token) only;
# the released checkpoint has none, so it samples the whole vocabulary as released.
SPEECH_ONLY_KEY = "sample_speech_only"
# Key of the same file for repetition-aware sampling: {"window": W, "tau": T}, or null for none. Absent (the released
# checkpoint): the released RAS. Codes that repeat by nature (the demo's mel units hold a vowel over several codes)
# need it off: there RAS replaces every natural repeat by a draw from the untruncated distribution.
RAS_KEY = "repetition_aware_sampling"
RELEASED_RAS = RepetitionAwareSampling()  # window 10, tau 0.1


@dataclass
class TTSPrompt:
    text: str  # what to say (normalised, possibly hybrid phoneme+text)
    prompt_text: str  # transcript of the voice prompt
    prompt_codes: Sequence[int]  # speech tokens of the voice prompt (0 .. num_codes-1)
    # token ids to use instead of tokenising ``prompt_text + " "``: a long text's chunk carries earlier chunks'
    # ids as they were fed (see :mod:`vocalign.policies.long_text`)
    prompt_text_ids: Sequence[int] | None = None


@dataclass(frozen=True)
class LengthPolicy:
    """Output length bounds as multiples of the target text's token count."""

    min_ratio: float = 2.0
    max_ratio: float = 20.0


def check_loading_info(info: dict, where: str) -> None:
    problems = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if problems:
        detail = "; ".join(f"{k.replace('_', ' ')}: {sorted(map(str, v))[:5]}" for k, v in problems.items())
        raise ValueError(f"{where} does not match its config: {detail}")


class SpeechLM:
    def __init__(self, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, num_codes: int = NUM_CODES,
                 lengths: LengthPolicy = LengthPolicy(), speech_only: bool = False,
                 ras: RepetitionAwareSampling | None = RELEASED_RAS) -> None:
        """``speech_only``: draw speech tokens and the stop token only (default: the whole vocabulary, as
        released); ``ras``: the repetition-aware sampling of :meth:`generate` (None: plain sampling)."""
        self.model, self.tokenizer, self.lengths, self.speech_only = model, tokenizer, lengths, speech_only
        self.ras = ras
        self.vocab = SpeechVocab.from_tokenizer(tokenizer, num_codes)
        vocab_size = model.get_input_embeddings().num_embeddings
        if self.vocab.audio_0 + num_codes > vocab_size:
            raise ValueError(f"the LM's vocabulary ({vocab_size}) is smaller than the tokenizer's speech tokens "
                             f"(<|audio_0|> = {self.vocab.audio_0} + {num_codes})")
        allowed = torch.zeros(vocab_size, dtype=torch.bool)
        allowed[self.vocab.audio_0:self.vocab.audio_0 + num_codes] = True
        allowed[self.vocab.stop] = True
        self.allowed = allowed

    @classmethod
    def from_pretrained(cls, ckpt: str | Path, *, num_codes: int = NUM_CODES, trust_remote_code: bool = False,
                        dtype: torch.dtype = torch.float32, device: str = "cpu",
                        speech_only: bool | None = None) -> SpeechLM:
        """``ckpt/llm`` (HF Llama folder) and ``ckpt/vq32k-phoneme-tokenizer``; every weight must be present.
        ``speech_only`` None: as ``llm/generation_config.json`` says under ``sample_speech_only`` (false when
        absent, as for the released checkpoint)."""
        ckpt = Path(ckpt)
        llm_dir = ckpt / "llm"
        if not (llm_dir / "config.json").is_file():
            raise FileNotFoundError(f"{llm_dir}/config.json is missing: not a GLM-TTS checkpoint folder")
        # mismatches are collected (not raised by transformers without the key names) and refused below
        model, info = LlamaForCausalLM.from_pretrained(str(llm_dir), dtype=dtype, output_loading_info=True,
                                                       ignore_mismatched_sizes=True)
        check_loading_info(info, f"{llm_dir} weights")
        tokenizer = load_tokenizer(ckpt / "vq32k-phoneme-tokenizer", trust_remote_code)
        generation = llm_dir / "generation_config.json"
        settings = json.loads(generation.read_text()) if generation.is_file() else {}
        if speech_only is None:
            speech_only = bool(settings.get(SPEECH_ONLY_KEY, False))
        ras = settings.get(RAS_KEY, {"window": RELEASED_RAS.window, "tau": RELEASED_RAS.tau})
        if ras is not None and not (isinstance(ras, dict) and set(ras) == {"window", "tau"}):
            raise ValueError(f"{generation}: {RAS_KEY} must be {{\"window\": W, \"tau\": T}} or null, got {ras!r}")
        return cls(model.to(device).eval(), tokenizer, num_codes, speech_only=speech_only,
                   ras=None if ras is None else RepetitionAwareSampling(int(ras["window"]), float(ras["tau"])))

    def save_sampling_settings(self, llm_dir: str | Path) -> None:
        """Record ``speech_only`` and ``ras`` in ``llm_dir/generation_config.json`` (keeping what is there), so that
        :meth:`from_pretrained` samples this checkpoint the way it is meant to be sampled."""
        generation = Path(llm_dir) / "generation_config.json"
        settings = json.loads(generation.read_text()) if generation.is_file() else {}
        settings[SPEECH_ONLY_KEY] = self.speech_only
        settings[RAS_KEY] = None if self.ras is None else {"window": self.ras.window, "tau": self.ras.tau}
        generation.write_text(json.dumps(settings, indent=2) + "\n")

    # ------------------------------------------------------------------ prompt layout
    def text_ids(self, text: str) -> list[int]:
        """Token ids of ``text`` as fed to the LM (no special tokens added); words the tokenizer maps to its unknown
        token are an error that names them."""
        ids = self.tokenizer(text, add_special_tokens=False).input_ids
        unk = self.tokenizer.unk_token_id
        if unk is not None and unk in ids:
            unknown = [t for t in text.split() if unk in self.tokenizer(t, add_special_tokens=False).input_ids]
            raise ValueError(f"the speech LM's tokenizer does not know {unknown or [text]} in {text!r}")
        return ids

    def encode(self, prompt: TTSPrompt) -> tuple[list[int], int]:
        """Token ids of the prompt and the number of target-text tokens (which bounds the output length). Without
        a voice prompt (no prompt text, no codes) the layout is ``[text, <|begin_of_audio|>]``."""
        bad = [c for c in prompt.prompt_codes if not 0 <= c < self.vocab.num_codes]
        if bad:
            raise ValueError(f"prompt speech codes out of range 0..{self.vocab.num_codes - 1}: {bad[:5]}")
        target = self.text_ids(prompt.text)
        if not target:
            raise ValueError("the text to synthesise is empty")
        if prompt.prompt_text_ids is not None:
            context = list(prompt.prompt_text_ids)
        else:
            context = self.text_ids(prompt.prompt_text + " ") if prompt.prompt_text else []
        ids = (context + target + [self.vocab.begin_of_audio]
               + [self.vocab.audio_0 + c for c in prompt.prompt_codes])
        return ids, len(target)

    def training_example(self, prompt: TTSPrompt, codes: Sequence[int]) -> tuple[list[int], list[int]]:
        """Supervised example in the inference layout: ids and labels, the loss on the speech codes and the stop
        token only (labels -100 elsewhere)."""
        bad = [c for c in codes if not 0 <= c < self.vocab.num_codes]
        if bad or not codes:
            raise ValueError(f"target speech codes must be a non-empty list in 0..{self.vocab.num_codes - 1}")
        ids, _ = self.encode(prompt)
        speech = [self.vocab.audio_0 + c for c in codes] + [self.vocab.stop]
        return ids + speech, [-100] * len(ids) + speech

    def batch(self, prompts: Sequence[TTSPrompt], num_generations: int = 1
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Left-padded ids and mask, each prompt repeated ``num_generations`` times, and target-text lengths."""
        encoded = [self.encode(p) for p in prompts]
        width = max(len(ids) for ids, _ in encoded)
        ids = torch.full((len(encoded), width), self.vocab.pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, (tokens, _) in enumerate(encoded):
            ids[row, width - len(tokens):] = torch.tensor(tokens)
            mask[row, width - len(tokens):] = 1
        text_lengths = torch.tensor([n for _, n in encoded])
        return (ids.repeat_interleave(num_generations, 0), mask.repeat_interleave(num_generations, 0),
                text_lengths.repeat_interleave(num_generations, 0))

    # ------------------------------------------------------------------ sampling
    def generate(
        self,
        prompts: Sequence[TTSPrompt],
        num_generations: int = 1,
        *,
        model: torch.nn.Module | None = None,
        sampling: SamplingParams = RELEASED_SAMPLING,
    ) -> tuple[torch.Tensor, torch.Tensor, Sampled]:
        """Sample speech tokens for every prompt ``num_generations`` times. ``model`` overrides the wrapped one
        (the trainer passes its unwrapped, possibly peft or ZeRO-3 policy). Each row's length is bounded by its text
        (GLM-TTS's ratios), and further by ``sampling.max_new_tokens`` / ``min_new_tokens``. Returns the prompt ids
        and mask (left padded) and what was sampled."""
        policy = model if model is not None else self.model
        device = next(policy.parameters()).device
        ids, mask, text_lengths = self.batch(prompts, num_generations)
        max_len = (text_lengths.float() * self.lengths.max_ratio).long().clamp(min=1)
        if sampling.max_new_tokens is not None:
            max_len = max_len.clamp(max=sampling.max_new_tokens)
        min_len = (text_lengths.float() * self.lengths.min_ratio).long().clamp(min=sampling.min_new_tokens)
        min_len = torch.minimum(min_len, max_len - 1).clamp(min=0)
        out = sample(policy, ids.to(device), mask.to(device), max_new_tokens=max_len.to(device),
                     min_new_tokens=min_len.to(device), stop_token_id=self.vocab.stop, pad_token_id=self.vocab.pad,
                     temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p,
                     allowed_tokens=self.allowed if self.speech_only else None, ras=self.ras,
                     synced_processes=sampling.synced_processes)
        return ids.to(device), mask.to(device), out

    def codes(self, sampled: Sampled) -> list[list[int]]:
        """Speech codes per row, without the stop token and padding. A drawn non-speech token (possible unless
        ``speech_only``) has no code: it is left out, with a warning, where the release would hand the flow an
        out-of-range code; it stays in ``sampled`` and so in the LM's context and the GRPO loss."""
        rows = []
        first, last = self.vocab.audio_0, self.vocab.audio_0 + self.vocab.num_codes
        for row, (tokens, mask) in enumerate(zip(sampled.tokens.tolist(), sampled.mask.tolist())):
            drawn = [t for t, m in zip(tokens, mask) if m and t != self.vocab.stop]
            speech = [t - first for t in drawn if first <= t < last]
            if len(speech) < len(drawn):
                outside = [t for t in drawn if not first <= t < last]
                logger.warning("row %d: %d drawn tokens are not speech tokens (ids %s); they are left out of the "
                               "codes", row, len(outside), outside[:5])
            rows.append(speech)
        return rows
