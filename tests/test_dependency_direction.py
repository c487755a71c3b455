"""Which package may import which: the direction the architecture docs draw, checked on the source.

``common`` is below everything; ``rewards`` and ``policies`` stand on it and never on each other; the trainer's core
(``rlhf`` without its environments) knows rewards' contract but no TTS model, so it trains any policy an environment
wraps; the environments, evaluation, SFT, the demo builder and the launchers sit above. Package code imports its
siblings relatively (``from ..rewards.base import Span``), so a reader that follows paths in the checkout, without
the editable install, sees the same wiring this test checks.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("common", "rewards", "policies", "rlhf", "eval", "sft", "demo", "launch", "configs")
# the rollout environments adapt a model family to the trainer; they are the only rlhf modules that may know policies
ENVIRONMENTS = {"rlhf/tts_env.py", "rlhf/toy_env.py"}
ALLOWED = {
    "common": set(),
    "configs": set(),
    "rewards": {"common"},
    "policies": {"common"},
    "rlhf": {"common", "rewards"},
    "rlhf-environments": {"common", "rewards", "policies"},
    "eval": {"common", "rewards", "policies", "rlhf"},
    "sft": {"common", "policies", "rlhf"},
    "demo": {"common", "rewards", "policies", "rlhf", "sft"},
    "launch": {"common", "rewards", "policies", "rlhf", "eval", "sft", "demo", "configs"},
}


def _layer(rel: str) -> str:
    return "rlhf-environments" if rel in ENVIRONMENTS else rel.split("/")[0]


def _imports(rel: str, source: str) -> list[tuple[int, str, int]]:
    """(line, top-level package imported, relative level) for every vocalign import in ``source``, lazy ones too."""
    found = []
    for node in ast.walk(ast.parse(source, rel)):
        if isinstance(node, ast.ImportFrom) and node.level:
            folder = rel.split("/")[:-1]
            base = folder[: len(folder) - (node.level - 1)]
            target = base + (node.module.split(".") if node.module else [])
            found.append((node.lineno, target[0] if target else "", node.level))
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("vocalign."):
            found.append((node.lineno, "absolute:" + node.module, 0))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, "absolute:" + a.name, 0) for a in node.names if a.name.startswith("vocalign.")]
    return found


def _sources() -> dict[str, str]:
    return {p.relative_to(REPO).as_posix(): p.read_text() for pkg in PACKAGES for p in sorted((REPO / pkg).rglob("*.py"))}


def violations(sources: dict[str, str]) -> list[str]:
    """Each import in ``sources`` (path in the checkout -> text) that goes against :data:`ALLOWED`, or is absolute."""
    found = []
    for rel, source in sources.items():
        layer = _layer(rel)
        for line, target, _ in _imports(rel, source):
            if target.startswith("absolute:"):
                found.append(f"{rel}:{line} imports {target[9:]} by its installed name; import it relatively")
            elif target != rel.split("/")[0] and target not in ALLOWED[layer]:
                found.append(f"{rel}:{line} ({layer}) imports {target}")
    return found


def test_packages_import_only_downwards_and_relatively():
    assert violations(_sources()) == []


def test_the_check_sees_a_wrong_way_import():
    """The check itself: a policies module importing rewards, a lazy rlhf-core import of policies, and an absolute
    sibling import are each named; an environment importing policies is allowed."""
    found = violations({
        "policies/probe.py": "from ..rewards.base import Sample\nfrom vocalign.common.audio import read_audio\n",
        "rlhf/loss.py": "def f():\n    from ..policies.decoding import Decoder\n",
        "rlhf/tts_env.py": "from ..policies.pipeline import TTSPipeline\n",
    })
    assert found == ["policies/probe.py:1 (policies) imports rewards",
                     "policies/probe.py:2 imports vocalign.common.audio by its installed name; import it relatively",
                     "rlhf/loss.py:2 (rlhf) imports policies"]


@pytest.mark.parametrize("package", PACKAGES)
def test_every_package_is_in_the_table(package):
    assert (REPO / package / "__init__.py").is_file()
    assert package in ALLOWED
