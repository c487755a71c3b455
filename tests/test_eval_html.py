"""eval.html: the held-out table's figures, the run's curves and each saved utterance's players side by side, linked
by relative path; opened in headless Chromium, every player loads its file (and a broken link is reported)."""

import shutil
import subprocess
from html.parser import HTMLParser

import matplotlib.pyplot as plt
import numpy as np
import pytest

from vocalign.eval.heldout import PolicyScores, compare

TEXTS = ['say "<b>one</b>" & two', "three four"]
RATE = 16000


class PageElements(HTMLParser):
    """The page's headings of saved utterances, players, images and table cells, in document order."""

    def __init__(self):
        super().__init__()
        self.order, self.cells, self.images, self.body = [], [], [], {}
        self._open = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "audio":
            self.order.append(("audio", attrs))
        elif tag == "img":
            self.images.append(attrs["src"])
        elif tag == "body":
            self.body = attrs
        elif tag in ("h3", "td"):
            self._open = tag

    def handle_data(self, data):
        if self._open == "h3":
            self.order.append(("text", data))
        elif self._open == "td":
            self.cells.append(data)
        self._open = None


def parse(page):
    elements = PageElements()
    elements.feed(page)
    return elements


def policy_scores(error_rates, seconds):
    """Two seeds, two utterances; the first seed's audio saved (a tone of each length)."""
    rows = [{"seed": seed, "index": i, "text": text, "error_rate": error_rates[seed], "transcript": f"heard {i}",
             "seconds": seconds[i]} for seed in (0, 1) for i, text in enumerate(TEXTS)]
    per_seed = {seed: {"error_rate": error_rates[seed], "sim": 0.6, "seconds_per_char_median": 0.1} for seed in (0, 1)}
    audio = [(0.1 * np.sin(np.arange(int(s * RATE)) * 0.05).astype(np.float32), RATE) for s in seconds]
    return PolicyScores(rows, per_seed, audio)


@pytest.fixture
def run_dir(tmp_path):
    """A run folder as `vocalign train` leaves it: the curves plotted, then the held-out comparison written."""
    plt.imsave(tmp_path / "reward_curves.png", np.arange(12.0).reshape(3, 4))
    compare({"sft": policy_scores({0: 0.5, 1: 0.3}, [0.25, 0.5]),
             "grpo": policy_scores({0: 0.2, 1: 0.2}, [0.3, 0.4])}, tmp_path)
    return tmp_path


def test_page_holds_the_table_the_curves_and_each_utterances_players(run_dir):
    page = (run_dir / "eval.html").read_text()
    elements = parse(page)
    table_cells = [c.strip() for line in (run_dir / "eval.md").read_text().splitlines()[2:]
                   for c in line.strip().strip("|").split("|")]
    assert "0.4000" in " ".join(table_cells)  # the sft error rate, mean of the seeds 0.5 and 0.3
    assert elements.cells == table_cells
    assert elements.images == ["reward_curves.png"]
    # each utterance's text, then its sft and grpo players, relative links to the files compare wrote
    assert [(kind, value if kind == "text" else value["src"]) for kind, value in elements.order] == [
        ("text", f"0. {TEXTS[0]}"), ("audio", "eval_wavs/sft/0.wav"), ("audio", "eval_wavs/grpo/0.wav"),
        ("text", f"1. {TEXTS[1]}"), ("audio", "eval_wavs/sft/1.wav"), ("audio", "eval_wavs/grpo/1.wav")]
    assert all((run_dir / attrs["src"]).is_file() for kind, attrs in elements.order if kind == "audio")
    assert "&lt;b&gt;one&lt;/b&gt;" in page and "<b>one" not in page  # text is escaped
    assert "heard: heard 1" in page


def chromium():
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    if binary is None:
        pytest.skip("no chromium binary to open eval.html with: `apt-get install chromium` (launch/setup.sh test "
                    "does it as root)")
    return binary


def loaded_dom(binary, page, profile):
    """The page's DOM after its script has marked the players (5 s of virtual time, well past the metadata loads)."""
    result = subprocess.run([binary, "--headless=new", "--no-sandbox", "--disable-gpu", f"--user-data-dir={profile}",
                             "--autoplay-policy=no-user-gesture-required", "--virtual-time-budget=5000",
                             "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]
    return parse(result.stdout)


def test_every_player_loads_its_file_in_chromium(run_dir, tmp_path_factory):
    binary = chromium()
    elements = loaded_dom(binary, run_dir / "eval.html", tmp_path_factory.mktemp("profile"))
    players = [attrs for kind, attrs in elements.order if kind == "audio"]
    assert elements.body.get("data-audio") == "4/4 loaded"
    assert [(p["src"], p["data-state"]) for p in players] == [(p["src"], "loaded") for p in players]
    assert [float(p["data-duration"]) for p in players] == pytest.approx([0.25, 0.3, 0.5, 0.4])

    (run_dir / "eval_wavs" / "grpo" / "1.wav").unlink()  # a broken link is told apart
    broken = loaded_dom(binary, run_dir / "eval.html", tmp_path_factory.mktemp("profile"))
    assert broken.body.get("data-audio") == "3/4 loaded"
    assert [attrs["data-state"] for kind, attrs in broken.order if kind == "audio"] == ["loaded"] * 3 + ["error"]
