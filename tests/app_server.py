"""Starting and stopping a real `python app.py` on a free local port: one helper for the app's tests
and for bench/startup.py.

The tests call `app_url()`: the first call starts the shared server and waits for it, later calls
reuse it, and it is stopped when the session ends. Its output goes to test-output/app-server.log.
"""
from __future__ import annotations

import atexit
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
OUTPUT = ROOT / "test-output"
START_TIMEOUT = float(os.environ.get("DEP_APP_START_TIMEOUT", "420"))

_server: dict = {}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(log_path: Path, env: dict[str, str] | None = None, timeout: float = START_TIMEOUT,
           on_poll: Callable[[], None] | None = None, args: tuple[str, ...] = ()) -> tuple[subprocess.Popen, str]:
    """Starts `python app.py [args]` on a free local port with `env` added to this process's
    environment; returns (process, url) once GET / answers 200. `on_poll` runs every 0.1 s while waiting."""
    port = free_port()
    env = dict(os.environ, GRADIO_SERVER_NAME="127.0.0.1", GRADIO_SERVER_PORT=str(port), PYTHONUNBUFFERED="1",
               **(env or {}))
    with open(log_path, "w") as log:  # the child keeps its own handle to the file
        process = subprocess.Popen([sys.executable, "app.py", *args], cwd=ROOT, env=env, stdout=log,
                                   stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if on_poll:
            on_poll()
        if process.poll() is not None:
            raise RuntimeError(f"app.py exited with code {process.returncode}; see {log_path}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return process, url
        except OSError:
            pass
        time.sleep(0.1)
    stop_process(process)
    raise RuntimeError(f"app.py did not answer within {timeout:.0f} s; see {log_path}")


def stop_process(process: subprocess.Popen) -> None:
    """Terminates the app, and kills it if it has not exited 20 s later."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def app_url() -> str:
    """The URL of the shared app of this test session, starting it on first use."""
    if "url" in _server:
        if _server["process"].poll() is not None:
            raise RuntimeError(f"the app server exited early; see {OUTPUT / 'app-server.log'}")
        return _server["url"]
    OUTPUT.mkdir(exist_ok=True)
    process, url = launch(OUTPUT / "app-server.log")
    atexit.register(stop_process, process)
    _server.update(process=process, url=url)
    return url
