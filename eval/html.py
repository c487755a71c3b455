"""``eval.html``: the held-out evaluation as one page to read and listen to.

The figures of ``eval.md`` say whether GRPO helped; a person deciding whether it *sounds* better wants the table, the
run's curves and the saved utterances of each policy side by side, playable. The page links the run folder's own
files by relative path (``eval_wavs/<policy>/<n>.wav``, ``*.png``), so the folder can be copied or served as a whole,
and the page stays small. A short script marks each player with whether its file loaded (``data-state`` and
``data-duration`` on the ``<audio>``, a count on ``<body>``) and shows a visible note beside a player whose file is
missing or unreadable.
"""

from __future__ import annotations

import html
import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

PAGE_NAME = "eval.html"
# per-utterance fields shown elsewhere on the page or only bookkeeping
_NOT_DETAILS = {"policy", "seed", "index", "text", "transcript"}
_SEPARATOR_CELL = re.compile(r"^:?-+:?$")

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 75em; padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; }
th, td { border: 1px solid #bbb; padding: 0.3em 0.7em; text-align: left; }
th { background: #f0f0f0; }
td { font-variant-numeric: tabular-nums; }
img { max-width: 100%; border: 1px solid #ddd; }
.utterance { border: 1px solid #ccc; border-radius: 6px; padding: 0.6em 1em; margin: 1em 0; }
.utterance h3 { margin: 0.2em 0 0.6em; font-weight: 500; }
.takes { display: grid; gap: 1em; }
.take h4 { margin: 0 0 0.3em; }
.take audio { width: 100%; }
.details { font-size: 0.85em; color: #555; margin: 0.3em 0; }
.missing { color: #b00; font-weight: 600; }
"""

# Marks every player once its file's metadata loaded (or failed), so a reader sees a broken link at once and a
# headless browser can check the page.
_SCRIPT = """
(() => {
  const players = Array.from(document.querySelectorAll('audio'));
  let settled = 0, loaded = 0;
  const settle = (player, state) => {
    if (player.dataset.state) return;
    player.dataset.state = state;
    player.dataset.duration = String(player.duration || 0);
    if (state === 'loaded') loaded += 1;
    else {
      const note = document.createElement('div');
      note.className = 'missing';
      note.textContent = 'could not load ' + player.getAttribute('src');
      player.after(note);
    }
    settled += 1;
    if (settled === players.length) document.body.dataset.audio = loaded + '/' + players.length + ' loaded';
  };
  for (const player of players) {
    player.addEventListener('loadedmetadata', () => settle(player, player.duration > 0 ? 'loaded' : 'empty'));
    player.addEventListener('error', () => settle(player, 'error'));
    if (player.readyState >= 1) settle(player, player.duration > 0 ? 'loaded' : 'empty');
    else if (player.error) settle(player, 'error');
  }
  if (!players.length) document.body.dataset.audio = '0/0 loaded';
})();
"""


def markdown_to_html(markdown: str) -> str:
    """``eval.md`` as HTML: each block of ``|``-rows a table (the first row its header, the ``|---|`` row dropped),
    any other line a paragraph; every cell's text escaped, so the figures are the file's, digit for digit."""
    parts: list[str] = []
    table: list[list[str]] = []

    def close_table() -> None:
        if table:
            head, *body = table
            parts.append("<table>\n<tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in head) + "</tr>\n"
                         + "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>\n"
                                   for row in body) + "</table>")
            table.clear()

    for line in markdown.splitlines():
        line = line.strip()
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            if not all(_SEPARATOR_CELL.match(c) for c in cells):
                table.append(cells)
            continue
        close_table()
        if line:
            parts.append(f"<p>{html.escape(line)}</p>")
    close_table()
    return "\n".join(parts)


def _details(row: Mapping[str, Any]) -> str:
    return " · ".join(f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}"
                      for key, value in row.items() if key not in _NOT_DETAILS)


def _href(relative: str) -> str:
    return html.escape(quote(relative), quote=True)


def render_eval_page(table_markdown: str, utterance_rows: Sequence[Mapping[str, Any]],
                     wavs: Mapping[str, Sequence[str]], images: Sequence[str], title: str = "Held-out evaluation"
                     ) -> str:
    """The page: the table, the images, then one block per saved utterance with each policy's player.

    ``utterance_rows``: ``eval_utterances.jsonl``'s rows (``policy``, ``seed``, ``index``, ``text``, figures);
    ``wavs``: each policy's saved files in utterance order, relative to the page (file ``n`` is row ``index == n``
    of the policy's first seed, as :func:`eval.heldout.score_policy` saves them); ``images``: relative paths."""
    first_seed: dict[str, Any] = {}
    for row in utterance_rows:
        first_seed.setdefault(row["policy"], row.get("seed"))
    by_utterance = {(row["policy"], row.get("index")): row for row in utterance_rows
                    if row.get("seed") == first_seed[row["policy"]]}
    policies = list(wavs)
    blocks = []
    for n in range(max((len(files) for files in wavs.values()), default=0)):
        rows = {p: by_utterance.get((p, n), {}) for p in policies}
        text = next((row["text"] for row in rows.values() if "text" in row), "")
        takes = []
        for policy in policies:
            if n >= len(wavs[policy]):
                continue
            row = rows[policy]
            heard = (f'<div class="details">heard: {html.escape(str(row["transcript"]))}</div>'
                     if "transcript" in row else "")
            takes.append(f'<div class="take"><h4>{html.escape(policy)}</h4>\n'
                         f'<audio controls preload="metadata" src="{_href(wavs[policy][n])}"></audio>\n'
                         f'{heard}<div class="details">{html.escape(_details(row))}</div></div>')
        blocks.append(f'<div class="utterance"><h3>{n}. {html.escape(text)}</h3>\n'
                      f'<div class="takes" style="grid-template-columns: repeat({max(len(takes), 1)}, 1fr)">\n'
                      + "\n".join(takes) + "\n</div></div>")
    figures = "\n".join(f'<p><img src="{_href(path)}" alt="{html.escape(path)}"></p>' for path in images)
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>{html.escape(title)}</title>\n'
            f"<style>{_STYLE}</style>\n</head>\n<body>\n<h1>{html.escape(title)}</h1>\n"
            f"<h2>Held-out figures</h2>\n{markdown_to_html(table_markdown)}\n"
            + (f"<h2>Curves</h2>\n{figures}\n" if images else "")
            + "<h2>Saved utterances</h2>\n" + ("\n".join(blocks) or "<p>No utterances were saved.</p>")
            + f"\n<script>{_SCRIPT}</script>\n</body>\n</html>\n")


def write_eval_page(out_dir: str | Path) -> Path:
    """``out_dir/eval.html`` from what the evaluation wrote there (``eval.md``, ``eval_utterances.jsonl``,
    ``eval_wavs/``) and the run's images (``*.png`` beside them, such as ``reward_curves.png``)."""
    out_dir = Path(out_dir)
    rows = [json.loads(line) for line in (out_dir / "eval_utterances.jsonl").read_text().splitlines() if line.strip()]
    wav_root = out_dir / "eval_wavs"
    policies = list(dict.fromkeys(row["policy"] for row in rows))
    wavs = {p: [f"eval_wavs/{p}/{n}.wav" for n in range(_count_wavs(wav_root / p))] for p in policies}
    images = sorted(path.name for path in out_dir.glob("*.png"))
    page = out_dir / PAGE_NAME
    page.write_text(render_eval_page((out_dir / "eval.md").read_text(), rows, wavs, images,
                                     f"Held-out evaluation: {out_dir.resolve().name}"), encoding="utf-8")
    return page


def _count_wavs(folder: Path) -> int:
    """How many of ``0.wav``, ``1.wav``, ... the folder holds in an unbroken run."""
    n = 0
    while (folder / f"{n}.wav").is_file():
        n += 1
    return n
