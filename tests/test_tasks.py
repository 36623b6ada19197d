"""Chat tasks on the real shared data: sizes, shuffles, rendering, grading, mixtures, and the offline paths."""

from __future__ import annotations

import gzip
import io
import json
import random
import re

import numpy as np
import pytest

from conftest import shared_data
from nanochat_jax import common
from nanochat_jax.execution import use_calculator
from nanochat_jax.tasks import (ARC, CHAT_SOURCES, GSM8K, MMLU, CustomJSON, DownloadError, HumanEval, LocalChat,
                                SimpleSpelling, SmolTalk, SpellingBee, Task, TaskMixture, TaskSequence, render_mc)
from nanochat_jax.tasks import common as tc
from nanochat_jax.tasks.customjson import read_conversations
from nanochat_jax.tasks.gsm8k import answer_to_parts
from nanochat_jax.tasks.humaneval import build_program, extract_program
from nanochat_jax.tasks.spellingbee import TALLY_MARK, USER_MSG_TEMPLATES


@pytest.fixture(scope="module")
def data():
    return shared_data()


@pytest.fixture(scope="module")
def tok(data):
    from nanochat_jax.tokenizer import train_tokenizer

    texts = [json.loads(line)["answer"] for line in open(data / "gsm8k" / "test.jsonl", encoding="utf-8")][:400]
    return train_tokenizer(iter(texts), vocab_size=400)


# ----------------------------------------------------------------------------------------------
# Sizes (the README's row counts) and the nanochat shuffle

@pytest.mark.parametrize("make, n", [
    (lambda d: ARC("ARC-Easy", "train", data_dir=d), 2251),
    (lambda d: ARC("ARC-Easy", "validation", data_dir=d), 570),
    (lambda d: ARC("ARC-Easy", "test", data_dir=d), 2376),
    (lambda d: ARC("ARC-Challenge", "train", data_dir=d), 1119),
    (lambda d: ARC("ARC-Challenge", "validation", data_dir=d), 299),
    (lambda d: ARC("ARC-Challenge", "test", data_dir=d), 1172),
    (lambda d: MMLU("all", "test", data_dir=d), 14042),
    (lambda d: MMLU("all", "validation", data_dir=d), 1531),
    (lambda d: MMLU("all", "dev", data_dir=d), 285),
    (lambda d: MMLU("all", "auxiliary_train", data_dir=d), 11008),  # the partial local copy
    (lambda d: MMLU("auxiliary_train", "train", data_dir=d), 11008),  # nanochat's older spelling of the same
    (lambda d: GSM8K("main", "train", data_dir=d), 7473),
    (lambda d: GSM8K("main", "test", data_dir=d), 1319),
    (lambda d: GSM8K("socratic", "test", data_dir=d), 1319),
    (lambda d: HumanEval(data_dir=d), 164),
    (lambda d: SpellingBee(size=256, split="test", data_dir=d), 256),
    (lambda d: SimpleSpelling(size=300, data_dir=d), 300),
    (lambda d: LocalChat("all", data_dir=d), 188 + 2312 + 1923 + 4535),
])
def test_lengths_match_readme(data, make, n):
    task = make(data)
    assert len(task) == n
    if isinstance(task, LocalChat):
        with pytest.raises(NotImplementedError, match="training-only"):
            _ = task.eval_type
    else:
        assert task.eval_type in ("categorical", "generative")
    for i in (0, n // 2, n - 1):  # well-formed conversations: user first, alternating, assistant last
        roles = [m["role"] for m in task[i]["messages"]]
        assert roles == ["user", "assistant"] * (len(roles) // 2) and len(roles) >= 2
    with pytest.raises(IndexError):
        task[n]


def test_shuffle_is_numpy_default_rng_42(data):
    rows = [json.loads(line) for line in open(data / "arc" / "ARC-Challenge-validation.jsonl", encoding="utf-8")]
    perm = np.random.default_rng(42).permutation(len(rows))
    task = ARC("ARC-Challenge", "validation", data_dir=data)
    for i in random.Random(0).sample(range(len(rows)), 20):
        row = rows[perm[i]]
        assert task[i]["messages"][0]["content"].startswith(f"Multiple Choice question: {row['question']}\n")
        assert task[i]["messages"][1]["content"] == row["answerKey"]


def test_env_var_selects_the_local_folder(data, monkeypatch):
    monkeypatch.setenv(tc.TASK_DATA_ENV, str(data))
    assert len(GSM8K("main", "test")) == 1319
    assert tc.task_data_dir() == data and tc.task_data_dir("/elsewhere").as_posix() == "/elsewhere"


def test_slicing(data):
    full = GSM8K("main", "test", data_dir=data)
    for start, stop, step in [(0, None, 1), (5, 50, 7), (100, 101, 3), (0, 420, 1), (1300, None, 4), (7, 7, 1)]:
        view = GSM8K("main", "test", data_dir=data, start=start, stop=stop, step=step)
        expected = list(range(len(full)))[start:stop:step]
        assert len(view) == len(expected)
        for j in (0, len(expected) - 1) if expected else ():
            assert view[j] == full[expected[j]]
    with pytest.raises(ValueError):
        GSM8K("main", "test", data_dir=data, start=5, stop=2)
    with pytest.raises(TypeError):
        full["0"]


# ----------------------------------------------------------------------------------------------
# Multiple choice

def test_render_mc_by_hand():
    text = render_mc("Which is a fruit?", ["A", "B"], ["apple", "rock"])
    assert text == ("Multiple Choice question: Which is a fruit?\n- apple=A\n- rock=B\n\n"
                    "Respond only with the letter of the correct answer.")


def test_mmlu_rows_match_the_csv(data):
    import csv

    with open(data / "mmlu" / "test" / "abstract_algebra_test.csv", newline="", encoding="utf-8") as f:
        first_subject = list(csv.reader(f))
    task = MMLU("all", "test", data_dir=data)
    # Rows are read in subject order, so row k < len(abstract_algebra) sits at the shuffled position of k.
    inverse = np.argsort(np.random.default_rng(42).permutation(14042))
    for k in (0, 7, len(first_subject) - 1):
        q, a, b, c, d, ans = first_subject[k]
        conv = task[int(inverse[k])]
        assert conv["messages"][0]["content"] == render_mc(q, "ABCD", [a, b, c, d])
        assert conv["messages"][1]["content"] == ans and conv["subject"] == "abstract_algebra"
        assert conv["letters"] == ("A", "B", "C", "D")


@pytest.mark.parametrize("make", [lambda d: ARC("ARC-Easy", "test", data_dir=d),
                                  lambda d: ARC("ARC-Challenge", "train", data_dir=d),
                                  lambda d: MMLU("all", "test", data_dir=d)])
def test_categorical_evaluate(data, make):
    task = make(data)
    assert task.eval_type == "categorical"
    for i in random.Random(1).sample(range(len(task)), 30):
        conv = task[i]
        gold = conv["messages"][-1]["content"]
        assert gold in conv["letters"]
        assert task.evaluate(conv, gold) == 1
        for wrong in conv["letters"]:
            if wrong != gold:
                assert task.evaluate(conv, wrong) == 0
    with pytest.raises(ValueError, match="letters"):
        task.evaluate(task[0], "Z")


# ----------------------------------------------------------------------------------------------
# GSM8K

def test_gsm8k_parts_by_hand():
    answer = "Weng earns 12/60 = $<<12/60=0.2>>0.2 per minute.\nSo 0.2 x 50 = $<<0.2*50=10>>10.\n#### 10"
    assert answer_to_parts(answer) == [
        {"type": "text", "text": "Weng earns 12/60 = $"},
        {"type": "python", "text": "12/60"}, {"type": "python_output", "text": "0.2"},
        {"type": "text", "text": "0.2 per minute.\nSo 0.2 x 50 = $"},
        {"type": "python", "text": "0.2*50"}, {"type": "python_output", "text": "10"},
        {"type": "text", "text": "10.\n#### 10"},
    ]
    assert answer_to_parts("<<a=b=c>>") == [{"type": "text", "text": ""}, {"type": "python", "text": "a=b"},
                                            {"type": "python_output", "text": "c"}, {"type": "text", "text": ""}]
    assert answer_to_parts("<<7>> x")[1:3] == [{"type": "python", "text": "7"}, {"type": "python_output", "text": ""}]


def test_gsm8k_renders_tool_calls_with_masks(data, tok):
    task = GSM8K("main", "test", data_dir=data)
    raw = [json.loads(line)["answer"] for line in open(data / "gsm8k" / "test.jsonl", encoding="utf-8")]
    perm = np.random.default_rng(42).permutation(len(raw))
    sp = {name: tok.encode_special(name) for name in ("<|python_start|>", "<|python_end|>", "<|output_start|>",
                                                      "<|output_end|>", "<|assistant_start|>", "<|assistant_end|>")}
    checked_calc = 0
    for i in range(12):
        conv, answer = task[i], raw[perm[i]]
        ids, mask = tok.render_conversation(conv, max_tokens=10**6)
        assert ids.count(sp["<|python_start|>"]) == answer.count("<<")  # one tool call per annotation
        # Walk the tokens: inside <|output_start|>..<|output_end|> mask 0, inside python mask 1.
        state, outputs, exprs, cur = None, [], [], []
        for t, m in zip(ids, mask):
            if t == sp["<|output_start|>"]:
                assert m == 0
                state, cur = "out", []
            elif t == sp["<|output_end|>"]:
                assert m == 0
                outputs.append(tok.decode(cur))
                state = None
            elif t == sp["<|python_start|>"]:
                assert m == 1
                state, cur = "py", []
            elif t == sp["<|python_end|>"]:
                assert m == 1
                exprs.append(tok.decode(cur))
                state = None
            elif state == "out":
                assert m == 0
                cur.append(t)
            elif state == "py":
                assert m == 1
                cur.append(t)
        calls = re.findall(r"<<([^>]+)>>", answer)
        assert exprs == [c.rsplit("=", 1)[0] for c in calls]
        assert outputs == [c.rsplit("=", 1)[1] for c in calls]
        # The calculator recomputes GSM8K's own annotations (where it accepts them).
        for expr, out in zip(exprs, outputs):
            got = use_calculator(expr)
            if got is not None and out.replace(",", "").lstrip("-").replace(".", "").isdigit():
                assert float(got) == pytest.approx(float(out.replace(",", "")), rel=1e-2, abs=1e-2)
                checked_calc += 1
        # Everything after <|assistant_start|> is trained on except the tool outputs.
        start = ids.index(sp["<|assistant_start|>"])
        assert mask[:start + 1] == [0] * (start + 1) and mask[-1] == 1 and ids[-1] == sp["<|assistant_end|>"]
        text_trained = tok.decode([t for t, m in zip(ids[start + 1:], mask[start + 1:]) if m and t not in sp.values()])
        assert text_trained == re.sub(r"<<([^>]+)=[^=>]*>>", lambda mt: mt.group(1), answer)
    assert checked_calc > 10


def test_gsm8k_evaluate_and_reward(data):
    task = GSM8K("main", "test", data_dir=data)
    for i in random.Random(2).sample(range(len(task)), 20):
        conv = task[i]
        gold = tc.extract_hash_answer(conv["messages"][-1]["content"][-1]["text"])
        assert gold is not None
        assert task.evaluate(conv, f"Some reasoning.\n#### {gold}") == 1
        assert task.reward(conv, f"#### {gold}") == 1.0
        assert task.evaluate(conv, f"#### {int(float(gold)) + 1}") == 0
        assert task.evaluate(conv, "no final answer") == 0 and task.reward(conv, "") == 0.0
    assert tc.extract_hash_answer("so #### 1,234.5 done") == "1234.5"
    assert tc.extract_hash_answer("#### -7") == "-7" and tc.extract_hash_answer("####7") is None


# ----------------------------------------------------------------------------------------------
# HumanEval

def test_extract_program():
    assert extract_program("Sure:\n```python\ndef f():\n    return 1\n```\nmore\n```\nx\n```") == \
        "def f():\n    return 1"
    assert extract_program("```\nprint(2)\n```") == "print(2)"
    assert extract_program("  def g(): pass\n") == "def g(): pass"


def test_humaneval_canonical_passes_wrong_fails(data):
    task = HumanEval(data_dir=data)
    assert task.eval_type == "generative"
    for i in random.Random(3).sample(range(len(task)), 4):
        conv = task[i]
        gold = conv["messages"][-1]["content"]  # prompt + canonical solution
        assert task.evaluate(conv, gold), conv["task_id"]
        assert task.evaluate(conv, f"Here you go:\n```python\n{gold}\n```\n")
        wrong = conv["messages"][0]["content"] + "    return None\n"
        assert not task.evaluate(conv, wrong), conv["task_id"]
        assert "check(" + conv["entry_point"] + ")" in build_program(conv, gold)


@pytest.mark.slow
def test_humaneval_every_canonical_solution_passes(data):
    task = HumanEval(data_dir=data)
    failed = [conv["task_id"] for conv in task if not task.evaluate(conv, conv["messages"][1]["content"])]
    assert failed == []


# ----------------------------------------------------------------------------------------------
# Spelling

def test_spellingbee_templates():
    # Classic nanochat's mix (tasks/spellingbee.py): 30 en, 4 es, 4 zh, 4 ko, 3 fr, 3 de, 3 ja; each template
    # names both slots once.
    assert len(USER_MSG_TEMPLATES) == len(set(USER_MSG_TEMPLATES)) == 51
    for t in USER_MSG_TEMPLATES:
        assert t.count("{letter}") == 1 and t.count("{word}") == 1 and not t.endswith("?"), t
    scripts = {"zh": r"[\u4e00-\u9fff]", "ko": r"[\uac00-\ud7af]", "ja": r"[\u3040-\u30ff]"}
    hits = {k: [t for t in USER_MSG_TEMPLATES if re.search(rx, t)] for k, rx in scripts.items()}
    hits["zh"] = [t for t in hits["zh"] if t not in hits["ja"]]  # Japanese templates may use kanji too
    assert {k: len(v) for k, v in hits.items()} == {"zh": 4, "ko": 4, "ja": 3}
    assert all(t.isascii() for t in USER_MSG_TEMPLATES[:30])  # English first (French is ASCII too, so no count)


def test_spellingbee_is_deterministic_and_consistent(data):
    a, b = SpellingBee(size=500, data_dir=data), SpellingBee(size=500, data_dir=data)
    test = SpellingBee(size=500, split="test", data_dir=data)
    assert all(a[i] == b[i] for i in range(0, 500, 25))
    assert a[0] != a[1] and a[3] != test[3]
    words = set(a.words)
    for i in range(0, 500, 10):
        conv = a[i]
        user, parts = conv["messages"][0]["content"], conv["messages"][1]["content"]
        assert [p["type"] for p in parts] == ["text", "text", "python", "python_output", "text"]
        expr = parts[2]["text"]
        word, letter = expr.split("'")[1], expr.split("'")[3]
        assert word in words and word in user and letter in user
        count = word.count(letter)
        assert parts[3]["text"] == str(count) == use_calculator(expr)  # the tool agrees with the data
        # The hand tally: one "pos:char" line per letter, the match lines counting up to the answer.
        lines = [ln for ln in parts[0]["text"].splitlines() if re.fullmatch(r"\d+:[a-z].*", ln)]
        assert [ln.split(TALLY_MARK)[0] for ln in lines] == [f"{k}:{c}" for k, c in enumerate(word, 1)]
        tallies = [int(ln.split(TALLY_MARK)[1]) for ln in lines if TALLY_MARK in ln]
        assert tallies == list(range(1, count + 1))
        assert f"{word}:{','.join(word)}" in parts[0]["text"]
        assert parts[-1]["text"].endswith(f"#### {count}")
        assert a.evaluate(conv, f"#### {count}") == 1 and a.evaluate(conv, f"#### {count + 1}") == 0
        assert a.evaluate(conv, "no answer here") == 0
        assert a.reward(conv, parts[-1]["text"]) == 1.0
    # Classic nanochat's construction: example i draws its word first from random.Random(seed).
    assert a[17]["messages"][1]["content"][2]["text"].split("'")[1] == random.Random(17).choice(a.words)
    assert test[17]["messages"][1]["content"][2]["text"].split("'")[1] == random.Random(10_000_017).choice(a.words)
    # The letter comes from the word about 90% of the time.
    big = SpellingBee(size=2000, data_dir=data)
    in_word = sum(e[2]["text"].split("'")[3] in e[2]["text"].split("'")[1]
                  for e in (big[i]["messages"][1]["content"] for i in range(2000)))
    assert 0.88 < in_word / 2000 < 0.96  # 0.9 plus the random letters that happen to be in the word


def test_spellingbee_renders_tool_call_with_masks(data, tok):
    task = SpellingBee(size=20, split="test", data_dir=data)
    sp = {name: tok.encode_special(name) for name in ("<|python_start|>", "<|python_end|>", "<|output_start|>",
                                                      "<|output_end|>", "<|assistant_start|>")}
    for i in range(0, 20, 4):
        conv = task[i]
        parts = conv["messages"][1]["content"]
        ids, mask = tok.render_conversation(conv, max_tokens=10**6)
        ps, pe = ids.index(sp["<|python_start|>"]), ids.index(sp["<|python_end|>"])
        os_, oe = ids.index(sp["<|output_start|>"]), ids.index(sp["<|output_end|>"])
        assert ids.count(sp["<|python_start|>"]) == 1 and ps < pe < os_ < oe
        assert tok.decode(ids[ps + 1:pe]) == parts[2]["text"] and set(mask[ps:pe + 1]) == {1}
        assert tok.decode(ids[os_ + 1:oe]) == parts[3]["text"] and set(mask[os_:oe + 1]) == {0}
        start = ids.index(sp["<|assistant_start|>"])
        assert set(mask[:start + 1]) == {0} and set(mask[start + 1:ps]) == {1} and set(mask[oe + 1:]) == {1}
        assert tok.decode(ids[oe + 1:]).startswith(parts[4]["text"])


def test_simple_spelling(data):
    task = SimpleSpelling(size=100, data_dir=data)
    shuffled = list(SpellingBee(size=1, data_dir=data).words)
    random.Random(42).shuffle(shuffled)
    for i in (0, 1, 99):
        word = random.Random(i).choice(shuffled)
        conv = task[i]
        assert conv["messages"][0]["content"] == f"Spell the word: {word}"
        assert conv["messages"][1]["content"] == word + ":" + ",".join(word)
        assert task.evaluate(conv, conv["messages"][1]["content"]) == 1
        assert task.evaluate(conv, word + ":" + ",".join(word[::-1] + "x")) == 0


# ----------------------------------------------------------------------------------------------
# Mixtures

class Numbers(Task):
    """A tiny task whose examples say which task and index they are."""

    def __init__(self, name, n, **kwargs):
        super().__init__(**kwargs)
        self.name, self.n = name, n

    def num_examples(self):
        return self.n

    def get_example(self, index):
        return {"messages": [{"role": "user", "content": self.name}, {"role": "assistant", "content": str(index)}]}


def test_mixture_matches_reference_shuffle_and_epochs():
    a, b, c = Numbers("a", 50), Numbers("b", 7), Numbers("c", 13)
    mix = TaskMixture([a, (b, 3), c, c])
    assert len(mix) == 50 + 3 * 7 + 2 * 13
    # The reference: every (task, index) pair listed task by task, then random.Random(42).shuffle.
    tasks = [a, b, b, b, c, c]
    pairs = [(t, i) for t, task in enumerate(tasks) for i in range(len(task))]
    random.Random(42).shuffle(pairs)
    assert [mix.locate(k) for k in range(len(mix))] == pairs
    seen = [(m["messages"][0]["content"], int(m["messages"][1]["content"])) for m in mix]
    assert sorted(seen) == sorted([("a", i) for i in range(50)] + [("b", i) for i in range(7)] * 3 +
                                  [("c", i) for i in range(13)] * 2)
    assert [x["messages"] for x in TaskMixture([a, (b, 3), c, c])] == [x["messages"] for x in mix]  # deterministic
    assert [x["messages"] for x in TaskMixture([a, b, b, b, (c, 2)])] == [x["messages"] for x in mix]
    assert len(TaskMixture([a, b], stop=10)) == 10
    with pytest.raises(ValueError):
        TaskMixture([(a, -1)])


def test_sequence_keeps_order():
    seq = TaskSequence([Numbers("a", 3), (Numbers("b", 2), 2)])
    assert [(m["messages"][0]["content"], m["messages"][1]["content"]) for m in seq] == \
        [("a", "0"), ("a", "1"), ("a", "2"), ("b", "0"), ("b", "1"), ("b", "0"), ("b", "1")]


def test_midtraining_style_mixture_on_real_data(data, tok):
    mix = TaskMixture([LocalChat("train", data_dir=data), MMLU("all", "auxiliary_train", data_dir=data),
                       (GSM8K("main", "train", data_dir=data), 2), SimpleSpelling(size=200, data_dir=data),
                       SpellingBee(size=80, data_dir=data)])
    n_chat = len(LocalChat("train", data_dir=data))
    assert len(mix) == n_chat + 11008 + 2 * 7473 + 200 + 80
    for k in random.Random(4).sample(range(len(mix)), 40):
        ids, mask = tok.render_conversation(mix[k])
        assert len(ids) == len(mask) and 0 < sum(mask) < len(mask)


# ----------------------------------------------------------------------------------------------
# Conversation files

def test_custom_json_both_line_formats(tmp_path):
    conv = [{"role": "user", "content": "Who are you?"}, {"role": "assistant", "content": "nanochat."}]
    path = tmp_path / "identity.jsonl"
    path.write_text(json.dumps(conv) + "\n\n" + json.dumps({"messages": conv}) + "\n", encoding="utf-8")
    task = CustomJSON(path)
    assert len(task) == 2 and task[0] == task[1] == {"messages": conv}
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps([conv[1], conv[0]]) + "\n")
    with pytest.raises(ValueError, match="role"):
        CustomJSON(bad)
    with pytest.raises(FileNotFoundError, match="curl"):
        CustomJSON(tmp_path / "missing.jsonl")
    assert len(CustomJSON(tmp_path / "missing.jsonl", missing_ok=True)) == 0


def test_local_chat_splits(data):
    full = LocalChat(split="all", data_dir=data)
    train, test = LocalChat("train", data_dir=data), LocalChat(split="test", data_dir=data)
    assert len(test) == int(np.ceil(0.05 * len(full))) and len(train) + len(test) == len(full)
    # Independent rebuild: the sources in order, np.random.default_rng(42), the first 5% (rounded up) are test.
    raw = [c for name in CHAT_SOURCES for c in read_conversations(data / "chat" / CHAT_SOURCES[name])]
    perm = np.random.default_rng(42).permutation(len(raw))
    n_test = len(test)
    assert [c["messages"] for c in test] == [raw[p] for p in perm[:n_test]]
    assert [c["messages"] for c in train] == [raw[p] for p in perm[n_test:]]
    assert [c["messages"] for c in full] == [raw[p] for p in perm]
    assert len(LocalChat("all", sources="oasst1", data_dir=data)) == 188
    assert set(CHAT_SOURCES) == {"oasst1", "hh_rlhf", "gpteacher_roleplay", "gpteacher_codegen"}
    with pytest.raises(ValueError):
        LocalChat("train", sources=["oasst1", "nope"], data_dir=data)
    with pytest.raises(FileNotFoundError, match="NANOCHAT_JAX_TASK_DATA"):
        LocalChat()


# ----------------------------------------------------------------------------------------------
# HuggingFace parquet export: download + cache, and the offline error

class FakeResponse:
    """What common.download reads of a streamed requests.Response."""

    def __init__(self, status, content):
        self.status_code, self.content, self.reason = status, content, "Fake"
        self.headers = {"Content-Length": str(len(content))}

    def iter_content(self, chunk_size):
        return (self.content[i:i + chunk_size] for i in range(0, len(self.content), chunk_size))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_smoltalk_offline_fails_clearly(monkeypatch):
    import requests

    calls = []

    def offline(url, stream=False, timeout=None):
        calls.append(url)
        raise requests.ConnectionError("no route to huggingface.co")

    monkeypatch.setattr(requests, "get", offline)
    monkeypatch.setattr(common.time, "sleep", lambda s: None)
    with pytest.raises(DownloadError) as e:
        SmolTalk(split="test")
    msg = str(e.value)
    assert "smol-smoltalk" in msg and "NANOCHAT_JAX_TASK_DATA" in msg and "no route" in msg and "LocalChat" in msg
    assert len(calls) == tc.DOWNLOAD_ATTEMPTS
    assert "smol-smoltalk/parquet/default/test" in calls[0]


def test_parquet_export_download_and_cache(monkeypatch, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    import requests

    convs = [[{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}] for i in range(10)]
    shards = []
    for part in (convs[:6], convs[6:]):
        buf = io.BytesIO()
        pq.write_table(pa.table({"messages": part}), buf)
        shards.append(buf.getvalue())
    served = {"https://huggingface.co/api/datasets/HuggingFaceTB/smol-smoltalk/parquet/default/train":
              json.dumps(["https://x/0.parquet", "https://x/1.parquet"]).encode(),
              "https://x/0.parquet": shards[0], "https://x/1.parquet": shards[1]}
    calls = []
    fails = {"https://x/1.parquet": 1}  # one transient failure, then success

    def fake_get(url, stream=False, timeout=None):
        calls.append(url)
        if fails.get(url):
            fails[url] -= 1
            return FakeResponse(503, b"")
        return FakeResponse(200, served[url]) if url in served else FakeResponse(404, b"")

    monkeypatch.setattr(requests, "get", fake_get)
    monkeypatch.setattr(common.time, "sleep", lambda s: None)
    task = SmolTalk(split="train")
    assert len(task) == 10
    perm = np.random.default_rng(42).permutation(10)
    assert [task[i]["messages"] for i in range(10)] == [convs[p] for p in perm]
    assert calls.count("https://x/1.parquet") == 2
    n_calls = len(calls)
    assert len(SmolTalk(split="train")) == 10 and len(calls) == n_calls  # served from the cache
    with pytest.raises(DownloadError, match="HTTP 404"):
        SmolTalk(split="test")


def test_local_folder_without_the_dataset_falls_back_then_explains(monkeypatch, tmp_path):
    import requests

    monkeypatch.setattr(requests, "get", lambda url, stream=False, timeout=None: FakeResponse(404, b""))
    with pytest.raises(DownloadError) as e:
        GSM8K("socratic", "train", data_dir=tmp_path)
    assert "train_socratic.jsonl" in str(e.value) and str(tmp_path) in str(e.value)


def test_humaneval_local_gzip_matches_raw(data):
    with gzip.open(data / "humaneval" / "HumanEval.jsonl.gz", "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    task = HumanEval(data_dir=data)
    perm = np.random.default_rng(42).permutation(164)
    conv = task[5]
    assert conv["task_id"] == rows[perm[5]]["task_id"]
    assert conv["messages"][1]["content"] == rows[perm[5]]["prompt"] + "\n" + rows[perm[5]]["canonical_solution"]
