import asyncio
import os
import sys
import threading
from pathlib import Path

import pytest
from aiohttp import web

from vocalign.rewards.limits import ServerLimits
from vocalign.rewards.server import RewardServer

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
VENV_BIN = Path(sys.executable).parent


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """accelerate keeps process-wide singletons; each test starts from a clean one."""
    yield
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()


@pytest.fixture
def local_server():
    """Start reward servers (or any aiohttp app) on 127.0.0.1 in a background event loop; all stop after the test."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    runners = []

    def start(plugin_or_app, **limits):
        server = None
        app = plugin_or_app
        if not isinstance(app, web.Application):
            server = RewardServer(plugin_or_app, ServerLimits(**limits))
            app = server.app()

        async def up():
            runner = web.AppRunner(app, shutdown_timeout=1.0)
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", 0).start()
            return runner

        runner = asyncio.run_coroutine_threadsafe(up(), loop).result(10)
        runners.append(runner)
        return server, f"http://127.0.0.1:{runner.addresses[0][1]}"

    yield start
    for runner in runners:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)
    loop.close()
