"""Serve a trained model as a ChatGPT-like web page and an OpenAI-compatible API.

    python scripts/chat_web.py                                   # the largest SFT model on every local device
    python scripts/chat_web.py -i rl --host=0.0.0.0 --port=8000  # reachable from other machines (e.g. a phone)
    python scripts/chat_web.py -n 2 -t 0.6 -k 50 -m 1024 --cors='*'

Then open http://<host>:<port>/ , or point an OpenAI client at http://<host>:<port>/v1 (any API key):
    curl -N localhost:8000/chat/completions -d '{"messages": [{"role": "user", "content": "hi"}]}'

One model replica per device (-n), each decoding up to --max-batch chats at once (continuous batching); more chats
wait in a queue. The server is waitress (threaded); endpoints and limits: nanochat_jax/web/app.py.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

from nanochat_jax.common import UserError, run_main
from nanochat_jax.config import CHECKPOINT_TOKENIZER, flag, parse_flags, print_config, require

PHASES = ("base", "mid", "sft", "rl")


@dataclass(frozen=True)
class WebConfig:
    """Web chat server over a checkpoint (see the module docstring)."""
    source: str = flag("sft", "checkpoint phase: base|mid|sft|rl (-i)")
    model_tag: str | None = flag(None, "default: the largest d<N> of the phase")
    step: int | None = flag(None, "default: the latest step")
    host: str = flag("127.0.0.1", "0.0.0.0 to accept connections from other machines")
    port: int = flag(8000, "0 = any free port (printed at start)")
    num_workers: int = flag(0, "model replicas, one per local device; 0 = all (-n)")
    temperature: float = flag(0.8, "default when a request gives none (-t)")
    top_k: int = flag(50, "default when a request gives none; 0 = off (-k)")
    max_tokens: int = flag(512, "default reply length when a request gives none (-m)")
    max_context: int = flag(0, "prompt + reply tokens at most, up to the model's sequence_len (0 = all of it)")
    max_batch: int = flag(8, "chats each replica decodes at once (rows of its KV cache); 1 = one at a time")
    chunk: int = flag(16, "decode steps per host round trip; tokens stream and chats join/leave a chunk at a time")
    threads: int = flag(64, "server threads: streams plus queued requests plus /health and /stats")
    queue_timeout: float = flag(300.0, "seconds a request waits for a free worker, then 503")
    warmup: bool = flag(True, "compile every replica before serving, for chats with the defaults")
    warmup_tokens: int = flag(64, "warm up prompts of up to this many tokens (the model's context: all; each "
                                  "prompt bucket compiles once)")
    cors: str = flag("", "Access-Control-Allow-Origin to send, e.g. '*'; empty = none")
    # not RuntimeFlags: one replica per local device (-n), not a mesh; the checkpoint's compute dtype and attention
    tokenizer_dir: str | None = flag(None, CHECKPOINT_TOKENIZER)

    def __post_init__(self):
        require(self.source in PHASES, f"-i/--source must be one of {PHASES}, got {self.source!r}")
        require(0 <= self.port <= 65535, f"--port must be in [0, 65535], got {self.port}")
        require(self.num_workers >= 0, f"-n/--num-workers must be >= 0 (0 = all devices), got {self.num_workers}")
        require(0 <= self.temperature <= 2, f"-t/--temperature must be in [0, 2], got {self.temperature}")
        require(0 <= self.top_k <= 200, f"-k/--top-k must be in [0, 200] (0 = off), got {self.top_k}")
        require(1 <= self.max_tokens <= 4096, f"-m/--max-tokens must be in [1, 4096], got {self.max_tokens}")
        require(self.max_context >= 0, f"--max-context must be >= 0 (0 = the model's), got {self.max_context}")
        require(self.max_batch >= 1, f"--max-batch must be >= 1, got {self.max_batch}")
        require(self.chunk >= 1, f"--chunk must be >= 1, got {self.chunk}")
        require(self.threads >= 2, f"--threads must be >= 2, got {self.threads}")
        require(self.queue_timeout > 0, f"--queue-timeout must be > 0, got {self.queue_timeout}")
        require(self.warmup_tokens >= 1, f"--warmup-tokens must be >= 1, got {self.warmup_tokens}")


ALIASES = {"-i": "source", "-n": "num_workers", "-t": "temperature", "-k": "top_k", "-m": "max_tokens"}


def main(argv=None) -> None:
    cfg = parse_flags(WebConfig, argv, aliases=ALIASES)
    print_config(cfg)
    from nanochat_jax.checkpoint import load_model, load_tokenizer, require_same_vocab, resolve_model_tag
    from nanochat_jax.common import print0
    from nanochat_jax.sharding import local_devices
    from nanochat_jax.web import SamplingDefaults, create_app, make_engines, make_server, warm_up

    model_tag = resolve_model_tag(cfg.source, cfg.model_tag)
    params, model_cfg, meta = load_model(cfg.source, model_tag, cfg.step)
    tokenizer = load_tokenizer(meta, cfg.tokenizer_dir)
    require_same_vocab(model_cfg, tokenizer, f"the {cfg.source} model")
    if cfg.max_context > model_cfg.sequence_len:
        raise UserError(f"--max-context={cfg.max_context} is longer than the model's context "
                        f"({model_cfg.sequence_len} tokens); use at most that (0 = the model's)")
    if cfg.num_workers > len(local_devices()):
        raise UserError(f"-n/--num-workers={cfg.num_workers}, but there are only {len(local_devices())} local devices")
    engines = make_engines(params, model_cfg, tokenizer, num_workers=cfg.num_workers or None)
    del params
    tag = f"{cfg.source}-{model_tag}-step{meta.get('step')}"
    app = create_app(engines, defaults=SamplingDefaults(cfg.temperature, cfg.top_k, cfg.max_tokens),
                     max_context=cfg.max_context or None, queue_timeout=cfg.queue_timeout, max_batch=cfg.max_batch,
                     model_name=f"nanochat-jax-{tag}", cors_origin=cfg.cors or None, chunk=cfg.chunk)
    if cfg.warmup:
        print0(f"compiling {len(engines)} replica(s)...")
        warm_up(app, cfg.warmup_tokens)
    server = make_server(app, host=cfg.host, port=cfg.port, threads=cfg.threads)
    print0(f"nanochat-jax web chat ({tag}, {len(engines)} worker(s) x {cfg.max_batch} slot(s) on "
           f"{engines[0].device.platform}) serving on "
           f"http://{cfg.host}:{server.effective_port}/  (OpenAI API: /v1/chat/completions; Ctrl-C to stop)")
    with contextlib.closing(server), contextlib.suppress(KeyboardInterrupt):  # Ctrl-C: a clean stop
        server.run()


if __name__ == "__main__":
    run_main(main)
