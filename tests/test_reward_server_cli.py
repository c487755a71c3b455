"""The train command's input errors that issue 26 found ending in tracebacks: each is one ValueError naming the file,
the line or row, and what to change (the command line prints it in one line and exits 2)."""

import shutil

import pytest

from vocalign.rlhf.tts_env import load_prompt_rows

from .conftest import REPO

ROW = '{"text": %s, "language": "en", "prompt_wav": "voice.flac", "prompt_text": "hello"}'


@pytest.fixture
def voice(tmp_path):
    shutil.copy(next((REPO / "demo" / "prompts" / "voices").glob("*.flac")), tmp_path / "voice.flac")
    return tmp_path


@pytest.mark.parametrize("lines, message", [
    ([ROW % '"one"', '{"text": "two", "language"'], "cannot be read: line 2 is not valid JSON"),
    ([ROW % "12"], "row 0: text must be a string (quote it), got 12"),
], ids=["broken-line", "numeric-text"])
def test_a_broken_prompt_file_is_one_error_naming_the_line(voice, lines, message):
    path = voice / "prompts.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError) as err:
        load_prompt_rows(path)
    assert message in str(err.value) and str(path) in str(err.value)
