"""Pretraining loader: packing invariants, best-fit rule, process striding, exact resume, validation loader."""

import json
import random
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import REPO_ROOT, shared_data
from nanochat_jax.dataloader import DataLoader, row_group_plan
from nanochat_jax.dataset import iter_texts
from nanochat_jax.tokenizer import train_tokenizer

WORDS = ("the quick brown fox jumps over a lazy dog while seven wizards quietly judge boxing matches in "
         "old castles near rivers of silver light and bright numbers like 12 345 6789 appear").split()


def _write_shards(folder, n_files=3, docs_per_file=120, rows_per_group=16, seed=0):
    """Unique docs ("doc <id>: words...") of widely varying length, in small row groups."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    all_docs = []
    for f in range(n_files):
        docs = []
        for i in range(docs_per_file):
            n = rng.choice([3, 10, 40, 120, 400])
            docs.append(f"doc {f}-{i}: " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, n))))
        pq.write_table(pa.table({"text": docs}), folder / f"shard_{f:05d}.parquet", row_group_size=rows_per_group)
        all_docs.append(docs)
    return all_docs


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("shards")
    docs = _write_shards(folder)
    tok = train_tokenizer((d for fd in docs for d in fd), vocab_size=400)
    return folder, docs, tok


def _segments(row, bos):
    starts = list(np.flatnonzero(row == bos)) + [len(row)]
    return [row[a:b] for a, b in zip(starts[:-1], starts[1:])]


def test_packing_invariants(corpus):
    folder, docs, tok = corpus
    train_docs = [np.array([tok.bos_id] + tok.encode(d), dtype=np.int32) for fd in docs[:-1] for d in fd]
    B, T = 4, 64
    with DataLoader(tok, B, T, "train", data_dir=folder, buffer_docs=50) as loader:
        used = []
        for _ in range(12):  # about a third of an epoch: no doc may repeat
            batch = next(loader)
            x, y = batch["inputs"], batch["targets"]
            assert x.shape == y.shape == (B, T) and x.dtype == np.int32
            assert (x[:, 0] == tok.bos_id).all(), "every row starts with BOS"
            assert np.array_equal(x[:, 1:], y[:, :-1]), "targets are inputs shifted by one"
            for row in np.concatenate([x, y[:, -1:]], axis=1):
                segs = _segments(row, tok.bos_id)
                assert sum(len(s) for s in segs) == T + 1, "no padding: the row is all document tokens"
                for j, seg in enumerate(segs):
                    matches = [k for k, d in enumerate(train_docs)
                               if len(d) >= len(seg) and np.array_equal(d[:len(seg)], seg)]
                    assert matches, "every token comes from some document, in order"
                    if j < len(segs) - 1:  # only the row's last doc may be cropped
                        assert any(len(train_docs[k]) == len(seg) for k in matches)
                    if len(seg) > 8:  # long enough to identify its doc uniquely
                        used.append(matches[0])
        assert len(used) == len(set(used)), "a document was used twice within one epoch"
        assert 0 < loader.packer.tokens_cropped < loader.packer.tokens_packed


class _LengthTokenizer:
    """Doc text "n" encodes to n tokens (ids 1..n) after BOS: lets a test hand-compute the packing."""
    bos_id = 0

    def encode(self, texts, prepend=None, append=None, num_threads=1):
        return [[prepend] + list(range(1, int(t))) for t in texts]


def test_best_fit_rule_by_hand(tmp_path):
    # one row group of docs whose lengths (with BOS) are 6, 3, 4, 2; rows of T+1 = 8
    pq.write_table(pa.table({"text": ["6", "3", "4", "2"]}), tmp_path / "a.parquet")
    tok = _LengthTokenizer()
    with DataLoader(tok, 1, 7, files=[tmp_path / "a.parquet"], buffer_docs=1, prefetch=0) as loader:
        rows = [np.concatenate([b["inputs"][0], b["targets"][0, -1:]]) for b in (next(loader) for _ in range(3))]
    lengths = [[len(s) for s in _segments(r, 0)] for r in rows]
    # row 1: largest that fits (6), then 2. row 2: 4, 3, then nothing fits in 1 -> refill (next epoch) and crop the
    # shortest (2) to 1. row 3: 6, then nothing fits in 2 -> crop the shortest left (3) to 2.
    assert lengths == [[6, 2], [4, 3, 1], [6, 2]]
    assert list(rows[2][6:]) == [0, 1], "a cropped doc keeps its beginning"


def test_process_striding(corpus):
    folder, docs, tok = corpus
    files = sorted(folder.glob("*.parquet"))[:-1]
    p0, p1 = row_group_plan(files, 0, 2), row_group_plan(files, 1, 2)
    assert not set(p0) & set(p1)
    assert sorted(p0 + p1) == sorted(row_group_plan(files, 0, 1))
    assert all(rg % 2 == 0 for _, rg in p0) and all(rg % 2 == 1 for _, rg in p1)
    # the loader of process 1 only ever emits docs from its own row groups
    where = []  # (tokens, (file, row group)) of every doc
    for fi, path in enumerate(files):
        pf = pq.ParquetFile(path)
        for rg in range(pf.num_row_groups):
            texts = pf.read_row_group(rg).column(0).to_pylist()
            where += [(tok.encode(t, prepend=tok.bos_id), (fi, rg)) for t in texts]
    checked = 0
    with DataLoader(tok, 2, 64, files=files, process_index=1, process_count=2, buffer_docs=20) as loader:
        for _ in range(5):
            for seg in _segments(next(loader)["inputs"][0], tok.bos_id):
                homes = {home for d, home in where if d[:len(seg)] == list(seg)}
                if len(homes) == 1:  # long enough to tell which doc it is
                    assert homes <= set(p1)
                    checked += 1
    assert checked >= 5
    # more readers than row groups: the extra readers share row groups instead of getting nothing
    n_rg = len(row_group_plan(files[:1], 0, 1))
    assert row_group_plan(files[:1], n_rg + 2, n_rg + 10) == [(0, 2)]


@pytest.mark.parametrize("prefetch", [0, 2])
def test_exact_resume(corpus, prefetch):
    folder, _, tok = corpus
    kw = dict(data_dir=folder, buffer_docs=30, prefetch=prefetch)
    with DataLoader(tok, 3, 48, **kw) as a:
        for _ in range(7):
            next(a)
        state = json.loads(json.dumps(a.get_state()))  # must survive a JSON round trip (checkpoint metadata)
        expected = [next(a) for _ in range(40)]  # runs past an epoch boundary of this small corpus
        assert a.epoch >= 1
    with DataLoader(tok, 3, 48, state=state, **kw) as b:
        for want in expected:
            got = next(b)
            assert np.array_equal(got["inputs"], want["inputs"]) and np.array_equal(got["targets"], want["targets"])


def test_resume_rejects_other_files(corpus, tmp_path):
    folder, _, tok = corpus
    with DataLoader(tok, 2, 32, data_dir=folder, prefetch=0) as a:
        next(a)
        state = a.get_state()
    _write_shards(tmp_path, n_files=2, docs_per_file=20)
    with pytest.raises(ValueError, match="same --data-dir"):
        DataLoader(tok, 2, 32, data_dir=tmp_path, state=state, prefetch=0)


def test_validation_loader_starts_at_the_beginning(corpus):
    folder, docs, tok = corpus
    firsts = []
    for _ in range(2):
        with DataLoader(tok, 2, 64, "val", data_dir=folder) as val:
            firsts.append(next(val)["inputs"])
            next(val)
    assert np.array_equal(firsts[0], firsts[1])
    val_docs = [tok.encode(d, prepend=tok.bos_id) for d in docs[-1]]
    for seg in _segments(firsts[0][0], tok.bos_id):
        assert any(d[:len(seg)] == list(seg) for d in val_docs), "val batches come from the last file only"


def test_bad_arguments(corpus, tmp_path):
    folder, _, tok = corpus
    with pytest.raises(ValueError, match="batch_size"):
        DataLoader(tok, 0, 64, data_dir=folder)
    with pytest.raises(FileNotFoundError, match="no \\*.parquet files"):
        DataLoader(tok, 2, 64, data_dir=tmp_path)
    with pytest.raises(ValueError, match="at least 2 parquet files"):
        _write_shards(tmp_path / "one", n_files=1, docs_per_file=5)
        DataLoader(tok, 2, 64, data_dir=tmp_path / "one")


def test_real_data_gutenberg(tmp_path):
    """Tokenizer + loader over the public Gutenberg shards, and the loader benchmark script end to end."""
    folder = shared_data("gutenberg")
    texts = []
    for i, text in enumerate(iter_texts(sorted(folder.glob("*.parquet"))[:1])):
        texts.append(text)
        if i == 300:
            break
    tok = train_tokenizer(texts, vocab_size=1024)
    tok_dir = tmp_path / "tok"
    tok.save(tok_dir)
    with DataLoader(tok, 4, 512, data_dir=folder) as loader:
        batch = next(loader)
        assert (batch["inputs"][:, 0] == tok.bos_id).all()
        text = tok.decode(batch["inputs"][0].tolist())
        assert text.startswith("<|bos|>") and len(text) > 1000
    out = subprocess.run([sys.executable, str(REPO_ROOT / "scripts" / "bench_loader.py"), f"--data-dir={folder}",
                          f"--tokenizer-dir={tok_dir}", "--device-batch-size=8", "--max-seq-len=512",
                          "--num-batches=10", "--warmup-batches=1"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["tokens_per_s"] > 0 and result["batch_shape"] == [8, 512]
