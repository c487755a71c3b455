"""Speech-token sampling throughput: batched (8 generations x 4 prompts at once, KV cache) vs one sequence at a time
(the released GLM-TTS way), same tiny speech LM in the published layout, same settings, same run.
Run: .venv/bin/python bench/rollout.py [--hidden 256 --layers 4 --generations 8 --prompts 4]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import replace

import torch

from vocalign.policies.checkpoints import TinySizes, write_tiny_checkpoint
from vocalign.policies.sampling import RELEASED_SAMPLING
from vocalign.policies.speech_lm import SpeechLM, TTSPrompt

TEXTS = ["今天天气很好，我们去公园散步吧。", "The quick brown fox jumps over the lazy dog.",
         "你好，欢迎使用语音合成。", "Reinforcement learning makes speech clearer."]


def timed(fn) -> tuple[float, int]:
    start = time.perf_counter()
    tokens = fn()
    return time.perf_counter() - start, tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--generations", type=int, default=8)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=150)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = write_tiny_checkpoint(tmp, TinySizes(num_codes=1024, hidden=args.hidden, layers=args.layers, heads=8))
        lm = SpeechLM.from_pretrained(ckpt, num_codes=1024)
    prompts = [TTSPrompt(TEXTS[i % len(TEXTS)], "参考音频的文本", list(range(i, i + 50))) for i in range(args.prompts)]
    sampling = replace(RELEASED_SAMPLING, max_new_tokens=args.max_new_tokens)

    def batched() -> int:
        return int(lm.generate(prompts, args.generations, sampling=sampling)[2].mask.sum())

    def one_by_one() -> int:
        return sum(int(lm.generate([p], 1, sampling=sampling)[2].mask.sum())
                   for p in prompts for _ in range(args.generations))

    torch.manual_seed(0)
    lm.generate(prompts[:1], 1, sampling=sampling)  # warm-up
    torch.manual_seed(1)
    t_batch, n_batch = timed(batched)
    torch.manual_seed(1)
    t_single, n_single = timed(one_by_one)
    print(f"speech LM: Llama hidden {args.hidden}, {args.layers} layers, vocab {len(lm.tokenizer)}; "
          f"{args.prompts} prompts x {args.generations} generations, <= {args.max_new_tokens} tokens each; "
          f"{torch.get_num_threads()} threads")
    print(f"one sequence at a time  {n_single / t_single:9.1f} tokens/s  ({n_single} tokens, {t_single:.2f} s)")
    print(f"batched                 {n_batch / t_batch:9.1f} tokens/s  ({n_batch} tokens, {t_batch:.2f} s)")
    print(f"ratio batched/one-at-a-time = {(n_batch / t_batch) / (n_single / t_single):.2f}x")


if __name__ == "__main__":
    main()
