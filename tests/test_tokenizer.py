"""Tokenizer: BPE training vs a pure-Python reference, encode/decode, storage, token_bytes, chat rendering,
and the tok_train / tok_eval scripts end to end (on generated shards and, when present, on real Gutenberg shards)."""

from __future__ import annotations

import collections
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import shared_data
from nanochat_jax import tokenizer as tk
from nanochat_jax.tokenizer import SPECIAL_TOKENS, Tokenizer, get_token_bytes, get_tokenizer, train_tokenizer

REPO = Path(__file__).resolve().parents[1]

WORDS = ("the of and to in is was for that with as on by it from at are this be which time water light river "
         "house morning people small great little could would should between through because machine learning "
         "model token compress").split()
CJK = "日本語中文漢字東京大學北京天气你好世界한국어문장도서관"
EMOJI = "😀🎉🚀🌍🔥👍🏽🇰🇷"
CODE_SNIPPETS = [
    "def f(x):\n    return x * 2 + 1\n",
    "for i in range(10):\n    print(i, i ** 2)\n",
    "class A:\n    def __init__(self, n: int) -> None:\n        self.n = n\n",
    "if (a && b) { return c[i]; } else { x += 0x1F; }\n",
    "import numpy as np\narr = np.zeros((3, 4), dtype=np.float32)\n",
]


def make_docs(n_docs: int, seed: int) -> list[str]:
    """Mixed English-ish prose, numbers, CJK, emoji and code: enough variety for every splitter branch."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n_docs):
        parts = []
        for _ in range(rng.randint(3, 8)):
            kind = rng.random()
            if kind < 0.6:
                words = [rng.choice(WORDS) for _ in range(rng.randint(5, 20))]
                words[0] = words[0].capitalize()
                parts.append(" ".join(words) + rng.choice([".", "!", "?", ", she said.", " (1999)."]))
            elif kind < 0.75:
                parts.append("".join(rng.choice(CJK) for _ in range(rng.randint(3, 15))))
            elif kind < 0.8:
                parts.append(" ".join(rng.choice(EMOJI) for _ in range(rng.randint(1, 4))))
            elif kind < 0.9:
                parts.append(f"In {rng.randint(1000, 2100)} it cost ${rng.randint(1, 99999)}.{rng.randint(0, 99):02d}")
            else:
                parts.append(rng.choice(CODE_SNIPPETS))
        docs.append(rng.choice([" ", "\n", "\n\n"]).join(parts))
    return docs


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    docs = make_docs(1500, seed=0)
    assert 150_000 < sum(len(d.encode()) for d in docs) < 600_000
    return docs


@pytest.fixture(scope="module")
def tok(corpus) -> Tokenizer:
    return train_tokenizer(iter(corpus), vocab_size=700)


def random_unicode(rng: random.Random, n: int) -> str:
    ranges = [(0x20, 0x7E), (0xA0, 0x24F), (0x370, 0x3FF), (0x400, 0x4FF), (0x4E00, 0x9FFF), (0xAC00, 0xD7A3),
              (0x1F300, 0x1F64F), (0x9, 0xD)]
    out = []
    for _ in range(n):
        lo, hi = rng.choice(ranges)
        out.append(chr(rng.randint(lo, hi)))
    return "".join(out)


# ----------------------------------------------------------------------------------------------
# Training

def reference_bpe_ranks(docs: list[str], n_merges: int) -> dict[bytes, int]:
    """Slow textbook BPE: split with the same regex, count chunks, repeatedly merge the most frequent pair
    (ties -> the smaller (left id, right id) pair), recounting from scratch every step."""
    import regex

    chunk_counts = collections.Counter(c for d in docs for c in regex.findall(tk.SPLIT_PATTERN, d))
    words = {chunk: list(chunk.encode()) for chunk in chunk_counts}
    vocab = {i: bytes([i]) for i in range(256)}
    for k in range(n_merges):
        pairs = collections.Counter()
        for chunk, ids in words.items():
            for a, b in zip(ids, ids[1:]):
                pairs[(a, b)] += chunk_counts[chunk]
        if not pairs:
            break
        best = max(pairs.values())
        pair = min(p for p, c in pairs.items() if c == best)
        new_id = 256 + k
        vocab[new_id] = vocab[pair[0]] + vocab[pair[1]]
        for chunk, ids in words.items():
            merged, i = [], 0
            while i < len(ids):
                if i + 1 < len(ids) and (ids[i], ids[i + 1]) == pair:
                    merged.append(new_id)
                    i += 2
                else:
                    merged.append(ids[i])
                    i += 1
            words[chunk] = merged
    return {b: i for i, b in vocab.items()}


def test_merges_match_reference_bpe(corpus):
    docs = corpus[:150]
    n_merges = 60
    ours = train_tokenizer(docs, vocab_size=256 + n_merges + len(SPECIAL_TOKENS))
    assert ours.mergeable_ranks() == reference_bpe_ranks(docs, n_merges)


def test_specials_are_last_nine_in_order(tok):
    v = tok.vocab_size
    assert v == 700
    assert [tok.encode_special(s) for s in SPECIAL_TOKENS] == list(range(v - 9, v))
    assert tok.bos_id == v - 9
    assert SPECIAL_TOKENS == ["<|bos|>", "<|user_start|>", "<|user_end|>", "<|assistant_start|>",
                              "<|assistant_end|>", "<|python_start|>", "<|python_end|>", "<|output_start|>",
                              "<|output_end|>"]
    with pytest.raises(ValueError, match="not a special token"):
        tok.encode_special("hello")


def test_split_pattern_digits_in_pairs(tok):
    import regex

    assert tok.enc._pat_str == tk.SPLIT_PATTERN  # rustbpe trained with, and tiktoken runs, nanochat's pattern

    assert regex.findall(tk.SPLIT_PATTERN, "abc 12345 x") == ["abc", " ", "12", "34", "5", " x"]
    assert regex.findall(tk.SPLIT_PATTERN, "don't WE'LL") == ["don", "'t", " WE", "'LL"]


@pytest.mark.parametrize("vocab_size", [0, 100, 256, 264])
def test_vocab_too_small_is_a_clear_value_error(vocab_size):
    with pytest.raises(ValueError, match="at least 256 byte tokens"):
        train_tokenizer(["some text"], vocab_size=vocab_size)


def test_small_corpus_warns_and_keeps_specials_on_top():
    with pytest.warns(UserWarning, match="only supported"):
        small = train_tokenizer(["hello hello world"] * 5, vocab_size=1000)
    assert small.vocab_size < 1000
    assert small.encode_special("<|output_end|>") == small.vocab_size - 1
    assert small.decode(small.encode("hello world")) == "hello world"


def test_empty_corpus_and_bad_items():
    with pytest.raises(ValueError, match="no training text"):
        train_tokenizer([], vocab_size=300)
    with pytest.raises(TypeError, match="#1 is a int"):
        train_tokenizer(["ok", 3], vocab_size=300)


# ----------------------------------------------------------------------------------------------
# Encode / decode

def test_round_trip_unicode_and_code(tok, corpus):
    rng = random.Random(1234)
    texts = [random_unicode(rng, rng.randint(1, 300)) for _ in range(50)]
    texts += [CODE_SNIPPETS[0] * 3, "\t\r\n  \n x", "naïve café — 東京 🚀🇰🇷 1234567", "", corpus[7]]
    for text in texts:
        ids = tok.encode(text)
        assert all(isinstance(i, int) and 0 <= i < tok.vocab_size - 9 for i in ids)
        assert tok.decode(ids) == text
        assert tok.decode(np.array(ids, dtype=np.int64)) == text


def test_training_text_compresses(tok, corpus):
    text = "\n".join(corpus[:200])
    ids = tok.encode(text)
    assert max(ids) < tok.vocab_size
    assert len(text.encode()) / len(ids) > 2.0  # 444 merges on a repetitive corpus: far better than bytes


def test_specials_in_text_are_not_parsed(tok):
    text = "hi <|bos|> and <|assistant_end|>"
    ids = tok.encode(text)
    assert not set(ids) & set(tok.special_tokens.values())
    assert tok.decode(ids) == text
    assert tok.decode([tok.bos_id]) == "<|bos|>"


def test_prepend_append_and_batch(tok, corpus):
    texts = corpus[:20] + ["", "<|bos|>"]
    user_end = tok.encode_special("<|user_end|>")
    singles = [tok.encode(t, prepend="<|bos|>", append=user_end) for t in texts]
    for t, ids in zip(texts, singles):
        assert ids[0] == tok.bos_id and ids[-1] == user_end and ids[1:-1] == tok.encode(t)
    assert tok.encode(texts, prepend="<|bos|>", append=user_end, num_threads=2) == singles
    assert tok.encode(tuple(texts)) == [tok.encode(t) for t in texts]
    with pytest.raises(ValueError):
        tok.encode("x", prepend=tok.vocab_size)
    with pytest.raises(TypeError):
        tok.encode(123)


# ----------------------------------------------------------------------------------------------
# token_bytes and storage

def test_token_bytes(tok, corpus):
    tb = tok.token_bytes()
    assert tb.dtype == np.int32 and tb.shape == (tok.vocab_size,)
    for i in range(tok.vocab_size):
        expected = 0 if i >= tok.vocab_size - 9 else len(tok.enc.decode_single_token_bytes(i))
        assert tb[i] == expected
    assert (tb[:256] == 1).all() and (tb[256:-9] >= 2).all()
    # bits-per-byte relies on this: the byte lengths of a text's tokens add up to the text's byte length
    rng = random.Random(99)
    for text in corpus[100:110] + [random_unicode(rng, 200)]:
        ids = tok.encode(text, prepend="<|bos|>")
        assert int(tb[ids].sum()) == len(text.encode("utf-8"))


def test_save_load_round_trip(tok, corpus, tmp_path, monkeypatch):
    paths = tok.save(tmp_path / "tok")
    assert {p.name for p in (tmp_path / "tok").iterdir()} == {"tokenizer.tiktoken", "tokenizer.json",
                                                              "token_bytes.npy"}
    loaded = Tokenizer.load(tmp_path / "tok")
    assert loaded.vocab_size == tok.vocab_size and loaded.bos_id == tok.bos_id
    assert loaded.special_tokens == tok.special_tokens
    texts = corpus[:50] + ["naïve 🚀 東京"]
    assert loaded.encode(texts) == tok.encode(texts)
    np.testing.assert_array_equal(get_token_bytes(tmp_path / "tok"), tok.token_bytes())
    np.testing.assert_array_equal(loaded.token_bytes(), tok.token_bytes())
    assert get_tokenizer(tmp_path / "tok").encode(texts[0]) == tok.encode(texts[0])
    # the ranks file is tiktoken's own format: its loader reads back the same ranks
    import tiktoken.load

    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")  # no caching of local files
    assert tiktoken.load.load_tiktoken_bpe(str(paths["ranks"])) == tok.mergeable_ranks()


def test_default_dir_and_missing_files(tok, tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_JAX_BASE_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="tok_train.py"):
        get_tokenizer()
    with pytest.raises(FileNotFoundError, match="tok_train.py"):
        get_token_bytes()
    tok.save()
    assert (tmp_path / "tokenizer" / "tokenizer.json").is_file()
    assert get_tokenizer().encode("water light") == tok.encode("water light")


def test_from_pretrained_unreachable_is_clear(monkeypatch):
    import tiktoken

    def offline(name):
        raise ConnectionError("no network")

    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    with pytest.raises(RuntimeError, match="unreachable"):
        Tokenizer.from_pretrained("gpt2")
    with pytest.raises(ValueError, match="unknown pretrained"):
        Tokenizer.from_pretrained("llama")


# ----------------------------------------------------------------------------------------------
# Chat rendering

TOOL_CONVERSATION = {"messages": [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 6*7? <|bos|>"},
    {"role": "assistant", "content": [
        {"type": "text", "text": "Let me compute."},
        {"type": "python", "text": "6*7"},
        {"type": "python_output", "text": "42"},
        {"type": "text", "text": "It is 42."},
    ]},
    {"role": "user", "content": "Thanks!"},
    {"role": "assistant", "content": "You're welcome."},
]}


def test_render_conversation_token_by_token(tok):
    v = tok.vocab_size
    BOS, US, UE, AS, AE, PS, PE, OS, OE = range(v - 9, v)  # hand-written: specials sit at the top in this order
    e = tok.encode
    expected = [
        ([BOS], 0), ([US], 0), (e("Be brief.\n\nWhat is 6*7? <|bos|>"), 0), ([UE], 0),
        ([AS], 0), (e("Let me compute."), 1), ([PS], 1), (e("6*7"), 1), ([PE], 1),
        ([OS], 0), (e("42"), 0), ([OE], 0), (e("It is 42."), 1), ([AE], 1),
        ([US], 0), (e("Thanks!"), 0), ([UE], 0), ([AS], 0), (e("You're welcome."), 1), ([AE], 1),
    ]
    exp_ids = [i for ids, _ in expected for i in ids]
    exp_mask = [m for ids, m in expected for _ in ids]
    ids, mask = tok.render_conversation(TOOL_CONVERSATION)
    assert ids == exp_ids
    assert mask == exp_mask
    assert ids.count(BOS) == 1  # the literal "<|bos|>" typed by the user stays text
    assert tok.decode(ids) == ("<|bos|><|user_start|>Be brief.\n\nWhat is 6*7? <|bos|><|user_end|>"
                               "<|assistant_start|>Let me compute.<|python_start|>6*7<|python_end|>"
                               "<|output_start|>42<|output_end|>It is 42.<|assistant_end|>"
                               "<|user_start|>Thanks!<|user_end|><|assistant_start|>You're welcome.<|assistant_end|>")
    trained = tok.decode([i for i, m in zip(ids, mask) if m])
    assert trained == ("Let me compute.<|python_start|>6*7<|python_end|>It is 42.<|assistant_end|>"
                       "You're welcome.<|assistant_end|>")
    assert TOOL_CONVERSATION["messages"][0]["role"] == "system"  # input not modified


def test_render_truncates(tok):
    full_ids, full_mask = tok.render_conversation(TOOL_CONVERSATION)
    for k in (1, 5, len(full_ids) - 1, len(full_ids), len(full_ids) + 10):
        ids, mask = tok.render_conversation(TOOL_CONVERSATION, max_tokens=k)
        assert ids == full_ids[:k] and mask == full_mask[:k]
    long_conv = {"messages": [{"role": "user", "content": "water " * 3000}, {"role": "assistant", "content": "ok"}]}
    ids, mask = tok.render_conversation(long_conv)
    assert len(ids) == len(mask) == 2048
    with pytest.raises(ValueError, match="max_tokens"):
        tok.render_conversation(TOOL_CONVERSATION, max_tokens=0)


def test_render_for_completion(tok):
    v = tok.vocab_size
    ids = tok.render_for_completion(TOOL_CONVERSATION)
    assert ids[-1] == v - 6  # <|assistant_start|>
    without_last = {"messages": TOOL_CONVERSATION["messages"][:-1]}
    assert ids == tok.render_conversation(without_last)[0] + [v - 6]
    assert tok.decode(ids).endswith("<|user_start|>Thanks!<|user_end|><|assistant_start|>")
    assert "welcome" not in tok.decode(ids)
    assert len(TOOL_CONVERSATION["messages"]) == 5  # input not modified
    with pytest.raises(ValueError, match=r"last message \(index 3\) must be from the assistant"):
        tok.render_for_completion({"messages": TOOL_CONVERSATION["messages"][:-1]})


@pytest.mark.parametrize("conversation, pattern", [
    ({}, "no 'messages'"),
    ([], "must be a dict"),
    ({"messages": []}, "empty"),
    ({"messages": "hello"}, "must be a list"),
    ({"messages": [{"role": "assistant", "content": "hi"}]}, "message 0: expected role 'user'"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]},
     "message 1: expected role 'assistant'"),
    ({"messages": [{"role": "system", "content": "s"}]}, "message 1: a system message must be followed"),
    ({"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
                   {"role": "system", "content": "s2"}]}, "message 2: expected role 'assistant'"),
    ({"messages": [{"role": "user", "content": ["a"]}]}, "message 0: user content must be a str"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": 7}]},
     "message 1: assistant content"),
    ({"messages": [{"role": "user", "content": "a"},
                   {"role": "assistant", "content": [{"type": "image", "text": "x"}]}]}, "message 1, part 0"),
    ({"messages": [{"role": "user", "content": "a"},
                   {"role": "assistant", "content": [{"type": "text", "text": "x"}, {"type": "python"}]}]},
     "message 1, part 1: 'text' must be a str"),
    ({"messages": [{"role": "user", "content": "a"}, "oops"]}, "message 1 must be a dict"),
    ({"messages": [{"role": "user"}]}, "message 0 must be a dict with 'role' and 'content'"),
])
def test_malformed_conversations_raise(tok, conversation, pattern):
    with pytest.raises(ValueError, match=pattern):
        tok.render_conversation(conversation)
    with pytest.raises(ValueError):
        tok.render_for_completion(conversation)


# ----------------------------------------------------------------------------------------------
# Scripts

def write_shards(folder: Path, docs_per_shard: list[list[str]]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True, exist_ok=True)
    for i, docs in enumerate(docs_per_shard):
        pq.write_table(pa.table({"text": docs}), folder / f"shard_{i:05d}.parquet", row_group_size=64)


def run_script(name: str, *args: str, base_dir: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "NANOCHAT_JAX_BASE_DIR": str(base_dir)}
    env.pop("NANOCHAT_JAX_DATA_DIR", None)
    return subprocess.run([sys.executable, f"scripts/{name}", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)


def test_iter_training_texts_crops_and_stops(tmp_path):
    write_shards(tmp_path, [["aaaa", "bbbbbb", "cc", "dddd"], ["zz"]])
    stats = {}
    got = list(tk.iter_training_texts([tmp_path / "shard_00000.parquet"], max_chars=8, doc_cap=5, stats=stats))
    assert got == ["aaaa", "bbbbb"]  # 4 chars, then 9 > 8: the crossing doc is kept, then stop
    assert stats == {"chars": 9, "docs": 2}
    got = list(tk.iter_training_texts([tmp_path / "shard_00000.parquet"], max_chars=100, doc_cap=3))
    assert got == ["aaa", "bbb", "cc", "ddd"]


def test_tok_train_script_end_to_end(tmp_path, corpus):
    docs = make_docs(400, seed=5)
    write_shards(tmp_path / "data", [docs[:300], docs[300:]])
    max_chars, doc_cap = 60_000, 400
    res = run_script("tok_train.py", "--vocab-size=512", f"--max-chars={max_chars}", f"--doc-cap={doc_cap}",
                     f"--data-dir={tmp_path / 'data'}", base_dir=tmp_path)
    assert res.returncode == 0, res.stderr + res.stdout
    # what the script should have trained on, computed by hand from the shard contents
    used, total = [], 0
    for d in docs[:300]:
        used.append(d[:doc_cap])
        total += len(used[-1])
        if total > max_chars:
            break
    assert f"chars used: {total:,} from {len(used):,} docs" in res.stdout
    assert "token_bytes over 503 non-special tokens" in res.stdout
    loaded = get_tokenizer(tmp_path / "tokenizer")
    assert loaded.vocab_size == 512
    assert loaded.mergeable_ranks() == train_tokenizer(used, vocab_size=512).mergeable_ranks()
    assert loaded.decode(loaded.encode(docs[350])) == docs[350]

    res = run_script("tok_eval.py", f"--data-dir={tmp_path / 'data'}", base_dir=tmp_path)
    assert res.returncode == 0, res.stderr + res.stdout
    for name in ("news", "korean", "code", "math", "science", "data-train", "data-val"):
        assert f"\n{name} " in res.stdout


def test_tok_train_script_rejects_small_vocab(tmp_path):
    res = run_script("tok_train.py", "--vocab-size=100", base_dir=tmp_path)
    assert res.returncode == 2
    assert "at least 265" in res.stderr


def test_real_data_compression(tmp_path):
    import pyarrow.parquet as pq

    data_dir = shared_data("gutenberg")
    res = run_script("tok_train.py", "--vocab-size=2048", "--max-chars=2_000_000", f"--data-dir={data_dir}",
                     base_dir=tmp_path)
    assert res.returncode == 0, res.stderr + res.stdout
    tok = get_tokenizer(tmp_path / "tokenizer")
    val_file = sorted(data_dir.glob("*.parquet"))[-1]
    text = "\n".join(pq.read_table(val_file, columns=["text"]).column(0).to_pylist()[:100])
    ids = tok.encode(text)
    ratio = len(text.encode()) / len(ids)
    # measured 3.12 bytes/token (3.58 at vocab 4096, 4.49 at 32768 with 20M chars); raw bytes would be 1.0
    assert ratio > 3.0, ratio
    assert int(get_token_bytes(tmp_path / "tokenizer")[ids].sum()) == len(text.encode())


def test_tok_eval_tables_against_a_baseline(tok, tmp_path, monkeypatch, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("tok_eval_under_test", REPO / "scripts" / "tok_eval.py")
    tok_eval = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, tok_eval)  # dataclasses look their module up there
    spec.loader.exec_module(tok_eval)
    baseline = train_tokenizer(make_docs(300, seed=7), vocab_size=300)  # a stand-in for GPT-2 (offline)

    def fake_pretrained(cls, name):
        if name == "gpt2":
            return baseline
        raise RuntimeError("tiktoken encoding 'cl100k_base' is unreachable")

    monkeypatch.setattr(Tokenizer, "from_pretrained", classmethod(fake_pretrained))
    tok.save(tmp_path / "tok")
    tok_eval.main([f"--tokenizer-dir={tmp_path / 'tok'}", f"--data-dir={tmp_path / 'nothing'}"])
    out = capsys.readouterr().out
    assert "GPT-4 (cl100k_base): not available offline" in out and "note: no shard samples" in out
    n_bytes = len(tok_eval.NEWS.encode())
    ours_n, base_n = len(tok.encode(tok_eval.NEWS)), len(baseline.encode(tok_eval.NEWS))
    diff = 100.0 * (base_n - ours_n) / base_n
    news_row = next(line for line in out.split("Ours vs GPT-2")[1].splitlines() if line.startswith("news "))
    assert news_row.split() == ["news", f"{n_bytes:,}", f"{base_n:,}", f"{n_bytes / base_n:.2f}", f"{ours_n:,}",
                                f"{n_bytes / ours_n:.2f}", f"{diff:+.1f}%"]
    assert diff > 0  # 700-token vocab vs 300: ours must compress better


def test_nanochat_tokenizer_pkl_loads_without_running_pickle_code(tmp_path):
    """nanochat saves pickle.dumps(tiktoken.Encoding); we read it with a restricted unpickler (no tiktoken code
    runs during unpickling), and token byte lengths come from the tokenizer itself."""
    import pickle

    from nanochat_jax.common import UserError
    from nanochat_jax.tokenizer import load_nanochat_tokenizer

    tok = train_tokenizer(["hello world, the quick brown fox jumps over the lazy dog"] * 20, vocab_size=300)
    (tmp_path / "tokenizer.pkl").write_bytes(pickle.dumps(tok.enc))
    loaded = get_tokenizer(tmp_path)  # only tokenizer.pkl there
    text = "the quick brown fox, hello\u00e9"
    assert loaded.encode(text) == tok.encode(text) and loaded.bos_id == tok.bos_id
    assert loaded.special_tokens == tok.special_tokens
    np.testing.assert_array_equal(get_token_bytes(tmp_path), tok.token_bytes())
    # an encoding without <|bos|> is not a nanochat tokenizer
    import tiktoken
    bare = tiktoken.Encoding(name="x", pat_str=tok.enc._pat_str, mergeable_ranks=tok.mergeable_ranks(),
                             special_tokens={"<|eot|>": 300})
    (tmp_path / "tokenizer.pkl").write_bytes(pickle.dumps(bare))
    with pytest.raises(UserError, match=re.escape("the encoding has no <|bos|> special token")):
        load_nanochat_tokenizer(tmp_path / "tokenizer.pkl")
    (tmp_path / "tokenizer.pkl").write_bytes(b"not a pickle")
    with pytest.raises(UserError, match="tokenizer.pkl: not a pickled tiktoken encoding"):
        get_tokenizer(tmp_path)
