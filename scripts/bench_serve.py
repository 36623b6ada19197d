"""Serving benchmark: the real web server (scripts/chat_web.py) on loopback, N concurrent streaming clients.

    python scripts/bench_serve.py                                   # tiny random d2 model, 32 clients × 64 tokens
    python scripts/bench_serve.py --clients=32 --max-tokens=64 --max-batch=1     # server flags pass through
    python scripts/bench_serve.py --model=checkpoint -i sft --model-tag=d20      # a trained model (base dir's)

Starts `scripts/chat_web.py --port=0`, sends one untimed request of the benchmark's shape (compiling what the
server's warm-up left out), then --clients streaming requests at once, each for exactly --max-tokens greedy tokens:
time to first token (request sent -> first token event), latency, and tokens/s (all completion tokens / time to the
last reply). A client that errors, gets a non-200 answer or still streams at --time-limit has failed. Then one more
request must succeed (nothing left stuck) and /stats is read. A table, then one JSON line. Flags this script does
not know, and all arguments after `--`, go to the server.

--model=random (default): a tokenizer and a random model of a tiny model's shapes in a temporary base dir, with
token embeddings and lm_head set so that greedy decoding loops "hihihi..." and never stops early (nanochat's
zero-initialised output projections leave the residual stream as it is; the compute is the same whatever the values).
"""

from __future__ import annotations

import collections
import dataclasses
import http.client
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import requests

from nanochat_jax.common import UserError, run_main
from nanochat_jax.config import flag, parse_flags, print_config, require

REPO_ROOT = Path(__file__).resolve().parents[1]
MAX_CLIENTS = 512


@dataclass(frozen=True)
class BenchServeConfig:
    """Concurrent streaming clients against scripts/chat_web.py on loopback (see the module docstring)."""
    clients: int = flag(32, f"concurrent streaming requests, all started at once (at most {MAX_CLIENTS})")
    max_tokens: int = flag(64, "tokens each reply streams (greedy; the random model never stops early)")
    prompt: str = flag("hello", "the user message each client sends")
    time_limit: float = flag(300.0, "seconds the clients get in all; still streaming after that = failed")
    startup_timeout: float = flag(600.0, "seconds the server may take to load and compile before serving")
    model: str = flag("random", "random: a tiny random model in a temporary base dir; checkpoint: whatever the "
                                "server's own flags (-i, --model-tag, --step) pick from $NANOCHAT_JAX_BASE_DIR")
    depth: int = flag(2, "random model: layers")
    width: int = flag(64, "random model: model width (n_embd)")
    head_dim: int = flag(16, "random model: attention head size (heads = width / head_dim, kv heads half)")
    vocab_size: int = flag(512, "random model: tokenizer vocabulary (trained here on synthetic text)")
    show_server: bool = flag(False, "print the server's output as it comes (otherwise only its last lines on "
                                    "failure)")

    def __post_init__(self):
        require(1 <= self.clients <= MAX_CLIENTS, f"--clients must be in [1, {MAX_CLIENTS}], got {self.clients}")
        require(1 <= self.max_tokens <= 4096, f"--max-tokens must be in [1, 4096], got {self.max_tokens}")
        require(self.time_limit > 0 and self.startup_timeout > 0, "--time-limit and --startup-timeout must be > 0")
        require(self.model in ("random", "checkpoint"), f"--model must be random|checkpoint, got {self.model!r}")
        require(self.depth >= 1 and self.width >= 2 * self.head_dim >= 2 and self.width % (2 * self.head_dim) == 0,
                "--width must be a multiple of 2 * --head-dim, and --depth >= 1")
        require(self.vocab_size >= 300, f"--vocab-size must be >= 300, got {self.vocab_size}")


def _flag_name(arg: str) -> str:
    return arg.lstrip("-").split("=", 1)[0].replace("-", "_")


def split_argv(argv: list[str]) -> tuple[list[str], list[str]]:
    """(this script's flags, the server's): flags named like a BenchServeConfig field are ours, the rest (with
    the value after a bare `--flag`/`-f`) and everything after `--` go to the server."""
    ours = {f.name for f in dataclasses.fields(BenchServeConfig)} | {"help", "h"}
    mine, server, i = [], [], 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            server += argv[i + 1:]
            break
        dest = mine if arg.startswith("-") and _flag_name(arg) in ours else server
        dest.append(arg)
        if arg.startswith("-") and "=" not in arg and i + 1 < len(argv) and not argv[i + 1].startswith("-"):
            if dest is server or _flag_name(arg) != "show_server":  # a bare boolean flag takes no value
                i += 1
                dest.append(argv[i])
        i += 1
    return mine, server


def make_random_model(base_dir: Path, cfg: BenchServeConfig) -> None:
    """A tokenizer and an SFT checkpoint `d<depth>` under base_dir whose greedy replies loop "hihi..."."""
    os.environ["NANOCHAT_JAX_BASE_DIR"] = str(base_dir)
    import jax
    import jax.numpy as jnp

    from nanochat_jax import gpt
    from nanochat_jax.checkpoint import Checkpointer, checkpoint_dir
    from nanochat_jax.tokenizer import train_tokenizer

    rng = np.random.default_rng(0)
    words = ["".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), rng.integers(2, 8))) for _ in range(400)]
    tok = train_tokenizer([" ".join(rng.choice(words, 6000)) + " hello, hi! how are you?"], vocab_size=cfg.vocab_size)
    tok.save()
    n_head = cfg.width // cfg.head_dim
    seq_len = max(256, 1 << (cfg.max_tokens + 128 - 1).bit_length())  # room for the prompt and the reply
    model_cfg = gpt.GPTConfig(sequence_len=seq_len, vocab_size=tok.vocab_size, n_layer=cfg.depth, n_head=n_head,
                              n_kv_head=max(1, n_head // 2), n_embd=cfg.width, head_dim=cfg.head_dim,
                              compute_dtype="float32", embed_dtype="float32")
    params = gpt.init_params(model_cfg, jax.random.key(0))
    # Embedding rows of the chain's tokens point along basis vectors; lm_head maps each to its successor.
    start, h, i = tok.encode_special("<|assistant_start|>"), tok.encode("h")[0], tok.encode("i")[0]
    wte = np.asarray(params["wte"], np.float32).copy()
    lm_head = np.zeros(params["lm_head"].shape, np.float32)
    for k, (src, dst) in enumerate({start: h, h: i, i: h}.items()):
        wte[src] = 0.0
        wte[src, k] = np.sqrt(cfg.width)
        lm_head[k, dst] = 1.0
    params = {**params, "wte": jnp.asarray(wte, params["wte"].dtype), "lm_head": jnp.asarray(lm_head)}
    with Checkpointer(checkpoint_dir("sft", f"d{cfg.depth}"), async_save=False) as ckpt:
        ckpt.save(1, params=params, meta={"step": 1, "model_config": model_cfg.to_dict()})
    print(f"random model: {cfg.depth} layers, width {cfg.width}, {n_head} heads of {cfg.head_dim}, vocab "
          f"{tok.vocab_size}, context {seq_len}; {gpt.num_params(model_cfg)['total']:,} params in {base_dir}")


class Server:
    """scripts/chat_web.py in a subprocess; its output is drained by a thread (kept: the last 60 lines)."""

    def __init__(self, args: list[str], env: dict, show: bool):
        self.proc = subprocess.Popen([sys.executable, str(REPO_ROOT / "scripts" / "chat_web.py"), *args],
                                     cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, bufsize=1)
        self.lines: collections.deque[str] = collections.deque(maxlen=60)
        self.url: str | None = None
        self.ready = threading.Event()
        threading.Thread(target=self._drain, args=(show,), daemon=True).start()

    def _drain(self, show: bool):
        for line in self.proc.stdout:
            self.lines.append(line.rstrip())
            if show:
                print(f"  [server] {line.rstrip()}", flush=True)
            if self.url is None and "serving on http://" in line:
                self.url = line.split("serving on ")[1].split()[0].rstrip("/")
                self.ready.set()
        self.ready.set()  # exited

    def wait_ready(self, timeout: float) -> str:
        if not self.ready.wait(timeout) or self.url is None:
            tail = "\n".join(list(self.lines)[-15:])
            state = "exited" if self.proc.poll() is not None else f"not serving after {timeout:.0f}s"
            raise UserError(f"the server {state}; its last lines:\n{tail}")
        return self.url

    def stop(self):
        self.proc.terminate()  # nothing if it has exited
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


def stream_chat(url: str, payload: dict, deadline: float) -> dict:
    """One streaming request on POST /chat/completions: {ok, ttft, latency, tokens, finish_reason | error}."""
    t0 = time.perf_counter()
    out = {"ok": False, "ttft": None, "latency": None, "tokens": 0}
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=max(deadline - time.monotonic(), 0.1))
    try:
        conn.request("POST", "/chat/completions", body=json.dumps(payload),
                     headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            return {**out, "error": f"HTTP {resp.status}: {resp.read()[:200]!r}"}
        for raw in resp:
            line = raw.decode("utf-8", "replace").strip()
            if not line.startswith("data: "):
                continue
            event = json.loads(line[len("data: "):])
            if "token" in event and out["ttft"] is None:
                out["ttft"] = time.perf_counter() - t0
            if event.get("done"):
                if "error" in event:
                    return {**out, "error": event["error"]}
                return {**out, "ok": True, "latency": time.perf_counter() - t0,
                        "tokens": event.get("completion_tokens", 0), "finish_reason": event.get("finish_reason")}
            if time.monotonic() > deadline:
                return {**out, "error": "time limit"}
        return {**out, "error": "stream ended without a done event"}
    except (OSError, http.client.HTTPException, ValueError) as e:
        return {**out, "error": f"{type(e).__name__}: {e}"}
    finally:
        conn.close()


def chat_payload(cfg: BenchServeConfig, max_tokens: int) -> dict:
    return {"messages": [{"role": "user", "content": cfg.prompt}], "max_tokens": max_tokens, "temperature": 0.0,
            "top_k": 0}


def run_clients(url: str, cfg: BenchServeConfig) -> tuple[list[dict], float]:
    """cfg.clients streams started together; returns their results and the wall time to the last completion."""
    results: list[dict] = [{"ok": False, "error": "not finished", "tokens": 0} for _ in range(cfg.clients)]
    go = threading.Barrier(cfg.clients + 1)

    def client(k):
        go.wait()
        results[k] = stream_chat(url, chat_payload(cfg, cfg.max_tokens), time.monotonic() + cfg.time_limit)

    threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(cfg.clients)]
    for t in threads:
        t.start()
    deadline, t0 = time.monotonic() + cfg.time_limit, time.perf_counter()
    go.wait()
    for t in threads:
        t.join(max(deadline - time.monotonic(), 0) + 5)
    ends = [t0 + r["latency"] for r in results if r.get("ok")]
    return results, (max(ends) if ends else time.perf_counter()) - t0


def summarize(results: list[dict], wall: float, cfg: BenchServeConfig) -> dict:
    ok = [r for r in results if r.get("ok")]
    ttft = np.array([r["ttft"] for r in ok if r["ttft"] is not None])
    lat = np.array([r["latency"] for r in ok])
    pct = lambda a, q: float(np.percentile(a, q)) if a.size else None
    tokens = int(sum(r["tokens"] for r in ok))
    return {"clients": cfg.clients, "max_tokens": cfg.max_tokens, "completed": len(ok),
            "failed": len(results) - len(ok), "short_replies": sum(r["tokens"] < cfg.max_tokens for r in ok),
            "tokens": tokens, "wall_seconds": wall, "tokens_per_s": tokens / wall if wall > 0 else None,
            "ttft_p50_s": pct(ttft, 50), "ttft_p99_s": pct(ttft, 99),
            "latency_p50_s": pct(lat, 50), "latency_p99_s": pct(lat, 99),
            "errors": dict(collections.Counter(r.get("error", "?")[:120] for r in results if not r.get("ok")))}


def main(argv=None) -> dict:
    mine, server_args = split_argv(sys.argv[1:] if argv is None else list(argv))
    cfg = parse_flags(BenchServeConfig, mine)
    print_config(cfg)
    with tempfile.TemporaryDirectory(prefix="bench_serve_") as tmp:
        env = dict(os.environ)
        if cfg.model == "random":
            make_random_model(Path(tmp), cfg)
            env["NANOCHAT_JAX_BASE_DIR"] = tmp
            server_args = ["-i", "sft", f"--model-tag=d{cfg.depth}", *server_args]
        given = {_flag_name(a) for a in server_args if a.startswith("-")}
        defaults = [f"--threads={cfg.clients + 16}"] if "threads" not in given else []
        server_args = ["--host=127.0.0.1", "--port=0", *defaults, *server_args]
        print(f"server: scripts/chat_web.py {' '.join(server_args)}", flush=True)
        server = Server(server_args, env, cfg.show_server)
        try:
            t0 = time.perf_counter()
            url = server.wait_ready(cfg.startup_timeout)
            health = requests.get(url + "/health", timeout=30).json()
            print(f"serving at {url} after {time.perf_counter() - t0:.1f}s (load + warm-up): {health.get('model')}, "
                  f"{health.get('num_workers')} worker(s)", flush=True)
            # untimed: compiles what this request shape needs beyond the server's own warm-up
            warm = stream_chat(url, chat_payload(cfg, cfg.max_tokens), time.monotonic() + cfg.startup_timeout)
            if not warm.get("ok"):
                raise UserError(f"the warm-up request failed: {warm.get('error')}")
            results, wall = run_clients(url, cfg)
            follow = stream_chat(url, chat_payload(cfg, 4), time.monotonic() + 60)
            stats = requests.get(url + "/stats", timeout=30).json()
        finally:
            server.stop()
    out = summarize(results, wall, cfg)
    out.update(follow_up_ok=bool(follow.get("ok")), server_args=server_args,
               server_stats={k: v for k, v in stats.items() if not isinstance(v, (list, dict))})
    fmt = lambda x, s=".2f": "-" if x is None else format(x, s)
    print(f"{'clients':>7} {'tokens':>6} {'done':>5} {'failed':>6} {'tok/s':>8} {'TTFT p50':>9} {'TTFT p99':>9} "
          f"{'lat p50':>8} {'lat p99':>8} {'wall s':>7}")
    print(f"{cfg.clients:>7} {cfg.max_tokens:>6} {out['completed']:>5} {out['failed']:>6} "
          f"{fmt(out['tokens_per_s'], '.1f'):>8} {fmt(out['ttft_p50_s']):>9} {fmt(out['ttft_p99_s']):>9} "
          f"{fmt(out['latency_p50_s']):>8} {fmt(out['latency_p99_s']):>8} {wall:>7.2f}")
    if out["errors"]:
        print("failures: " + "; ".join(f"{n} × {e}" for e, n in out["errors"].items()))
    if not out["follow_up_ok"]:
        print(f"the follow-up request failed: {follow.get('error')}")
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    run_main(main)
