"""The docs a user reads stay true: the configuration reference matches the dataclasses, the site builds with
warnings as errors, the README stays short, and no relative link points at a file that is not there."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

from vocalign.launch.config_reference import PAGE, REGENERATE, render

REPO = Path(__file__).resolve().parents[1]
README_MAX_LINES = 200
# [text](target) and ![alt](target), the target up to a space, ')' or '#'; code spans are dropped before matching
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s#]*)(?:#[^)\s]*)?(?:\s+\"[^\"]*\")?\)")
CODE = re.compile(r"```.*?```|`[^`\n]*`", re.DOTALL)


def relative_links(markdown: str) -> list[str]:
    """Targets of the markdown links in ``markdown`` that name a file in the checkout (not URLs or pure anchors)."""
    targets = LINK.findall(CODE.sub("", markdown))
    return [t for t in targets if t and not re.match(r"[a-z][a-z0-9+.-]*:", t, re.IGNORECASE)]


def test_the_configuration_reference_is_generated_from_the_dataclasses():
    committed = (REPO / PAGE).read_text(encoding="utf-8")
    assert committed == render(), f"{PAGE} is stale: regenerate it with `{REGENERATE}` from the repository root"


def test_the_reference_lists_every_trainer_key_with_its_default():
    """Spot values, so that a renderer that drops fields or defaults cannot pass by agreeing with itself."""
    from vocalign.rlhf.config import GRPOConfig

    page = render()
    for field in ("num_generations", "epsilon_high", "token_reward_weights", "resample", "schedule", "lora"):
        assert f"| `{field}` |" in page
    assert len(re.findall(r"^\| `\w+` \|", page, re.MULTILINE)) >= len(GRPOConfig.__dataclass_fields__)
    assert "| `micro_batch_size` | int | `8` | sequences per forward/backward;" in page
    assert "### `trainer.schedule` (Schedule)" in page and "### `eval` (HeldoutSettings)" in page


@pytest.mark.skipif(importlib.util.find_spec("mkdocs") is None,
                    reason="mkdocs is not installed (`bash launch/setup.sh test` installs it with the test extra)")
def test_the_docs_site_builds_with_warnings_as_errors(tmp_path):
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path)],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{result.stdout}\n{result.stderr}"
    assert (tmp_path / "reference" / "configuration" / "index.html").is_file()


def test_the_readme_stays_short():
    lines = (REPO / "README.md").read_text(encoding="utf-8").count("\n")
    assert lines <= README_MAX_LINES, (f"README.md has {lines} lines (at most {README_MAX_LINES}): move detail into "
                                       f"docs/ and link it")


def test_relative_links_point_at_files_that_exist():
    pages = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
    broken = [f"{page.relative_to(REPO)} -> {target}" for page in pages
              for target in relative_links(page.read_text(encoding="utf-8"))
              if not (page.parent / target).exists()]
    assert broken == []


def test_the_link_finder_sees_links_and_skips_urls_anchors_and_code():
    text = ("See [a](docs/a.md), [b](docs/b.md#part \"title\"), ![img](fig.png), [web](https://x.org/y.md), "
            "[here](#top), `[not](code.md)` and\n```\n[not](block.md)\n```\n")
    assert relative_links(text) == ["docs/a.md", "docs/b.md", "fig.png"]
