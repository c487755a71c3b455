"""The text + phoneme + speech-token vocabulary of the speech LM.

The released ``vq32k-phoneme-tokenizer`` folder is a Hugging Face tokenizer with remote code (tiktoken-style ranks);
it holds text tokens, the phoneme tokens ``<|SYMBOL|>``, the speech tokens ``<|audio_0|>`` .. ``<|audio_32767|>``
and the control tokens below. Loading it runs code from the folder, so it needs ``trust_remote_code=True``.
:func:`build_char_tokenizer` makes a small character-level tokenizer with the same special tokens, for tests and
the tiny checkpoint.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

PAD = "<|endoftext|>"
STOP = "<|user|>"
BEGIN_OF_AUDIO = "<|begin_of_audio|>"
UNK = "<|unk|>"


def audio_token(code: int) -> str:
    return f"<|audio_{code}|>"


@dataclass(frozen=True)
class SpeechVocab:
    """Ids the speech LM needs; speech code c is token ``audio_0 + c``."""

    pad: int
    stop: int
    begin_of_audio: int
    audio_0: int
    num_codes: int

    @classmethod
    def from_tokenizer(cls, tokenizer: PreTrainedTokenizerBase, num_codes: int) -> SpeechVocab:
        ids = {}
        for name, token in (("pad", PAD), ("stop", STOP), ("begin_of_audio", BEGIN_OF_AUDIO),
                            ("audio_0", audio_token(0)), ("audio_last", audio_token(num_codes - 1))):
            found = tokenizer.convert_tokens_to_ids(token)
            if found is None or found == tokenizer.unk_token_id:
                raise ValueError(f"the tokenizer has no {token!r} token; is this the GLM-TTS speech tokenizer folder?")
            ids[name] = found
        if ids["audio_last"] - ids["audio_0"] != num_codes - 1:
            raise ValueError(f"speech tokens are not contiguous: <|audio_0|> is {ids['audio_0']} but "
                             f"<|audio_{num_codes - 1}|> is {ids['audio_last']}")
        return cls(ids["pad"], ids["stop"], ids["begin_of_audio"], ids["audio_0"], num_codes)


def load_tokenizer(path: str | Path, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"tokenizer folder {path} does not exist")
    try:
        return AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except ValueError as err:
        if "trust_remote_code" in str(err) and not trust_remote_code:
            raise ValueError(f"{path} ships its own tokenizer code; set trust_remote_code: true to run it") from None
        raise


def _speech_tokenizer(pieces: Iterable[str], phonemes: Iterable[str], num_codes: int, pre_tokenizer
                      ) -> PreTrainedTokenizerFast:
    """Control tokens, phoneme tokens and speech tokens first (contiguous codes), then ``pieces``."""
    from tokenizers import Tokenizer, models

    specials = [PAD, STOP, BEGIN_OF_AUDIO, UNK] + [f"<|{p}|>" for p in phonemes]
    speech = [audio_token(c) for c in range(num_codes)]
    vocab = {tok: i for i, tok in enumerate(specials + speech + list(pieces))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizer
    tok.add_special_tokens(specials + speech)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, eos_token=STOP, unk_token=UNK)


def build_char_tokenizer(characters: Iterable[str], phonemes: Iterable[str], num_codes: int
                         ) -> PreTrainedTokenizerFast:
    """Character-level tokenizer, for tests and the tiny checkpoint."""
    from tokenizers import Regex, pre_tokenizers

    return _speech_tokenizer(sorted(set(characters) | {" "}), phonemes, num_codes,
                             pre_tokenizers.Split(Regex("."), behavior="isolated"))


def build_word_tokenizer(words: Iterable[str], num_codes: int) -> PreTrainedTokenizerFast:
    """Word-level tokenizer over a closed vocabulary (the demo TTS's): a word is one token, as a frequent word is
    one BPE token in the released tokenizer; punctuation marks are tokens of their own, anything else is unknown."""
    from tokenizers import pre_tokenizers

    return _speech_tokenizer(sorted(set(words) | set(".,?!")), [], num_codes, pre_tokenizers.Whitespace())
