"""Text normalisation and long-text splitting, as the released GLM-TTS front end does them.

The speech LM was tuned on text written the way the release's front end writes it, so the same text must reach it
here: numbers, dates, times, money, units, %, ℃ spelled out by WeTextProcessing (the release's normaliser, the
version it pins) with Chinese-specific rules around it (brackets and quotes dropped, Greek letters and math symbols
read out, ！ and ! become full stops, English lower-cased in Chinese text, a final full stop added), and English
text spelled out by WeTextProcessing's English grammar and inflect, then lower-cased with its punctuation tidied.
WeTextProcessing needs pynini; it is in the ``tts`` extra. Its Chinese grammar is compiled once (about a minute)
with the release's options and cached on disk.

Long text is split as released: into units (a CJK character, an English word, or one other character; spaces
join the unit before them), weighed 1 per unit except an English word, which weighs 0.7 per syllable; sentences end
at punctuation once they weigh ``min_chars``, and a sentence heavier than ``max_chars`` is cut every ``max_chars``
units (one unit later when the cut would start the next piece with punctuation). The release normalises the whole
text, splits it, then normalises each chunk again.
"""

from __future__ import annotations

import functools
import itertools
import logging
import os
import re
import shutil
import tempfile
import unicodedata
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

logger = logging.getLogger(__name__)

# the punctuation the release ends sentences at, dedupes and fixes at the end of the text
PUNCTUATION = "。？！；：、.?!;:，,"
_PUNCT_CLASS = "[" + re.escape(PUNCTUATION) + "]"
_HAN = re.compile(r"[\u4e00-\u9fff]")
# the release's configs/custom_replace.jsonl, applied to Chinese text before normalisation
CHINESE_VARIANTS = {"噢": "哦", "欸": "诶"}
_CIRCLED = {chr(0x2460 + i): d for i, d in enumerate("一二三四五六七八九十")}
_SPELLED_SYMBOLS = {
    # Greek letters and shapes
    "α": "阿尔法", "β": "贝塔", "γ": "伽玛", "Γ": "伽玛", "δ": "德尔塔", "Δ": "德尔塔", "△": "德尔塔",
    "ε": "艾普西龙", "ζ": "捷塔", "η": "依塔", "θ": "西塔", "Θ": "西塔", "ι": "艾欧塔", "κ": "喀帕", "λ": "拉姆达",
    "Λ": "拉姆达", "μ": "缪", "ν": "拗", "ξ": "克西", "Ξ": "克西", "ο": "欧米克伦", "π": "派", "Π": "派", "ρ": "肉",
    "ς": "西格玛", "Σ": "西格玛", "σ": "西格玛", "τ": "套", "υ": "宇普西龙", "φ": "服艾", "Φ": "服艾", "χ": "器",
    "ψ": "普赛", "Ψ": "普赛", "ω": "欧米伽", "Ω": "欧米伽", "□": "方框",
    # relations and sets
    ">": "大于", "<": "小于", "∈": "属于", "∉": "不属于", "∪": "并", "∩": "交", "⊥": "垂直", "∥": "平行",
    "≠": "不等于", "∵": "因为", "∴": "所以", "∅": "空集", "⊂": "真包含于", "⊃": "包含", "⊆": "包含于", "⊇": "真包含",
    "⊄": "不属于", "⊅": "非超集", "⊈": "不属于", "⊉": "非超集",
}
_DIGITS_ZH = "零一二三四五六七八九"
_PLACES_ZH = ["", "十", "百", "千", "万", "十万", "百万", "千万", "亿", "十亿", "百亿", "千亿"]
_SCIENTIFIC = re.compile(r"(-?\d+(?:\.\d+)?)[*x×](\d+(?:\.\d+)?)\^(-?\d+(?:\.\d+)?)")
_MULTIPLY = {"zh": ("乘", "一二三四五六七八九十百千万亿"), "en": ("multiply", "0-9")}


def is_chinese(ch: str) -> bool:
    return "\u4e00" <= ch <= "\u9fff" or "\u3400" <= ch <= "\u4dbf"


def contains_chinese(text: str) -> bool:
    """The release's test for taking the Chinese path: any character of the CJK unified block."""
    return bool(_HAN.search(text))


# ---------------------------------------------------------------------------------------------------- numbers
def chinese_number(value: str | int) -> str:
    """Digits read the way the release's scientific-notation rule reads them: place by place, zeros collapsed,
    ``一十`` shortened to ``十``, decimals digit by digit; a negative number starts with ``负``."""
    if isinstance(value, str):
        whole, _, decimals = repr(float(value)).partition(".")
        decimals = decimals.rstrip("0")
        if decimals:
            head = chinese_number(int(whole)) if int(whole) != 0 else "零"
            return head + "点" + "".join(_DIGITS_ZH[int(d)] for d in decimals)
        value = int(whole)
    if value == 0:
        return "零"
    if value < 0:
        return "负" + chinese_number(-value)
    out: list[str] = []
    place, zero_pending, last_place = 0, False, ""
    while value:
        digit, value = value % 10, value // 10
        name = _PLACES_ZH[place] if place < len(_PLACES_ZH) else ""
        if digit == 0:
            if not zero_pending and out and last_place not in ("万", "亿"):
                out.append("零")
                zero_pending = True
        else:
            out.extend([name, _DIGITS_ZH[digit]] if name else [_DIGITS_ZH[digit]])
            zero_pending, last_place = False, name
        place += 1
    text = "".join(reversed(out))
    text = re.sub(r"^一十", "十", text)
    return re.sub(r"零$", "", re.sub(r"零+", "零", text))


def _scientific_to_chinese(text: str) -> str:
    """``3.5×10^8`` -> ``三点五乘十的八次方`` (the first such expression only, as released)."""
    match = _SCIENTIFIC.search(text)
    if match is None:
        return text
    base, factor, power = match.groups()
    spoken = f"{chinese_number(base)}乘{chinese_number(factor)}的{chinese_number(power)}次方"
    return text[:match.start()] + spoken + text[match.end():]


def _asterisk_as_multiply(text: str, lang: str) -> str:
    """``*`` between operands (numbers, letters, or brackets around them) is read as multiply; any other ``*``
    is dropped."""
    word, digits = _MULTIPLY[lang]
    operand = rf"[{digits}a-zA-Z]"
    left = rf"(?:(?<={operand})|(?<={operand}\)))"
    right = rf"(?={operand}|\({operand})"
    return re.sub(rf"{left}\s*\*\s*{right}", word, text).replace("*", "")


# ---------------------------------------------------------------------------------------------------- normaliser
def _keep_space(before: str, after: str) -> bool:
    return bool(re.match(r"[a-zA-Z0-9.,!?;:]", before)) and bool(re.match(r"[a-zA-Z0-9]", after))


def _drop_spaces(text: str) -> str:
    """Spaces survive only before a letter or digit that follows a letter, digit or ASCII punctuation."""
    text = re.sub(r" +", " ", text)
    return "".join(ch for i, ch in enumerate(text)
                   if ch != " " or (0 < i < len(text) - 1 and _keep_space(text[i - 1], text[i + 1])))


def _tidy_punctuation(text: str) -> str:
    text = _drop_spaces(text)
    text = re.sub(rf"({_PUNCT_CLASS})\1+", r"\1", text)
    text = re.sub(rf"{_PUNCT_CLASS}(?={_PUNCT_CLASS})", "", text)  # of a run of marks the last one stays
    return text.replace("#", "").replace("！", "。").replace("!", ".")


def _final_punctuation(text: str) -> str:
    """Questions keep their mark; any other text ends with one full stop (Chinese or ASCII by the text)."""
    if text and text[-1] in "？?":
        return text
    stop = "。" if contains_chinese(text) else "."
    return (text[:-1] if text and text[-1] in PUNCTUATION else text) + stop


def _lines_as_sentences(text: str) -> str:
    """A numbered first line keeps its number as a sentence; every line ends with punctuation; lines join."""
    text = re.sub(r"^(\d+)\. ", r"\1。", text).replace("\\n", "\n")
    lines = []
    for line in filter(None, (raw.strip() for raw in text.split("\n"))):
        if line[-1] not in ".!?;:：。！？；，":
            line = line + "。" if contains_chinese(line) else line + ". "
        lines.append(line)
    return "".join(lines) if contains_chinese("".join(lines)) else " ".join(lines)


def _drop_brackets(text: str, lang: str) -> str:
    for ch in "()（）【】「」`《》『』{}[]" + ("" if lang == "en" else "‘’"):
        text = text.replace(ch, "")
    return text


def _wetext_version() -> str:
    return metadata.version("WeTextProcessing")


def _cache_root() -> Path:
    base = os.environ.get("VOCALIGN_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "vocalign"
    return Path(base)


@functools.lru_cache(maxsize=1)
def _wetext() -> tuple[Callable[[str], str], Callable[[str], str]]:
    """WeTextProcessing's Chinese and English normalisers with the release's options. The Chinese grammar is
    compiled once per version (keeping erhua and interjections, full-width to half-width) into a cache folder."""
    try:
        from tn.chinese.normalizer import Normalizer as ChineseNormalizer
        from tn.english.normalizer import Normalizer as EnglishNormalizer
    except ImportError as err:
        raise ImportError("text normalisation needs WeTextProcessing (and pynini): pip install 'vocalign[tts]'") from err
    # WeTextProcessing gives its loggers their own handler, so each of its INFO lines ("found existing fst ...")
    # printed twice beside ours; its warnings still come through
    for name in ("wetext-zh_normalizer", "wetext-en_normalizer"):
        logging.getLogger(name).addFilter(lambda record: record.levelno >= logging.WARNING)
    options = {"remove_erhua": False, "full_to_half": True, "remove_interjections": False, "traditional_to_simple": True}
    cache = _cache_root() / f"wetextprocessing-{_wetext_version()}-zh-tn"
    if not (cache / "zh_tn_tagger.fst").is_file():
        logger.info("compiling WeTextProcessing's Chinese grammar into %s (once, about a minute)", cache)
        cache.parent.mkdir(parents=True, exist_ok=True)
        building = Path(tempfile.mkdtemp(dir=cache.parent, prefix=".building-"))
        ChineseNormalizer(cache_dir=str(building), overwrite_cache=True, **options)
        try:
            building.rename(cache)
        except OSError:  # another process finished first; its files are the same
            shutil.rmtree(building, ignore_errors=True)
    chinese = ChineseNormalizer(cache_dir=str(cache), overwrite_cache=False, **options)
    return chinese.normalize, EnglishNormalizer().normalize


@functools.lru_cache(maxsize=1)
def _inflect():
    import inflect

    return inflect.engine()


def _normalize_chinese(text: str, zh_tn: Callable[[str], str]) -> str:
    text = _scientific_to_chinese(text)
    text = re.sub(r"(?<=\d)\s*-\s*(?=\d)", "减", text).replace("-", "")
    text = re.sub(rf"咯(?={_PUNCT_CLASS})", "喽", text)
    for variant, standard in CHINESE_VARIANTS.items():
        text = text.replace(variant, standard)
    text = zh_tn(text)
    text = text.replace("\\", "")
    text = re.sub(r"(?<=\W)额(?=\W)", "呃", f" {text} ")
    text = _asterisk_as_multiply(re.sub(r"[~～]+", "。", text), "zh").strip()
    text = _drop_brackets(text, "zh").replace(" - ", "，").replace("——", "，")
    text = re.sub(r"[,:：;；、]+", "，", text)
    text = re.sub(r"[.…]+", "。", text)
    text = re.sub(r"[_·]+", "", text)
    text = re.sub(r"""['"‘’“”|]+""", "", text)
    for symbol, spoken in {"†": "，", "²": "平方", "³": "立方", "/": "每", "~": "到", "～": "到", **_CIRCLED,
                           **_SPELLED_SYMBOLS}.items():
        text = text.replace(symbol, spoken)
    return text.lower()


def _spell_digits(text: str) -> str:
    """Every run of characters that ``str.isdigit`` accepts (superscripts too) as English words (inflect)."""
    return "".join(_inflect().number_to_words(run) if digits else run
                   for digits, run in ((k, "".join(g)) for k, g in itertools.groupby(text, str.isdigit)))


def _normalize_english(text: str, en_tn: Callable[[str], str]) -> str:
    text = en_tn(text.replace("'", "’"))
    text = _asterisk_as_multiply(_drop_brackets(text, "en"), "en")
    text = _spell_digits(text.replace("—", " ").replace("’", "'"))
    text = re.sub(r"[^\w\s.,!?':;]", "", re.sub(r"\s+", " ", text)).lower()
    text = re.sub(r"([.,!?':;])\1+", r"\1", text)
    return re.sub(r"\s*([.,?!':;])\s*", r"\1 ", text).strip()


def normalize_text(text: str) -> str:
    """The release's text normalisation (``TextFrontEnd.text_normalize`` with WeTextProcessing)."""
    if not isinstance(text, str):
        raise TypeError(f"text to normalise must be a string, got {type(text).__name__}")
    return _normalize_cached(text)


@functools.lru_cache(maxsize=16384)
def _normalize_cached(text: str) -> str:
    # WeTextProcessing's tagger takes ~30 ms a text on a CPU, and GRPO normalises the same prompt texts at every
    # step and every evaluation; the result depends on the text alone, so each text is normalised once
    import emoji

    zh_tn, en_tn = _wetext()
    text = emoji.replace_emoji(_lines_as_sentences(text), replace="")
    text = re.sub(r"(?<=[a-zA-Z])-(?=[a-zA-Z])", " ", text)
    text = _normalize_chinese(text, zh_tn) if contains_chinese(text) else _normalize_english(text, en_tn)
    return _final_punctuation(_tidy_punctuation(text))


# ---------------------------------------------------------------------------------------------------- splitting
def _is_cjk_unit(ch: str) -> bool:
    name = unicodedata.name(ch, "")
    return "CJK" in name or "IDEOGRAPH" in name


def _is_punctuation(unit: str) -> bool:
    mark = unit.strip()
    return len(mark) == 1 and mark in PUNCTUATION


def split_units(text: str) -> list[str]:
    """CJK characters (ideographic punctuation included) one by one, English words (letters, with ' and - inside)
    whole, any other character alone; a space joins the unit before it."""
    units: list[str] = []
    word = ""
    for ch in text:
        if not _is_cjk_unit(ch) and (ch.isalpha() or (word and ch in "'-")):
            word += ch
            continue
        if word:
            units.append(word)
            word = ""
        if ch.isspace() and units:
            units[-1] += ch
        else:
            units.append(ch)
    if word:
        units.append(word)
    return units


@functools.lru_cache(maxsize=4096)
def syllables(word: str) -> int:
    """CMU dictionary syllables (``pronouncing``); vowel groups for words it does not know."""
    import pronouncing

    phones = pronouncing.phones_for_word(word)
    if phones:
        return pronouncing.syllable_count(phones[0])
    lower = word.lower()
    count = len(re.findall(r"(?!e$)[aeiouy]+", lower)) + bool(re.fullmatch(r"[^aeiouy]*e", lower))
    return max(count, 1)


def weight(units: list[str]) -> float:
    """Length in Chinese-character equivalents: an English word weighs 0.7 per syllable, any other unit 1."""
    total = 0.0
    for unit in units:
        word = unit.strip()
        total += 0.7 * syllables(word) if word.isascii() and word.isalpha() else 1
    return total


def split_text(text: str, min_chars: int = 30, max_chars: int = 60) -> list[str]:
    """Chunks of ``text`` as the release splits it (see the module docstring); joined they give ``text`` back.
    Where the release fails (a sentence heavier than ``max_chars`` with at most ``max_chars`` units, e.g. long
    English words without punctuation) the sentence stays whole."""
    if not text.strip():
        return []
    sentences: list[list[str]] = [[]]
    for unit in split_units(text):
        sentences[-1].append(unit)
        if _is_punctuation(unit) and weight(sentences[-1]) >= min_chars:
            sentences.append([])
    chunks: list[str] = []
    for sentence in filter(None, sentences):
        while weight(sentence) > max_chars and len(sentence) > max_chars:
            cut = max_chars + 1 if _is_punctuation(sentence[max_chars]) else max_chars
            chunks.append("".join(sentence[:cut]))
            sentence = sentence[cut:]
        if sentence:
            chunks.append("".join(sentence))
    return chunks
