"""One real `python app.py` server for the app's tests, started once per test session.

Both test_app_api.py and test_app_browser.py call `app_url()`; the first call starts the server on a
free local port and waits for it, later calls reuse it, and it is stopped when the session ends.
The server's output goes to test-output/app-server.log.
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

ROOT = Path(__file__).resolve().parent.parent
OUTPUT = ROOT / "test-output"
START_TIMEOUT = float(os.environ.get("DEP_APP_START_TIMEOUT", "420"))

_server: dict = {}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _stop() -> None:
    process = _server.get("process")
    if process is not None and process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
    handle = _server.get("log")
    if handle is not None:
        handle.close()


def app_url() -> str:
    """The URL of the running app, starting it on first use."""
    if "url" in _server:
        if _server["process"].poll() is not None:
            raise RuntimeError(f"the app server exited early; see {OUTPUT / 'app-server.log'}")
        return _server["url"]
    OUTPUT.mkdir(exist_ok=True)
    port = free_port()
    env = dict(os.environ, GRADIO_SERVER_NAME="127.0.0.1", GRADIO_SERVER_PORT=str(port), PYTHONUNBUFFERED="1")
    log = open(OUTPUT / "app-server.log", "w")
    process = subprocess.Popen([sys.executable, "app.py"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    _server.update(process=process, log=log)
    atexit.register(_stop)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"app.py exited with code {process.returncode}; see {OUTPUT / 'app-server.log'}")
        try:
            with urllib.request.urlopen(url + "gradio_api/info", timeout=5) as response:
                if response.status == 200:
                    _server["url"] = url
                    return url
        except OSError:
            pass
        time.sleep(1)
    _stop()
    raise RuntimeError(f"app.py did not answer within {START_TIMEOUT:.0f} s; see {OUTPUT / 'app-server.log'}")


def stop() -> None:
    _stop()
    _server.clear()
