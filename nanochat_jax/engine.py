"""Inference engine: batched prefill + KV-cached decoding, sampling, stop tokens and calculator tool use.

    engine = Engine(params, cfg, tokenizer)                       # optionally device=jax.local_devices()[i]
    for tokens, masks in engine.generate(prompt_ids, num_samples=4, max_tokens=64, temperature=0.8, top_k=50):
        ...                                                       # one column per step: a token per row
    seqs, masks = engine.generate_batch([ids_a, ids_b], max_tokens=64, temperature=0)   # prompts may differ in length

Rows are prompt-major (row = prompt_index * num_samples + sample_index). The cache (`gpt.KVCache`) is preallocated
per call, S = the power-of-two bucket of (longest prompt + max_tokens), never longer than the model's context when
that fits (`Engine.lengths`). The prefill runs the prompts right-padded to a bucket and repeats each one's cache
num_samples times; every row then samples its own token 0. Each decode step feeds one token per row at its own
position pos[b]; padding left past a row's prompt is overwritten before any query can see it.

The decode loop runs on the device (`_decode`, a jitted lax.while_loop over up to `chunk` steps, the donated state
`Rows` in its carry) and returns to the host after a chunk, when every row is done, or right after a row emits
<|python_end|>: the host runs the calculator (nanochat_jax.execution.use_calculator) and the next chunk forces
<|output_start|> result <|output_end|>. A row stops on <|assistant_end|> or <|bos|>, or after max_tokens (forced
tokens count). Greedy chunks skip the sampler. Token i of a row is drawn with fold_in(fold_in(key(seed), i), r),
r the row's sample number in its request: a seeded request samples the same tokens whatever shares its batch and
whatever the chunk size.

Continuous batching (`Engine.open_batch`, `Batch`): the rows of one cache are slots; `insert_many` prefills the
requests admitted together and scatters each into a free row while the others are mid-reply, `free` ends a row,
`step` runs one chunk for all. `generate` is the same loop over rows filled by one prefill.

Compilation: prefill, insert and decode are compiled ahead of time per static shape key and kept per Engine; each
compilation is logged and counted (`engine.compilations`). An Engine holds its params cast once to the compute
dtype (every matmul casts to it anyway: identical outputs, half the bytes read); use one Engine per thread.
"""

from __future__ import annotations

import collections
import itertools
import queue
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import Iterator, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from nanochat_jax import gpt
from nanochat_jax.common import get_logger, pow2_bucket
from nanochat_jax.sharding import local_devices

STOP_TOKENS = ("<|assistant_end|>", "<|bos|>")
PREFILL_ROWS = 8  # rows of a continuous batch's prefill call (Batch.insert_many)


def _top_k_bucket(top_k: int | None, vocab_size: int) -> int:
    """Static width of the top-k pre-selection (0: no top-k). The actual k is a runtime value <= this width."""
    if not top_k or top_k >= vocab_size:
        return 0
    return min(pow2_bucket(top_k), vocab_size)


def row_keys(keydata_B2, index_B, sub_B):
    """Row b's key for its token number index_B[b] of a reply: fold_in(fold_in(key(seed_b), index_B[b]), sub_B[b])
    (sub: the row's sample number within its request). Nothing about the other rows enters, so a request samples
    the same tokens whatever shares the batch with it."""
    keys = jax.random.wrap_key_data(keydata_B2)
    return jax.vmap(lambda k, i, s: jax.random.fold_in(jax.random.fold_in(k, i), s))(keys, index_B, sub_B)


def sample_rows(logits_BV, keys_B, temperature_B, top_k_B, *, kmax: int, sample: bool = True):
    """One token per row from fp32 logits (B, V), on device, each row with its own key, temperature (0: argmax)
    and top_k (0: off; else the top_k <= kmax largest logits are kept). sample=False (every row greedy) skips the
    sampler altogether: the argmax is what the sampler would return for such rows anyway."""
    # jnp.argmax's first maximum as a max and a min: its (value, index) reduce is ~6x slower on XLA:CPU.
    iota = jax.lax.broadcasted_iota(jnp.int32, logits_BV.shape, 1)
    greedy = jnp.min(jnp.where(logits_BV == logits_BV.max(-1, keepdims=True), iota, logits_BV.shape[1]), axis=-1)
    if not sample:
        return greedy
    if kmax:
        top_vals = jax.lax.top_k(logits_BV, kmax)[0]  # (B, kmax), descending
        kth = jnp.take_along_axis(top_vals, jnp.clip(top_k_B, 1, kmax)[:, None] - 1, axis=1)
        kth = jnp.where(top_k_B[:, None] > 0, kth, -jnp.inf)
        logits_BV = jnp.where(logits_BV >= kth, logits_BV, -jnp.inf)
    hot = temperature_B > 0
    sampled = jax.vmap(jax.random.categorical)(keys_B, logits_BV / jnp.where(hot, temperature_B, 1.0)[:, None])
    return jnp.where(hot, sampled, greedy).astype(jnp.int32)


def sample_tokens(logits_BV, key, temperature, top_k, *, kmax: int):
    """`sample_rows` with one temperature and top_k for all rows; row b draws with fold_in(key, b)."""
    B = logits_BV.shape[0]
    keys = jax.vmap(partial(jax.random.fold_in, key))(jnp.arange(B))
    return sample_rows(logits_BV, keys, jnp.broadcast_to(temperature, (B,)), jnp.broadcast_to(top_k, (B,)),
                       kmax=kmax)


class Rows(NamedTuple):
    """The device state of B decode rows (the slots of continuous batching): the KV cache and, per row, what the
    decode loop needs to feed, sample and stop it. A free slot is a row with done set."""
    cache: gpt.KVCache
    tok: jax.Array          # (B,) int32: the newest token, emitted but not fed to the model yet
    prev: jax.Array         # (B,) int32: the token before it (smear)
    n: jax.Array            # (B,) int32: tokens generated, tok included (= the index of the next one)
    done: jax.Array         # (B,) bool: stop token, max_tokens reached, cancelled, or a free slot
    max_tokens: jax.Array   # (B,) int32
    keydata: jax.Array      # (B, 2) uint32: key data of jax.random.key(request seed)
    sub: jax.Array          # (B,) int32: the row's sample number within its request
    temperature: jax.Array  # (B,) float32, 0 = greedy
    top_k: jax.Array        # (B,) int32, 0 = off


def _first_tokens(rows: Rows, logits_BV, *, kmax: int, stop_ids: tuple) -> Rows:
    """Token 0 of each row, sampled from its prompt's last logits."""
    keys = row_keys(rows.keydata, jnp.zeros_like(rows.n), rows.sub)
    tok = sample_rows(logits_BV, keys, rows.temperature, rows.top_k, kmax=kmax)
    return rows._replace(tok=tok, n=jnp.ones_like(rows.n),
                         done=jnp.isin(tok, jnp.asarray(stop_ids, jnp.int32)) | (rows.max_tokens <= 1))


def _prefill(params, idx_nT, lens_n, keydata, temperature, top_k, max_tokens, *, cfg, num_samples: int,
             max_len: int, kmax: int, stop_ids: tuple) -> Rows:
    """Prefill the distinct prompts into a cache of max_len, repeat each num_samples times, sample token 0."""
    n = idx_nT.shape[0]
    B = n * num_samples
    logits, cache = gpt.forward_cached(params, idx_nT, cfg, gpt.init_cache(cfg, n, max_len), lengths_B=lens_n)
    prev = idx_nT[jnp.arange(n), lens_n - 1]
    if num_samples > 1:
        rep = partial(jnp.repeat, repeats=num_samples)
        cache = gpt.KVCache(rep(cache.k, axis=1), rep(cache.v, axis=1), rep(cache.pos, axis=0))
        logits, prev = rep(logits, axis=0), rep(prev, axis=0)
    full = lambda x, dt: jnp.broadcast_to(jnp.asarray(x, dt), (B,))  # noqa: E731
    rows = Rows(cache, prev, prev, jnp.zeros(B, jnp.int32), jnp.zeros(B, bool), full(max_tokens, jnp.int32),
                jnp.broadcast_to(keydata, (B, *keydata.shape)), jnp.arange(B, dtype=jnp.int32),
                full(temperature, jnp.float32), full(top_k, jnp.int32))
    return _first_tokens(rows, logits, kmax=kmax, stop_ids=stop_ids)


def _insert(params, rows: Rows, idx_RT, lens_R, slots_R, seed_R, temperature_R, top_k_R, max_tokens_R, *, cfg,
            kmax: int, stop_ids: tuple) -> Rows:
    """Prefill R right-padded prompts (a cache of their bucket's length T) and write each into row slots_R[r] of
    `rows` (donated: scattered in place), its sampling settings and key (seed_R: uint32, the seed mod 2**32, as
    jax.random.key takes it) too; sample their token 0. A slot past the last row (padding) writes nothing."""
    R, T = idx_RT.shape
    logits, c = gpt.forward_cached(params, idx_RT, cfg, gpt.init_cache(cfg, R, T), lengths_B=lens_R)
    prev, zeros = idx_RT[jnp.arange(R), lens_R - 1], jnp.zeros(R, jnp.int32)
    keydata = jax.random.key_data(jax.vmap(jax.random.key)(seed_R))
    new = _first_tokens(Rows(c, prev, prev, zeros, zeros.astype(bool), max_tokens_R, keydata, zeros,
                             temperature_R, top_k_R), logits, kmax=kmax, stop_ids=stop_ids)
    put = lambda a, b: a.at[slots_R].set(b.astype(a.dtype), mode="drop")  # noqa: E731
    kv = lambda a, b: a.at[:, slots_R, :T].set(b, mode="drop")  # noqa: E731
    cache = gpt.KVCache(kv(rows.cache.k, new.cache.k), kv(rows.cache.v, new.cache.v), put(rows.cache.pos, c.pos))
    return Rows(cache, *(put(a, b) for a, b in zip(rows[1:], new[1:])))


def _decode(params, rows: Rows, forced_BC, nforced_B, cancel_B, *, cfg, kmax: int, sample: bool, stop_ids: tuple,
            tool_end: int):
    """Up to C = forced_BC.shape[1] decode steps in one device loop (lax.while_loop, the cache in its carry, so
    updated in place). Each step feeds every live row's newest token, samples the next (or takes the row's next
    forced token: row b's first nforced_B[b] tokens are forced_BC[b, :nforced_B[b]]), and marks rows done on a
    stop token or max_tokens. Done rows (cancel_B: freed by the host) keep their cache position. The loop ends
    after C steps, when every row is done, or after a step where a live row emitted <|python_end|> (tool_end): the
    host runs the calculator before the row may go on. Returns (rows, tokens (C, B), count (B,)): row b's new
    tokens are tokens[:count[b], b]."""
    C = forced_BC.shape[1]
    stop = jnp.asarray(stop_ids, jnp.int32)
    rows = rows._replace(done=rows.done | cancel_B)
    n0 = rows.n

    def step(carry):
        rows, used_B, out_CB, j, _ = carry
        live = ~rows.done
        logits, cache = gpt.forward_cached(params, rows.tok[:, None], cfg, rows.cache,
                                           lengths_B=live.astype(jnp.int32), prev_idx_B=rows.prev)
        nxt = sample_rows(logits, row_keys(rows.keydata, rows.n, rows.sub), rows.temperature, rows.top_k, kmax=kmax,
                          sample=sample)
        force = used_B < nforced_B
        nxt = jnp.where(force, jnp.take_along_axis(forced_BC, jnp.minimum(used_B, C - 1)[:, None], 1)[:, 0], nxt)
        nxt = jnp.where(live, nxt, rows.tok)
        n = rows.n + live
        done = rows.done | (live & (jnp.isin(nxt, stop) | (n >= rows.max_tokens)))
        rows = rows._replace(cache=cache, tok=nxt, prev=jnp.where(live, rows.tok, rows.prev), n=n, done=done)
        return rows, used_B + (live & force), out_CB.at[j].set(nxt), j + 1, jnp.any(live & (nxt == tool_end))

    def more(carry):
        rows, _, _, j, tool = carry
        return (j < C) & ~tool & ~jnp.all(rows.done)

    B = rows.tok.shape[0]
    init = (rows, jnp.zeros(B, jnp.int32), jnp.zeros((C, B), jnp.int32), jnp.int32(0), jnp.bool_(False))
    rows, _, out_CB, _, _ = jax.lax.while_loop(more, step, init)
    return rows, out_CB, rows.n - n0


@dataclass
class _Row:
    """Host-side state of one row: tool-use state machine, forced tokens to come, completion."""
    forced: collections.deque = field(default_factory=collections.deque)
    in_python: bool = False
    expr: list = field(default_factory=list)
    completed: bool = False
    n: int = 0  # tokens generated so far
    max_tokens: int = 0
    temperature: float = 0.0


class Batch:
    """B decode rows on one Engine: the device state (`Rows`, a cache of cache_len tokens per row) and each row's
    host state. `Engine.generate` fills every row with one batched prefill; continuous batching (the web server)
    starts with every slot free (`Engine.open_batch`), `insert`s a request into a free slot while the others
    are mid-reply and `free`s it when the request ends. `step` runs one decode chunk and returns what each row
    emitted, after the host's part of tool use and stopping (`Engine._advance`)."""

    def __init__(self, engine: "Engine", rows: Rows, host: list[_Row], cache_len: int, kmax: int,
                 prefill_rows: int = 1):
        self.engine, self.rows, self.host, self.cache_len, self.kmax = engine, rows, host, cache_len, kmax
        self.prefill_rows, self._unforced = prefill_rows, {}

    def _start(self, b: int, tok: int) -> None:
        row = self.host[b]
        row.n = 1
        self.engine._advance(row, tok)
        row.completed |= row.n >= row.max_tokens

    def insert(self, slot: int, prompt: Sequence[int], *, max_tokens: int, temperature: float, top_k: int | None,
               seed: int) -> int:
        """Prefill `prompt` into free row `slot` with its own sampling settings; returns its token 0 (mask 1)."""
        return self.insert_many([(slot, prompt, dict(max_tokens=max_tokens, temperature=temperature, top_k=top_k,
                                                     seed=seed))])[0]

    def insert_many(self, requests: Sequence[tuple[int, Sequence[int], dict]]) -> list[int]:
        """`insert` for several (slot, prompt, settings) at once. Requests whose prompts share a length bucket are
        prefilled together, `prefill_rows` rows per call however many there are (padding rows write nothing), so
        a request's numbers never depend on what it is prefilled with; first tokens are read back together."""
        e, B, R = self.engine, len(self.host), self.prefill_rows
        groups = collections.defaultdict(list)
        if len({slot for slot, _, _ in requests}) < len(requests):
            raise ValueError("insert_many: a slot is given twice")
        for slot, prompt, kw in requests:
            if not self.host[slot].completed:
                raise ValueError(f"slot {slot} is in use")
            (prompt,) = _as_prompts(prompt, e.cfg.vocab_size)
            if len(prompt) + kw["max_tokens"] > self.cache_len:
                raise ValueError(f"prompt {len(prompt)} + max_tokens {kw['max_tokens']} > cache length "
                                 f"{self.cache_len}")
            groups[min(pow2_bucket(len(prompt), e.min_bucket), self.cache_len)].append((slot, prompt, kw))
        for T, group in groups.items():
            for part in (group[i:i + R] for i in range(0, len(group), R)):
                idx, lens, slots = np.zeros((R, T), np.int32), np.ones(R, np.int32), np.full(R, B, np.int32)
                seeds, temp, top_k, maxt = np.zeros(R, np.uint32), np.zeros(R, np.float32), *np.ones((2, R), np.int32)
                for r, (slot, prompt, kw) in enumerate(part):
                    idx[r, :len(prompt)], lens[r], slots[r], seeds[r] = prompt, len(prompt), slot, kw["seed"] % 2**32
                    temp[r], top_k[r], maxt[r] = kw["temperature"], kw["top_k"] or 0, kw["max_tokens"]
                    self.host[slot] = _Row(max_tokens=kw["max_tokens"], temperature=kw["temperature"])
                args = (e.params, self.rows, *map(e._put, (idx, lens, slots, seeds, temp, top_k, maxt)))
                fn = e._get(("insert", B, R, T, self.cache_len, self.kmax), e._insert_jit, *args, cfg=e.cfg,
                            kmax=self.kmax, stop_ids=e._stop)
                self.rows = fn(*args)
        first = np.asarray(self.rows.tok)
        for slot, _, _ in requests:
            self._start(slot, int(first[slot]))
        return [int(first[slot]) for slot, _, _ in requests]

    def free(self, slot: int) -> None:
        """End row `slot` (its request finished or went away); the device stops it at the start of the next step."""
        self.host[slot].completed = True

    @property
    def active(self) -> int:
        return sum(not r.completed for r in self.host)

    def step(self, chunk: int) -> list[list[tuple[int, int]]]:
        """One decode chunk of up to `chunk` steps; per row, the (token, mask) pairs it emitted (mask 0: forced
        tool output), [] for done rows. A row's last pair is its stop token when it stopped on one."""
        e, B = self.engine, len(self.host)
        forced = np.zeros((B, chunk), np.int32)
        nforced = np.zeros(B, np.int32)
        for b, row in enumerate(self.host):
            if row.forced and not row.completed:
                f = list(itertools.islice(row.forced, chunk))
                forced[b, :len(f)], nforced[b] = f, len(f)
        sample = any(r.temperature > 0 for r in self.host if not r.completed)
        if nforced.any():
            to_force = e._put(forced), e._put(nforced)
        else:  # the usual chunk: nothing forced, zeros already on the device (two transfers less)
            to_force = self._unforced.get(chunk) or self._unforced.setdefault(chunk, (e._put(forced), e._put(nforced)))
        args = (e.params, self.rows, *to_force, e._put(np.array([r.completed for r in self.host])))
        fn = e._get(("decode", B, chunk, sample, self.cache_len, self.kmax), e._decode_jit, *args, cfg=e.cfg,
                    kmax=self.kmax, sample=sample, stop_ids=e._stop, tool_end=e._tool_end)
        self.rows, out_CB, count_B = fn(*args)
        out_CB, count_B = jax.device_get((out_CB, count_B))
        emitted = []
        for b, row in enumerate(self.host):
            pairs = []
            for j in range(int(count_B[b]) if not row.completed else 0):
                tok = int(out_CB[j, b])
                pairs.append((tok, 0 if j < nforced[b] else 1))
                if j < nforced[b]:
                    row.forced.popleft()
                row.n += 1
                e._advance(row, tok)
            row.completed |= row.n >= row.max_tokens
            emitted.append(pairs)
        return emitted


def _key_data(seed: int) -> np.ndarray:
    return np.asarray(jax.random.key_data(jax.random.key(seed)))


class Engine:
    """KV-cached generation for one model on one device (see the module docstring)."""

    def __init__(self, params, cfg: gpt.GPTConfig, tokenizer=None, *, device=None, min_bucket: int = 16,
                 chunk: int = 16):
        """params: the model pytree; tokenizer: needed for stop tokens and tool use (None: neither, e.g. for
        benchmarks with random weights); device: where params and cache live (default: the first local device);
        chunk: decode steps per host round trip (tokens are streamed a chunk at a time)."""
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.device = device if device is not None else local_devices()[0]
        self.min_bucket = min_bucket
        self.chunk = chunk
        self.set_params(params)
        self.compilations: list[tuple] = []
        self._compiled: dict[tuple, object] = {}
        self._log = get_logger()
        static = ("cfg", "kmax", "stop_ids")
        self._prefill_jit = jax.jit(_prefill, static_argnames=(*static, "num_samples", "max_len"))
        self._insert_jit = jax.jit(_insert, static_argnames=static, donate_argnums=(1,))
        self._decode_jit = jax.jit(_decode, static_argnames=(*static, "sample", "tool_end"), donate_argnums=(1,))
        self.stop_ids: set[int] = set()
        self.tool_ids: dict[str, int] | None = None
        if tokenizer is not None:
            self.stop_ids = {tokenizer.encode_special(s) for s in STOP_TOKENS}
            self.tool_ids = {name: tokenizer.encode_special(f"<|{name}|>")
                             for name in ("python_start", "python_end", "output_start", "output_end")}
        self._stop = tuple(sorted(self.stop_ids))
        self._tool_end = self.tool_ids["python_end"] if self.tool_ids else -1

    def set_params(self, params) -> None:
        """Use new weights (same shapes), e.g. after an RL step; compiled functions are kept (params are arguments)."""
        cast = lambda a: a.astype(self.cfg.dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a  # noqa: E731
        self.params = jax.tree.map(cast, jax.device_put(params, self.device))  # cast where they will live

    # -- compilation ------------------------------------------------------------------------------

    _KEY_NAMES = {"prefill": ("prompts", "samples", "prompt_len", "cache_len", "top_k_width"),
                  "insert": ("rows", "prefill_rows", "prompt_len", "cache_len", "top_k_width"),
                  "decode": ("rows", "chunk", "sampling", "cache_len", "top_k_width")}

    def _get(self, key: tuple, jitted, *args, **static):
        """The compiled executable for `key`, which must name every static shape and argument (compiled and
        logged the first time). Keys end with (cache_len, top_k_width)."""
        fn = self._compiled.get(key)
        if fn is None:
            t0 = time.perf_counter()
            fn = jitted.lower(*args, **static).compile()
            self._compiled[key] = fn
            self.compilations.append(key)
            shapes = " ".join(f"{k}={v}" for k, v in zip(self._KEY_NAMES[key[0]], key[1:]))
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
        S = pow2_bucket(need, self.min_bucket)
        if need <= context:
            S = min(S, context)
        return min(pow2_bucket(prompt_len, self.min_bucket), S), S

    # -- generation -------------------------------------------------------------------------------

    def open_batch(self, rows: int, cache_len: int, max_top_k: int | None = None, prefill_rows: int | None = None
                   ) -> Batch:
        """`rows` free slots of cache_len tokens each, for continuous batching; requests may use top_k up to
        max_top_k (the static width of the top-k pre-selection). Requests inserted together are prefilled
        prefill_rows at a time (default: min(rows, PREFILL_ROWS))."""
        kmax = _top_k_bucket(max_top_k, self.cfg.vocab_size)
        B = rows
        cache = jax.tree.map(self._put, gpt.init_cache(self.cfg, B, cache_len))
        z = lambda dt: self._put(np.zeros(B, dt))  # noqa: E731
        state = Rows(cache, z(np.int32), z(np.int32), z(np.int32), self._put(np.ones(B, bool)), z(np.int32),
                     self._put(np.tile(_key_data(0), (B, 1))), z(np.int32), z(np.float32), z(np.int32))
        return Batch(self, state, [_Row(completed=True) for _ in range(B)], cache_len, kmax,
                     prefill_rows or min(B, PREFILL_ROWS))

    def generate(self, tokens: Sequence[int] | Sequence[Sequence[int]], num_samples: int = 1, max_tokens: int = 256,
                 temperature: float = 1.0, top_k: int | None = None, seed: int = 42, chunk: int | None = None
                 ) -> Iterator[tuple[list[int], list[int]]]:
        """Stream generation: yields (token_column, mask_column) per step, one entry per row (mask 1 = sampled,
        0 = forced tool output). Rows that already finished get their last token again (mask 0) until every
        row is done or max_tokens steps have been yielded; track completion with `stop_ids` or use
        generate_batch. Token 0 comes as soon as the prefill is done, the rest a decode chunk at a time."""
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
        args = (self.params, self._put(idx), self._put(lens), self._put(_key_data(seed)),
                self._put(np.float32(temperature)), self._put(np.int32(top_k or 0)), self._put(np.int32(max_tokens)))
        prefill = self._get(("prefill", n, num_samples, T, S, kmax), self._prefill_jit, *args, cfg=cfg,
                            num_samples=num_samples, max_len=S, kmax=kmax, stop_ids=self._stop)
        batch = Batch(self, prefill(*args), [_Row(max_tokens=max_tokens, temperature=temperature) for _ in range(B)],
                      S, kmax)
        last = np.asarray(batch.rows.tok).tolist()
        for b, tok in enumerate(last):
            batch._start(b, tok)
        yield list(last), [1] * B
        while batch.active:
            emitted = batch.step(chunk or self.chunk)
            if not any(emitted):
                raise RuntimeError("engine: a decode chunk emitted nothing for unfinished rows")
            for j in range(max(map(len, emitted))):
                column, masks = [], []
                for b, pairs in enumerate(emitted):
                    tok, mask = pairs[j] if j < len(pairs) else (last[b], 0)
                    last[b] = tok
                    column.append(tok)
                    masks.append(mask)
                yield column, masks


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
        devices = local_devices(num_workers)
    return [Engine(params, cfg, tokenizer, device=d) for d in devices]


def map_on_engines(engines: Sequence["Engine"], items: Sequence, fn) -> list:
    """[fn(engine, item) for item in items], spread over the engines: one thread per engine, each taking the next
    item (JAX releases the GIL while a device computes, so N devices work at once). Results come back in item
    order; the first exception is re-raised here and the items not yet started are dropped."""
    idle = queue.SimpleQueue()
    for engine in engines:
        idle.put(engine)

    def run(item):
        engine = idle.get()  # free again once fn returns: never two threads on one engine
        try:
            return fn(engine, item)
        finally:
            idle.put(engine)

    with ThreadPoolExecutor(len(engines)) as pool:
        futures = [pool.submit(run, item) for item in items]
        try:
            return [f.result() for f in futures]
        finally:
            for f in futures:
                f.cancel()


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


__all__ = ["Engine", "make_engines", "map_on_engines", "sample_tokens", "STOP_TOKENS"]
