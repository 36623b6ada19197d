"""Web chat server: a Flask app that streams replies from a pool of inference engines, one model replica per device.

    app = create_app(params=params, cfg=cfg, tokenizer=tokenizer)       # one Engine per local device
    app = create_app(engines=[Engine(params, cfg, tok, device=d) ...])  # or engines built by the caller
    make_server(app, host="127.0.0.1", port=8000).run()                 # waitress: threaded production WSGI

Endpoints
    GET  /                     the chat page (static/: index.html, app.js, style.css)
    POST /chat/completions     {"messages": [{"role", "content"}...], "temperature"?, "top_k"?, "max_tokens"?,
                               "seed"?} → Server-Sent Events: `data: {"token": text, "worker": i}` per piece of
                               text, then `data: {"done": true, "finish_reason": "stop"|"length", ...}`
    POST /v1/chat/completions  OpenAI-compatible: "stream": true gives `data: {chat.completion.chunk}` ...
                               `data: [DONE]`, otherwise one chat.completion JSON object. GET /v1/models.
    GET  /health, GET /stats   readiness, the context and the defaults a request gets (max_tokens already cut to
                               the context; the page shows them); workers busy/idle, queue length, requests
                               served, tokens generated, slots in use, tokens/s over the last 10 s

A request leases a slot on the least loaded Worker (continuous batching, one per engine), waiting in a queue while
all are taken (503 after queue_timeout). Every bad request is an HTTP 400 with an OpenAI-style JSON error
({"error": {"message", "type", "param"}}) before a worker is taken; a body over 2 MB is a 413, any other failure a
JSON 500, and the server keeps running. Special tokens (tool calls) appear as their names, as in the reference UI.
"""

from __future__ import annotations

import codecs
import collections
import contextlib
import json
import queue
import random
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator, Sequence

import waitress
from flask import Flask, Response, jsonify, request, send_from_directory
from waitress import wasyncore
from werkzeug.exceptions import HTTPException

from nanochat_jax.common import get_logger, pow2_bucket
from nanochat_jax.engine import make_engines

STATIC_DIR = Path(__file__).resolve().parent / "static"

# Request limits (the reference chat_web's), all answered with HTTP 400.
MAX_MESSAGES = 500
MAX_MESSAGE_CHARS = 8_000
MAX_TOTAL_CHARS = 32_000
TEMPERATURE_RANGE = (0.0, 2.0)
TOP_K_RANGE = (0, 200)          # 0 = no top-k
MAX_TOKENS_RANGE = (1, 4096)
MAX_BODY_BYTES = 2 * 1024 * 1024  # 32,000 chars as JSON \u escapes fit with room to spare
SEED_MAX = 2**31 - 1
TOKENS_PER_S_WINDOW = 10.0  # /stats tokens_per_s: tokens streamed over the last this many seconds


@dataclass(frozen=True)
class SamplingDefaults:
    """What a request gets for the fields it leaves out (the reference chat_web's defaults)."""
    temperature: float = 0.8
    top_k: int = 50
    max_tokens: int = 512


class RequestError(Exception):
    """A request the server will not run: becomes a JSON error with `status` (400 unless said otherwise)."""

    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.message, self.param, self.status, self.kind = message, param, status, kind


def error_body(message: str, kind: str, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": None}}


def _failure(what: str, e: Exception) -> str:
    return f"{what} ({type(e).__name__}: {str(e)[:200]})"


# ----------------------------------------------------------------------------------------------
# Request parsing and validation

@dataclass(frozen=True)
class ChatRequest:
    messages: tuple[tuple[str, str], ...]  # (role, content); roles user/assistant, system already folded in
    temperature: float
    top_k: int
    max_tokens: int
    seed: int
    stream: bool
    include_usage: bool = False  # OpenAI stream_options: a last chunk with the token counts


def _bad_messages(message: str) -> RequestError:
    return RequestError(message, "messages")


def _content_text(content, i: int) -> str:
    """A message's text: a string, or OpenAI's list of {"type": "text", "text": ...} parts."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise _bad_messages(f"messages[{i}].content must be a string, got {type(content).__name__}")
    for j, part in enumerate(content):
        if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
            raise _bad_messages(f"messages[{i}].content[{j}]: only text parts ({{'type': 'text', 'text': ...}}) "
                                f"are supported, got {str(part)[:80]}")
    return "".join(part["text"] for part in content)


def parse_messages(messages) -> tuple[tuple[str, str], ...]:
    """Validated (role, content) pairs; system messages before the first user message are prepended to it."""
    if messages is None:
        raise _bad_messages("missing 'messages': send a list of {'role': 'user'|'assistant', 'content': str}")
    if not isinstance(messages, list):
        raise _bad_messages(f"'messages' must be a list, got {type(messages).__name__}")
    if not messages:
        raise _bad_messages("'messages' is empty: send at least one user message")
    if len(messages) > MAX_MESSAGES:
        raise _bad_messages(f"too many messages: {len(messages)} > {MAX_MESSAGES}; start a new chat")
    out, system, total = [], [], 0
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise _bad_messages(f"messages[{i}] must be an object with 'role' and 'content'")
        role = m.get("role")
        if role not in ("user", "assistant", "system"):
            raise _bad_messages(f"messages[{i}].role must be 'user' or 'assistant' (or a leading 'system'), "
                                f"got {str(role)[:40]!r}")
        content = _content_text(m.get("content"), i)
        if not content:
            raise _bad_messages(f"messages[{i}].content is empty")
        if len(content) > MAX_MESSAGE_CHARS:
            raise _bad_messages(f"messages[{i}] is {len(content)} characters; the limit is {MAX_MESSAGE_CHARS}")
        total += len(content)
        if role == "system":
            if out:
                raise _bad_messages(f"messages[{i}]: a system message may only come before the first user message")
            system.append(content)
            continue
        if system:
            if role != "user":
                raise _bad_messages(f"messages[{i}]: system messages must be followed by a user message")
            content, system = "\n\n".join(system + [content]), []
        out.append((role, content))
    if total > MAX_TOTAL_CHARS:
        raise _bad_messages(f"the conversation is {total} characters; the limit is {MAX_TOTAL_CHARS}; start a new chat")
    if not out:
        raise _bad_messages("only system messages: add a user message")
    return tuple(out)


def _number(body: dict, name: str, default, lo, hi, integer: bool):
    value = body.get(name)
    if value is None:
        return default
    kind = "an integer" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (
            integer and isinstance(value, float) and not value.is_integer()):
        raise RequestError(f"'{name}' must be {kind} in [{lo}, {hi}], got {json.dumps(value)[:40]}", name)
    if not (lo <= value <= hi):  # also rejects NaN
        raise RequestError(f"'{name}' must be in [{lo}, {hi}], got {value}", name)
    return int(value) if integer else float(value)


def parse_chat_request(body, defaults: SamplingDefaults = SamplingDefaults(), *, openai: bool = False) -> ChatRequest:
    """Validate a decoded JSON body (native or OpenAI format) → ChatRequest, or raise RequestError."""
    if not isinstance(body, dict):
        raise RequestError(f"the request body must be a JSON object, got {type(body).__name__}")
    messages = parse_messages(body.get("messages"))
    temperature = _number(body, "temperature", defaults.temperature, *TEMPERATURE_RANGE, integer=False)
    top_k = _number(body, "top_k", defaults.top_k, *TOP_K_RANGE, integer=True)
    max_name = "max_completion_tokens" if openai and body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _number(body, max_name, defaults.max_tokens, *MAX_TOKENS_RANGE, integer=True)
    # no seed: a fresh sample per request, like the reference
    seed = _number(body, "seed", random.randint(0, SEED_MAX), 0, SEED_MAX, integer=True)
    stream = body.get("stream", False) if openai else True
    if not isinstance(stream, bool):
        raise RequestError(f"'stream' must be true or false, got {json.dumps(stream)[:40]}", "stream")
    if openai and body.get("n", 1) != 1:
        raise RequestError("only n=1 is supported", "n")
    opts = body.get("stream_options")
    include_usage = openai and isinstance(opts, dict) and opts.get("include_usage") is True
    return ChatRequest(messages, temperature, top_k, max_tokens, seed, stream, include_usage)


def render_prompt(tokenizer, messages: Sequence[tuple[str, str]]) -> list[int]:
    """<|bos|>, each turn in its special tokens, then <|assistant_start|> for the reply (chat_cli's format)."""
    sp = tokenizer.encode_special
    ids = [tokenizer.bos_id]
    for role, content in messages:
        ids += [sp(f"<|{role}_start|>"), *tokenizer.encode(content), sp(f"<|{role}_end|>")]
    return ids + [sp("<|assistant_start|>")]


# ----------------------------------------------------------------------------------------------
# Worker pool and continuous batching

class Worker:
    """One Engine (one device) serving up to max_batch requests at once, each in its own row (slot) of one static
    KV cache. A scheduler thread owns the engine's `Batch` and loops: free the slots of requests that finished or
    went away, prefill waiting requests into free slots while the others stay mid-reply, run one decode chunk for
    every busy slot (each with its own temperature, top-k, max_tokens and seed), hand each request its tokens."""

    def __init__(self, index: int, engine, max_batch: int = 1, cache_len: int | None = None, chunk: int | None = None):
        self.index, self.engine, self.max_batch, self.cache_len, self.chunk = index, engine, max_batch, cache_len, chunk
        self.leased = 0  # requests admitted by the pool (<= max_batch), counted under the pool's lock
        self.requests = self.tokens = 0
        self.slots: dict[int, Generation] = {}  # scheduler thread only
        self._pending: collections.deque = collections.deque()
        self._cond = threading.Condition()
        self._lock = threading.Lock()  # held while the engine's batch is in use (scheduler, warm-up)
        self._batch = self._thread = None

    def batch(self):
        """The engine's Batch, made on first use (the cache is allocated then)."""
        if self._batch is None:
            cache_len = self.cache_len or self.engine.cfg.sequence_len
            self._batch = self.engine.open_batch(self.max_batch, cache_len, TOP_K_RANGE[1])
        return self._batch

    def submit(self, gen: Generation) -> None:
        with self._cond:
            self._pending.append(gen)
            if self._thread is None:
                self._thread = threading.Thread(target=self._schedule, name=f"nanochat-worker-{self.index}",
                                                daemon=True)
                self._thread.start()
            self._cond.notify()

    def _schedule(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._pending or self.slots, timeout=1.0)
                with self._lock:
                    for slot in [s for s, gen in self.slots.items() if gen.cancelled]:
                        self._free(slot)
                    free = [s for s in range(self.max_batch) if s not in self.slots]
                    admit = [(slot, self._pending.popleft()) for slot in free[:len(self._pending)]]
            with self._lock:
                try:
                    self._run(admit)
                except Exception as e:  # the engine failed: every request on it gets the error
                    get_logger().exception(f"web: worker {self.index} failed")
                    for gen in [*self.slots.values(), *(gen for _, gen in admit)]:
                        gen.events.put(("error", e))
                    self.slots.clear()
                    self._batch = None  # its buffers may be gone (donated): start over

    def _run(self, admit: list) -> None:
        batch = self.batch()
        admit = [(slot, gen) for slot, gen in admit if not gen.cancelled]
        self.slots.update(admit)
        first = batch.insert_many([(slot, gen.prompt, gen.sampling) for slot, gen in admit]) if admit else []
        for (slot, _), tok in zip(admit, first):
            self._deliver(batch, slot, [tok])  # the first token goes out as soon as the prefills are done
        if batch.active:
            emitted = batch.step(self.chunk or self.engine.chunk)
            for slot in list(self.slots):
                self._deliver(batch, slot, [tok for tok, _ in emitted[slot]])

    def _deliver(self, batch, slot: int, tokens: list[int]) -> None:
        gen = self.slots[slot]
        if tokens:
            gen.events.put(("tokens", tokens))
        if batch.host[slot].completed:
            gen.events.put(("end", None))
            self._free(slot)

    def _free(self, slot: int) -> None:
        self._batch.free(slot)
        del self.slots[slot]


class WorkerPool:
    """Hands out request leases: each worker takes up to its max_batch requests at once (the least loaded worker
    first); callers wait while all are full. Thread-safe."""

    def __init__(self, engines: Sequence, max_batch: int = 1, cache_len: int | None = None, chunk: int | None = None):
        if not engines:
            raise ValueError("WorkerPool needs at least one engine")
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.workers = [Worker(i, e, max_batch, cache_len, chunk) for i, e in enumerate(engines)]
        self._cond = threading.Condition()
        self.waiting = self.max_waiting = self.requests_cancelled = 0
        self._recent: collections.deque = collections.deque()  # (time, tokens) of the last TOKENS_PER_S_WINDOW s
        self.started = time.time()

    def _free_worker(self) -> Worker | None:
        free = [w for w in self.workers if w.leased < w.max_batch]
        return min(free, key=lambda w: w.leased) if free else None

    def acquire(self, timeout: float | None = None) -> Worker | None:
        """A worker with a free slot, waiting up to `timeout` seconds (None: forever); None if none came free."""
        with self._cond:
            if self._free_worker() is None:
                self.waiting += 1
                self.max_waiting = max(self.max_waiting, self.waiting)
                try:
                    if not self._cond.wait_for(lambda: self._free_worker() is not None, timeout):
                        return None
                finally:
                    self.waiting -= 1
            worker = self._free_worker()
            worker.leased += 1
            return worker

    def count_tokens(self, worker: Worker, n: int = 1) -> None:
        with self._cond:
            worker.tokens += n
            self._recent.append((time.time(), n))

    def release(self, worker: Worker, *, cancelled: bool = False) -> None:
        with self._cond:
            if worker.leased <= 0:
                raise RuntimeError(f"worker {worker.index} released twice")
            worker.leased -= 1
            worker.requests += 1
            self.requests_cancelled += int(cancelled)
            self._cond.notify()

    def stats(self) -> dict:
        with self._cond:
            now = time.time()
            while self._recent and self._recent[0][0] < now - TOKENS_PER_S_WINDOW:
                self._recent.popleft()
            window = min(TOKENS_PER_S_WINDOW, max(now - self.started, 1e-9))
            ws = self.workers
            busy = sum(w.leased > 0 for w in ws)
            return {"total_workers": len(ws), "busy_workers": busy, "idle_workers": len(ws) - busy,
                    "max_batch": ws[0].max_batch, "slots_total": sum(w.max_batch for w in ws),
                    "slots_in_use": sum(w.leased for w in ws), "queue_length": self.waiting,
                    "max_queue_length": self.max_waiting, "requests_served": sum(w.requests for w in ws),
                    "requests_cancelled": self.requests_cancelled, "tokens_generated": sum(w.tokens for w in ws),
                    "tokens_per_s": round(sum(n for _, n in self._recent) / window, 1),
                    "uptime_s": round(now - self.started, 3),
                    "workers": [{"id": w.index, "device": str(w.engine.device), "busy": w.leased > 0,
                                 "slots_in_use": w.leased, "requests_served": w.requests, "tokens_generated": w.tokens}
                                for w in ws]}


class Generation:
    """One reply on a leased worker slot. Iterate it for text pieces, or `chunks` for lists of them a delivery at a
    time (the first token, then a decode chunk's worth: a stream sends each in one write); then finish_reason is
    "stop" (a stop token) or "length" (max_tokens). Tokens go through an incremental UTF-8 decoder, so a piece is
    whole characters (invalid bytes become U+FFFD, as decode does; a character cut off by max_tokens is dropped).
    close() returns the lease once, whoever calls it first (the end, an error, a client disconnect)."""

    def __init__(self, pool: WorkerPool, worker: Worker, tokenizer, prompt: list[int], req: ChatRequest,
                 max_tokens: int):
        self.pool, self.worker, self.tokenizer, self.request, self.prompt = pool, worker, tokenizer, req, prompt
        self.sampling = dict(max_tokens=max_tokens, temperature=req.temperature, top_k=req.top_k, seed=req.seed)
        self.prompt_tokens, self.completion_tokens = len(prompt), 0
        self.finish_reason: str | None = None
        self.cancelled = False
        self.events: queue.Queue = queue.Queue()  # from the scheduler: ("tokens", ids), ("end", _), ("error", e)
        self.chunks = self._run()
        self._once = threading.Lock()  # taken by the first close(), never released
        self._t0 = time.perf_counter()
        worker.submit(self)

    def _run(self) -> Iterator[list[str]]:
        stop_ids = self.worker.engine.stop_ids
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        while True:
            kind, payload = self.events.get()
            if kind == "error":
                raise payload
            if kind == "end":
                self.finish_reason = "length"
                return
            pieces, n = [], 0
            for token in payload:
                if token in stop_ids:
                    self.finish_reason = "stop"
                    break
                n += 1
                if text := decoder.decode(self.tokenizer.id_to_bytes(token)):
                    pieces.append(text)
            self.completion_tokens += n
            self.pool.count_tokens(self.worker, n)  # once per delivery: the pool's lock is shared by every stream
            if pieces:
                yield pieces
            if self.finish_reason:
                return

    def __iter__(self) -> Iterator[str]:
        return (piece for pieces in self.chunks for piece in pieces)

    def close(self) -> None:
        if not self._once.acquire(blocking=False):
            return
        self.cancelled = True  # the scheduler frees the slot before its next chunk
        try:
            self.chunks.close()
        finally:
            self.pool.release(self.worker, cancelled=self.finish_reason is None)
            dt = time.perf_counter() - self._t0
            n = self.completion_tokens
            get_logger().info(f"web: worker {self.worker.index}: {self.prompt_tokens} prompt + {n} reply tokens in "
                              f"{dt:.2f}s ({n / max(dt, 1e-9):.1f} tok/s), {self.finish_reason or 'cancelled'}")


def warm_up(app: Flask, prompt_tokens: int = 64) -> int:
    """Compile, on every worker in parallel, what chats with the app's defaults hit: the prefill of each prompt
    length bucket up to `prompt_tokens` (a short message, with or without a system prompt, is a few dozen tokens)
    and the decode chunk; a longer prompt compiles its bucket when it first comes. Returns programs per engine."""
    routes = app.extensions["nanochat"]
    defaults, max_context, bos = routes.defaults, routes.max_context, routes.tokenizer.bos_id

    def run(worker: Worker) -> int:
        engine, before = worker.engine, len(worker.engine.compilations)
        with worker._lock:
            batch = worker.batch()
            slot = next(s for s in range(worker.max_batch) if s not in worker.slots)
            lengths = {}  # prompt bucket → one prompt length that has it
            for n in range(1, min(prompt_tokens, max_context - 1) + 1):
                lengths.setdefault(min(pow2_bucket(n, engine.min_bucket), batch.cache_len), n)
            for n in lengths.values():
                batch.insert(slot, [bos] * n, max_tokens=min(defaults.max_tokens, max_context - n),
                             temperature=defaults.temperature, top_k=defaults.top_k, seed=0)
                batch.host[slot].completed = False  # run one chunk for it even if it stopped at once
                batch.step(worker.chunk or engine.chunk)
                batch.free(slot)
        return len(engine.compilations) - before

    t0 = time.perf_counter()
    with ThreadPoolExecutor(len(routes.pool.workers)) as ex:
        count = max(ex.map(run, routes.pool.workers))
    get_logger().info(f"web: warm-up compiled {count} program(s) per engine for prompts of up to "
                      f"{prompt_tokens} tokens in {time.perf_counter() - t0:.1f}s")
    return count


# ----------------------------------------------------------------------------------------------
# The app

def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _event_stream(gen: Generation, events: Iterator[str], error_event, done: str = "") -> Response:
    """An SSE response; once the headers are out, a failure travels in the stream as error_event(message)."""
    def body():
        try:
            yield from events
        except Exception as e:
            get_logger().exception("web: generation failed")
            yield error_event(_failure("generation failed", e))
        finally:
            gen.close()
        if done:
            yield done

    resp = Response(body(), mimetype="text/event-stream", headers={"Cache-Control": "no-cache",
                                                                   "X-Accel-Buffering": "no"})
    resp.call_on_close(gen.close)  # also frees the worker if the body was never iterated
    return resp


@dataclass
class _Routes:
    """The app's endpoints over one worker pool (create_app registers each method under its route)."""
    pool: WorkerPool
    tokenizer: object
    defaults: SamplingDefaults
    max_context: int
    queue_timeout: float | None
    model_name: str

    def start(self, openai: bool) -> Generation:
        """Validate and tokenize, then lease a worker (waiting in the queue); the caller must close the result."""
        body = request.get_json(force=True, silent=True)
        if body is None:
            raise RequestError("the request body is not valid JSON")
        req = parse_chat_request(body, self.defaults, openai=openai)
        prompt = render_prompt(self.tokenizer, req.messages)
        if len(prompt) >= self.max_context:
            raise RequestError(f"the conversation is {len(prompt)} tokens; this model's context is "
                               f"{self.max_context} tokens: shorten it or start a new chat", "messages")
        worker = self.pool.acquire(self.queue_timeout)
        if worker is None:
            raise RequestError(f"all {len(self.pool.workers)} workers are busy; try again shortly", status=503,
                               kind="server_busy")
        try:  # max_tokens is cut to what the context leaves
            return Generation(self.pool, worker, self.tokenizer, prompt, req,
                              min(req.max_tokens, self.max_context - len(prompt)))
        except BaseException:
            self.pool.release(worker, cancelled=True)
            raise

    def index(self):
        return send_from_directory(STATIC_DIR, "index.html")

    def health(self):
        s, d = self.pool.stats(), self.defaults
        return jsonify({"status": "ok", "ready": True, "num_workers": s["total_workers"],
                        "available_workers": sum(w["slots_in_use"] < s["max_batch"] for w in s["workers"]),
                        "free_slots": s["slots_total"] - s["slots_in_use"], "model": self.model_name,
                        "max_context": self.max_context,
                        "defaults": {"temperature": d.temperature, "top_k": d.top_k, "max_tokens": d.max_tokens}})

    def stats(self):
        return jsonify(self.pool.stats())

    def models(self):
        return jsonify({"object": "list", "data": [{"id": self.model_name, "object": "model",
                                                    "created": int(self.pool.started), "owned_by": "nanochat-jax"}]})

    def chat_completions(self):
        gen = self.start(openai=False)

        def events():
            for pieces in gen.chunks:
                yield "".join(_sse({"token": text, "worker": gen.worker.index}) for text in pieces)
            yield _sse({"done": True, "finish_reason": gen.finish_reason, "prompt_tokens": gen.prompt_tokens,
                        "completion_tokens": gen.completion_tokens})

        return _event_stream(gen, events(), lambda error: _sse({"error": error, "done": True}))

    def openai_chat_completions(self):
        gen = self.start(openai=True)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        head = lambda kind: {"id": rid, "object": kind, "created": created, "model": self.model_name}
        usage = lambda: {"prompt_tokens": gen.prompt_tokens, "completion_tokens": gen.completion_tokens,
                         "total_tokens": gen.prompt_tokens + gen.completion_tokens}
        if not gen.request.stream:
            with contextlib.closing(gen):
                text = "".join(gen)
            return jsonify({**head("chat.completion"), "usage": usage(), "choices": [
                {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": gen.finish_reason}]})

        def chunk(delta: dict | None, finish: str | None = None, **extra) -> str:
            choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish}]
            return _sse({**head("chat.completion.chunk"), "choices": choices, **extra})

        def events():
            yield chunk({"role": "assistant", "content": ""})
            for pieces in gen.chunks:
                yield "".join(chunk({"content": text}) for text in pieces)
            yield chunk({}, gen.finish_reason)
            if gen.request.include_usage:
                yield chunk(None, usage=usage())

        return _event_stream(gen, events(), lambda error: _sse(error_body(error, "server_error")), "data: [DONE]\n\n")


ROUTES = (("GET", "/", "index"), ("GET", "/health", "health"), ("GET", "/stats", "stats"),
          ("POST", "/chat/completions", "chat_completions"), ("GET", "/v1/models", "models"),
          ("POST", "/v1/chat/completions", "openai_chat_completions"))


def _add_error_handlers(app: Flask, cors_origin: str | None) -> None:
    """JSON errors (RequestError: its status; HTTP errors; anything else: 500) and the CORS headers."""

    @app.errorhandler(RequestError)
    def _request_error(e: RequestError):
        resp = jsonify(error_body(e.message, e.kind, e.param))
        if e.status == 503:
            resp.headers["Retry-After"] = "5"
        return resp, e.status

    @app.errorhandler(HTTPException)
    def _http_error(e: HTTPException):
        message = e.description or e.name
        if e.code == 413:
            message = f"request body too large: limit is {MAX_BODY_BYTES // 2**20} MB"
        return jsonify(error_body(message, e.name.lower().replace(" ", "_"))), e.code

    @app.errorhandler(Exception)
    def _server_error(e: Exception):
        get_logger().exception("web: unhandled error")
        return jsonify(error_body(_failure("internal server error", e), "server_error")), 500

    if cors_origin:
        @app.after_request
        def _cors(resp):
            resp.headers.update({"Access-Control-Allow-Origin": cors_origin, "Access-Control-Allow-Methods":
                                 "GET, POST, OPTIONS", "Access-Control-Allow-Headers": "Content-Type, Authorization"})
            return resp


def create_app(engines: Sequence | None = None, *, params=None, cfg=None, tokenizer=None, devices=None,
               num_workers: int | None = None, defaults: SamplingDefaults = SamplingDefaults(),
               max_context: int | None = None, queue_timeout: float | None = 300.0, model_name: str = "nanochat-jax",
               cors_origin: str | None = None, max_batch: int = 1, chunk: int | None = None) -> Flask:
    """The chat app over `engines`, or over one Engine per device built from (params, cfg, tokenizer).

    max_context: prompt + reply tokens at most (default: the model's sequence_len); longer prompts are a 400, and
    max_tokens (the default one too) is cut to what is left. queue_timeout: seconds a request waits for a free
    worker before a 503. max_batch: requests each worker decodes at once (continuous batching; each holds one
    row of a cache of max_context tokens); chunk: decode steps per round trip to the host (default: the engine's).
    cors_origin: sent as Access-Control-Allow-Origin (e.g. "*") so pages on other origins may call the API."""
    if engines is None:
        if params is None or cfg is None or tokenizer is None:
            raise ValueError("create_app needs engines, or params, cfg and tokenizer to build them")
        engines = make_engines(params, cfg, tokenizer, devices=devices, num_workers=num_workers)
    engines = list(engines)
    if not engines:
        raise ValueError("create_app: no engines")
    tokenizer = tokenizer if tokenizer is not None else engines[0].tokenizer
    if tokenizer is None or any(e.tokenizer is None for e in engines):
        raise ValueError("create_app: the engines need a tokenizer (for stop tokens and decoding)")
    max_context = max_context or engines[0].cfg.sequence_len
    if max_context < 2:
        raise ValueError(f"create_app: max_context must be >= 2 tokens, got {max_context}")
    defaults = replace(defaults, max_tokens=min(defaults.max_tokens, max_context))
    pool = WorkerPool(engines, max_batch=max_batch, cache_len=max_context, chunk=chunk)
    routes = _Routes(pool, tokenizer, defaults, max_context, queue_timeout, model_name)
    app = Flask(__name__, static_folder=str(STATIC_DIR), static_url_path="/static")
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY_BYTES
    app.extensions["nanochat"] = routes  # get_pool and warm_up read it
    _add_error_handlers(app, cors_origin)
    for method, rule, name in ROUTES:
        app.add_url_rule(rule, name, getattr(routes, name), methods=[method])
    return app


def get_pool(app: Flask) -> WorkerPool:
    return app.extensions["nanochat"].pool


# ----------------------------------------------------------------------------------------------
# Serving (waitress: a threaded production WSGI server)

def make_server(app: Flask, host: str = "127.0.0.1", port: int = 8000, threads: int = 64):
    """A waitress server for `app` (port 0: any free port; see .effective_port). Each streaming reply, and each
    request waiting for a worker, holds one of `threads`: keep it well above the number of workers, so the rest
    answer /health and /stats while every worker is busy."""
    # channel_request_lookahead: keep reading the socket during a reply, so a client that goes away is noticed
    # (the next write then raises, waitress closes the response, and the worker is freed).
    return waitress.create_server(app, host=host, port=port, threads=threads, channel_request_lookahead=1,
                                  ident="nanochat-jax", clear_untrusted_proxy_headers=True)


class BackgroundServer:
    """make_server(...) running in a daemon thread (tests, notebooks): `.url`, `.stop()`; a context manager."""

    def __init__(self, app: Flask, host: str = "127.0.0.1", port: int = 0, threads: int = 64):
        self.server = make_server(app, host=host, port=port, threads=threads)
        self.url = f"http://{host}:{self.server.effective_port}"
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="nanochat-web", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        """waitress's own loop, in short slices so stop() can end it; sockets are closed in this thread, never
        under a select() that is still running (closing them from another thread races with it: EBADF)."""
        while not self._stopping.is_set():
            wasyncore.loop(timeout=0.05, map=self.server._map, use_poll=self.server.adj.asyncore_use_poll, count=1)
        self.server.task_dispatcher.shutdown(timeout=self._timeout)
        wasyncore.close_all(self.server._map)

    def stop(self, timeout: float = 10.0) -> None:
        self._timeout = timeout
        self._stopping.set()
        self._thread.join(timeout + 1)

    def __enter__(self) -> BackgroundServer:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
