"""Inference engine: batched prefill + KV-cached decoding, sampling, stop tokens and calculator tool use.

    engine = Engine(params, cfg, tokenizer)                       # optionally device=jax.local_devices()[i]
    for tokens, masks in engine.generate(prompt_ids, num_samples=4, max_tokens=64, temperature=0.8, top_k=50):
        ...                                                       # one column per step: a token per row
    seqs, masks = engine.generate_batch([ids_a, ids_b], max_tokens=64, temperature=0)   # prompts may differ in length

Rows. `tokens` is one prompt (list of ids) or several prompts (list of lists, any lengths). Each prompt is run
`num_samples` times; rows are prompt-major (row = prompt_index * num_samples + sample_index).

Cache layout (gpt.KVCache). k and v are (layers, rows, S, kv_heads, head_dim) in the compute dtype, preallocated
per call with S = the power-of-two bucket of (longest prompt + max_tokens), but never longer than the model's
sequence_len when prompt + max_tokens fit in it (`Engine.lengths`); `pos` (rows,) counts the tokens each
row has cached, which is also the absolute position of its next token. The prefill runs the distinct prompts
right-padded to a power-of-two bucket T (at most S) and sets pos[b] = len(prompt_b), then the cache is
repeated num_samples times along the row axis, so each row samples its own first token from the same prefix.

Decoding. Each step feeds one token per row at position pos[b]: RoPE uses that per-row position; every layer writes
its k/v at [layer, row, pos[row]] (the cache rides in the scan carry, so the write is in place) and attends over
keys at positions <= pos[row]. Padding garbage left by the prefill beyond a row's prompt is overwritten before
any query can see it (a query at position p only sees keys <= p). A sliding-window layer with window w sees keys
in [p - w, p]: when w + 1 < S it reads only that slice of the cache (a per-row dynamic slice), otherwise the whole
cache with a mask. Smear mixes the previous token's normed embedding into the current one; the step recomputes it
from the previous token id (the prompt's last token for the first step), so nothing else has to be cached.

Host/device split. Sampling (temperature, top-k, per-row keys folded from the request seed, the step and the row)
happens on device; the host reads back only the sampled token ids. The loop is pipelined one step deep: step i
(which feeds token i) is dispatched before the host reads token i from step i-1, because whether token i is
forced (tool output) depends only on tokens before it. Forced tokens replace the sampled ones on device
(`where(use_forced, forced, sampled)`) and are fed through the model like sampled ones; their mask is 0.

Tool use (as the reference): <|python_start|> opens an expression; on <|python_end|> its decoded text goes to
nanochat_jax.execution.use_calculator, and a non-None result forces <|output_start|> result <|output_end|> into the
stream. A row finishes when it emits <|assistant_end|> or <|bos|>, or after max_tokens tokens (forced ones count).

Compilation. Prefill and decode are compiled ahead of time per static shape key (rows, prompt bucket, cache
bucket, top-k bucket) and kept per Engine; every compilation is logged and counted (`engine.compilations`), so a
chat that grows its context recompiles only when a bucket changes. An Engine holds its own params (cast once to
the compute dtype: every matmul casts weights to it anyway, so outputs are bit-identical and decode reads half the
bytes of fp32 weights) and compiled functions; use one Engine per thread.
"""

from __future__ import annotations

import collections
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from nanochat_jax import gpt
from nanochat_jax.common import get_logger

STOP_TOKENS = ("<|assistant_end|>", "<|bos|>")


def bucket(n: int, minimum: int = 16) -> int:
    """The power of two >= max(n, minimum): prompt and cache lengths are padded to these static shapes."""
    return 1 << (max(n, minimum) - 1).bit_length()


def _top_k_bucket(top_k: int | None, vocab_size: int) -> int:
    """Static width of the top-k pre-selection (0: no top-k). The actual k is a runtime value <= this width."""
    if not top_k or top_k >= vocab_size:
        return 0
    return min(bucket(top_k, 1), vocab_size)


def sample_tokens(logits_BV, key, temperature, top_k, *, kmax: int):
    """One token per row from fp32 logits (B, V), on device. temperature 0 → argmax. kmax > 0 → keep the top_k
    (<= kmax, a traced int) largest logits. Row b draws with fold_in(key, b), so rows are independent."""
    B = logits_BV.shape[0]
    greedy = jnp.argmax(logits_BV, axis=-1)
    if kmax:
        top_vals = jax.lax.top_k(logits_BV, kmax)[0]  # (B, kmax), descending
        kth = jnp.take(top_vals, jnp.clip(top_k, 1, kmax) - 1, axis=1)[:, None]
        logits_BV = jnp.where(logits_BV >= kth, logits_BV, -jnp.inf)
    t = jnp.where(temperature > 0, temperature, 1.0)
    keys = jax.vmap(partial(jax.random.fold_in, key))(jnp.arange(B))
    sampled = jax.vmap(jax.random.categorical)(keys, logits_BV / t)
    return jnp.where(temperature > 0, sampled, greedy).astype(jnp.int32)


def _prefill(params, idx_nT, lens_n, key, temperature, top_k, *, cfg, num_samples: int, max_len: int, kmax: int):
    """Prefill the distinct prompts, repeat each num_samples times, sample every row's first token."""
    n = idx_nT.shape[0]
    logits, cache = gpt.forward_cached(params, idx_nT, cfg, gpt.init_cache(cfg, n, max_len), lengths_B=lens_n)
    prev = idx_nT[jnp.arange(n), lens_n - 1]
    if num_samples > 1:
        rep = partial(jnp.repeat, repeats=num_samples)
        cache = gpt.KVCache(rep(cache.k, axis=1), rep(cache.v, axis=1), rep(cache.pos, axis=0))
        logits, prev = rep(logits, axis=0), rep(prev, axis=0)
    tok = sample_tokens(logits, jax.random.fold_in(key, 0), temperature, top_k, kmax=kmax)
    return cache, tok, prev


def _decode(params, cache, tok_B, prev_B, forced_B, use_forced_B, key, step, temperature, top_k, *, cfg, kmax: int):
    """Feed one token per row (the sampled one, or the forced one where use_forced_B), sample the next."""
    inp_B = jnp.where(use_forced_B, forced_B, tok_B)
    logits, cache = gpt.forward_cached(params, inp_B[:, None], cfg, cache, prev_idx_B=prev_B)
    nxt = sample_tokens(logits, jax.random.fold_in(key, step), temperature, top_k, kmax=kmax)
    return cache, nxt, inp_B


@dataclass
class _Row:
    """Host-side state of one row: tool-use state machine, forced tokens to come, completion."""
    forced: collections.deque = field(default_factory=collections.deque)
    in_python: bool = False
    expr: list = field(default_factory=list)
    completed: bool = False


class Engine:
    """KV-cached generation for one model on one device (see the module docstring)."""

    def __init__(self, params, cfg: gpt.GPTConfig, tokenizer=None, *, device=None, min_bucket: int = 16):
        """params: the model pytree; tokenizer: needed for stop tokens and tool use (None: neither, e.g. for
        benchmarks with random weights); device: where params and cache live (default: the first local device)."""
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.device = device if device is not None else jax.local_devices()[0]
        self.min_bucket = min_bucket
        self.set_params(params)
        self.compilations: list[tuple] = []
        self._compiled: dict[tuple, object] = {}
        self._log = get_logger()
        donate = () if self.device.platform == "cpu" else (1,)  # CPU cannot donate; avoid the warning
        self._prefill_jit = jax.jit(_prefill, static_argnames=("cfg", "num_samples", "max_len", "kmax"))
        self._decode_jit = jax.jit(_decode, static_argnames=("cfg", "kmax"), donate_argnums=donate)
        self.stop_ids: set[int] = set()
        self.tool_ids: dict[str, int] | None = None
        if tokenizer is not None:
            self.stop_ids = {tokenizer.encode_special(s) for s in STOP_TOKENS}
            self.tool_ids = {name: tokenizer.encode_special(f"<|{name}|>")
                             for name in ("python_start", "python_end", "output_start", "output_end")}

    def set_params(self, params) -> None:
        """Use new weights (same shapes), e.g. after an RL step; compiled functions are kept (params are arguments)."""
        cast = lambda a: a.astype(self.cfg.dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a  # noqa: E731
        self.params = jax.tree.map(cast, jax.device_put(params, self.device))  # cast where they will live

    # -- compilation ------------------------------------------------------------------------------

    def _get(self, key: tuple, jitted, *args, **static):
        """The compiled executable for `key`, which must name every static shape and argument (compiled and
        logged the first time)."""
        fn = self._compiled.get(key)
        if fn is None:
            t0 = time.perf_counter()
            fn = jitted.lower(*args, **static).compile()
            self._compiled[key] = fn
            self.compilations.append(key)
            names = {"prefill": ("prompts", "samples", "prompt_len", "cache_len", "top_k_width"),
                     "decode": ("rows", "cache_len", "top_k_width")}[key[0]]
            shapes = " ".join(f"{k}={v}" for k, v in zip(names, key[1:]))
            self._log.info(f"engine: compiled {key[0]} ({shapes}) on {self.device} in "
                           f"{time.perf_counter() - t0:.2f}s; {len(self.compilations)} compilation(s) so far")
        return fn

    def _put(self, x):
        return jax.device_put(x, self.device)

    def lengths(self, prompt_len: int, max_tokens: int) -> tuple[int, int]:
        """(T, S): the padded prompt length and the cache length that a call with this longest prompt and
        max_tokens compiles for. Powers of two, except that a cache is never longer than the model's context
        when prompt + max_tokens fit in it (e.g. sequence_len 300: S = 300, not 512)."""
        need, context = prompt_len + max_tokens, self.cfg.sequence_len
        S = bucket(need, self.min_bucket)
        if need <= context:
            S = min(S, context)
        return min(bucket(prompt_len, self.min_bucket), S), S

    # -- generation -------------------------------------------------------------------------------

    def generate(self, tokens: Sequence[int] | Sequence[Sequence[int]], num_samples: int = 1, max_tokens: int = 256,
                 temperature: float = 1.0, top_k: int | None = None, seed: int = 42
                 ) -> Iterator[tuple[list[int], list[int]]]:
        """Stream generation: yields (token_column, mask_column) per step, one entry per row (mask 1 = sampled,
        0 = forced tool output). Rows that already finished keep receiving (meaningless) tokens until every row
        is done or max_tokens steps have been yielded; track completion with `stop_ids` or use generate_batch."""
        prompts = _as_prompts(tokens, self.cfg.vocab_size)
        if not (isinstance(num_samples, int) and num_samples >= 1):
            raise ValueError(f"num_samples must be an int >= 1, got {num_samples!r}")
        if not (isinstance(max_tokens, int) and max_tokens >= 1):
            raise ValueError(f"max_tokens must be an int >= 1, got {max_tokens!r}")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
        if top_k is not None and top_k < 0:
            raise ValueError(f"top_k must be None or >= 0 (0/None = off), got {top_k}")
        cfg = self.cfg
        n, B = len(prompts), len(prompts) * num_samples
        lens = np.array([len(p) for p in prompts], np.int32)
        T, S = self.lengths(int(lens.max()), max_tokens)
        kmax = _top_k_bucket(top_k, cfg.vocab_size)
        idx = np.zeros((n, T), np.int32)
        for i, p in enumerate(prompts):
            idx[i, :len(p)] = p
        key = self._put(jax.random.key(seed))
        temp = self._put(np.float32(temperature))
        k_arr = self._put(np.int32(top_k or 0))

        prefill_args = (self.params, self._put(idx), self._put(lens), key, temp, k_arr)
        prefill = self._get(("prefill", n, num_samples, T, S, kmax), self._prefill_jit, *prefill_args, cfg=cfg,
                            num_samples=num_samples, max_len=S, kmax=kmax)
        cache, raw_dev, prev_dev = prefill(*prefill_args)

        rows = [_Row() for _ in range(B)]
        no_forcing = (self._put(np.zeros(B, np.int32)), self._put(np.zeros(B, bool)))
        decode = None
        for i in range(max_tokens):
            # Token i (raw_dev: sampled, not read yet) is forced where a tool result is queued; that depends only
            # on tokens before i, so feeding token i can be dispatched before the host reads it.
            use_forced = [bool(r.forced) and not r.completed for r in rows]
            if i + 1 < max_tokens:
                if any(use_forced):
                    forcing = (self._put(np.array([r.forced[0] if u else 0 for r, u in zip(rows, use_forced)],
                                                  np.int32)), self._put(np.array(use_forced)))
                else:
                    forcing = no_forcing
                args = (self.params, cache, raw_dev, prev_dev, *forcing, key, self._put(np.int32(i + 1)), temp, k_arr)
                if decode is None:
                    decode = self._get(("decode", B, S, kmax), self._decode_jit, *args, cfg=cfg, kmax=kmax)
                cache, next_raw_dev, prev_dev = decode(*args)
            raw = np.asarray(raw_dev)  # waits for the previous step only; the one just dispatched keeps running
            column, masks = [], []
            for r, row in enumerate(rows):
                if use_forced[r]:
                    tok, mask = row.forced.popleft(), 0
                else:
                    tok, mask = int(raw[r]), 1
                column.append(tok)
                masks.append(mask)
                if not row.completed:
                    self._advance(row, tok)
            yield column, masks
            if all(r.completed for r in rows):
                return
            if i + 1 < max_tokens:
                raw_dev = next_raw_dev

    def _advance(self, row: _Row, tok: int) -> None:
        """Stop tokens and the calculator tool for one row, given its newest token."""
        if tok in self.stop_ids:
            row.completed = True
            return
        ids = self.tool_ids
        if ids is None:
            return
        if tok == ids["python_start"]:
            row.in_python, row.expr = True, []
        elif tok == ids["python_end"] and row.in_python:
            row.in_python = False
            from nanochat_jax.execution import use_calculator  # lazy: only chats that use the tool need it

            result = use_calculator(self.tokenizer.decode(row.expr))
            row.expr = []
            if result is not None:
                row.forced.extend([ids["output_start"], *self.tokenizer.encode(str(result)), ids["output_end"]])
        elif row.in_python:
            row.expr.append(tok)

    def generate_batch(self, tokens: Sequence[int] | Sequence[Sequence[int]], num_samples: int = 1,
                       **kwargs) -> tuple[list[list[int]], list[list[int]]]:
        """Non-streaming generate: per row, the prompt followed by its generated tokens (the terminal
        <|assistant_end|>/<|bos|> stripped), and masks (0 for the prompt and forced tokens, 1 for sampled ones).
        kwargs: max_tokens, temperature, top_k, seed as for generate."""
        prompts = _as_prompts(tokens, self.cfg.vocab_size)
        seqs = [list(p) for p in prompts for _ in range(num_samples)]
        masks = [[0] * len(s) for s in seqs]
        done = [False] * len(seqs)
        for column, mask_column in self.generate(prompts, num_samples=num_samples, **kwargs):
            for r, (tok, mask) in enumerate(zip(column, mask_column)):
                if done[r]:
                    continue
                if tok in self.stop_ids:
                    done[r] = True
                    continue
                seqs[r].append(tok)
                masks[r].append(mask)
        return seqs, masks


def make_engines(params, cfg: gpt.GPTConfig, tokenizer, devices: Sequence | None = None,
                 num_workers: int | None = None) -> list["Engine"]:
    """One Engine (a full model replica) per device: `devices`, else the first num_workers local devices (all)."""
    if devices is None:
        devices = jax.local_devices()
        if num_workers is not None:
            if not 1 <= num_workers <= len(devices):
                raise ValueError(f"num_workers={num_workers}, but there are {len(devices)} local devices")
            devices = devices[:num_workers]
    return [Engine(params, cfg, tokenizer, device=d) for d in devices]


def map_on_engines(engines: Sequence["Engine"], items: Sequence, fn) -> list:
    """[fn(engine, item) for item in items], spread over the engines: one thread per engine, each taking the next
    item from a shared queue (JAX releases the GIL while a device computes, so N devices work at once). Results
    come back in item order; the first exception raised in a worker is re-raised here."""
    import queue
    import threading

    work: queue.Queue = queue.Queue()
    for i, item in enumerate(items):
        work.put((i, item))
    results: dict[int, object] = {}
    errors: list[BaseException] = []

    def worker(engine):
        try:
            while not errors:
                try:
                    i, item = work.get_nowait()
                except queue.Empty:
                    return
                results[i] = fn(engine, item)
        except BaseException as e:  # noqa: BLE001 (surfaced in the calling thread)
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(e,), daemon=True) for e in engines]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return [results[i] for i in range(len(items))]


def _as_prompts(tokens, vocab_size: int) -> list[list[int]]:
    """One prompt (ids) or several (lists of ids) → a list of non-empty int lists, ids checked."""
    if len(tokens) == 0:
        raise ValueError("generate: the prompt is empty; start it with at least <|bos|>")
    first = tokens[0]
    prompts = [list(map(int, p)) for p in tokens] if isinstance(first, (list, tuple, np.ndarray)) else [
        list(map(int, tokens))]
    for i, p in enumerate(prompts):
        if not p:
            raise ValueError(f"generate: prompt {i} is empty; start it with at least <|bos|>")
        bad = [t for t in p if not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"generate: prompt {i} has ids outside [0, {vocab_size}): {bad[:5]}")
    return prompts


__all__ = ["Engine", "bucket", "make_engines", "map_on_engines", "sample_tokens", "STOP_TOKENS"]
