"""The configuration reference page, generated from the config dataclasses so that it cannot drift from them.

Each config section is a dataclass; its fields, types and defaults are read with :mod:`dataclasses`, and what each
field means from the comments beside it in the source (a comment on the field's line, or a comment block directly
under the previous field), else from the field's ``metadata["help"]``; a comment block after a blank line titles
the fields below it, and the class docstring introduces its table. ``tests/test_docs.py`` fails when the committed
page and :func:`render` disagree; regenerate it with :data:`REGENERATE`.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import re
import textwrap
import tokenize
import typing
from dataclasses import dataclass
from typing import Any

import yaml

from ..demo.build import DemoTTSConfig
from ..eval.heldout import HeldoutSettings
from ..rewards.limits import ServerLimits
from ..rlhf.config import GRPOConfig
from ..rlhf.toy_env import ToyConfig
from ..sft.finetune import SFTConfig
from .recipe import GLMTTSSettings

PAGE = "docs/reference/configuration.md"
REGENERATE = f"python -m vocalign.launch.config_reference > {PAGE}"


@dataclass(frozen=True)
class Section:
    title: str
    key: str  # where the dataclass sits in its YAML file (`trainer`); "" for the whole file
    cls: type
    read_by: str  # the file or command that reads it, in words


# One line per config section; nested dataclasses get their own tables under their parent's key.
SECTIONS: tuple[Section, ...] = (
    Section("Trainer", "trainer", GRPOConfig, "the `trainer:` section of a training recipe (`vocalign train`)"),
    Section("Held-out evaluation", "eval", HeldoutSettings, "the `eval:` section of a training recipe"),
    Section("GLM-TTS environment", "env", GLMTTSSettings,
            "the `env:` section of a training recipe with `name: glmtts` (beside `name`)"),
    Section("Toy environment", "env", ToyConfig, "the `env:` section of a training recipe with `name: toy` (beside `name`)"),
    Section("Demo TTS builder", "", DemoTTSConfig, "a `vocalign make-demo-tts` file, such as `configs/demo_tts.yaml`"),
    Section("LoRA voice SFT", "", SFTConfig, "a `vocalign sft` file, such as `configs/lora_voice.yaml`"),
    Section("Reward server limits", "", ServerLimits,
            "the flags of `vocalign serve-reward` (`max_batch` is `--max-batch`); a plugin may lower the defaults"),
)


@dataclass(frozen=True)
class SourceNotes:
    """What the class's source says beside its fields, which :mod:`dataclasses` cannot see."""

    docstring: str
    comments: dict[str, str]  # field -> its own comment
    headings: dict[str, str]  # field -> the comment that titles the group of fields starting at it


def source_notes(cls: type) -> SourceNotes:
    source = textwrap.dedent(inspect.getsource(cls))
    lines = source.splitlines()
    comments: dict[int, tuple[str, bool]] = {}  # line -> (text, follows code on its line)
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            row, col = token.start
            comments[row] = (token.string.lstrip("#").strip(), bool(lines[row - 1][:col].strip()))
    classdef = ast.parse(source).body[0]
    assert isinstance(classdef, ast.ClassDef)
    spans = {node.target.id: (node.lineno, node.end_lineno or node.lineno) for node in classdef.body
             if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)}
    field_ends = {end for _, end in spans.values()}
    own: dict[str, str] = {}
    headings: dict[str, str] = {}
    for name, (first, last) in spans.items():
        trailing = [comments[row][0] for row in range(first, last + 1) if comments.get(row, ("", False))[1]]
        above = []
        row = first - 1
        while row in comments and not comments[row][1]:
            above.insert(0, comments[row][0])
            row -= 1
        if above and row not in field_ends and any(end < first for end in field_ends):  # after a blank line
            headings[name] = " ".join(above)
            above = []
        if text := " ".join(above + trailing):
            own[name] = text
    return SourceNotes(ast.get_docstring(classdef) or "", own, headings)


def _dataclass_in(annotation: Any) -> type | None:
    """The dataclass a field holds (``LoraSettings | None`` -> ``LoraSettings``), else None."""
    for candidate in (annotation, *typing.get_args(annotation)):
        if isinstance(candidate, type) and dataclasses.is_dataclass(candidate):
            return candidate
    return None


def _default(f: dataclasses.Field, parent: Any) -> Any:
    """The field's value when its section is left out: the parent's default object decides (SFT's LoRA settings
    differ from the class's own defaults), else the field's default."""
    if dataclasses.is_dataclass(parent) and not isinstance(parent, type):
        return getattr(parent, f.name)
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _as_yaml(value: Any) -> str:
    """The default as one would write it in the YAML file, as a markdown code span."""
    if value is dataclasses.MISSING:
        return "required"
    if isinstance(value, tuple):
        value = list(value)
    try:
        text = yaml.safe_dump(value, default_flow_style=True, width=10**6).removesuffix("...\n").strip()
    except yaml.representer.RepresenterError:
        text = repr(value)
    return f"`{_cell(text)}`"


def _markdown(text: str) -> str:
    """reStructuredText roles and literals of docstrings (``x``, :meth:`x`) as markdown code."""
    return re.sub(r":\w+:`~?([^`]+)`", r"`\1`", text).replace("``", "`")


def _cell(text: str) -> str:
    return _markdown(text).replace("|", "\\|").replace("\n", " ")


def _type_name(annotation: Any) -> str:
    return annotation if isinstance(annotation, str) else inspect.formatannotation(annotation)


def _tables(key: str, cls: type, defaults: Any) -> list[str]:
    """Markdown for ``cls`` at YAML path ``key``, then each nested dataclass's tables under ``key.field``."""
    notes = source_notes(cls)
    hints = typing.get_type_hints(cls)
    out = [f"### `{key}` ({cls.__name__})" if key else f"### {cls.__name__}", ""]
    if notes.docstring:
        out += [_markdown(notes.docstring), ""]
    nested: list[tuple[str, type, Any]] = []
    header = ["| key | type | default | meaning |", "|---|---|---|---|"]
    out += header
    for f in dataclasses.fields(cls):
        if f.name in notes.headings:
            heading = _markdown(notes.headings[f.name])
            out += ["", heading[:1].upper() + heading[1:] + ":", "", *header]
        value = _default(f, defaults)
        meaning = notes.comments.get(f.name) or f.metadata.get("help", "")
        child = _dataclass_in(hints[f.name])
        if child is not None:
            path = f"{key}.{f.name}" if key else f.name
            nested.append((path, child, value))
            meaning = (meaning.rstrip(".") + ". " if meaning else "") + f"Its keys: table `{path}`."
            shown = "`null`" if value is None else "see its table"
        else:
            shown = _as_yaml(value)
        out.append(f"| `{f.name}` | {_cell(_type_name(f.type))} | {shown} | {_cell(meaning)} |")
    out.append("")
    for path, child, value in nested:
        out += _tables(path, child, value)
    return out


def render() -> str:
    """The configuration reference page, as committed at :data:`PAGE`."""
    out = [
        "# Configuration reference",
        "",
        f"<!-- Generated from the config dataclasses by `{REGENERATE}`; do not edit by hand. -->",
        "",
        "Every key vocalign reads from a config file, with its type and default. Unknown keys are refused with the",
        "closest known one. Any key can also be set on the command line with `--set section.key=value` (the value",
        "is read as YAML).",
        "",
    ]
    for section in SECTIONS:
        out += [f"## {section.title}", "", f"Read from {section.read_by}.", ""]
        out += _tables(section.key, section.cls, None)
    return "\n".join(out).rstrip("\n") + "\n"


if __name__ == "__main__":
    print(render(), end="")
