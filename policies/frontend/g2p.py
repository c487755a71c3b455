"""Phoneme-in: hybrid phoneme + text input for Chinese, as GLM-TTS reads it.

Most characters stay text. Two kinds become phoneme tokens ``<|INITIAL|><|FINAL+TONE|>`` so that the speech LM
cannot misread them: entries of a replace dictionary (polyphones in context, e.g. 衰 in 乡音无改鬓毛衰 is cui1),
matched longest first, and characters outside the set the model reads reliably as text (rare characters), read by
G2P: jieba segments words so that pypinyin picks the reading of the word, not of the lone character. English stays
text. During training, ordinary characters may be swapped for phonemes at random so the model learns both forms.

Phoneme symbols are the released tokenizer's: standard pinyin finals in full form (uei, iou, uen, v for u-umlaut),
tone 5 for the neutral tone, ``i`` after zh/ch/sh/r written ``iii`` and after z/c/s written ``ii``.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Iterable, Mapping
from pathlib import Path

from .text import is_chinese

logger = logging.getLogger(__name__)

_RETROFLEX = {"zh", "ch", "sh", "r"}
_DENTAL = {"z", "c", "s"}
# the release's configs/ files phoneme-in reads: the phoneme inventory, the replace dictionary, the characters read as text
RELEASE_TABLES = ("G2P_all_phonemes.json", "G2P_replace_dict.jsonl", "G2P_able_1word.json")
# characters pypinyin misreads, read as a character with the intended reading (as the release's G2P does before
# segmenting and looking up pinyin): 嗯 as en1 (恩), 呣 as mu3 (母)
READ_AS = str.maketrans({"嗯": "恩", "呣": "母"})


def read_inventory(path: str | Path) -> list[str]:
    """Phoneme symbols of ``G2P_all_phonemes.json`` (index -> symbol, or a list), in the file's order: the order in
    which a tokenizer built from it numbers them."""
    table = json.loads(Path(path).read_text(encoding="utf-8"))
    return list(table.values() if isinstance(table, dict) else table)


def syllable_phonemes(initial: str, final_tone: str) -> list[str]:
    """``("sh", "i4")`` -> ``["SH", "III4"]``; ``("", "van2")`` -> ``["VAN2"]``."""
    if final_tone[:-1] == "i" and initial in _RETROFLEX:
        final_tone = "iii" + final_tone[-1]
    elif final_tone[:-1] == "i" and initial in _DENTAL:
        final_tone = "ii" + final_tone[-1]
    return ([initial.upper()] if initial else []) + [final_tone.upper()]


def as_tokens(phonemes: Iterable[str]) -> str:
    return "".join(f"<|{p}|>" for p in phonemes)


class ChineseG2P:
    """Word-aware pinyin (jieba + pypinyin) restricted to a known phoneme inventory."""

    def __init__(self, inventory: Iterable[str] | None = None) -> None:
        import jieba
        from pypinyin import Style, pinyin

        jieba.setLogLevel(logging.WARNING)
        self._cut, self._pinyin, self._style = jieba.cut, pinyin, Style
        self.inventory = set(inventory) if inventory is not None else None

    def word(self, word: str) -> list[list[str] | None]:
        """Phonemes per character of ``word``; None for a character with no reading in the inventory."""
        reading = word.translate(READ_AS)
        initials = self._pinyin(reading, style=self._style.INITIALS, strict=True)
        finals = self._pinyin(reading, style=self._style.FINALS_TONE3, strict=True, neutral_tone_with_five=True)
        out: list[list[str] | None] = []
        for ch, (initial,), (final,) in zip(word, initials, finals):
            if not is_chinese(ch) or not final or not final[-1].isdigit():
                out.append(None)
                continue
            phonemes = syllable_phonemes(initial, final)
            if self.inventory is not None and not set(phonemes) <= self.inventory:
                logger.debug("no phoneme tokens for %s (%s)", ch, phonemes)
                out.append(None)
                continue
            out.append(phonemes)
        return out

    def words(self, text: str) -> list[str]:
        """Words of ``text``, segmented as it is read (see ``READ_AS``); the characters stay those of ``text``."""
        words, start = [], 0
        for piece in self._cut(text.translate(READ_AS)):
            words.append(text[start:start + len(piece)])
            start += len(piece)
        return words


class PhonemeFrontend:
    """Text -> hybrid phoneme+text string for the tokenizer."""

    def __init__(self, g2p: ChineseG2P, replace: Mapping[str, str] | None = None,
                 text_readable: Iterable[str] | None = None) -> None:
        """``replace``: word -> replacement (may mix text and phoneme tokens); ``text_readable``: characters the
        model reads as text; None means every character."""
        self.g2p = g2p
        self.replace = dict(replace or {})
        self.longest = max(map(len, self.replace), default=0)
        self.readable = set(text_readable) if text_readable is not None else None

    @classmethod
    def from_files(cls, phonemes: str | Path, replace_dicts: Iterable[str | Path] = (),
                   readable_chars: str | Path | None = None) -> PhonemeFrontend:
        """The released data files: ``G2P_all_phonemes.json`` (index -> symbol), replace dictionaries as JSON lines
        of ``{word: replacement}`` (later files override earlier ones), ``G2P_able_1word.json`` (characters read as
        text)."""
        symbols = read_inventory(phonemes)
        replace: dict[str, str] = {}
        for path in replace_dicts:
            for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}:{n}: not a JSON object: {err}") from None
                if not isinstance(entry, dict):
                    raise TypeError(f"{path}:{n}: expected {{word: replacement}}, got {line!r}")
                replace.update(entry)
        readable = json.loads(Path(readable_chars).read_text(encoding="utf-8")) if readable_chars else None
        return cls(ChineseG2P(symbols), replace, readable)

    @classmethod
    def from_release_configs(cls, folder: str | Path) -> PhonemeFrontend:
        """The tables the release's ``use_phoneme`` reads, from a folder laid out as its ``configs/``:
        ``G2P_all_phonemes.json``, ``G2P_replace_dict.jsonl`` and ``G2P_able_1word.json``."""
        folder = Path(folder)
        missing = [name for name in RELEASE_TABLES if not (folder / name).is_file()]
        if missing:
            raise FileNotFoundError(f"phoneme-in needs the release's G2P tables in {folder}; missing {missing} "
                                    "(they are in the release's configs/ folder)")
        inventory, replace, readable = (folder / name for name in RELEASE_TABLES)
        return cls.from_files(inventory, [replace], readable)

    def _replace_longest(self, text: str) -> list[tuple[str, bool]]:
        """Split into (piece, fixed) where fixed pieces come from the dictionary and are never touched again."""
        pieces: list[tuple[str, bool]] = []
        i, plain = 0, ""
        while i < len(text):
            for length in range(min(self.longest, len(text) - i), 0, -1):
                replacement = self.replace.get(text[i:i + length])
                if replacement is not None:
                    if plain:
                        pieces.append((plain, False))
                        plain = ""
                    pieces.append((replacement, True))
                    i += length
                    break
            else:
                plain += text[i]
                i += 1
        if plain:
            pieces.append((plain, False))
        return pieces

    def convert(self, text: str, *, phoneme_share: float = 0.0, rng: random.Random | None = None) -> str:
        """Hybrid string. ``phoneme_share`` > 0 (training augmentation) also turns that share of ordinary Chinese
        characters into phonemes at random."""
        out = []
        for piece, fixed in self._replace_longest(text):
            if fixed:
                out.append(piece)
                continue
            for word in self.g2p.words(piece):
                needs_g2p = [is_chinese(ch) and ((self.readable is not None and ch not in self.readable)
                                                 or (phoneme_share > 0 and (rng or random).random() < phoneme_share))
                             for ch in word]
                if not any(needs_g2p):
                    out.append(word)
                    continue
                for ch, convert, phonemes in zip(word, needs_g2p, self.g2p.word(word)):
                    out.append(as_tokens(phonemes) if convert and phonemes else ch)
        return "".join(out)

    def augment(self, text: str, rng: random.Random, probability: float = 0.2, max_share: float = 0.5) -> str:
        """The report's training augmentation: with ``probability``, a uniform share up to ``max_share`` of ordinary
        characters becomes phonemes; dictionary entries and rare characters are converted as at inference."""
        share = rng.uniform(0.0, max_share) if rng.random() < probability else 0.0
        return self.convert(text, phoneme_share=share, rng=rng)
