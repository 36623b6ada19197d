"""Tests for scripts/chat_cli.py with a scripted checkpoint that answers every user turn with "hi!" (test_engine's
bigram model, sequence_len 64): stdout is only the conversation (log lines on stderr, with -v only), and a chat
longer than the context drops its oldest turns with a note, never compiling a cache longer than the context."""

import importlib.util
import os
import subprocess
import sys

import pytest

from conftest import REPO_ROOT
from nanochat_jax.engine import Engine
from test_engine import scripted_params, single, tokenizer  # noqa: F401 (fixture)


def save_hi_model(tokenizer):  # noqa: F811
    """A base checkpoint (tag d2, step 5) of a scripted model that answers every user turn with "hi!", and the
    tokenizer in <base dir>/tokenizer, where chat_cli looks by default. Returns the reply's tokens."""
    from nanochat_jax.checkpoint import Checkpointer, checkpoint_dir

    sp = tokenizer.encode_special
    h, i, bang = (single(tokenizer, c) for c in "hi!")
    cfg, params = scripted_params(tokenizer, {sp("<|assistant_start|>"): h, h: i, i: bang,
                                              bang: sp("<|assistant_end|>")})
    tokenizer.save()
    with Checkpointer(checkpoint_dir("base", "d2"), async_save=False) as ckpt:
        ckpt.save(5, params=params, meta={"step": 5, "model_config": cfg.to_dict()})
    return [h, i, bang, sp("<|assistant_end|>")]


def load_chat_cli(monkeypatch):
    spec = importlib.util.spec_from_file_location("chat_cli", REPO_ROOT / "scripts" / "chat_cli.py")
    chat_cli = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "chat_cli", chat_cli)  # dataclasses look their module up there
    spec.loader.exec_module(chat_cli)
    return chat_cli


def _run(*args):
    return subprocess.run([sys.executable, "scripts/chat_cli.py", *args], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})


@pytest.mark.slow  # a subprocess end to end: ~30-50 s on a shared 2-core box
def test_one_shot_stdout_is_only_the_conversation(tokenizer):  # noqa: F811
    save_hi_model(tokenizer)
    out = _run("-p", "hello", "-i", "base", "-t", "0", "--max-tokens=16")
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    assert out.stdout == "\nUser: hello\n\nAssistant: hi!\n", out.stdout[-2000:]
    assert "engine: compiled" not in out.stderr and "64-token context" in out.stderr
    out = _run("-p", "hello", "-i", "base", "-t", "0", "--max-tokens=16", "-v")
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    assert out.stdout == "\nUser: hello\n\nAssistant: hi!\n", out.stdout[-2000:]
    assert "engine: compiled prefill" in out.stderr and '"max_tokens": 16' in out.stderr  # logs and config
    out = _run("-p", "hello " * 80, "-i", "base")
    assert out.returncode == 1 and "this model's context is 64 tokens: shorten it" in out.stderr, out.stderr[-2000:]


def test_long_chat_drops_its_oldest_turns_and_stays_in_the_context(tokenizer, monkeypatch, capsys):  # noqa: F811
    """--max-tokens 256 on a 64-token model: every reply is cut to the room left and every cache fits in 64."""
    reply = save_hi_model(tokenizer)
    chat_cli = load_chat_cli(monkeypatch)
    lines = iter(["hello " * 80] + ["hello"] * 9 + ["quit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    calls, engines = [], []
    real_generate = Engine.generate

    def generate(self, tokens, **kw):
        calls.append((list(tokens), kw["max_tokens"]))
        engines.append(self)
        return real_generate(self, tokens, **kw)

    monkeypatch.setattr(Engine, "generate", generate)
    chat_cli.main(["-i", "base", "-t", "0", "--max-tokens=256"])
    out, err = capsys.readouterr()
    assert out.count("Assistant: hi!\n") == 9 and "(" not in out  # notes are not part of the transcript
    assert "this model's context is 64 tokens: shorten it" in err  # the long message: no reply, nothing kept
    assert "dropped the oldest 1 turn(s)" in err
    sp = tokenizer.encode_special
    turn = [sp("<|user_start|>"), *tokenizer.encode("hello"), sp("<|user_end|>"), sp("<|assistant_start|>")]
    assert len(calls) == 9 and calls[0] == ([tokenizer.bos_id, *turn], 64 - 1 - len(turn))
    whole = turn + reply
    for prompt, max_tokens in calls:
        assert len(prompt) + max_tokens == 64  # the reply may fill the context, never more
        assert len(prompt) + 16 <= 64  # a quarter of the context is left for the reply
        kept, rest = divmod(len(prompt) - 1 - len(turn), len(whole))
        assert rest == 0 and prompt == [tokenizer.bos_id, *whole * kept, *turn]  # whole turns, the newest ones
    assert max(len(p) for p, _ in calls) > 32  # turns were kept until the context filled up
    assert {key[-2] for key in engines[0].compilations} == {64}  # every cache: exactly the context


@pytest.mark.slow
def test_interactive_turns_clear_and_quit(tokenizer, monkeypatch, capsys):  # noqa: F811
    reply = save_hi_model(tokenizer)
    chat_cli = load_chat_cli(monkeypatch)
    lines = iter(["hello", "  ", "and you?", "clear", "hello", "quit", "never read"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    prompts = []
    real_generate = Engine.generate
    monkeypatch.setattr(Engine, "generate", lambda self, tokens, **kw: prompts.append(list(tokens)) or
                        real_generate(self, tokens, **kw))
    chat_cli.main(["-i", "base", "-t", "0", "--max-tokens=16"])
    out, err = capsys.readouterr()
    assert out.count("Assistant: hi!\n") == 3 and "(conversation cleared)" in err
    sp = tokenizer.encode_special
    turn = lambda text: [sp("<|user_start|>"), *tokenizer.encode(text), sp("<|user_end|>"),  # noqa: E731
                         sp("<|assistant_start|>")]
    first = [tokenizer.bos_id, *turn("hello")]
    assert prompts == [first, first + reply + turn("and you?"), first]
    assert next(lines) == "never read"
