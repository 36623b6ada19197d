"""Tests for nanochat_jax/engine.py and the KV-cache path of gpt.py: cached prefill/decode against the full forward
(logits in fp32, greedy tokens) with sliding windows, value embeds, smear and backout, for prompts of different
lengths in one batch; sampling statistics, seeds and top-k; calculator tool use and stop tokens with a scripted
model; compilation caching, cache lengths within the context and device pinning; and the bench_infer script end
to end (chat_cli: test_chat_cli.py)."""

import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import REPO_ROOT
from nanochat_jax import execution, gpt
from nanochat_jax.common import pow2_bucket
from nanochat_jax.engine import Engine, map_on_engines, sample_tokens
from nanochat_jax.tokenizer import train_tokenizer
from test_gpt import TINY, random_params

# TINY (test_gpt): 4 layers "SSSL" with short_window=8, GQA 4/2, VE on layers 1 and 3, smear, backout, fp32.


def full_forward_greedy(params, cfg, prompts, n_new):
    """Independent of the cache: re-run the whole sequence every step (fixed-size buffer, causal, so the padding
    after each row's end never matters) and take the argmax at the row's last position."""
    f = jax.jit(lambda p, x: gpt.forward(p, x, cfg))
    length = max(map(len, prompts)) + n_new
    buf = np.zeros((len(prompts), length), np.int32)
    pos = np.array([len(p) for p in prompts])
    for i, p in enumerate(prompts):
        buf[i, :len(p)] = p
    rows = np.arange(len(prompts))
    for _ in range(n_new):
        buf[rows, pos] = np.asarray(jnp.argmax(f(params, jnp.asarray(buf))[rows, pos - 1], axis=-1))
        pos += 1
    return [buf[i, :pos[i]].tolist() for i in rows]


# ----------------------------------------------------------------------------------------------
# gpt.forward_cached

@pytest.mark.parametrize("overrides, cache_len", [
    ({}, 40),                                       # S layers read a window slice of the cache, L layers all of it
    (dict(n_layer=3, short_window=16, window_pattern="SL"), 28),  # lone VE layer; prefill window spans the cache
])
def test_cached_prefill_and_decode_match_full_forward(overrides, cache_len):
    cfg = gpt.GPTConfig(**{**TINY, **overrides})
    params = random_params(cfg, seed=11)
    rng = np.random.default_rng(12)
    seq = rng.integers(0, cfg.vocab_size, (3, cache_len))
    want = np.asarray(jax.jit(lambda p, x: gpt.forward(p, x, cfg))(params, jnp.asarray(seq)))
    # Prefill three right-padded prompts of different lengths, then decode each row past the short window.
    lens = np.array([5, 12, 1])
    padded = np.where(np.arange(12) < lens[:, None], seq[:, :12], rng.integers(0, cfg.vocab_size, (3, 12)))
    prefill = jax.jit(lambda p, x, n: gpt.forward_cached(p, x, cfg, gpt.init_cache(cfg, 3, cache_len), lengths_B=n))
    logits, cache = prefill(params, jnp.asarray(padded), jnp.asarray(lens))
    assert cache.k.shape == (cfg.n_layer, 3, cache_len, cfg.n_kv_head, cfg.head_dim)
    np.testing.assert_array_equal(np.asarray(cache.pos), lens)
    rows = np.arange(3)
    np.testing.assert_allclose(np.asarray(logits), want[rows, lens - 1], rtol=1e-4, atol=1e-4)
    step = jax.jit(lambda p, c, tok, prev: gpt.forward_cached(p, tok[:, None], cfg, c, prev_idx_B=prev))
    pos = lens.copy()
    for _ in range(cache_len - 12):
        logits, cache = step(params, cache, jnp.asarray(seq[rows, pos]), jnp.asarray(seq[rows, pos - 1]))
        np.testing.assert_allclose(np.asarray(logits), want[rows, pos], rtol=1e-4, atol=1e-4)
        pos += 1
    np.testing.assert_array_equal(np.asarray(cache.pos), pos)


# ----------------------------------------------------------------------------------------------
# Engine: greedy equivalence, batching, compilation cache, device pinning, seeds

@pytest.fixture(scope="module")
def tiny_engine():
    """An Engine pinned to the second device, three prompts of different lengths and their greedy continuations by
    the full forward. Every Engine call below uses the same shapes (3 prompts × 2 samples, lengths <= 16, cache
    32), so prefill and decode compile once."""
    cfg = gpt.GPTConfig(**TINY)
    params = random_params(cfg, seed=21)
    prompts = [np.random.default_rng(22).integers(0, cfg.vocab_size, n).tolist() for n in (3, 11, 6)]
    n_new = 20  # well past the short window (8)
    return cfg, params, Engine(params, cfg, device=jax.devices()[1]), prompts, full_forward_greedy(params, cfg,
                                                                                                   prompts, n_new)


def test_greedy_decode_equals_full_forward_for_mixed_lengths(tiny_engine):
    cfg, params, engine, prompts, want = tiny_engine
    assert {d for leaf in jax.tree.leaves(engine.params) for d in leaf.devices()} == {jax.devices()[1]}
    seqs, masks = engine.generate_batch(prompts, num_samples=2, max_tokens=20, temperature=0.0)
    assert seqs == [w for w in want for _ in range(2)]
    assert masks == [[0] * len(p) + [1] * 20 for p in prompts for _ in range(2)]
    assert [key[0] for key in engine.compilations] == ["prefill", "decode"]
    # Other prompts in the same length buckets reuse the compiled prefill and decode.
    prompts2 = [np.random.default_rng(23).integers(0, cfg.vocab_size, n).tolist() for n in (9, 2, 12)]
    seqs2, _ = engine.generate_batch(prompts2, num_samples=2, max_tokens=20, temperature=0.0)
    assert len(engine.compilations) == 2
    assert seqs2[::2] == full_forward_greedy(params, cfg, prompts2, 20)
    assert pow2_bucket(16, 16) == 16 and pow2_bucket(17, 16) == 32 and pow2_bucket(3, 16) == 16


def test_cache_is_never_longer_than_the_context_when_the_request_fits():
    """Cache lengths are powers of two, but capped at sequence_len (here 40) when prompt + max_tokens fit in it; a
    prompt bucket never outgrows the cache. Decoding into the capped cache still matches the full forward."""
    cfg = gpt.GPTConfig(**{**TINY, "sequence_len": 40})
    params = random_params(cfg, seed=27)
    engine = Engine(params, cfg)
    assert engine.lengths(5, 11) == (16, 16) and engine.lengths(5, 35) == (16, 40)
    assert engine.lengths(33, 7) == (40, 40)
    assert engine.lengths(5, 36) == (16, 64)  # past the context: the plain bucket (the caller asked for it)
    prompts = [np.random.default_rng(28).integers(0, cfg.vocab_size, n).tolist() for n in (5, 33)]
    for prompt, n_new in zip(prompts, (35, 7)):
        seqs, _ = engine.generate_batch(prompt, max_tokens=n_new, temperature=0.0)
        assert seqs == full_forward_greedy(params, cfg, [prompt], n_new)
    assert engine.compilations == [("prefill", 1, 1, 16, 40, 0), ("decode", 1, 16, False, 40, 0),
                                   ("prefill", 1, 1, 40, 40, 0)]


def test_seeds_rows_and_top_k(tiny_engine):
    cfg, params, engine, prompts, greedy = tiny_engine
    run = lambda **kw: engine.generate_batch(prompts, **{"num_samples": 2, "max_tokens": 20, **kw})[0]  # noqa: E731
    # Greedy first (compiled already when the test above ran in this process), so the count below holds alone too.
    assert run(temperature=0.0) == [g for g in greedy for _ in range(2)]
    a, again, other = run(temperature=1.0, seed=1), run(temperature=1.0, seed=1), run(temperature=1.0, seed=2)
    assert a == again and a != other
    # Each row samples its own tokens, the first one included: the two samples of a prompt differ.
    for p, r0, r1 in zip(prompts, a[::2], a[1::2]):
        assert r0[:len(p)] == r1[:len(p)] == p and r0 != r1
    assert len({row[len(p)] for row, p in zip(a, [p for p in prompts for _ in range(2)])}) > 2
    assert len(engine.compilations) == 3  # seed and temperature are runtime values; only greedy decoding skips the
    assert engine.compilations[-1][:4] == ("decode", 6, 16, True)  # sampler (a decode of its own)
    # top_k=1 at any temperature is greedy.
    assert run(temperature=1.0, top_k=1, seed=3) == [g for g in greedy for _ in range(2)]


def test_engine_params_cast_to_compute_dtype_change_nothing():
    """The engine stores fp32 weights in the compute dtype once; every use casts to it anyway, so bf16 logits are
    bit-identical while decode reads half the weight bytes."""
    cfg = gpt.GPTConfig(**{**TINY, "n_layer": 2, "compute_dtype": "bfloat16", "embed_dtype": "bfloat16"})
    params = random_params(cfg, seed=25)
    engine = Engine(params, cfg)
    assert {leaf.dtype for leaf in jax.tree.leaves(engine.params)} == {jnp.dtype(jnp.bfloat16)}
    idx = jnp.asarray(np.random.default_rng(26).integers(0, cfg.vocab_size, (2, 12)))
    fwd = jax.jit(lambda p, x: gpt.forward(p, x, cfg))
    np.testing.assert_array_equal(np.asarray(fwd(engine.params, idx)), np.asarray(fwd(params, idx)))


def test_sample_tokens_distribution():
    """Empirical frequencies over many independent rows vs softmax(logits / T) restricted to the top k."""
    rng = np.random.default_rng(24)
    logits = rng.normal(0, 1.5, 12).astype(np.float32)
    n = 20000
    batch = jnp.asarray(np.tile(logits, (n, 1)))
    for temperature, top_k, kmax in [(1.0, 0, 0), (0.7, 5, 8)]:
        toks = np.asarray(sample_tokens(batch, jax.random.key(5), jnp.float32(temperature), jnp.int32(top_k),
                                        kmax=kmax))
        z = logits.astype(np.float64) / temperature
        if top_k:
            z = np.where(logits >= np.sort(logits)[-top_k], z, -np.inf)
        p = np.exp(z - z.max())
        p /= p.sum()
        freq = np.bincount(toks, minlength=12) / n
        assert np.all(freq[p == 0] == 0)
        assert np.all(np.abs(freq - p) <= 5 * np.sqrt(p * (1 - p) / n) + 1e-9), (freq, p)
    greedy = np.asarray(sample_tokens(batch[:3], jax.random.key(0), jnp.float32(0.0), jnp.int32(0), kmax=0))
    assert (greedy == np.argmax(logits)).all()


# ----------------------------------------------------------------------------------------------
# A scripted model: greedy output follows a fixed bigram table, so tool use and stops can be checked exactly

@pytest.fixture(scope="module")
def tokenizer():
    texts = ["hello there, 3*4 is 12 and 7*6 is 42. hi! " * 3, "Yes. Zebra. " * 5]
    return train_tokenizer(texts, vocab_size=280)


def scripted_params(tokenizer, bigram: dict[int, int]):
    """A fresh reference-init model has zero attention/MLP output projections and smear_lambda 0, so its final
    hidden state is a positive multiple of rms_norm(wte[token]): logits depend on the current token only. Give
    each source token an orthogonal embedding and point lm_head from it at its successor."""
    cfg = gpt.GPTConfig(sequence_len=64, vocab_size=tokenizer.vocab_size, n_layer=2, n_head=4, n_kv_head=2, n_embd=64,
                        head_dim=16, compute_dtype="float32", embed_dtype="float32")
    params = gpt.init_params(cfg, jax.random.key(0))
    D = cfg.n_embd
    wte = np.random.default_rng(0).normal(0, 1, params["wte"].shape).astype(np.float32)
    lm_head = np.zeros(params["lm_head"].shape, np.float32)
    for i, (src, dst) in enumerate(bigram.items()):
        wte[src] = 0.0
        wte[src, i] = math.sqrt(D)
        lm_head[i, dst] = 1.0
    return cfg, {**params, "wte": jnp.asarray(wte), "lm_head": jnp.asarray(lm_head)}


def single(tokenizer, text):
    ids = tokenizer.encode(text)
    assert len(ids) == 1, (text, ids)
    return ids[0]


def test_calculator_output_is_forced_with_mask_zero(tokenizer, monkeypatch):
    sp = tokenizer.encode_special
    three, times, four, y, z = (single(tokenizer, c) for c in "3*4YZ")
    bigram = {sp("<|assistant_start|>"): sp("<|python_start|>"), sp("<|python_start|>"): three, three: times,
              times: four, four: sp("<|python_end|>"), sp("<|python_end|>"): y, y: sp("<|assistant_end|>"),
              sp("<|output_end|>"): z, z: sp("<|assistant_end|>")}
    cfg, params = scripted_params(tokenizer, bigram)
    engine = Engine(params, cfg, tokenizer)
    # 27 prompt tokens: with max_tokens 7 or 30 the cache bucket is 64 either way, so all calls share compilations.
    prompt = [tokenizer.bos_id, sp("<|user_start|>"), *tokenizer.encode("what is 3*4? " * 4)[:23], sp("<|user_end|>"),
              sp("<|assistant_start|>")]
    calls = []
    real = execution.use_calculator
    monkeypatch.setattr(execution, "use_calculator", lambda expr: calls.append(expr) or real(expr))
    columns = list(engine.generate(prompt, num_samples=2, max_tokens=30, temperature=0.0))
    assert calls == ["3*4", "3*4"]  # once per row
    code = [sp("<|python_start|>"), three, times, four, sp("<|python_end|>")]
    output = [sp("<|output_start|>"), *tokenizer.encode("12"), sp("<|output_end|>")]
    # The forced <|output_end|> is fed through the model: its successor Z follows, then the stop token.
    want = code + output + [z, sp("<|assistant_end|>")]
    want_mask = [1] * len(code) + [0] * len(output) + [1, 1]
    assert [tokens for tokens, _ in columns] == [[t, t] for t in want]  # streamed columns, both rows
    assert [masks for _, masks in columns] == [[m, m] for m in want_mask]
    seqs, masks = engine.generate_batch(prompt, num_samples=2, max_tokens=30, temperature=0.0)
    assert seqs == [prompt + want[:-1]] * 2 and masks == [[0] * len(prompt) + want_mask[:-1]] * 2
    # max_tokens counts forced tokens too.
    seqs, _ = engine.generate_batch(prompt, num_samples=2, max_tokens=7, temperature=0.0)
    assert seqs == [prompt + (code + output)[:7]] * 2
    # A refused expression forces nothing: the model's own successor of <|python_end|> (Y) follows.
    monkeypatch.setattr(execution, "use_calculator", lambda expr: None)
    seqs, masks = engine.generate_batch(prompt, num_samples=2, max_tokens=30, temperature=0.0)
    assert seqs == [prompt + code + [y]] * 2 and masks == [[0] * len(prompt) + [1] * (len(code) + 1)] * 2
    assert len(engine.compilations) == 2


# ----------------------------------------------------------------------------------------------
# Scripts

def _run(args, **env):
    return subprocess.run([sys.executable, *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "JAX_PLATFORMS": "cpu", **env})


@pytest.mark.slow  # a subprocess end to end: ~30-50 s on a shared 2-core box
def test_bench_infer_runs_on_cpu_without_grain_or_flask():
    code = ("import runpy, sys; sys.argv = ['bench_infer.py'] + sys.argv[1:]; "
            "runpy.run_path('scripts/bench_infer.py', run_name='__main__'); "
            "heavy = [m for m in ('grain', 'flask') if m in sys.modules]; assert not heavy, heavy")
    out = _run(["-c", code, "--depth=2", "--max-new-tokens=4", "--batch-sizes=3", "--prompt-len=5",
                "--max-seq-len=64", "--vocab-size=256", "--head-dim=32"])
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert [r["batch"] for r in result["results"]] == [3]
    for r in result["results"]:
        assert r["ttft_ms"] > 0 and r["tpot_ms"] > 0 and r["bytes_per_step"] > 0
        assert r["compilations"] == 2 and r["bandwidth_util_percent"] is None  # no peak bandwidth for CPU


@pytest.mark.parametrize("depth", [4, pytest.param(20, marks=pytest.mark.slow)])
def test_compiled_prefill_and_decode_have_no_conditionals(depth):
    """Static per-layer windows in the cached path too: the engine's compiled prefill and decode hold no XLA
    conditional (each would cost a host round trip per layer and token on a GPU)."""
    from nanochat_jax.engine import _decode, _insert, _prefill
    from test_train import hlo_ops

    cfg = gpt.GPTConfig.from_depth(depth, max_seq_len=256, vocab_size=32768, compute_dtype="float32")
    params = gpt.param_shapes(cfg)
    i32, f32 = jnp.int32, jnp.float32
    sds = jax.ShapeDtypeStruct
    keydata = sds((2,), jnp.uint32)
    static = dict(cfg=cfg, kmax=64, stop_ids=(1, 2))
    prefill = jax.jit(_prefill, static_argnames=("cfg", "num_samples", "max_len", "kmax", "stop_ids")).lower(
        params, sds((1, 32), i32), sds((1,), i32), keydata, sds((), f32), sds((), i32), sds((), i32),
        num_samples=2, max_len=256, **static).compile()
    rows = jax.eval_shape(lambda p, x, n: _prefill(p, x, n, jnp.zeros(2, jnp.uint32), 1.0, 5, 9, num_samples=2,
                                                   max_len=256, **static), params, sds((1, 32), i32), sds((1,), i32))
    insert = jax.jit(_insert, static_argnames=("cfg", "kmax", "stop_ids")).lower(
        params, rows, sds((2, 32), i32), sds((2,), i32), sds((2,), i32), sds((2,), jnp.uint32), sds((2,), f32),
        sds((2,), i32), sds((2,), i32), **static).compile()
    decode = jax.jit(_decode, static_argnames=("cfg", "kmax", "stop_ids", "sample", "tool_end")).lower(
        params, rows, sds((2, 16), i32), sds((2,), i32), sds((2,), bool), sample=True, tool_end=3,
        **static).compile()
    for compiled in (prefill, insert, decode):
        assert hlo_ops(compiled)["conditional"] == 0


# ----------------------------------------------------------------------------------------------
# The on-device decode loop and continuous batching (Batch)

@pytest.mark.slow
def test_chunk_size_changes_no_token(tiny_engine):
    """Seeded sampling draws token i of row r with a key folded from (seed, i, r) only: one step per round trip
    or a chunk of 16 (or a loop cut short by the rows finishing) give the same tokens."""
    cfg, params, engine, prompts, greedy = tiny_engine
    run = lambda chunk: engine.generate_batch(prompts, num_samples=2, max_tokens=20, temperature=0.9, top_k=7,  # noqa: E731
                                              seed=5, chunk=chunk)
    assert run(3) == run(16)


def drain(batch, outputs):
    while batch.active:
        for slot, pairs in enumerate(batch.step(4)):
            outputs.setdefault(slot, []).extend(tok for tok, _ in pairs)


def alone(engine, slot, prompt, prefill_rows=None, **settings):
    """A request's tokens when it is the only one in a 4-slot batch."""
    batch = engine.open_batch(4, 64, max_top_k=50, prefill_rows=prefill_rows)
    out = {slot: [batch.insert(slot, prompt, **settings)]}
    drain(batch, out)
    return out[slot]


def test_continuous_batching_rows_are_independent(tiny_engine):
    """A request's tokens depend on its own prompt and settings only: alone in a 4-slot batch, or inserted into
    another slot while three other requests (greedy and sampled, other top-k, seeds and lengths) are mid-reply.
    Greedy rows equal the full forward; a freed slot takes a new request."""
    cfg, params, engine, prompts, greedy = tiny_engine
    rng = np.random.default_rng(31)
    others = [rng.integers(0, cfg.vocab_size, n).tolist() for n in (3, 11, 7)]
    sampled = dict(max_tokens=18, temperature=1.0, top_k=20, seed=123)
    want_sampled = alone(engine, 2, prompts[0], **sampled)
    want_greedy = alone(engine, 0, prompts[1], max_tokens=20, temperature=0.0, top_k=0, seed=1)
    assert prompts[1] + want_greedy == greedy[1]

    batch = engine.open_batch(4, 64, max_top_k=50)
    out = {0: [batch.insert(0, others[0], max_tokens=30, temperature=0.7, top_k=0, seed=9)]}
    out[3] = [batch.insert(3, others[1], max_tokens=9, temperature=1.3, top_k=3, seed=4)]
    for slot, pairs in enumerate(batch.step(4)):
        out.setdefault(slot, []).extend(tok for tok, _ in pairs)
    out[1] = [batch.insert(1, prompts[0], **sampled)]  # joins mid-reply, in another slot than alone
    for slot, pairs in enumerate(batch.step(3)):
        out.setdefault(slot, []).extend(tok for tok, _ in pairs)
    out[2] = [batch.insert(2, prompts[1], max_tokens=20, temperature=0.0, top_k=0, seed=77)]
    drain(batch, out)
    assert out[1] == want_sampled and len(out[1]) == 18
    assert out[2] == want_greedy
    assert len(out[0]) == 30 and len(out[3]) == 9  # per-row max_tokens
    # Free slots are reused: a request in slot 3 after its first occupant finished.
    assert batch.host[3].completed
    out[3] = [batch.insert(3, prompts[0], **sampled)]
    drain(batch, out)
    assert out[3] == want_sampled
    batch.insert(0, prompts[0], **sampled)
    with pytest.raises(ValueError, match="in use"):
        batch.insert(0, prompts[0], **sampled)


def test_requests_admitted_together_are_prefilled_together_as_if_alone(tiny_engine):
    """insert_many prefills the requests of one prompt bucket together, prefill_rows (here 2) rows per call however
    many there are (a padding row writes nothing): four requests in two buckets, admitted at once, get the tokens
    each gets alone (row 0 of its call, beside padding), whichever row of a call and which slot they land in.
    The greedy one equals the full forward."""
    cfg, params, engine, prompts, greedy = tiny_engine
    long = np.random.default_rng(33).integers(0, cfg.vocab_size, 20).tolist()  # bucket 32; the others 16
    requests = [(prompts[0], dict(max_tokens=18, temperature=1.0, top_k=20, seed=123)),
                (prompts[1], dict(max_tokens=20, temperature=0.0, top_k=0, seed=1)),
                (long, dict(max_tokens=12, temperature=0.8, top_k=0, seed=5)),
                (prompts[2], dict(max_tokens=10, temperature=1.3, top_k=3, seed=2**32 + 4))]
    want = [alone(engine, 0, p, prefill_rows=2, **kw) for p, kw in requests]
    assert prompts[1] + want[1] == greedy[1]
    batch = engine.open_batch(4, 64, max_top_k=50, prefill_rows=2)
    slots = [3, 1, 0, 2]
    out = {s: [tok] for s, tok in zip(slots, batch.insert_many([(s, p, kw) for s, (p, kw) in zip(slots, requests)]))}
    drain(batch, out)
    assert [out[s] for s in slots] == want
    assert [len(w) for w in want] == [18, 20, 12, 10]
    inserts = [key for key in engine.compilations if key[0] == "insert" and key[2] == 2]
    assert sorted(inserts) == [("insert", 4, 2, 16, 64, 64), ("insert", 4, 2, 32, 64, 64)]
    with pytest.raises(ValueError, match="twice"):
        batch.insert_many([(0, long, requests[2][1]), (0, long, requests[2][1])])


def test_map_on_engines_keeps_item_order_and_never_shares_an_engine():
    import threading
    import time

    lock, busy = threading.Lock(), set()

    def square(engine, item):
        with lock:
            assert engine not in busy  # one thread per engine at a time
            busy.add(engine)
        time.sleep(0.002 * (item % 3))
        with lock:
            busy.discard(engine)
        return item * item

    assert map_on_engines(["a", "b", "c"], list(range(24)), square) == [i * i for i in range(24)]
    with pytest.raises(ZeroDivisionError):
        map_on_engines(["a", "b"], [1, 0, 2], lambda engine, x: 1 / x)
