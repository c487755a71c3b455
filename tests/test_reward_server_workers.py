"""Reward worker processes end with the process that owns them, however it ends: a trainer stopped with SIGTERM
used to leave the CER reward's pocketsphinx workers running for hours."""

import signal
import subprocess
import sys
import time

import psutil
import pytest

from .conftest import REPO

OWNER = """
import time
from vocalign.rewards.pocketsphinx_asr import PocketSphinxASR

if __name__ == "__main__":
    asr = PocketSphinxASR(workers=2)
    print("ready", flush=True)
    time.sleep(600)
"""


def workers_of(owner: psutil.Process) -> list[psutil.Process]:
    """The pool's workers: the children of the forkserver, itself a child of the owner."""
    return [p for child in owner.children() if "forkserver" in " ".join(child.cmdline()) for p in child.children()]


@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL], ids=["term", "int", "kill"])
def test_pocketsphinx_workers_end_with_their_owner(tmp_path, how):
    script = tmp_path / "owner.py"
    script.write_text(OWNER)
    proc = subprocess.Popen([sys.executable, str(script)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        owner = psutil.Process(proc.pid)
        deadline = time.monotonic() + 30
        while len(workers_of(owner)) < 2:
            assert time.monotonic() < deadline, "the pool did not start its workers"
            time.sleep(0.1)
        left = owner.children(recursive=True)  # the workers and the forkserver that started them
        proc.send_signal(how)
        proc.wait(timeout=30)
        gone, alive = psutil.wait_procs(left, timeout=5)
        assert alive == [], f"still running 5 s after their owner ended: {[p.cmdline() for p in alive]}"
    finally:
        proc.kill()
        proc.wait()
