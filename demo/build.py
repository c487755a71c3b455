"""The demo TTS: a small GLM-TTS-shaped model that vocalign trains from nothing but espeak-ng, on a CPU.

GRPO can only improve a policy that already speaks. This recipe makes one in minutes, in the shape of GLM-TTS, so
that the main job shows the real loop (LM sampling -> audio -> ASR and speaker rewards -> update) make speech
measurably clearer. Read top to bottom:

1. voices and texts: espeak-ng voices split into SFT/RL voices and held-out voices, word strings split so that no
   held-out text is ever trained on;
2. speech: espeak-ng renders every utterance at 16 kHz;
3. codec: k-means mel units (:mod:`vocalign.policies.mel_units`) fitted on the SFT speech, 25 codes a second;
4. tokenizer: word level over the domain's words, with the control and speech tokens of the published layout;
5. SFT: a Llama trained from scratch on (voice prompt, text) -> speech codes, laid out exactly as GLM-TTS's LM reads
   them (prompt text, text, ``<|begin_of_audio|>``, prompt codes, then the codes to predict). It stops at
   ``sft.steps``, well before convergence, so that reinforcement learning has headroom (``STOP_POINT``);
6. files: ``ckpt/`` (``llm/``, ``vq32k-phoneme-tokenizer/``, ``mel_units/``; ``TTSPipeline.from_pretrained``
   loads it), ``prompts/`` (voice prompts, ``train.jsonl`` for GRPO, ``heldout.jsonl`` for evaluation) and
   ``provenance.json``.

Everything is seeded; the espeak-ng version is recorded, since another version speaks slightly differently.
"""

from __future__ import annotations

import io
import json
import logging
import platform
import random
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
import torch
import transformers
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm
from transformers import LlamaConfig, LlamaForCausalLM, get_scheduler

from ..common.audio import to_model_rate
from ..common.settings import apply_overrides, from_dict, load_yaml
from ..policies.codec import MelUnitCodec
from ..policies.frontend.text import normalize_text
from ..policies.frontend.tokenizer import build_word_tokenizer
from ..policies.mel_units import MelUnits, MelUnitsConfig
from ..policies.pipeline import MEL_UNITS_DIR
from ..policies.sampling import RELEASED_SAMPLING
from ..policies.speech_lm import SpeechLM, TTSPrompt
from ..rewards.pocketsphinx_asr import PocketSphinxASR
from ..rewards.text_norm import error_rate
from ..sft.finetune import Example, collate, sft_step, shuffled_batches

logger = logging.getLogger(__name__)

# pocketsphinx's beams as the main job sets them (configs/grpo_demo_cpu.yaml)
DEMO_DECODER_OPTIONS = {"beam": 1e-30, "wbeam": 1e-20}

STOP_POINT = ("SFT stops at sft.steps, well before convergence, so that GRPO has headroom: run much longer, the "
              "recipe's samples come about as intelligible as espeak-ng through the codec, which bounds what any "
              "policy over these codes can reach. heldout_word_error_rate.sft_by_step is the curve; the gap from .sft "
              "to .codec_round_trip is GRPO's headroom.")

DIGITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


@dataclass
class SpeechSettings:
    rate: int = 150  # espeak-ng words per minute
    # espeak-ng voices the SFT data and GRPO prompts speak with
    train_voices: list[str] = field(default_factory=lambda: [
        "en-us+m1", "en-us+m2", "en-us+m4", "en-us+f1", "en-us+f2", "en-us+f3", "en-us+klatt", "en-us+klatt3",
        "en-us+Alex", "en-us+benjamin", "en-us+edward", "en-us+max", "en-us+michael", "en-us+grandpa",
        "en-us+victor", "en-us+caleb"])
    # voices only the held-out evaluation hears (none may also be a training voice)
    heldout_voices: list[str] = field(default_factory=lambda: [
        "en-us+m5", "en-us+m6", "en-us+f4", "en-us+f5", "en-us+klatt2", "en-us+klatt4", "en-us+adam",
        "en-us+david"])


@dataclass
class TextSettings:
    words: list[str] = field(default_factory=lambda: list(DIGITS))  # each text is a random string of these words
    min_words: int = 3  # words per text, at least
    max_words: int = 6  # words per text, at most


@dataclass
class DataSettings:
    sft_utterances_per_voice: int = 300  # espeak-ng utterances rendered per training voice for SFT
    prompts_per_utterance: int = 1  # SFT pairs each utterance with this many voice prompts of its speaker
    rl_prompts: int = 96  # GRPO prompt rows (SFT voices, texts not in SFT)
    heldout_utterances: int = 128  # evaluation rows (held-out voices and texts)


@dataclass
class ModelSettings:
    hidden_size: int = 192  # the speech LM (a Llama) width
    intermediate_size: int = 512  # its MLP width
    num_layers: int = 4  # its decoder layers
    num_heads: int = 4  # its attention heads


@dataclass
class SFTSettings:
    steps: int = 400  # optimizer steps of SFT
    eval_every: int = 100  # held-out word error rate of the SFT samples every this many steps, into provenance.json
    batch_size: int = 32  # (text, speech) examples per step
    learning_rate: float = 2e-3  # AdamW, constant after the warm-up
    warmup_steps: int = 50  # linear warm-up from 0
    weight_decay: float = 0.01  # AdamW's decoupled weight decay
    max_grad_norm: float = 1.0  # gradients clipped to this global norm (0: not clipped)


@dataclass
class DemoTTSConfig:
    output_dir: str = "runs/demo_tts"  # the checkpoint, prompt files and provenance.json go here
    seed: int = 0  # texts, the train/held-out split, the codebook, weights and SFT order
    speech: SpeechSettings = field(default_factory=SpeechSettings)
    text: TextSettings = field(default_factory=TextSettings)
    data: DataSettings = field(default_factory=DataSettings)
    # 16 Griffin-Lim iterations: half the decode time of 32 at the same pocketsphinx error rate on the demo's speech
    codec: MelUnitsConfig = field(default_factory=lambda: MelUnitsConfig(griffin_lim_iters=16))
    model: ModelSettings = field(default_factory=ModelSettings)
    sft: SFTSettings = field(default_factory=SFTSettings)

    def __post_init__(self) -> None:
        shared = sorted(set(self.speech.train_voices) & set(self.speech.heldout_voices))
        if shared:
            raise ValueError(f"voices {shared} are both trained on and held out; a held-out voice must be new")
        if not self.speech.train_voices or not self.speech.heldout_voices:
            raise ValueError("speech.train_voices and speech.heldout_voices must both name voices")
        if not 1 <= self.text.min_words <= self.text.max_words:
            raise ValueError("text.min_words must be >= 1 and <= text.max_words")
        if self.data.sft_utterances_per_voice < 2:
            raise ValueError("data.sft_utterances_per_voice must be >= 2 (a voice prompt is another utterance)")


def load_demo_config(path: str | Path, overrides: dict[str, Any] | None = None) -> DemoTTSConfig:
    return from_dict(DemoTTSConfig, apply_overrides(load_yaml(path), (overrides or {}).items()), "demo_tts")


# ---------------------------------------------------------------------------------------------- 1-2: speech
def espeak_version() -> str:
    if shutil.which("espeak-ng") is None:
        raise FileNotFoundError("espeak-ng is not installed; `bash launch/setup.sh` installs it "
                                "(or `apt-get install espeak-ng`)")
    return subprocess.run(["espeak-ng", "--version"], check=True, capture_output=True, text=True).stdout.strip()


def speak(text: str, voice: str, rate: int, sample_rate: int = 16000) -> np.ndarray:
    """espeak-ng speaking ``text`` to memory, resampled to ``sample_rate``."""
    result = subprocess.run(["espeak-ng", "-v", voice, "-s", str(rate), "--stdout", text], capture_output=True)
    if result.returncode != 0 or not result.stdout:
        raise ValueError(f"espeak-ng could not speak with voice {voice!r}: {result.stderr.decode().strip()}")
    audio, rate_in = sf.read(io.BytesIO(result.stdout), dtype="float32")
    return to_model_rate(audio, rate_in, sample_rate)


@dataclass
class Utterance:
    voice: str
    text: str
    audio: np.ndarray | None = None
    codes: list[int] | None = None


@dataclass
class Corpus:
    sft: list[Utterance]  # SFT voices; the first utterance of each voice is its GRPO voice prompt
    rl_texts: list[str]  # GRPO targets (SFT voices)
    heldout_prompts: list[Utterance]  # one voice prompt per held-out voice
    heldout_texts: list[str]  # evaluation targets (held-out voices)

    def heldout_pairs(self) -> list[tuple[str, Utterance]]:
        """(target text, voice prompt) of every evaluation row, as ``heldout.jsonl`` pairs them."""
        return paired(self.heldout_texts, self.heldout_prompts)


def paired(texts: list[str], prompts: list[Utterance]) -> list[tuple[str, Utterance]]:
    """Each target text with a voice prompt, the voices taken in turn."""
    return [(text, prompts[i % len(prompts)]) for i, text in enumerate(texts)]


def make_corpus(cfg: DemoTTSConfig) -> Corpus:
    """Texts drawn without repetition, so that held-out texts (targets and prompt transcripts) never occur in SFT
    or GRPO, then spoken by their voices."""
    rng = random.Random(cfg.seed)
    speech, text, data = cfg.speech, cfg.text, cfg.data
    needed = (len(speech.train_voices) * data.sft_utterances_per_voice + data.rl_prompts
              + len(speech.heldout_voices) + data.heldout_utterances)
    possible = sum(len(text.words) ** n for n in range(text.min_words, text.max_words + 1))
    if needed > possible // 2:
        raise ValueError(f"{needed} distinct texts asked of only {possible} possible; lengthen the texts")
    texts: list[str] = []
    seen: set[str] = set()
    while len(texts) < needed:
        candidate = " ".join(rng.choice(text.words) for _ in range(rng.randint(text.min_words, text.max_words)))
        if candidate not in seen:
            seen.add(candidate)
            texts.append(candidate)
    per_voice = data.sft_utterances_per_voice
    sft = [Utterance(voice, texts.pop()) for voice in speech.train_voices for _ in range(per_voice)]
    rl_texts = [texts.pop() for _ in range(data.rl_prompts)]
    heldout_prompts = [Utterance(voice, texts.pop()) for voice in speech.heldout_voices]
    heldout_texts = [texts.pop() for _ in range(data.heldout_utterances)]
    for utt in tqdm(sft + heldout_prompts, desc="espeak-ng", unit="utt"):
        utt.audio = speak(utt.text, utt.voice, speech.rate, cfg.codec.sample_rate)
    return Corpus(sft, rl_texts, heldout_prompts, heldout_texts)


# ---------------------------------------------------------------------------------------------- 3-5: models
def sft_examples(lm: SpeechLM, utterances: list[Utterance], prompts_per_utterance: int, seed: int) -> list[Example]:
    """Each utterance with ``prompts_per_utterance`` other utterances of its voice as voice prompt. Both texts are
    normalised as the pipeline normalises them at synthesis (GLM-TTS's front end ends a sentence with a full stop):
    a model trained on raw texts meets an unseen token in every evaluation and GRPO prompt."""
    rng = random.Random(seed)
    by_voice: dict[str, list[Utterance]] = {}
    for utt in utterances:
        by_voice.setdefault(utt.voice, []).append(utt)
    examples = []
    for utt in utterances:
        others = [u for u in by_voice[utt.voice] if u is not utt]
        for prompt in rng.sample(others, min(prompts_per_utterance, len(others))):
            request = TTSPrompt(normalize_text(utt.text), normalize_text(prompt.text), prompt.codes)
            examples.append(lm.training_example(request, utt.codes))
    return examples


def new_speech_lm(cfg: DemoTTSConfig) -> SpeechLM:
    tokenizer = build_word_tokenizer(cfg.text.words, cfg.codec.num_codes)
    m = cfg.model
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=m.hidden_size, intermediate_size=m.intermediate_size,
                         num_hidden_layers=m.num_layers, num_attention_heads=m.num_heads,
                         num_key_value_heads=m.num_heads, max_position_embeddings=1024, tie_word_embeddings=True,
                         bos_token_id=None, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    # speech codes only (the LM never saw text after <|begin_of_audio|>), and no repetition-aware sampling: mel
    # units repeat by nature while a sound lasts, and RAS would redraw every such repeat from the untruncated
    # distribution (measured on held-out voices: word error rate 0.60 with the released RAS, 0.51 without)
    return SpeechLM(LlamaForCausalLM(config), tokenizer, cfg.codec.num_codes, speech_only=True, ras=None)


def train_sft(lm: SpeechLM, examples: list[Example], cfg: SFTSettings, seed: int,
              evaluate: Callable[[int, torch.nn.Module], None] | None = None) -> list[float]:
    """AdamW, linear warm-up then a constant rate (so that a shorter run is a prefix of a longer one);
    ``evaluate(step, model)`` every ``cfg.eval_every`` steps."""
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    optimizer = torch.optim.AdamW(lm.model.parameters(), lr=cfg.learning_rate, betas=(0.9, 0.95),
                                  weight_decay=cfg.weight_decay)
    scheduler = get_scheduler("constant_with_warmup", optimizer, num_warmup_steps=cfg.warmup_steps)
    model, optimizer = accelerator.prepare(lm.model, optimizer)
    batches = shuffled_batches(examples, cfg.batch_size, seed)
    model.train()
    losses = []
    bar = tqdm(range(cfg.steps), desc="sft", unit="step")
    for _ in bar:
        losses.append(sft_step(model, collate(next(batches), lm.vocab.pad), optimizer, accelerator, cfg.max_grad_norm,
                               scheduler))
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
        if evaluate is not None and cfg.eval_every and len(losses) % cfg.eval_every == 0:
            model.eval()
            evaluate(len(losses), accelerator.unwrap_model(model))
            model.train()
    lm.model = accelerator.unwrap_model(model).cpu().eval()
    return losses


class HeldoutJudge:
    """Where the SFT stands, measured on the held-out texts and voices with the main job's judge (pocketsphinx
    restricted to the domain's words): espeak-ng's own speech (the ceiling), its codec round trip (the ceiling through
    the codes), and the SFT model's samples (seed fixed, sampled as the evaluation samples). The gap between the last
    two is the headroom GRPO has; measured along the SFT, it shows where to stop."""

    def __init__(self, lm: SpeechLM, codec: MelUnitCodec, corpus: Corpus, cfg: DemoTTSConfig) -> None:
        self.lm, self.units, self.seed = lm, codec.units, cfg.seed
        self.asr = PocketSphinxASR(vocabulary=cfg.text.words, decoder_options=DEMO_DECODER_OPTIONS)
        pairs = corpus.heldout_pairs()
        self.texts = [text for text, _ in pairs]
        self.spoken = [speak(text, prompt.voice, cfg.speech.rate, codec.sample_rate) for text, prompt in pairs]
        self.requests = [TTSPrompt(normalize_text(text), normalize_text(prompt.text), self.units.encode(prompt.audio))
                         for text, prompt in pairs]
        self.sft_by_step: dict[int, float] = {}

    def word_error_rate(self, audios: list[np.ndarray]) -> float:
        hypotheses = self.asr.transcribe(audios)
        return round(float(np.mean([error_rate(t, h, "en") for t, h in zip(self.texts, hypotheses)])), 4)

    def sft_samples(self, model: torch.nn.Module) -> float:
        with torch.random.fork_rng():  # the training's random state is left as it was
            torch.manual_seed(self.seed)
            _, _, sampled = self.lm.generate(self.requests, model=model,
                                             sampling=replace(RELEASED_SAMPLING, max_new_tokens=256))
        return self.word_error_rate(self.units.decode_batch(self.lm.codes(sampled)))

    def record(self, step: int, model: torch.nn.Module) -> None:
        self.sft_by_step[step] = self.sft_samples(model)
        logger.info("SFT step %d: held-out word error rate %.3f", step, self.sft_by_step[step])

    def report(self, final_step: int) -> dict[str, Any]:
        """The ceilings and the final SFT model (already measured when ``eval_every`` divides the step count)."""
        round_trip = self.units.decode_batch([self.units.encode(audio) for audio in self.spoken])
        if final_step not in self.sft_by_step:
            self.sft_by_step[final_step] = self.sft_samples(self.lm.model)
        return {"espeak_ng": self.word_error_rate(self.spoken), "codec_round_trip": self.word_error_rate(round_trip),
                "sft": self.sft_by_step[final_step], "sft_by_step": self.sft_by_step}


# ---------------------------------------------------------------------------------------------- 6: files
def write_prompts(folder: Path, corpus: Corpus, sample_rate: int) -> dict[str, Path]:
    """Voice prompts as 16-bit FLAC, ``train.jsonl`` (GRPO) and ``heldout.jsonl`` (evaluation)."""
    (folder / "voices").mkdir(parents=True, exist_ok=True)
    first_of_voice: dict[str, Utterance] = {}
    for utt in corpus.sft:
        first_of_voice.setdefault(utt.voice, utt)
    files = {}
    for name, prompts, targets in (("train", list(first_of_voice.values()), corpus.rl_texts),
                                   ("heldout", corpus.heldout_prompts, corpus.heldout_texts)):
        wavs = {prompt.voice: f"voices/{prompt.voice.replace('+', '_')}.flac" for prompt in prompts}
        for prompt in prompts:
            sf.write(folder / wavs[prompt.voice], prompt.audio, sample_rate, subtype="PCM_16")
        rows = [{"text": target, "language": "en", "prompt_text": prompt.text, "voice": prompt.voice,
                 "prompt_wav": wavs[prompt.voice]} for target, prompt in paired(targets, prompts)]
        files[name] = folder / f"{name}.jsonl"
        files[name].write_text("".join(json.dumps(r) + "\n" for r in rows))
    return files


def numerics() -> dict[str, Any]:
    """What picks the k-means codebook besides the seed: the BLAS kernels scikit-learn runs on, which OpenBLAS
    chooses per CPU (on one machine the build is deterministic; with another kernel, e.g. ``OPENBLAS_CORETYPE=Haswell``
    on an AVX-512 CPU, the codebook and every figure after it differ)."""
    import sklearn
    from threadpoolctl import threadpool_info

    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                    if line.startswith("model name")), cpu)
    blas = sorted({f"{pool['internal_api']} {pool.get('version')} {pool.get('architecture', '')}".strip()
                   for pool in threadpool_info() if pool["user_api"] == "blas"})
    return {"cpu": cpu, "blas": blas, "scikit_learn": sklearn.__version__, "numpy": np.__version__}


def build_demo_tts(cfg: DemoTTSConfig) -> Path:
    """Run every step; returns the output folder (``ckpt/``, ``prompts/``, ``provenance.json``)."""
    started = time.perf_counter()
    version = espeak_version()
    set_seed(cfg.seed)
    out = Path(cfg.output_dir)
    corpus = make_corpus(cfg)
    t_speech = time.perf_counter() - started

    units = MelUnits.fit([u.audio for u in corpus.sft], cfg.codec, cfg.seed)
    codec = MelUnitCodec(units)
    for utt in corpus.sft:
        utt.codes = units.encode(utt.audio)
    lm = new_speech_lm(cfg)
    examples = sft_examples(lm, corpus.sft, cfg.data.prompts_per_utterance, cfg.seed)
    t_codec = time.perf_counter() - started - t_speech
    logger.info("%d SFT utterances (%d voices), %d examples, %.1f M parameters", len(corpus.sft),
                len(cfg.speech.train_voices), len(examples), sum(p.numel() for p in lm.model.parameters()) / 1e6)
    judge = HeldoutJudge(lm, codec, corpus, cfg)
    losses = train_sft(lm, examples, cfg.sft, cfg.seed, evaluate=judge.record)
    t_sft = time.perf_counter() - started - t_speech - t_codec
    heldout_wer = judge.report(cfg.sft.steps)
    logger.info("held-out word error rate: %s", heldout_wer)

    ckpt = out / "ckpt"
    lm.model.save_pretrained(ckpt / "llm", safe_serialization=True)
    lm.save_sampling_settings(ckpt / "llm")
    lm.tokenizer.save_pretrained(ckpt / "vq32k-phoneme-tokenizer")
    codec.units.save(ckpt / MEL_UNITS_DIR)
    prompt_files = write_prompts(out / "prompts", corpus, codec.sample_rate)
    provenance = {
        "command": "vocalign make-demo-tts configs/demo_tts.yaml",
        "config": asdict(cfg),
        "espeak_ng": version,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "numerics": numerics(),
        "data": {"sft_utterances": len(corpus.sft), "sft_examples": len(examples),
                 "sft_seconds_of_speech": round(sum(len(u.audio) for u in corpus.sft) / codec.sample_rate, 1),
                 "sft_codes": sum(len(u.codes) for u in corpus.sft),
                 "rl_prompts": len(corpus.rl_texts), "heldout_utterances": len(corpus.heldout_texts)},
        "parameters": sum(p.numel() for p in lm.model.parameters()),
        "sft_loss": {"first": losses[0], "last_50_mean": float(np.mean(losses[-50:])),
                     "every_50": [round(float(np.mean(losses[i:i + 50])), 4) for i in range(0, len(losses), 50)]},
        "heldout_word_error_rate": heldout_wer,
        "stop_point": STOP_POINT,
        "seconds": {"speech": round(t_speech, 1), "codec": round(t_codec, 1), "sft": round(t_sft, 1),
                    "total": round(time.perf_counter() - started, 1)},
        "files": {name: str(path.relative_to(out)) for name, path in prompt_files.items()},
    }
    (out / "provenance.json").write_text(json.dumps(provenance, indent=2) + "\n")
    logger.info("demo TTS in %s (%.0f s)", out, time.perf_counter() - started)
    return out
