"""CORE eval: prompts of each task type against hand-written strings, few-shot draws and the shuffle as nanochat makes
them, token spans, centered accuracy against nanochat's GPT-2 reference CSVs, a model with controlled logits that
must score 100% and 0%, the bucketed/batched/sharded scorer against a direct NumPy float64 scoring of each example,
the compilation count, a run over every task of the local bundle, and the bundle download (retry, lock, one rename)."""

import http.server
import json
import random
import re
import shutil
import threading
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import shared_data
from nanochat_jax import core_eval as ce
from nanochat_jax import gpt, sharding
from nanochat_jax.tokenizer import train_tokenizer


class CharTokenizer:
    """One token per ASCII character (id = code point), BOS = 0: spans can be worked out by hand."""
    bos_id = 0
    vocab_size = 128

    def encode(self, text, prepend=None):
        if isinstance(text, list):
            return [self.encode(t, prepend) for t in text]
        assert all(0 < ord(c) < 128 for c in text), text
        return ([prepend] if prepend is not None else []) + [ord(c) for c in text]


CHAR = CharTokenizer()


@pytest.fixture(scope="module")
def bundle():
    return shared_data("core_eval")


@pytest.fixture(scope="module")
def bpe(bundle):
    texts = [json.loads(line)["query"] for line in open(bundle / "eval_data/world_knowledge/arc_easy.jsonl")][:400]
    return train_tokenizer(texts, vocab_size=300)


@pytest.fixture(scope="module")
def tiny_gpt(bpe):
    cfg = gpt.GPTConfig(sequence_len=128, vocab_size=bpe.vocab_size, n_layer=2, n_head=2, n_kv_head=2, n_embd=64,
                        head_dim=32, compute_dtype="float32")
    seed = int(np.random.default_rng().integers(1 << 30))
    params = gpt.init_params(cfg, jax.random.key(seed))
    # the init's lm_head is tiny (std 0.001, near-uniform logits); larger weights make rows' scores differ clearly
    rng = np.random.default_rng(seed)
    params["lm_head"] = jnp.asarray(rng.standard_normal(params["lm_head"].shape) * 0.5, jnp.float32)
    return cfg, params


# ----------------------------------------------------------------------------------------------
# Prompts, few-shot draws, shuffle, spans

def test_render_multiple_choice():
    item = {"query": "Question: 2+2?", "choices": ["4", "five"], "gold": 0}
    shots = [{"query": "Question: 1+1?", "choices": ["3", "2"], "gold": 1},
             {"query": "Question: 0+0?", "choices": ["0", "9"], "gold": 0}]
    assert ce.render_prompts_mc(item, "\nAnswer: ", shots) == [
        "Question: 1+1?\nAnswer: 2\n\nQuestion: 0+0?\nAnswer: 0\n\nQuestion: 2+2?\nAnswer: 4",
        "Question: 1+1?\nAnswer: 2\n\nQuestion: 0+0?\nAnswer: 0\n\nQuestion: 2+2?\nAnswer: five"]
    assert ce.render_prompts("multiple_choice", item, " ") == ["Question: 2+2? 4", "Question: 2+2? five"]


def test_render_schema():
    item = {"context_options": ["Ann beat Bo so Ann", "Ann beat Bo so Bo"], "continuation": "was sad.", "gold": 1}
    shot = {"context_options": ["It rained so we", "It was sunny so we"], "continuation": "stayed in.", "gold": 0}
    assert ce.render_prompts_schema(item, " ", [shot]) == [
        "It rained so we stayed in.\n\nAnn beat Bo so Ann was sad.",
        "It rained so we stayed in.\n\nAnn beat Bo so Bo was sad."]


def test_render_language_modeling():
    # contexts are stripped (this one has trailing spaces); the prompt without the continuation is stripped too
    item = {"context": "The sky is  ", "continuation": "blue"}
    shots = [{"context": " Grass is\t", "continuation": "green"}]
    assert ce.render_prompts_lm(item, " ", shots) == ["Grass is green\n\nThe sky is",
                                                      "Grass is green\n\nThe sky is blue"]
    assert ce.render_prompts_lm(item, "\nAnswer: ") == ["The sky is\nAnswer:", "The sky is\nAnswer: blue"]


def test_fewshot_draws_are_nanochats():
    rng = random.Random()
    for _ in range(200):
        n = rng.randint(2, 300)
        idx, k = rng.randrange(n), rng.randint(1, 12)
        got = ce.fewshot_indices(n, idx, k)
        if k <= n - 1:  # nanochat: Random(1234 + idx).sample(every other index, k)
            assert got == random.Random(1234 + idx).sample([i for i in range(n) if i != idx], k)
        else:  # too few others (tiny --max-per-task): all of them, in a deterministic order
            assert sorted(got) == [i for i in range(n) if i != idx]
        assert got == ce.fewshot_indices(n, idx, k) and idx not in got and len(set(got)) == len(got)
    assert ce.fewshot_indices(10, 3, 0) == [] and ce.fewshot_indices(1, 0, 5) == []


def test_shuffle_then_truncate(bundle):
    copa = next(t for t in ce.load_core_tasks(bundle) if t.label == "copa")
    raw = [json.loads(line) for line in open(ce.task_data_path(bundle, copa))]
    random.Random(1337).shuffle(raw)
    assert ce.load_task_data(bundle, copa, max_per_task=7) == raw[:7]
    assert ce.load_task_data(bundle, copa) == raw


def test_token_spans_by_hand():
    mc = ce.example_rows("multiple_choice", CHAR.encode(["ab cat", "ab car"], prepend=0))
    assert [(s, e) for _, s, e in mc] == [(6, 7), (6, 7)]  # BOS + "ab ca" shared; the last letter is scored
    schema = ce.example_rows("schema", CHAR.encode(["x said yes", "yy said yes"], prepend=0))
    assert [(s, e) for _, s, e in schema] == [(2, 11), (3, 12)]  # " said yes" (9 tokens) is scored
    lm = ce.example_rows("language_modeling", CHAR.encode(["ctx", "ctx foo"], prepend=0))
    assert [(list(t), s, e) for t, s, e in lm] == [([0] + [ord(c) for c in "ctx foo"], 4, 8)]
    assert ce.find_common_length([[1, 2, 3], [1, 2], [1, 2, 9]], "left") == 2
    assert ce.find_common_length([[5, 1, 2], [2], [7, 7, 2]], "right") == 1
    assert ce.crop_row((list(range(10)), 6, 10), 6) == (list(range(4, 10)), 2, 6)
    assert ce.crop_row((list(range(10)), 2, 10), 4) == (list(range(6, 10)), 1, 4)  # keeps one context token
    assert ce.crop_row((list(range(5)), 2, 5), 8) == (list(range(5)), 2, 5)
    assert ce.crop_row((list(range(10)), 2, 4), 5) == (list(range(5, 10)), 1, 1)  # span cropped away: empty


def test_bucket_lengths():
    assert ce.bucket_lengths(2048) == (64, 128, 256, 512, 1024, 2048)
    assert ce.bucket_lengths(100, 8) == (8, 16, 32, 64, 100)
    assert ce.bucket_lengths(32) == (32,)
    with pytest.raises(ValueError, match="power of two"):
        ce.bucket_lengths(100, 48)
    assert [ce.pow2_bucket(n, 64) for n in (1, 64, 65, 1000)] == [64, 64, 128, 1024]


# ----------------------------------------------------------------------------------------------
# Baselines and centering

def test_centered_accuracy_against_reference_csvs(bundle):
    assert ce.centered_accuracy(0.7, 62) == pytest.approx(0.08 / 0.38)  # boolq's 62% baseline, by hand
    assert ce.centered_accuracy(0.25, 25) == 0 and ce.centered_accuracy(0.4, 0) == 0.4
    tasks = ce.load_core_tasks(bundle)
    assert len(tasks) == 22 and [t.task_type for t in tasks].count("schema") == 2
    boolq = next(t for t in tasks if t.label == "boolq")
    assert (boolq.random_baseline, boolq.num_fewshot, boolq.continuation_delimiter) == (62.0, 10, "\nAnswer: ")
    csvs = sorted((bundle / "reference_results").glob("*.csv"))
    assert csvs
    for path in csvs:  # nanochat's GPT-2 results: centered from accuracy with our baselines, CORE their mean
        ref = ce.read_core_csv(path)
        centered = []
        for t in tasks:
            acc, cen = ref[t.label]
            assert ce.centered_accuracy(acc, t.random_baseline) == pytest.approx(cen, abs=2e-6), (path.name, t.label)
            centered.append(cen)
        assert np.mean(centered) == pytest.approx(ref["CORE"][1], abs=2e-6)


# ----------------------------------------------------------------------------------------------
# A model with controlled logits: 100% and 0%

def bigram_logits(table, tokens_BT):
    """The 'model' predicts table[current token] as the next token, with certainty."""
    return 30.0 * jax.nn.one_hot(table[tokens_BT], 128, dtype=jnp.float32)


def _bigram_table():
    table = np.full(128, ord("z"), np.int32)
    table[ord(".")] = ord(" ")  # contexts end with "."; the delimiter follows
    table[ord("k")] = ord(" ")  # schema: the option ending in "k" predicts the shared continuation's first token
    table[ord("m")] = ord("q")
    return jnp.asarray(table)


def _controlled_tasks(rng, right: bool):
    """Examples the bigram model gets right (right=True) or wrong, for each task type."""
    word = lambda: "".join(rng.choice("abcdefgh") for _ in range(rng.randint(1, 6)))  # noqa: E731
    mc, schema, lm = [], [], []
    for _ in range(9):
        n = rng.randint(2, 4)
        choices = ["z" * rng.randint(2, 5)] + [word() + "z" for _ in range(n - 1)]
        rng.shuffle(choices)
        gold = next(i for i, c in enumerate(choices) if set(c) == {"z"})
        mc.append({"query": word() + ".", "choices": choices, "gold": gold if right else (gold + 1) % n})
        options = [word() + "k", word() + "m"]
        gold = 0
        if rng.random() < 0.5:
            options, gold = options[::-1], 1
        schema.append({"context_options": options, "continuation": "z" * rng.randint(1, 4),
                       "gold": gold if right else 1 - gold})
        cont = "z" * rng.randint(1, 5)
        if not right:
            pos = rng.randrange(len(cont))
            cont = cont[:pos] + "a" + cont[pos + 1:]
        lm.append({"context": word() + ".", "continuation": cont})
    return [(ce.CoreTask("mc", "", "multiple_choice", 2), mc), (ce.CoreTask("sch", "", "schema", 0), schema),
            (ce.CoreTask("lm", "", "language_modeling", 3), lm)]


def numpy_bigram_scores(rows):
    """The bigram model's ScoreFn in plain NumPy float64 (no buckets, no padding, no JAX)."""
    table = np.asarray(_bigram_table())
    mean_loss, correct = [], []
    for tokens, start, end in rows:
        tokens = np.asarray(tokens)
        logits = 30.0 * np.eye(128)[table[tokens[start - 1:end - 1]]]
        logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        targets = tokens[start:end]
        mean_loss.append(-logp[np.arange(len(targets)), targets].mean())
        correct.append(bool((logits.argmax(-1) == targets).all()))
    return np.array(mean_loss), np.array(correct)


@pytest.mark.parametrize("right", [True, False])
def test_controlled_model_scores_100_and_0(right):
    scorer = ce.Scorer(bigram_logits, _bigram_table(), mesh=sharding.make_mesh(8), max_len=64, pad_id=0,
                       min_bucket=16, batch_tokens=64)
    for task, data in _controlled_tasks(random.Random(), right):
        for score_fn, chunk in ((scorer, 2048), (scorer, 2), (numpy_bigram_scores, 4)):  # streamed in chunks too
            out = ce.evaluate_task(score_fn, CHAR, data, task, chunk_examples=chunk)
            assert out["correct"] == [right] * len(data), (task.label, chunk, out["correct"])
            assert out["accuracy"] == (1.0 if right else 0.0) and out["examples"] == len(data)
        rows, spans = ce.prepare_task(CHAR, data, task)
        assert out["rows"] == len(rows) == sum(n for _, n in spans)
        np.testing.assert_allclose(scorer(rows)[0], numpy_bigram_scores(rows)[0], rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# The scorer against a direct, unbatched scoring (nanochat's forward_model in NumPy float64)

def _direct_scores(params, cfg, rows, max_len, pad_id):
    """Row by row: crop to max_len from the left, right-pad with pad_id to max_len (one shape, one compilation;
    nanochat pads too, with BOS), one forward, float64 log-softmax; mean loss over the span, greedy all-correct."""
    fwd = jax.jit(lambda x: gpt.forward(params, x, cfg))
    out = []
    for tokens, start, end in rows:
        cut = max(0, len(tokens) - max_len)
        tokens, start, end = list(tokens)[cut:], max(start - cut, 1), end - cut
        x = np.full((1, max_len), pad_id, np.int32)
        x[0, :len(tokens)] = tokens
        logits = np.asarray(fwd(x), np.float64)[0, :len(tokens)]
        logp = logits - logits.max(-1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
        targets = np.asarray(tokens[1:])
        nll = -logp[np.arange(len(targets)), targets]
        pred = logits.argmax(-1)[:-1]
        out.append((nll[start - 1:end - 1].mean(), bool((pred[start - 1:end - 1] == targets[start - 1:end - 1]).all())))
    return np.array([m for m, _ in out]), np.array([c for _, c in out])


@pytest.mark.parametrize("crop", [True, False])
def test_scorer_matches_direct_scoring(bundle, bpe, tiny_gpt, crop):
    cfg, params = tiny_gpt
    tasks = {t.label: t for t in ce.load_core_tasks(bundle)}
    rows = []
    for label in ("copa", "arc_easy", "winograd", "lambada_openai", "bigbench_dyck_languages"):
        rows += ce.prepare_task(bpe, ce.load_task_data(bundle, tasks[label], 2), tasks[label])[0]
    # rows the model must get right: random prefixes continued by the model's own greedy tokens
    rng = np.random.default_rng()
    fwd = jax.jit(lambda x: gpt.forward(params, x, cfg))
    for _ in range(4):
        buf = np.full((1, 64), bpe.bos_id, np.int32)  # one shape for every step (causal: the tail does not matter)
        start = end = int(rng.integers(4, 40))
        buf[0, 1:start] = rng.integers(0, 256, start - 1)
        for _ in range(rng.integers(1, 5)):
            buf[0, end] = int(np.asarray(fwd(buf))[0, end - 1].argmax())
            end += 1
        toks = buf[0, :end].tolist()
        rows.append((toks, start, end))
        wrong = list(toks)
        wrong[-1] = (wrong[-1] + 1) % cfg.vocab_size
        rows.append((wrong, start, len(toks)))
    scorer = ce.make_model_scorer(params, cfg, sharding.make_mesh(8), pad_id=bpe.bos_id, crop=crop, min_bucket=64,
                                  batch_tokens=256)
    mean_loss, correct = scorer(rows)
    longest = max(len(r[0]) for r in rows)
    assert longest > cfg.sequence_len, "some 10-shot prompts exceed the model's 128 tokens"
    ref_loss, ref_correct = _direct_scores(params, cfg, rows, cfg.sequence_len if crop else longest, pad_id=5)
    np.testing.assert_allclose(mean_loss, ref_loss, rtol=2e-4)
    assert (correct == ref_correct).all()
    assert correct[-8::2].all() and not correct[-7::2].any()
    n_long = sum(len(r[0]) > cfg.sequence_len for r in rows)
    assert scorer.stats["long"] == n_long and scorer.stats["cropped"] == (n_long if crop else 0)
    assert scorer.buckets[:2] == (64, 128)
    assert max(scorer.buckets) == (128 if crop else 1 << (longest - 1).bit_length())


def test_bucketing_limits_compilations(tiny_gpt):
    cfg, params = tiny_gpt
    rng = np.random.default_rng()
    lengths = rng.integers(2, cfg.sequence_len + 60, 150)  # some longer than max_len: cropped into the last bucket
    rows = []
    for n in lengths:
        toks = rng.integers(0, cfg.vocab_size, n).tolist()
        s = int(rng.integers(1, n))
        rows.append((toks, s, int(rng.integers(s, n + 1)) if n <= cfg.sequence_len else n))  # CORE spans end rows
    scorer = ce.make_model_scorer(params, cfg, sharding.make_mesh(4), pad_id=0, crop=True, min_bucket=8,
                                  batch_tokens=200)
    assert scorer.buckets == (8, 16, 32, 64, 128)
    loss_a, ok_a = scorer(rows)
    assert scorer.traces == len(scorer.buckets) == scorer._fn._cache_size()
    scorer(rows[::-1][:40])
    assert scorer.traces == len(scorer.buckets), "no new shapes, no new compilations"
    # one bucket and other batch sizes (so other padding): the same scores
    single = ce.make_model_scorer(params, cfg, sharding.make_mesh(2), pad_id=7, crop=True, min_bucket=128,
                                  batch_tokens=1000)
    loss_b, ok_b = single(rows)
    assert single.traces == 1
    finite = np.isfinite(loss_a)
    empty = np.array([s == e for _, s, e in rows])
    assert (np.isfinite(loss_b) == finite).all() and (finite == ~empty).all() and not ok_a[empty].any()
    np.testing.assert_allclose(loss_a[finite], loss_b[finite], rtol=2e-5)
    assert (ok_a == ok_b).all()


# ----------------------------------------------------------------------------------------------
# The whole benchmark

def test_core_over_every_task_of_the_local_bundle(bundle, bpe, tiny_gpt, tmp_path):
    cfg, params = tiny_gpt
    scorer = ce.make_model_scorer(params, cfg, sharding.make_mesh(8), pad_id=bpe.bos_id, crop=True, min_bucket=32,
                                  batch_tokens=512)
    lines = []
    out = ce.evaluate_core(scorer, bpe, bundle, max_per_task=2, log=lines.append)
    tasks = ce.load_core_tasks(bundle)
    present = [t for t in tasks if t.label != "coqa"]
    assert out["missing"] == ["coqa"] and list(out["results"]) == [t.label for t in present]
    assert out["examples"] == 2 * len(present) and out["num_tasks"] == 22
    for t in present:
        acc = out["results"][t.label]
        assert acc in (0.0, 0.5, 1.0)
        assert out["centered_results"][t.label] == pytest.approx((acc - t.random_baseline / 100) /
                                                                 (1 - t.random_baseline / 100))
    assert out["core_metric"] == pytest.approx(np.mean(list(out["centered_results"].values())))
    assert 1 <= out["compilations"] <= len(scorer.buckets)
    assert any("coqa" in line and "WARNING" in line for line in lines)
    assert "21/22 tasks" in lines[-1] and "missing: coqa" in lines[-1] and "ex/s" in lines[-1]
    with pytest.raises(FileNotFoundError, match="coqa"):
        ce.evaluate_core(scorer, bpe, bundle, max_per_task=2, require_all=True, log=lines.append)
    # a subset, and the CSV (nanochat's layout, missing task visible, CORE last)
    sub = ce.evaluate_core(scorer, bpe, bundle, max_per_task=2, tasks=["winograd", "coqa"], log=lines.append)
    assert list(sub["results"]) == ["winograd"] and sub["missing"] == ["coqa"]
    path = ce.write_core_csv(tmp_path / "base_eval" / "core.csv", out)
    back = ce.read_core_csv(path)
    assert list(back)[-2:] == ["coqa", "CORE"] and back["coqa"] == (None, None)
    assert back["CORE"][1] == pytest.approx(out["core_metric"], abs=1e-6)
    assert back["copa"][0] == pytest.approx(out["results"]["copa"], abs=1e-6)
    assert "CORE (21/22 tasks)" in ce.format_core_table(out)


# ----------------------------------------------------------------------------------------------
# A small bundle on disk, evaluated by the controlled model and served over HTTP for the download

def _write_bundle(root, rng):
    (root / "eval_data" / "x").mkdir(parents=True)
    tasks = _controlled_tasks(rng, True)
    yaml_lines = ["icl_tasks:"]
    meta = ["Eval Task,Task Category,Task Type,#shots,#datapoints,Random baseline,Centered Metric?,Description"]
    baselines = {"mc": 25, "sch": 50, "lm": 0, "gone": 0}
    for task, data in tasks:
        with open(root / "eval_data" / "x" / f"{task.label}.jsonl", "w") as f:
            f.writelines(json.dumps(d) + "\n" for d in data)
    for label, kind, shots in (("mc", "multiple_choice", 2), ("sch", "schema", 0), ("gone", "language_modeling", 0),
                               ("lm", "language_modeling", 3)):
        yaml_lines += ["-", f"  label: {label}", f"  dataset_uri: x/{label}.jsonl", f"  num_fewshot: [{shots}]",
                       f"  icl_task_type: {kind}"]
        meta.append(f"{label},cat,{kind},{shots},9,{baselines[label]},,desc")
    (root / "core.yaml").write_text("\n".join(yaml_lines) + "\n")
    (root / "eval_meta_data.csv").write_text("\n".join(meta) + "\n")


def test_controlled_model_on_a_bundle(tmp_path):
    _write_bundle(tmp_path / "b", random.Random())
    scorer = ce.Scorer(bigram_logits, _bigram_table(), mesh=sharding.make_mesh(2), max_len=64, pad_id=0,
                       min_bucket=64)
    out = ce.evaluate_core(scorer, CHAR, tmp_path / "b", log=lambda *_: None)
    assert out["results"] == {"mc": 1.0, "sch": 1.0, "lm": 1.0} and out["missing"] == ["gone"]
    assert out["core_metric"] == 1.0 and out["compilations"] == 1
    out = ce.evaluate_core(scorer, CHAR, tmp_path / "b", max_per_task=4, tasks=["mc"], log=lambda *_: None)
    assert out["examples"] == 4 and out["compilations"] == 0  # same bucket shape: compiled already


def _progress(lines):
    """(label, done, total) of each within-task progress line."""
    out = []
    for line in lines:
        m = re.fullmatch(r"  (\w+): (\d+)/(\d+) examples scored \(\d+%\), \d+s", line)
        if m:
            out.append((m[1], int(m[2]), int(m[3])))
    return out


class _BusyScorer(ce.Scorer):
    def finished_rows(self):
        return []  # a busy device: nothing finished yet whenever the host looks, so finish() reports every batch


def test_progress_within_a_task(tmp_path, capsys):
    _write_bundle(tmp_path / "b", random.Random())
    # two rows per batch: each task is several batches, so there is progress to report
    scorer = _BusyScorer(bigram_logits, _bigram_table(), mesh=sharding.make_mesh(2), max_len=64, pad_id=0,
                         min_bucket=64, batch_tokens=64)
    lines = []
    out = ce.evaluate_core(scorer, CHAR, tmp_path / "b", log=lines.append, progress_every=0)
    assert out["results"] == {"mc": 1.0, "sch": 1.0, "lm": 1.0}
    progress = _progress(lines)
    for label in ("mc", "sch", "lm"):
        done = [d for name, d, total in progress if name == label]
        assert done[0] == 0 and done == sorted(done) and 0 < done[-1] < 9, (label, done)  # its own line says 9/9
        assert all(total == 9 for name, _, total in progress if name == label)
        # progress lines come before the task's line
        task_line = next(i for i, line in enumerate(lines) if line.startswith(f"{label} "))
        assert max(i for i, line in enumerate(lines) if line.startswith(f"  {label}: ")) < task_line
    assert len(progress) <= scorer.stats["batches"] + 3, "at most a line per batch (+1 per task), even with no interval"
    # the default interval: short tasks print only their own lines
    lines.clear()
    ce.evaluate_core(scorer, CHAR, tmp_path / "b", log=lines.append)
    assert _progress(lines) == [] and len(lines) == 5  # missing-task warning, 3 tasks, CORE
    # a silent log stays silent
    capsys.readouterr()
    ce.evaluate_core(scorer, CHAR, tmp_path / "b", log=lambda *_: None, progress_every=0)
    assert capsys.readouterr() == ("", "")


def test_progress_with_the_real_scorer(tmp_path):
    """Chunks fed one example at a time: the host checks for finished batches after each, without waiting."""
    scorer = ce.Scorer(bigram_logits, _bigram_table(), mesh=sharding.make_mesh(2), max_len=64, pad_id=0,
                       min_bucket=64, batch_tokens=64)
    task, data = _controlled_tasks(random.Random(), True)[0]
    lines = []
    out = ce.evaluate_task(scorer, CHAR, data, task, chunk_examples=1, log=lines.append, progress_every=0)
    assert out["accuracy"] == 1.0
    done = [d for _, d, _ in _progress(lines)]
    assert done and done[0] <= 1 and done == sorted(done) and done[-1] < len(data)
    scorer.add(ce.prepare_task(CHAR, data, task)[0])
    for _, (mean_B, _) in scorer.pending:
        mean_B.block_until_ready()
    ids = scorer.finished_rows()
    assert ids == sorted(ids) and len(ids) == 2 * len(scorer.pending)  # every dispatched batch, two rows each
    assert scorer.finished_rows() == []


def test_progress_counts_examples_whose_rows_are_all_scored():
    lines = []
    p = ce.TaskProgress("hellaswag", 3, lines.append, every=0)
    p.add([(0, 3), (3, 0)])  # an example without rows counts as done
    p.add([(0, 2)])          # a later chunk: its rows are 3 and 4
    p.scored([0, 3])
    p.scored([1, 2])
    assert lines == ["  hellaswag: 1/3 examples scored (33%), 0s", "  hellaswag: 2/3 examples scored (67%), 0s"]
    p.scored([4])
    assert p.done == 3 and len(lines) == 2  # done: the task's own line says so


def test_download_retries_and_places_the_bundle(tmp_path):
    src = tmp_path / "src" / "eval_bundle"
    _write_bundle(src, random.Random(0))
    zip_path = tmp_path / "eval_bundle.zip"
    with zipfile.ZipFile(zip_path, "w") as zf:
        for p in sorted(src.rglob("*")):
            zf.write(p, p.relative_to(src.parent))
    hits = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            hits.append(self.path)
            if self.path == "/missing.zip":
                self.send_error(404)
            elif len(hits) == 1:
                self.send_error(503)  # the first try fails: must be retried
            else:
                body = zip_path.read_bytes()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        path = ce.ensure_eval_bundle(url=f"{url}/eval_bundle.zip", backoff=0.01)
        assert hits == ["/eval_bundle.zip"] * 2
        assert path.name == "eval_bundle" and [t.label for t in ce.load_core_tasks(path)] == ["mc", "sch", "gone", "lm"]
        assert not [p for p in path.parent.iterdir() if p.name.startswith(".eval_bundle")], "temp dir removed"
        assert ce.ensure_eval_bundle(url=f"{url}/eval_bundle.zip") == path and len(hits) == 2, "no second download"
        assert ce.ensure_eval_bundle(src) == src
        with pytest.raises(FileNotFoundError, match="core.yaml"):
            ce.ensure_eval_bundle(tmp_path)
        shutil.rmtree(path)
        with pytest.raises(RuntimeError, match="404"):
            ce.ensure_eval_bundle(url=f"{url}/missing.zip", backoff=0.01)
        assert hits[-1] == "/missing.zip" and hits.count("/missing.zip") == 1, "a 404 is not retried"
    finally:
        server.shutdown()
        server.server_close()
