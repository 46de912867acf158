"""Sharing one process, one queue and two cores with strangers.

- Fair turns: generations share Gradio's queue; each client may have at most `MAX_PENDING` of them
  queued or running at once (more are answered at once with a message), and the waiting ones are
  ordered round-robin across clients, so a client who sends many requests waits for their own
  and an ordinary visitor waits for about one generation at most.
  A client is its session and, on a Space (behind a proxy), its forwarded address (X-Forwarded-For).
- Nothing kept: an upload is deleted as soon as it is read; Gradio's cache is swept (`DELETE_CACHE`);
  the log holds one line per request with counts, modes and times, never a text.
"""
from __future__ import annotations

import copy
import logging
import time
from collections import Counter
from pathlib import Path
from typing import Any

import gradio as gr

log = logging.getLogger("dep_studio.requests")

MAX_PENDING = 2              # generations one client may have queued or running at once
LLM_QUEUE = "llm"            # the concurrency id every generation runs under
REFUSALS = "refusals"        # where a request over the limit waits: no one, it is answered at once
DELETE_CACHE = (300, 600)    # every 5 minutes, delete what Gradio wrote more than 10 minutes ago

TOO_MANY = ("You already have {n} generations queued or running; wait for one of them to finish, then "
            "try again. (Each visitor may have {limit} at once, so that everyone gets a turn.)")


def forwarded_address(request: Any) -> str | None:
    """The client's own address as the proxy in front of a Space reports it, if any."""
    headers = getattr(request, "headers", None) or {}
    first = (headers.get("x-forwarded-for") or "").split(",")[0].strip()
    return first or None


def _same_client(event: Any, session: str, address: str | None) -> bool:
    return event.session_hash == session or (address is not None and forwarded_address(event.request) == address)


def share_fairly(demo: gr.Blocks, limit: int = MAX_PENDING) -> None:
    """Per-client limit and round-robin order for the generations in `demo`'s queue (call after
    `demo.queue()`), by wrapping the queue's `push`. A request over the limit is answered at once with
    an error naming the limit, through Gradio's own error path, so the page and `gradio_client`
    both show the message."""
    queue = demo._queue
    push = queue.push

    async def fair_push(body: Any, request: Any, username: str | None):
        fn = demo.fns.get(body.fn_index)
        if fn is None or fn.concurrency_id != LLM_QUEUE or not limit:
            return await push(body, request, username)
        address = forwarded_address(request)
        pending = sum(_same_client(e, body.session_hash, address) for e in _pending(queue))
        answer = await push(body, request, username)
        accepted, event_id, _ = answer
        async with queue.delete_lock:
            if accepted and pending >= limit:
                _refuse(queue, queue.event_ids_to_events[event_id], pending, limit)
            _round_robin(queue)
        return answer

    queue.push = fair_push


def _refuse(queue: Any, event: Any, pending: int, limit: int) -> None:
    """Moves a queued generation out of the LLM's queue, to be answered at once with an error."""
    message = TOO_MANY.format(n=pending, limit=limit)

    def refuse(*args: Any) -> None:
        raise gr.Error(message, title="Too many requests", print_exception=False)

    queue.event_queue_per_concurrency_id[LLM_QUEUE].queue.remove(event)
    refusal = copy.copy(event.fn)
    refusal.fn, refusal.types_generator = refuse, False
    refusal.concurrency_id, refusal.concurrency_limit = REFUSALS, None
    queue.create_event_queue_for_fn(refusal)
    event.fn, event.concurrency_id = refusal, REFUSALS
    queue.event_queue_per_concurrency_id[REFUSALS].queue.append(event)
    log.info("request refused: the client has %d generations queued or running", pending)


def _running(queue: Any) -> list:
    return [e for job in queue.active_jobs if job for e in job if e.fn.concurrency_id == LLM_QUEUE]


def _pending(queue: Any) -> list:
    """The generations running and waiting."""
    waiting = queue.event_queue_per_concurrency_id.get(LLM_QUEUE)
    return _running(queue) + (list(waiting.queue) if waiting else [])


def _round_robin(queue: Any) -> None:
    """Reorders the waiting generations so that each client's n-th comes after every client's (n-1)-th
    (a running one counts as a client's first). Stable: the same client's requests keep their order."""
    waiting = queue.event_queue_per_concurrency_id.get(LLM_QUEUE)
    if waiting is None:
        return
    turns = Counter(_client_key(e) for e in _running(queue))
    order = {}
    for event in waiting.queue:
        order[event._id] = turns[_client_key(event)]
        turns[_client_key(event)] += 1
    waiting.queue.sort(key=lambda e: order[e._id])


def _client_key(event: Any) -> str:
    return forwarded_address(event.request) or event.session_hash


def forget_upload(path: str | Path | None) -> None:
    """Deletes an uploaded file (and its folder in Gradio's cache, once empty): it has been read."""
    if not path:
        return
    path = Path(path)
    path.unlink(missing_ok=True)
    try:
        path.parent.rmdir()
    except OSError:  # not empty, or already gone
        pass


class RequestLog:
    """The one log line of a request, written by `done()`: counts, modes and times; for an error, its
    kind only (a message can quote the input). Never a text of the visitor's."""

    def __init__(self, kind: str, source: str):
        self.kind, self.source, self.began = kind, source, time.perf_counter()
        self.jobs: list = []              # the engine jobs (one; two to compare reviewers)
        self.modes: tuple[str, ...] = ()
        self.result = None
        self.error: BaseException | None = None

    def done(self) -> None:
        notes = self.result.notes if self.result is not None else []
        log.info("%s: source=%s modes=%s reviews=%s k=%s tokens=%d seconds=%.1f over_budget=%s error=%s",
                 self.kind, self.source, "+".join(self.modes) or "-",
                 ",".join(str(len(job.request.profile)) for job in self.jobs) or "-",
                 self.jobs[0].personalization.k if self.jobs else "-",
                 self.result.new_tokens if self.result is not None else 0, time.perf_counter() - self.began,
                 "yes" if any("time budget" in n for n in notes) else "no",
                 type(self.error).__name__ if self.error else "none")
