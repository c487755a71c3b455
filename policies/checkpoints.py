"""Writing a tiny random checkpoint in the published GLM-TTS layout.

Tests, the embedded CPU demo and the benchmarks load it through exactly the code a real checkpoint takes. Sizes are
tiny (the real LM is 1.5B parameters) but names, files and formats are those of the release.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import yaml
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM, WhisperConfig, WhisperFeatureExtractor

from .flow import FlowConfig, FlowMatching
from .frontend.g2p import read_inventory
from .frontend.tokenizer import build_char_tokenizer
from .speaker import write_tiny_campplus
from .speech_lm import SpeechLM
from .speech_tokenizer import WhisperVQEncoder
from .vocoder import HiFT, HiFTConfig
from .vocos2d import ReleasedGeneratorInterface, Vocos2D, Vocos2DConfig

# The tiny tokenizer reads printable ASCII, common CJK punctuation and every CJK unified ideograph, one token each.
TINY_CHARACTERS = ("".join(chr(c) for c in range(32, 127)) + "，。！？、：；“”‘’（）《》…—"
                   + "".join(chr(c) for c in range(0x4E00, 0xA000)))


@dataclass(frozen=True)
class TinySizes:
    num_codes: int = 64
    hidden: int = 32
    layers: int = 2
    heads: int = 4
    flow_dim: int = 64
    flow_depth: int = 2
    flow_token_dim: int = 32
    hift_channels: int = 32
    vocos2d_channels: int = 4
    vocos2d_depth: int = 1


def write_tiny_checkpoint(root: str | Path, sizes: TinySizes = TinySizes(), phonemes_file: str | Path | None = None,
                          seed: int = 0) -> Path:
    """Write ``llm/``, ``vq32k-phoneme-tokenizer/``, ``speech_tokenizer/``, ``flow/`` (config.yaml, flow.pt),
    ``hift/hift.pt``, ``vocos2d/generator_jit.ckpt`` and ``frontend/campplus.onnx`` with random weights. The release
    has no HiFT config (its sizes are CosyVoice 2's); the tiny one adds ``hift/config.yaml`` with its smaller
    widths. Both vocoders are written so that the 24 kHz and the 32 kHz paths can run on one tiny checkpoint."""
    root = Path(root)
    phonemes = [] if phonemes_file is None else read_inventory(phonemes_file)
    tokenizer = build_char_tokenizer(TINY_CHARACTERS, phonemes, sizes.num_codes)
    tokenizer.save_pretrained(root / "vq32k-phoneme-tokenizer")
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=sizes.hidden, intermediate_size=sizes.hidden * 3,
                         num_hidden_layers=sizes.layers, num_attention_heads=sizes.heads,
                         num_key_value_heads=max(1, sizes.heads // 4), max_position_embeddings=2048, rms_norm_eps=1e-5,
                         rope_theta=10000.0, tie_word_embeddings=False, bos_token_id=None,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    model = LlamaForCausalLM(config)
    model.save_pretrained(root / "llm", safe_serialization=True)
    # random weights would mostly draw text tokens; the tiny LM samples speech tokens and the stop token only
    SpeechLM(model, tokenizer, sizes.num_codes, speech_only=True).save_sampling_settings(root / "llm")
    write_flow(root / "flow", FlowConfig(vocab_size=sizes.num_codes, speech_token_dim=sizes.flow_token_dim,
                                         trans_dim=sizes.flow_dim, depth=sizes.flow_depth, heads=2, dim_head=32,
                                         conv_layers=2))
    hift = HiFTConfig(base_channels=sizes.hift_channels * 4, f0_channels=sizes.hift_channels)
    (root / "hift").mkdir(exist_ok=True)
    (root / "hift" / "config.yaml").write_text(yaml.safe_dump(
        {"base_channels": hift.base_channels, "f0_channels": hift.f0_channels}))
    torch.save(HiFT(hift).state_dict(), root / "hift" / "hift.pt")
    write_speech_tokenizer(root / "speech_tokenizer", sizes.num_codes)
    write_tiny_campplus(root / "frontend" / "campplus.onnx", seed=seed)
    with torch.random.fork_rng():  # the other parts' weights stay those of checkpoints written before Vocos2D was
        torch.manual_seed(seed)
        write_vocos2d(root / "vocos2d" / "generator_jit.ckpt",
                      Vocos2DConfig(channels=sizes.vocos2d_channels, depth=sizes.vocos2d_depth))
    return root


def write_vocos2d(path: Path, cfg: Vocos2DConfig) -> None:
    """A random :class:`Vocos2D` as TorchScript behind the released generator's interface, where the release keeps
    its generator."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.jit.script(ReleasedGeneratorInterface(Vocos2D(cfg)).eval()).save(str(path))


def write_speech_tokenizer(folder: Path, num_codes: int, width: int = 32) -> None:
    """A two-layer Whisper-VQ encoder at 25 Hz (pool 2 after layer 1, quantise after layer 2)."""
    config = WhisperConfig(d_model=width, encoder_layers=2, encoder_attention_heads=2, encoder_ffn_dim=width * 2,
                           num_mel_bins=128, max_source_positions=1500, pooling_kernel_size=2, pooling_type="avg",
                           pooling_position=1, quantize_position=2, quantize_vocab_size=num_codes,
                           quantize_encoder_only=True, quantize_causal_block_size=200)
    folder.mkdir(parents=True, exist_ok=True)
    config.to_json_file(str(folder / "config.json"))
    save_file(WhisperVQEncoder(config).state_dict(), str(folder / "model.safetensors"), metadata={"format": "pt"})
    WhisperFeatureExtractor(feature_size=128).save_pretrained(str(folder))


def write_flow(folder: Path, cfg: FlowConfig) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.yaml").write_text(yaml.safe_dump({"flow": asdict(cfg)}, sort_keys=False))
    torch.save(FlowMatching(cfg).state_dict(), folder / "flow.pt")
