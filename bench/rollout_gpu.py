"""A GLM-TTS GRPO step on one GPU at the published sizes, random weights: rollout decoding, token-to-audio, update.

1. Decoding with the speech LM's size (Llama, hidden 2048, 28 layers, 16 heads, 4 KV heads, vocab 98304), bf16,
   batch 64 and 128, a 150-token prompt and exactly 500 new tokens per row (no stop token), top-k 25, top-p 0.8.
   Three peers in this run on the same inputs, each timed after a warm-up with the same arguments: HF ``generate``,
   vocalign's ``sample`` on the dynamic cache (eager) and on the static cache with a CUDA graph per step (graphed).
   Prints tokens/s, the ratios to HF, and the graphed path's HBM bandwidth: bytes read per step (all weights + the
   K and V cache at the mean context, prompt + new/2) over the mean step time (the run's time over its new tokens,
   prefill included), as a share of the device's peak.
2. Token-to-audio of a GRPO batch through ``GLMTTSCodec.decode``: flow matching (10 Euler steps) + HiFT at the
   released sizes, 64 utterances of 10 s (250 codes) with a 3 s voice prompt (75 codes, 150 mel frames).
3. Rewards: Whisper large-v3 (CER's ASR) and WavLM-base-plus-sv (SIM) at their sizes on that batch.
4. The update of one batch (64 rows x 650 tokens, micro-batches of 8, gradient checkpointing, vocalign's loss),
   bf16: full fine-tune with fused AdamW, and LoRA r=16 on every projection. MFU counts 6 (full) or 4 (LoRA) FLOPs
   per weight-matrix entry and token (the LM head only on the kept completion logits, the embedding lookup none);
   attention's score products and the recompute of checkpointing are not counted.
Targets are printed beside the figures, not asserted. Without CUDA every part runs at --tiny sizes on CPU.
Run: .venv/bin/python bench/rollout_gpu.py [--batches 64 128] [--new-tokens 500] [--micro-batch 8] [--tiny]
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import SimpleNamespace

import torch
from peft import LoraConfig, get_peft_model
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    WavLMConfig,
    WavLMForXVector,
    WhisperConfig,
    WhisperFeatureExtractor,
    WhisperForConditionalGeneration,
)

from vocalign.policies.codec import FlowCondition, GLMTTSCodec, VoicePrompt
from vocalign.policies.flow import FlowConfig, FlowMatching
from vocalign.policies.sampling import sample
from vocalign.policies.vocoder import HiFT, HiFTConfig
from vocalign.rlhf.loss import aggregate, clipped_surrogate, completion_logps

# (lower-case device name contains all of these, HBM bytes/s, dense bf16 FLOP/s); " h200" leaves out GH200
PEAKS = (((" h200",), 4.8e12, 989e12), ((" h100", "pcie"), 2.0e12, 756e12), ((" h100", "hbm3"), 3.35e12, 989e12),
         ((" h100", "sxm"), 3.35e12, 989e12), ((" a100", "80gb"), 2.0e12, 312e12),
         ((" a100", "40gb"), 1.555e12, 312e12))
GRAPHED = "graphed (vocalign, static cache + CUDA graph)"
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass(frozen=True)
class DecodeRun:
    tokens: int  # generated, over all rows
    seconds: float

    @property
    def rate(self) -> float:
        return self.tokens / self.seconds


@dataclass
class BenchFigures:
    """What :func:`main` printed, as numbers: decode runs by batch size and peer, seconds by GRPO-step phase (None:
    out of memory)."""

    decode: dict[int, dict[str, DecodeRun]] = field(default_factory=dict)
    phases: dict[str, float | None] = field(default_factory=dict)


@dataclass(frozen=True)
class Sizes:
    lm: LlamaConfig
    batches: list[int]
    prompt: int  # tokens
    new_tokens: int
    flow: FlowConfig
    hift: HiFTConfig
    utterances: int
    codes: int  # speech codes per utterance, 25 Hz
    prompt_codes: int
    rows: int  # of the update
    micro_batch: int
    whisper: WhisperConfig  # CER's ASR
    asr_tokens: int  # tokens Whisper generates per utterance
    wavlm: WavLMConfig  # SIM's speaker encoder


def sizes(args: argparse.Namespace) -> Sizes:
    no_stop = dict(bos_token_id=None, eos_token_id=None, pad_token_id=0)
    if args.tiny:
        return Sizes(LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                 intermediate_size=128, vocab_size=512, **no_stop),
                     args.batches or [4], 16, args.new_tokens or 8,
                     FlowConfig(vocab_size=512, speech_token_dim=32, trans_dim=64, depth=2, heads=2, dim_head=32,
                                conv_layers=2),
                     HiFTConfig(base_channels=32, f0_channels=16), 2, 25, 25, 4, args.micro_batch or 2,
                     WhisperConfig(d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                                   decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128,
                                   num_mel_bins=128, vocab_size=512, max_target_positions=64, pad_token_id=1,
                                   bos_token_id=2, eos_token_id=3, decoder_start_token_id=2), 8,
                     WavLMConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                                 conv_dim=(32,) * 7, tdnn_dim=(32, 32, 32, 32, 64)))
    return Sizes(LlamaConfig(hidden_size=2048, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=4,
                             intermediate_size=6144, vocab_size=98304, **no_stop),
                 args.batches or [64, 128], 150, args.new_tokens or 500, FlowConfig(), HiFTConfig(), 64, 250, 75, 64,
                 args.micro_batch or 8,
                 WhisperConfig(d_model=1280, encoder_layers=32, decoder_layers=32, encoder_attention_heads=20,
                               decoder_attention_heads=20, encoder_ffn_dim=5120, decoder_ffn_dim=5120,
                               num_mel_bins=128, vocab_size=51866), 128,  # large-v3
                 WavLMConfig())  # base-plus-sv


def build_lm(config: LlamaConfig, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    with torch.device(device):  # initialised where it runs: no 7 GB detour through host memory
        return AutoModelForCausalLM.from_config(config, dtype=dtype).eval()


def kv_cache_bytes(cfg: LlamaConfig, batch: int, context: float, itemsize: int) -> float:
    """Bytes of the K and V cache of ``batch`` rows holding ``context`` tokens each: what a decode step reads
    besides the weights."""
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    return 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * context * batch * itemsize


def update_flops(model: torch.nn.Module, rows: int, width: int, new: int, lora: bool) -> float:
    """FLOPs of one update as the MFU counts them: 6 (full) or 4 (LoRA: no weight gradients) per weight matrix entry
    of ``model`` (before LoRA) and token, the LM head only on the kept completion logits (``new`` + 1 per row), the
    embedding lookup none (nor the norms' scales, which multiply elementwise)."""
    matrices = sum(p.numel() for p in model.parameters() if p.dim() > 1)
    embed, head = model.get_input_embeddings().weight.numel(), model.get_output_embeddings().weight.numel()
    return (4 if lora else 6) * ((matrices - embed - head) * rows * width + head * rows * (new + 1))


def timed(fn: Callable[[], object], device: torch.device) -> tuple[float, object]:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    result = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, result


def decode_peers(model: torch.nn.Module, ids: torch.Tensor, new: int) -> dict[str, Callable[[], int]]:
    """Each peer returns the number of tokens it generated."""
    mask = torch.ones_like(ids)

    def hf() -> int:
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, top_k=25, top_p=0.8,
                             max_new_tokens=new, min_new_tokens=new, pad_token_id=0)
        return (out.shape[1] - ids.shape[1]) * len(ids)

    def ours(decoding: str) -> Callable[[], int]:
        return lambda: int(sample(model, ids, mask, max_new_tokens=new, min_new_tokens=new, stop_token_id=None,
                                  pad_token_id=0, top_k=25, top_p=0.8, decoding=decoding).mask.sum())

    peers = {"HF generate": hf, "eager (vocalign, dynamic cache)": ours("dynamic")}
    if ids.is_cuda:
        peers[GRAPHED] = ours("graph")
    return peers


def bench_decode(s: Sizes, device: torch.device, dtype: torch.dtype, peak_bw: float | None
                 ) -> dict[int, dict[str, DecodeRun]]:
    """Each peer's timed run by batch size."""
    runs: dict[int, dict[str, DecodeRun]] = {}
    model = build_lm(s.lm, device, dtype)
    cfg = s.lm
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    for batch in s.batches:
        print(f"decode, batch {batch}: {s.prompt}-token prompt, {s.new_tokens} new tokens per row, top-k 25, top-p 0.8")
        ids = torch.randint(1, cfg.vocab_size, (batch, s.prompt), device=device)
        runs[batch] = {}
        for name, peer in decode_peers(model, ids, s.new_tokens).items():
            torch.manual_seed(0)
            peer()  # warm-up (the graphed peer captures its graph here)
            torch.manual_seed(1)
            seconds, tokens = timed(peer, device)
            run = runs[batch][name] = DecodeRun(tokens, seconds)
            print(f"  {name:47s} {run.rate:10.1f} tokens/s  ({run.tokens} tokens, {run.seconds:.2f} s)")
        rates = {name: run.rate for name, run in runs[batch].items()}
        hf, eager = rates["HF generate"], rates["eager (vocalign, dynamic cache)"]
        graphed = rates.get(GRAPHED)
        if graphed is None:
            print("  graphed decode: needs CUDA (skipped)")
            print(f"  ratio eager/HF = {eager / hf:.2f}x")
            continue
        print(f"  ratio graphed/HF = {graphed / hf:.2f}x (target >= 4x at batch 64), eager/HF = {eager / hf:.2f}x")
        kv_bytes = kv_cache_bytes(cfg, batch, s.prompt + s.new_tokens / 2, model.dtype.itemsize)
        step_s = batch / graphed  # every step gives one token per row
        achieved = (weight_bytes + kv_bytes) / step_s
        detail = (f"[weights {weight_bytes / 1e9:.2f} GB + KV {kv_bytes / 1e9:.2f} GB per step, "
                  f"{step_s * 1e3:.2f} ms/step]")
        if peak_bw is None:
            print(f"  graphed HBM: {achieved / 1e9:.0f} GB/s; peak of {torch.cuda.get_device_name()} unknown "
                  f"(pass --peak-bandwidth)  {detail}")
        else:
            print(f"  graphed HBM: {achieved / 1e9:.0f} GB/s = {achieved / peak_bw:.0%} of {peak_bw / 1e9:.0f} GB/s "
                  f"(target >= 50%)  {detail}")
    return runs


class BenchTokenizerStandIn:
    """Bench stand-in for the Whisper-VQ speech tokenizer: GLMTTSCodec reads only its code count, decode nothing."""

    def __init__(self, num_codes: int) -> None:
        self.encoder = SimpleNamespace(config=SimpleNamespace(quantize_vocab_size=num_codes))


def bench_token_to_audio(s: Sizes, device: torch.device) -> float:
    flow, hift = FlowMatching(s.flow).to(device).eval(), HiFT(s.hift).to(device).eval()
    # the CAM++ speaker model only embeds prompt audio (encode_prompt); decode takes the embedding from the prompt
    codec = GLMTTSCodec(BenchTokenizerStandIn(s.flow.vocab_size), flow, hift, speaker=None)
    vocab, n = s.flow.vocab_size, s.utterances
    prompts = [VoicePrompt("", torch.randint(0, vocab, (s.prompt_codes,)).tolist(),
                           FlowCondition(torch.randn(2 * s.prompt_codes, s.flow.mel_dim), torch.randn(192)))
               for _ in range(n)]
    codes = [torch.randint(0, vocab, (s.codes,)).tolist() for _ in range(n)]
    codec.decode(codes, prompts, flow_steps=10)  # warm-up
    seconds, audio = timed(lambda: codec.decode(codes, prompts, flow_steps=10), device)
    utterance_s = s.codes / 25
    print(f"token-to-audio (GLMTTSCodec.decode: flow 10 steps + HiFT), {n} x {utterance_s:g} s with a {s.prompt_codes / 25:g} s "
          f"prompt: {seconds:.2f} s (target < 5 s for 64 x 10 s; {sum(len(a) for a in audio) / 24000:.0f} s of audio)")
    return seconds


def bench_rewards(s: Sizes, device: torch.device, dtype: torch.dtype) -> float:
    """CER's ASR (Whisper large-v3 sizes, greedy, up to 128 tokens: random weights rarely stop, so this is the
    worst case) and SIM's speaker encoder (WavLM-base-plus-sv sizes) on the batch's audio and its voice prompts."""
    with torch.device(device):
        asr = WhisperForConditionalGeneration(s.whisper).to(dtype).eval()
        speaker = WavLMForXVector(s.wavlm).to(dtype).eval()
    audio = torch.randn(s.utterances, s.codes * 640) * 0.1  # 16 kHz
    prompts = torch.randn(s.utterances, s.prompt_codes * 640) * 0.1
    features = WhisperFeatureExtractor(feature_size=128)(list(audio.numpy()), sampling_rate=16000, return_tensors="pt")
    features = features.input_features.to(device, dtype)
    audio, prompts = audio.to(device, dtype), prompts.to(device, dtype)

    @torch.no_grad()
    def score() -> None:
        asr.generate(features, max_new_tokens=s.asr_tokens, min_new_tokens=s.asr_tokens, do_sample=False)
        speaker(audio)
        speaker(prompts)

    score()  # warm-up
    seconds, _ = timed(score, device)
    print(f"rewards: Whisper (d_model {s.whisper.d_model}, {s.whisper.encoder_layers}+{s.whisper.decoder_layers} layers) "
          f"on {s.utterances} x {s.codes / 25:g} s ({s.asr_tokens} tokens each) + WavLM x-vectors (hidden "
          f"{s.wavlm.hidden_size}) of outputs and prompts: {seconds:.2f} s")
    return seconds


def bench_update(s: Sizes, device: torch.device, dtype: torch.dtype, lora: bool, peak_flops: float | None
                 ) -> float | None:
    label = "LoRA r=16" if lora else "full fine-tune"
    model = build_lm(s.lm, device, dtype)
    vocab, new, width = s.lm.vocab_size, s.new_tokens, s.prompt + s.new_tokens
    flops = update_flops(model, s.rows, width, new, lora)
    if lora:
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=LORA_TARGETS))
    model.activation_checkpointing_enable()  # after LoRA, as rlhf.training_setup orders them
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6,
                                  fused=device.type == "cuda")
    ids = torch.randint(1, vocab, (s.rows, width), device=device)
    attention = torch.ones_like(ids)
    mask = torch.ones(s.rows, new, device=device)
    old_logps = torch.full((s.rows, new), -math.log(vocab), device=device)  # a random model is about uniform
    advantages = torch.randn(s.rows, device=device)
    num_tokens = float(s.rows * new)

    def update() -> None:  # as rlhf.trainer.GRPOTrainer.optimise: one optimiser step per batch
        for index in torch.arange(s.rows, device=device).split(s.micro_batch):
            logps = completion_logps(model, ids[index], attention[index], new, 1.0)
            terms = clipped_surrogate(logps, old_logps[index], advantages[index], epsilon_low=0.2, epsilon_high=0.28)
            aggregate(terms.per_token_loss, mask[index], "token_mean", num_tokens=num_tokens,
                      num_sequences=s.rows).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    try:
        update()  # warm-up; allocates the optimiser's state
        seconds, _ = timed(update, device)
    except torch.cuda.OutOfMemoryError:
        name = torch.cuda.get_device_name() if device.type == "cuda" else str(device)
        print(f"  {label}: out of memory at micro-batch {s.micro_batch} on {name}")
        return None
    mfu = f"MFU {flops / seconds / peak_flops:.0%} of {peak_flops / 1e12:.0f} TFLOP/s (target >= 35%)" \
        if peak_flops else "peak bf16 FLOP/s unknown (pass --peak-flops)"
    print(f"  {label:15s} {seconds:7.2f} s/update, {flops / seconds / 1e12:8.3f} TFLOP/s, {mfu}")
    return seconds


def main(argv: list[str] | None = None) -> BenchFigures:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, nargs="+", help="decode batch sizes (default 64 128; --tiny: 4)")
    parser.add_argument("--new-tokens", type=int, help="new tokens per row (default 500; --tiny: 8)")
    parser.add_argument("--micro-batch", type=int, help="rows per micro-batch of the update (default 8; --tiny: 2)")
    parser.add_argument("--tiny", action="store_true", help="tiny models and batches (always, without CUDA)")
    parser.add_argument("--peak-bandwidth", type=float, help="HBM bytes/s of this device (default: by its name)")
    parser.add_argument("--peak-flops", type=float, help="dense bf16 FLOP/s of this device (default: by its name)")
    parser.add_argument("--skip", nargs="*", default=[], choices=["decode", "audio", "rewards", "update"])
    args = parser.parse_args(argv)
    if torch.cuda.is_available():
        device, dtype = torch.device("cuda"), torch.bfloat16
        name = torch.cuda.get_device_name()
        peak_bw, peak_flops = next(((bw, fl) for keys, bw, fl in PEAKS if all(k in name.lower() for k in keys)),
                                   (None, None))
        peak_bw, peak_flops = args.peak_bandwidth or peak_bw, args.peak_flops or peak_flops
    else:
        print("no CUDA: GPU figures not taken; running the same code paths at --tiny sizes on CPU")
        device, dtype, args.tiny = torch.device("cpu"), torch.float32, True
        torch.set_num_threads(1)  # tiny ops: more threads only add overhead, and contention on a busy machine
        name = "CPU, 1 thread"
        peak_bw, peak_flops = args.peak_bandwidth, args.peak_flops
    s = sizes(args)
    torch.manual_seed(0)
    print(f"device: {name}; LM: Llama hidden {s.lm.hidden_size}, {s.lm.num_hidden_layers} layers, "
          f"vocab {s.lm.vocab_size}, {dtype}, random weights")
    figures = BenchFigures()
    phases = figures.phases
    if "decode" not in args.skip:
        figures.decode = bench_decode(s, device, dtype, peak_bw)
        # the rollout path a GRPO step takes (graphed on CUDA), at the first batch size
        first = figures.decode[s.batches[0]]
        phases["rollout"] = first[GRAPHED if GRAPHED in first else "eager (vocalign, dynamic cache)"].seconds
    if "audio" not in args.skip:
        phases["token-to-audio"] = bench_token_to_audio(s, device)
    if "rewards" not in args.skip:
        phases["rewards"] = bench_rewards(s, device, dtype)
    if "update" not in args.skip:
        print(f"update: {s.rows} rows x ({s.prompt} + {s.new_tokens}) tokens, micro-batch {s.micro_batch}, "
              f"gradient checkpointing, {dtype}")
        for lora in (False, True):
            phases["update, LoRA" if lora else "update, full"] = bench_update(s, device, dtype, lora, peak_flops)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    print("one GRPO step, by phase (rollout at the first batch size): " + ", ".join(
        f"{name} {'out of memory' if sec is None else f'{sec:.2f} s'}" for name, sec in phases.items()))
    return figures


if __name__ == "__main__":
    main()
