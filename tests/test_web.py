"""Tests for nanochat_jax/web (the chat server) and scripts/chat_web.py.

Models are scripted: a fresh model with zero attention/MLP output projections (the reference init) has logits that
depend only on the current token, so pointing lm_head from one orthogonal embedding to a successor makes greedy
decoding follow a fixed chain. REPLY answers every chat with "é" (two byte tokens, C3 A9) "h" "i" "!" and stops;
LOOP answers "hihihi..." forever (for max_tokens, disconnects and the queue). Every check is against text and
counts known in advance: the exact SSE events, token counts in /stats, the worker pool back to idle.
"""

import collections
import json
import math
import os
import shutil
import socket
import subprocess
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import requests
from werkzeug.test import EnvironBuilder

from conftest import REPO_ROOT
from nanochat_jax import gpt
from nanochat_jax.engine import Batch, Engine
from nanochat_jax.tokenizer import train_tokenizer
from nanochat_jax.web import (BackgroundServer, RequestError, SamplingDefaults, WorkerPool, create_app, get_pool,
                              parse_chat_request, parse_messages, render_prompt, warm_up)
from nanochat_jax.web import app as web_app

REPLY_TEXT = "éhi!"


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(["hello there, how are you? hi! " * 4, "fine thanks, and you? " * 4], vocab_size=280)


def scripted_params(tok, chain: dict[int, int]):
    """cfg, params whose greedy successor of token a is chain[a] (see the module docstring)."""
    cfg = gpt.GPTConfig(sequence_len=64, vocab_size=tok.vocab_size, n_layer=2, n_head=4, n_kv_head=2, n_embd=64,
                        head_dim=16, compute_dtype="float32", embed_dtype="float32")
    params = gpt.init_params(cfg, jax.random.key(0))
    wte = np.random.default_rng(0).normal(0, 1, params["wte"].shape).astype(np.float32)
    lm_head = np.zeros(params["lm_head"].shape, np.float32)
    for i, (src, dst) in enumerate(chain.items()):
        wte[src] = 0.0
        wte[src, i] = math.sqrt(cfg.n_embd)
        lm_head[i, dst] = 1.0
    return cfg, {**params, "wte": jnp.asarray(wte), "lm_head": jnp.asarray(lm_head)}


def one(tok, text):
    ids = tok.encode(text)
    assert len(ids) == 1, (text, ids)
    return ids[0]


@pytest.fixture(scope="module")
def models(tok):
    sp = tok.encode_special
    c3, a9 = tok.encode("é")  # one character, two byte tokens: must never be sent half
    h, i, bang = (one(tok, c) for c in "hi!")
    reply = scripted_params(tok, {sp("<|assistant_start|>"): c3, c3: a9, a9: h, h: i, i: bang,
                                  bang: sp("<|assistant_end|>")})
    loop = scripted_params(tok, {sp("<|assistant_start|>"): h, h: i, i: h})
    return {"reply": reply, "loop": loop}


def engines(tok, model, n=1):
    """n replicas on devices 0..n-1. Prompts and caches pad to at least 32 tokens, so the short chats below all
    share one compiled prefill and decode per engine (with top_k 0)."""
    cfg, params = model
    return [Engine(params, cfg, tok, device=jax.devices()[d], min_bucket=32) for d in range(n)]


GREEDY = SamplingDefaults(temperature=0.0, top_k=0, max_tokens=8)


@pytest.fixture(scope="module")
def reply_app(tok, models):
    return create_app(engines(tok, models["reply"]), defaults=GREEDY)


@pytest.fixture(scope="module")
def loop_app(tok, models):
    # A long context so that replies can run for thousands of tokens (disconnects must cut them short).
    return create_app(engines(tok, models["loop"]), defaults=GREEDY, max_context=8192, queue_timeout=0.3)


def user(text="hello"):
    return [{"role": "user", "content": text}]


def sse(text: str) -> list:
    """The data payloads of an SSE body, JSON-decoded ("[DONE]" kept as a string)."""
    assert text.endswith("\n\n"), text[-200:]
    out = []
    for event in text[:-2].split("\n\n"):
        assert event.startswith("data: "), event
        payload = event[len("data: "):]
        out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


def read_events(body, n: int, buffer: list) -> list:
    """The next n SSE payloads from a streaming WSGI body (one write may carry several events: a decode chunk's);
    `buffer` keeps the events read past them for the next call."""
    while len(buffer) < n:
        buffer.extend(sse(next(body).decode()))
    out, buffer[:] = buffer[:n], buffer[n:]
    return out


def assert_idle(app, served=None, cancelled=None):
    s = get_pool(app).stats()
    assert s["busy_workers"] == 0 and s["idle_workers"] == s["total_workers"] and s["queue_length"] == 0, s
    if served is not None:
        assert s["requests_served"] == served, s
    if cancelled is not None:
        assert s["requests_cancelled"] == cancelled, s
    return s


# ----------------------------------------------------------------------------------------------
# Pages, health, stats

def test_page_static_files_health_stats_and_json_errors(reply_app):
    client = reply_app.test_client()
    page = client.get("/")
    assert page.status_code == 200 and page.mimetype == "text/html"
    html = page.get_data(as_text=True)
    assert "<textarea" in html and "static/app.js" in html and 'name="viewport"' in html
    js = client.get("/static/app.js")
    assert js.status_code == 200 and "chat/completions" in js.get_data(as_text=True)
    assert client.get("/static/style.css").status_code == 200
    health = client.get("/health").get_json()
    assert health["status"] == "ok" and health["ready"] is True
    assert health["max_context"] == 64 and health["defaults"] == {"temperature": 0.0, "top_k": 0, "max_tokens": 8}
    assert health["num_workers"] == 1 and health["available_workers"] == 1
    stats = client.get("/stats").get_json()
    assert stats["total_workers"] == 1 and stats["busy_workers"] == 0 and stats["idle_workers"] == 1
    assert stats["queue_length"] == 0 and stats["workers"][0]["device"] == str(jax.devices()[0])
    for key in ("requests_served", "tokens_generated", "requests_cancelled", "uptime_s"):
        assert key in stats
    models = client.get("/v1/models").get_json()
    assert models["object"] == "list" and models["data"][0]["id"] == "nanochat-jax"
    missing = client.get("/nope")
    assert missing.status_code == 404 and "error" in missing.get_json()
    wrong_method = client.get("/chat/completions")
    assert wrong_method.status_code == 405 and "error" in wrong_method.get_json()


# ----------------------------------------------------------------------------------------------
# Streaming replies

def test_native_sse_stream_sends_whole_characters_and_counts_tokens(reply_app):
    client = reply_app.test_client()
    before = get_pool(reply_app).stats()
    resp = client.post("/chat/completions", json={"messages": user(), "temperature": 0})
    assert resp.status_code == 200 and resp.mimetype == "text/event-stream"
    events = sse(resp.get_data(as_text=True))
    # "é" is two tokens, sent as one piece once its second byte is known; nothing half a character.
    assert [e["token"] for e in events[:-1]] == ["é", "h", "i", "!"]
    assert all(e["worker"] == 0 for e in events[:-1])
    assert events[-1] == {"done": True, "finish_reason": "stop", "completion_tokens": 5,
                          "prompt_tokens": len(render_prompt(get_pool(reply_app).workers[0].engine.tokenizer,
                                                             [("user", "hello")]))}
    after = assert_idle(reply_app, served=before["requests_served"] + 1)
    assert after["tokens_generated"] == before["tokens_generated"] + 5
    assert after["workers"][0]["tokens_generated"] == before["workers"][0]["tokens_generated"] + 5


@pytest.mark.parametrize("max_tokens, pieces", [(1, []), (2, ["é"]), (4, ["é", "h", "i"])])
def test_max_tokens_cuts_reply_and_drops_a_half_character(reply_app, max_tokens, pieces):
    resp = reply_app.test_client().post("/chat/completions", json={"messages": user(), "max_tokens": max_tokens})
    events = sse(resp.get_data(as_text=True))
    assert [e["token"] for e in events[:-1]] == pieces  # max_tokens=1: only byte C3, which is never sent
    assert events[-1]["finish_reason"] == "length" and events[-1]["completion_tokens"] == max_tokens
    assert_idle(reply_app)


def test_openai_non_streaming_and_streaming(reply_app):
    client = reply_app.test_client()
    messages = [{"role": "system", "content": "Be brief."}, *user("hi"), {"role": "assistant", "content": "hello"},
                {"role": "user", "content": [{"type": "text", "text": "and "}, {"type": "text", "text": "you?"}]}]
    resp = client.post("/v1/chat/completions", json={"model": "whatever", "messages": messages, "temperature": 0})
    assert resp.status_code == 200 and resp.mimetype == "application/json"
    body = resp.get_json()
    prompt = render_prompt(get_pool(reply_app).workers[0].engine.tokenizer,
                           [("user", "Be brief.\n\nhi"), ("assistant", "hello"), ("user", "and you?")])
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    assert body["choices"] == [{"index": 0, "message": {"role": "assistant", "content": REPLY_TEXT},
                                "finish_reason": "stop"}]
    assert body["usage"] == {"prompt_tokens": len(prompt), "completion_tokens": 5, "total_tokens": len(prompt) + 5}

    resp = client.post("/v1/chat/completions", json={"messages": messages, "stream": True, "max_tokens": 3,
                                                     "stream_options": {"include_usage": True}})
    events = sse(resp.get_data(as_text=True))
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert [c["choices"][0]["delta"]["content"] for c in chunks[1:-2]] == ["é", "h"]
    assert chunks[-2]["choices"] == [{"index": 0, "delta": {}, "finish_reason": "length"}]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 3
    assert_idle(reply_app)


def test_sampling_is_seeded_per_request(reply_app):
    """temperature 1, no top-k: a random walk through the scripted model; the same seed gives the same reply."""
    client = reply_app.test_client()
    ask = lambda seed: client.post("/v1/chat/completions", json={  # noqa: E731
        "messages": user(), "temperature": 1.0, "top_k": 0, "max_tokens": 12, "seed": seed}).get_json()
    a, b, c = ask(1), ask(1), ask(2)
    assert a["choices"] == b["choices"]
    texts = {ask(s)["choices"][0]["message"]["content"] for s in range(3, 9)} | {c["choices"][0]["message"]["content"]}
    assert len(texts) > 1  # not always the greedy reply
    assert_idle(reply_app)


# ----------------------------------------------------------------------------------------------
# Validation: every rule is a 400 with a JSON error, before any worker is taken

def _messages(n, chars=1):
    return [{"role": "user" if k % 2 == 0 else "assistant", "content": "x" * chars} for k in range(n)]


BAD_REQUESTS = [
    ("not json", "{'messages': oops", "not valid JSON"),
    ("not an object", [1, 2], "must be a JSON object"),
    ("no messages", {}, "missing 'messages'"),
    ("messages not a list", {"messages": "hi"}, "must be a list"),
    ("empty messages", {"messages": []}, "is empty"),
    ("message not an object", {"messages": ["hi"]}, "must be an object"),
    ("tool role", {"messages": [{"role": "tool", "content": "x"}]}, "role must be 'user' or 'assistant'"),
    ("no role", {"messages": [{"content": "x"}]}, "role must be"),
    ("late system", {"messages": [*user(), {"role": "system", "content": "x"}]}, "may only come before"),
    ("system then assistant", {"messages": [{"role": "system", "content": "x"}, {"role": "assistant",
                                                                                 "content": "y"}]},
     "followed by a user message"),
    ("only system", {"messages": [{"role": "system", "content": "x"}]}, "only system messages"),
    ("empty content", {"messages": user("")}, "content is empty"),
    ("number content", {"messages": [{"role": "user", "content": 5}]}, "must be a string"),
    ("image part", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     "only text parts"),
    ("501 messages", {"messages": _messages(501)}, "too many messages: 501 > 500"),
    ("8001 chars", {"messages": user("x" * 8001)}, "8001 characters; the limit is 8000"),
    ("32001 total", {"messages": _messages(4, 8000) + user("x")}, "32001 characters; the limit is 32000"),
    ("temperature < 0", {"messages": user(), "temperature": -0.01}, "'temperature' must be in [0.0, 2.0]"),
    ("temperature > 2", {"messages": user(), "temperature": 2.01}, "'temperature' must be in"),
    ("temperature text", {"messages": user(), "temperature": "hot"}, "'temperature' must be a number"),
    ("temperature bool", {"messages": user(), "temperature": True}, "'temperature' must be a number"),
    ("temperature NaN", '{"messages": [{"role": "user", "content": "x"}], "temperature": NaN}', "'temperature'"),
    ("top_k < 0", {"messages": user(), "top_k": -1}, "'top_k' must be in [0, 200]"),
    ("top_k > 200", {"messages": user(), "top_k": 201}, "'top_k' must be in [0, 200]"),
    ("top_k fraction", {"messages": user(), "top_k": 1.5}, "'top_k' must be an integer"),
    ("max_tokens 0", {"messages": user(), "max_tokens": 0}, "'max_tokens' must be in [1, 4096]"),
    ("max_tokens 4097", {"messages": user(), "max_tokens": 4097}, "'max_tokens' must be in [1, 4096]"),
    ("max_tokens text", {"messages": user(), "max_tokens": "10"}, "'max_tokens' must be an integer"),
    ("seed negative", {"messages": user(), "seed": -1}, "'seed' must be in"),
]


@pytest.mark.parametrize("path", ["/chat/completions", "/v1/chat/completions"])
def test_every_bad_request_is_a_json_400_and_takes_no_worker(reply_app, path):
    client = reply_app.test_client()
    before = get_pool(reply_app).stats()["requests_served"]
    for name, body, message in BAD_REQUESTS:
        if isinstance(body, str):
            resp = client.post(path, data=body, content_type="application/json")
        else:
            resp = client.post(path, json=body)
        assert resp.status_code == 400, (name, resp.get_data(as_text=True)[:300])
        err = resp.get_json()["error"]
        assert message in err["message"], (name, err)
        assert err["type"] == "invalid_request_error"
    if path.startswith("/v1"):
        for body, param in [({"messages": user(), "stream": "yes"}, "stream"), ({"messages": user(), "n": 2}, "n"),
                            ({"messages": user(), "max_completion_tokens": 0}, "max_completion_tokens")]:
            resp = client.post(path, json=body)
            assert resp.status_code == 400 and resp.get_json()["error"]["param"] == param, body
    assert_idle(reply_app, served=before)


def test_limits_accept_their_boundaries(tok):
    """Exactly at each limit is fine (checked on the parser: such chats are longer than the tiny model's context)."""
    ok = parse_chat_request({"messages": _messages(500), "temperature": 2, "top_k": 200, "max_tokens": 4096})
    assert len(ok.messages) == 500 and (ok.temperature, ok.top_k, ok.max_tokens) == (2.0, 200, 4096)
    ok = parse_chat_request({"messages": _messages(4, 8000), "temperature": 0, "top_k": 0, "max_tokens": 1,
                             "seed": 7})
    assert sum(len(c) for _, c in ok.messages) == 32000 and (ok.temperature, ok.top_k, ok.max_tokens) == (0, 0, 1)
    assert ok.seed == 7 and parse_chat_request({"messages": user(), "top_k": 5.0}).top_k == 5
    d = parse_chat_request({"messages": user()}, SamplingDefaults(0.3, 7, 99))
    assert (d.temperature, d.top_k, d.max_tokens, d.stream) == (0.3, 7, 99, True)
    assert parse_chat_request({"messages": user()}, openai=True).stream is False
    assert parse_chat_request({"messages": user(), "max_completion_tokens": 9}, openai=True).max_tokens == 9
    with pytest.raises(RequestError, match="empty"):
        parse_messages([])


def test_prompt_matches_the_tokenizers_chat_rendering(tok):
    """render_prompt (with a leading system message folded into the first user turn) against the training-time
    renderer: the same ids that render_for_completion gives for the chat plus a reply to complete."""
    sent = [{"role": "system", "content": "You are terse."}, {"role": "system", "content": "And kind."},
            *user("hi there"), {"role": "assistant", "content": "hello!"}, *user("how are you?")]
    messages = parse_messages(sent)
    assert messages == (("user", "You are terse.\n\nAnd kind.\n\nhi there"), ("assistant", "hello!"),
                        ("user", "how are you?"))
    want = tok.render_for_completion({"messages": [{"role": r, "content": c} for r, c in messages]
                                      + [{"role": "assistant", "content": "x"}]})
    assert render_prompt(tok, messages) == want


def test_long_conversation_is_rejected_and_max_tokens_cut_to_the_context(tok, models):
    app = create_app(engines(tok, models["loop"]), defaults=GREEDY)  # max_context: the model's sequence_len, 64
    client = app.test_client()
    resp = client.post("/chat/completions", json={"messages": user("hello there " * 40)})
    assert resp.status_code == 400 and "this model's context is 64 tokens" in resp.get_json()["error"]["message"]
    n_prompt = len(render_prompt(tok, [("user", "hello")]))
    body = client.post("/v1/chat/completions", json={"messages": user(), "max_tokens": 4096}).get_json()  # greedy
    assert body["usage"]["completion_tokens"] == 64 - n_prompt and body["choices"][0]["finish_reason"] == "length"
    assert body["choices"][0]["message"]["content"] == ("hi" * 64)[:64 - n_prompt]
    assert_idle(app, served=1)


def test_request_too_large_is_a_json_413_that_states_the_limit(reply_app):
    resp = reply_app.test_client().post("/chat/completions", data="x" * (web_app.MAX_BODY_BYTES + 1),
                                        content_type="application/json")
    assert resp.status_code == 413
    assert resp.get_json()["error"]["message"] == "request body too large: limit is 2 MB"


# ----------------------------------------------------------------------------------------------
# Warm-up and the limits the page shows

def test_warm_up_compiles_what_short_chats_hit(tok, models):
    """The server's usual defaults (top-k 50, 512 tokens cut to the 64-token context) and the engine's own
    buckets: after warm_up, short chats of either endpoint, with or without a system prompt, compile nothing."""
    cfg, params = models["reply"]
    engine = Engine(params, cfg, tok)  # prompt buckets 16, 32, 64
    app = create_app([engine], defaults=SamplingDefaults())
    assert warm_up(app) == 4 and len(engine.compilations) == 4  # 3 prefill buckets, 1 decode
    client = app.test_client()
    system = {"role": "system", "content": "Be brief and kind."}
    lengths = []
    for path, messages in [("/chat/completions", user("hi")), ("/v1/chat/completions", user()),
                           ("/chat/completions", [system, *user("hi")]),
                           ("/chat/completions", [system, *user("hello there, how are you?")]),
                           ("/v1/chat/completions", user("hello there, how are you? " * 3))]:
        lengths.append(len(render_prompt(tok, parse_messages(messages))))
        resp = client.post(path, json={"messages": messages})
        assert resp.status_code == 200 and resp.get_data(as_text=True)
    assert lengths == [6, 7, 23, 34, 44]  # the tiny tokenizer spends many tokens: buckets 16, 32 and 64
    assert len(engine.compilations) == 4, engine.compilations[4:]
    health = client.get("/health").get_json()  # the default max_tokens, cut to the context
    assert health["max_context"] == 64 and health["defaults"] == {"temperature": 0.8, "top_k": 50, "max_tokens": 64}


PAGE_HARNESS = r"""
// app.js in node with a stub DOM: health answers with argv[2]; then commands typed in argv[3] (JSON list).
const fs = require("fs"), vm = require("vm");
const els = {};
function el() {
  return { textContent: "", className: "", title: "", value: "", hidden: false, dataset: {}, style: {}, listeners: {},
    classList: { toggle() {}, add() {} }, addEventListener(type, fn) { this.listeners[type] = fn; }, append() {},
    replaceChildren() {}, focus() {}, querySelector: () => el(), scrollHeight: 0, lastElementChild: null };
}
const store = JSON.parse(process.argv[4]);
const ctx = { document: { getElementById: (id) => (els[id] = els[id] || el()), createElement: el,
                          addEventListener() {} },
              localStorage: { getItem: (k) => store[k] || null, setItem: (k, v) => { store[k] = v; } },
              fetch: async () => ({ ok: true, json: async () => JSON.parse(process.argv[2]) }) };
vm.createContext(ctx);
vm.runInContext(fs.readFileSync(process.argv[1], "utf8"), ctx);
setTimeout(() => {
  const footers = [els.settings.textContent];
  for (const text of JSON.parse(process.argv[3])) {
    els.input.value = text;
    els.form.listeners.submit({ preventDefault() {} });
    footers.push(els.settings.textContent);
  }
  const notices = vm.runInContext("messages.map((m) => m.content)", ctx);
  console.log(JSON.stringify({ footers, notices, status: els.status.title }));
}, 100);
"""


@pytest.mark.skipif(shutil.which("node") is None,
                    reason="needs Node.js on PATH to run the page's script (e.g. apt-get install nodejs)")
def test_page_shows_the_servers_limit_for_max_tokens(tok, models):
    """The page's footer and /maxtokens take the default and the limit from /health, not a built-in 512."""
    app = create_app(engines(tok, models["reply"]), defaults=SamplingDefaults())
    health = app.test_client().get("/health").get_data(as_text=True)

    def page(commands, stored=None):
        out = subprocess.run(["node", "-e", PAGE_HARNESS, str(web_app.STATIC_DIR / "app.js"), health,
                              json.dumps(commands), json.dumps(stored or {})],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr[-2000:]
        return json.loads(out.stdout)

    got = page(["/maxtokens 100", "/maxtokens 20", "/topk 0"])
    assert got["footers"] == ["temperature 0.8 · top-k 50 · max 64 tokens"] * 2 + [
        "temperature 0.8 · top-k 50 · max 20 tokens", "temperature 0.8 · top-k off · max 20 tokens"]
    assert got["notices"] == ['max tokens must be an integer from 1 to 64, got "100"', "max tokens set to 20",
                              "top-k set to 0"]
    assert "context 64 tokens" in got["status"]
    # A longer reply chosen on another server is cut to this one's context.
    stored = page([], {"nanochat-jax.chosen": json.dumps({"maxTokens": 512})})
    assert stored["footers"] == ["temperature 0.8 · top-k 50 · max 64 tokens"]


# ----------------------------------------------------------------------------------------------
# Failures and disconnects free the worker

def test_server_errors_are_json_500_and_free_the_worker(reply_app, monkeypatch):
    client = reply_app.test_client()
    engine = get_pool(reply_app).workers[0].engine
    monkeypatch.setattr(engine.tokenizer, "encode", lambda *a, **k: 1 / 0)  # fails while rendering the prompt
    resp = client.post("/chat/completions", json={"messages": user()})
    assert resp.status_code == 500 and "ZeroDivisionError" in resp.get_json()["error"]["message"]
    monkeypatch.undo()

    def broken(*args, **kwargs):
        raise RuntimeError("device fell over")

    monkeypatch.setattr(Batch, "step", broken)  # the first decode chunk, after the prefill's token
    resp = client.post("/chat/completions", json={"messages": user()})  # headers are out: error in the stream
    assert resp.status_code == 200
    events = sse(resp.get_data(as_text=True))
    assert "device fell over" in events[-1]["error"] and events[-1]["done"] is True
    resp = client.post("/v1/chat/completions", json={"messages": user()})
    assert resp.status_code == 500 and "device fell over" in resp.get_json()["error"]["message"]
    events = sse(client.post("/v1/chat/completions", json={"messages": user(), "stream": True}).get_data(True))
    assert "device fell over" in events[-2]["error"]["message"] and events[-1] == "[DONE]"
    assert_idle(reply_app)
    monkeypatch.undo()
    assert sse(client.post("/chat/completions", json={"messages": user()}).get_data(True))[-1]["done"]


def test_closing_a_stream_stops_generation_and_frees_the_worker(loop_app):
    client = loop_app.test_client()
    pool = get_pool(loop_app)
    before = pool.stats()
    resp = client.post("/chat/completions", json={"messages": user(), "max_tokens": 4000}, buffered=False)
    body = iter(resp.response)
    assert [e["token"] for e in read_events(body, 3, [])] == ["h", "i", "h"]
    assert pool.stats()["busy_workers"] == 1
    resp.close()  # what the WSGI server does when the client goes away
    after = assert_idle(loop_app, served=before["requests_served"] + 1,
                        cancelled=before["requests_cancelled"] + 1)
    assert after["tokens_generated"] - before["tokens_generated"] <= 1 + 16  # the first token and one decode chunk

    # A response closed before its body was ever read frees the worker too (the test client always reads the
    # first chunk, so call the WSGI app directly, as a server would).
    environ = EnvironBuilder(path="/v1/chat/completions", method="POST",
                             json={"messages": user(), "stream": True}).get_environ()
    statuses = []
    body = loop_app(environ, lambda status, headers, exc_info=None: statuses.append(status))
    assert statuses == ["200 OK"] and pool.stats()["busy_workers"] == 1
    body.close()
    assert_idle(loop_app, cancelled=before["requests_cancelled"] + 2)


def test_continuous_batching_frees_a_closed_slot_within_a_chunk(tok, models, monkeypatch):
    """Two streams share a worker (max_batch=2); closing one frees its slot before the next-but-one decode chunk,
    while the other keeps streaming, and a third chat then takes the freed slot and completes."""
    app = create_app(engines(tok, models["loop"]), defaults=GREEDY, max_context=512, max_batch=2, chunk=4)
    pool, worker = get_pool(app), get_pool(app).workers[0]
    chunks = []  # the busy slots at the start of each decode chunk
    real_step = Batch.step

    def step(self, chunk):
        chunks.append({s for s, row in enumerate(self.host) if not row.completed})
        return real_step(self, chunk)

    monkeypatch.setattr(Batch, "step", step)
    client = app.test_client()
    buffers = collections.defaultdict(list)
    tokens = lambda body, n: [e["token"] for e in read_events(body, n, buffers[id(body)])]  # noqa: E731
    a = client.post("/chat/completions", json={"messages": user(), "max_tokens": 400}, buffered=False)
    a_body = iter(a.response)
    assert tokens(a_body, 3) == ["h", "i", "h"]
    b = client.post("/chat/completions", json={"messages": user(), "max_tokens": 400}, buffered=False)
    b_body = iter(b.response)
    assert tokens(b_body, 2) == ["h", "i"]
    s = pool.stats()
    assert (s["slots_in_use"], s["busy_workers"], s["queue_length"]) == (2, 1, 0) and set(worker.slots) == {0, 1}
    health = client.get("/health").get_json()
    assert (health["available_workers"], health["free_slots"]) == (0, 0)
    seen = len(chunks)
    a.close()
    deadline = time.time() + 20
    while 0 in worker.slots and time.time() < deadline:
        time.sleep(0.01)
    assert 0 not in worker.slots
    assert sum(0 in busy for busy in chunks[seen:]) <= 1  # at most the chunk already under way when it closed
    c = sse(client.post("/chat/completions", json={"messages": user(), "max_tokens": 5}).get_data(True))
    assert "".join(e["token"] for e in c[:-1]) == "hihih" and c[-1]["finish_reason"] == "length"
    assert tokens(b_body, 3) == ["h", "i", "h"]  # b streamed on all along
    b.close()
    s = assert_idle(app, served=3, cancelled=2)
    assert s["slots_in_use"] == 0 and s["tokens_per_s"] > 0


def test_busy_pool_queues_then_answers_503(loop_app):
    client = loop_app.test_client()
    holder = client.post("/chat/completions", json={"messages": user(), "max_tokens": 4000}, buffered=False)
    next(iter(holder.response))
    t0 = time.perf_counter()
    busy = client.post("/chat/completions", json={"messages": user()})
    assert time.perf_counter() - t0 >= 0.25  # waited queue_timeout (0.3 s) in the queue first
    assert busy.status_code == 503 and busy.get_json()["error"]["type"] == "server_busy"
    assert busy.headers["Retry-After"]
    holder.close()
    assert_idle(loop_app)


def test_worker_pool_hands_out_each_worker_once_and_queues():
    class E:
        device = "cpu:0"

    pool = WorkerPool([E(), E()])
    a, b = pool.acquire(), pool.acquire()
    assert {a.index, b.index} == {0, 1} and pool.acquire(timeout=0.01) is None
    got = []
    waiter = threading.Thread(target=lambda: got.append(pool.acquire(timeout=10)))
    waiter.start()
    deadline = time.time() + 5
    while pool.stats()["queue_length"] != 1 and time.time() < deadline:
        time.sleep(0.01)
    assert pool.stats()["queue_length"] == 1 and pool.stats()["busy_workers"] == 2
    pool.release(a)
    waiter.join(5)
    assert got == [a] and pool.stats()["queue_length"] == 0 and pool.stats()["max_queue_length"] == 1
    pool.release(b)
    pool.release(a, cancelled=True)
    with pytest.raises(RuntimeError, match="released twice"):
        pool.release(a)
    s = pool.stats()
    assert (s["requests_served"], s["requests_cancelled"], s["busy_workers"]) == (3, 1, 0)


# ----------------------------------------------------------------------------------------------
# A real server (waitress) on 127.0.0.1

def stream_chat(url, path, payload, timeout=120):
    with requests.post(url + path, json=payload, stream=True, timeout=timeout) as r:
        assert r.status_code == 200, r.text[:300]
        return sse(r.content.decode())


@pytest.mark.parametrize("max_batch", [1, pytest.param(8, marks=pytest.mark.slow)])
def test_real_server_32_concurrent_streams_all_complete(tok, models, max_batch):
    app = create_app(engines(tok, models["reply"], n=2), defaults=GREEDY, max_batch=max_batch)
    results, errors = [None] * 32, []

    def client(k):
        try:
            if k % 2:
                events = stream_chat(server.url, "/v1/chat/completions", {"messages": user(f"hi {k}"),
                                                                         "stream": True})
                results[k] = "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1])
                assert events[-2]["choices"][0]["finish_reason"] == "stop"
            else:
                events = stream_chat(server.url, "/chat/completions", {"messages": user(f"hello {k}")})
                results[k] = "".join(e["token"] for e in events[:-1])
                assert events[-1]["done"] and events[-1]["finish_reason"] == "stop"
        except Exception as e:  # noqa: BLE001 (reported below)
            errors.append(f"client {k}: {e!r}")

    with BackgroundServer(app, threads=48) as server:
        threads = [threading.Thread(target=client, args=(k,)) for k in range(32)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not errors, errors
        assert results == [REPLY_TEXT] * 32
        stats = requests.get(server.url + "/stats", timeout=10).json()
        assert stats["busy_workers"] == 0 and stats["idle_workers"] == 2 and stats["queue_length"] == 0
        assert stats["requests_served"] == 32 and stats["requests_cancelled"] == 0
        assert stats["tokens_generated"] == 32 * 5
        assert all(w["requests_served"] > 0 for w in stats["workers"])  # both replicas served
        assert stats["max_queue_length"] >= 1  # 32 chats on 2 workers x max_batch slots: some waited
        assert stats["slots_in_use"] == 0 and stats["slots_total"] == 2 * max_batch
        assert requests.get(server.url + "/health", timeout=10).json()["available_workers"] == 2


def test_real_server_client_disconnect_frees_the_worker(loop_app):
    pool = get_pool(loop_app)
    before = pool.stats()
    with BackgroundServer(loop_app, threads=8) as server:
        host, port = server.url.removeprefix("http://").split(":")
        body = json.dumps({"messages": user(), "max_tokens": 4000}).encode()
        with socket.create_connection((host, int(port)), timeout=30) as sock:
            sock.sendall(b"POST /chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n" % len(body) + body)
            received = b""
            while received.count(b'"token"') < 3:
                received += sock.recv(4096)
            assert b"200 OK" in received and b'"token": "h"' in received
        deadline = time.time() + 20
        while time.time() < deadline:
            stats = requests.get(server.url + "/stats", timeout=10).json()
            if stats["busy_workers"] == 0:
                break
            time.sleep(0.05)
        assert stats["busy_workers"] == 0 and stats["requests_cancelled"] == before["requests_cancelled"] + 1
        generated = stats["tokens_generated"] - before["tokens_generated"]
        assert generated < 4000, generated  # stopped early, not run to max_tokens
        # The freed worker takes the next chat; an OpenAI stream dropped by `requests` is noticed too.
        with requests.post(server.url + "/v1/chat/completions", json={"messages": user(), "max_tokens": 4000,
                                                                      "stream": True}, stream=True, timeout=30) as r:
            lines = r.iter_lines()
            first = [json.loads(next(line for line in lines if line)[len(b"data: "):]) for _ in range(3)]
        assert [c["choices"][0]["delta"].get("content") for c in first] == ["", "h", "i"]
        deadline = time.time() + 20
        while pool.stats()["busy_workers"] and time.time() < deadline:
            time.sleep(0.05)
        stats = assert_idle(loop_app, cancelled=before["requests_cancelled"] + 2)
        assert stats["tokens_generated"] - before["tokens_generated"] < 8000


# ----------------------------------------------------------------------------------------------
# scripts/chat_web.py end to end

@pytest.mark.slow  # a subprocess end to end: ~30-50 s on a shared 2-core box
def test_chat_web_script_serves_a_checkpoint(tok, models):
    from nanochat_jax.checkpoint import Checkpointer, checkpoint_dir

    cfg, params = models["reply"]
    tok.save()
    with Checkpointer(checkpoint_dir("sft", "d2"), async_save=False) as ckpt:
        ckpt.save(3, params=params, meta={"step": 3, "model_config": cfg.to_dict()})
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    proc = subprocess.Popen([sys.executable, "scripts/chat_web.py", "--port=0", "-t", "0", "-m", "8"],
                            cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url, lines = None, []
        for line in proc.stdout:
            lines.append(line)
            if "serving on http://" in line:
                url = line.split("serving on ")[1].split()[0].rstrip("/")
                break
        assert url, "".join(lines)[-3000:]
        health = requests.get(url + "/health", timeout=30).json()
        assert health["num_workers"] == 2 and "sft" in health["model"]
        body = requests.post(url + "/v1/chat/completions", json={"messages": user()}, timeout=60).json()
        assert body["choices"][0]["message"]["content"] == REPLY_TEXT
        bad = requests.post(url + "/chat/completions", json={"messages": user(), "top_k": 999}, timeout=30)
        assert bad.status_code == 400 and "'top_k'" in bad.json()["error"]["message"]
    finally:
        proc.terminate()
        proc.wait(30)
