"""nanochat's own files, without torch: a checkpoint directory written by nanochat's code (tests/golden/nanochat_*,
see tools/make_golden.py: model_*.pt, meta_*.json, tokenizer.pkl, token_bytes.pt) imports with
scripts/convert_checkpoint.py and answers a prompt through scripts/chat_cli.py; hostile pickles are refused
without running them."""

from __future__ import annotations

import importlib.util
import io
import os
import pickle
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from nanochat_jax import convert
from nanochat_jax.common import UserError
from nanochat_jax.tokenizer import get_tokenizer, load_nanochat_tokenizer

REPO_ROOT = Path(__file__).resolve().parents[1]
GOLDEN = REPO_ROOT / "tests" / "golden"


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses with string annotations look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def no_torch(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` raises ImportError


@pytest.mark.parametrize("preset", ["current", "classic"])
def test_import_brings_the_tokenizer_and_chats(preset, tmp_path, monkeypatch, no_torch, capsys):
    monkeypatch.setenv("NANOCHAT_JAX_BASE_DIR", str(tmp_path / "base"))
    src = tmp_path / "download"
    shutil.copytree(GOLDEN / f"nanochat_{preset}", src)  # a downloaded nanochat checkpoint folder
    convert_script = _script("convert_checkpoint")
    convert_script.main(convert_script.ConvertConfig(direction="import", source_dir=str(src), phase="sft",
                                                     model_tag=f"nano_{preset}"))
    out = capsys.readouterr().out
    assert f"chat with it: python scripts/chat_cli.py -i sft --model-tag=nano_{preset}" in out
    saved = tmp_path / "base" / "imported_tokenizers" / f"sft-nano_{preset}"
    assert {p.name for p in saved.iterdir()} == {"tokenizer.tiktoken", "tokenizer.json", "token_bytes.npy"}
    ours, theirs = get_tokenizer(saved), load_nanochat_tokenizer(src / "tokenizer.pkl")
    text = "The model answers."
    assert ours.encode(text) == theirs.encode(text) and ours.bos_id == theirs.bos_id
    np.testing.assert_array_equal(np.load(saved / "token_bytes.npy"), convert.read_pt(src / "token_bytes.pt"))

    chat = _script("chat_cli")
    chat.main(["-i", "sft", f"--model-tag=nano_{preset}", "-p", "The model", "--max-tokens=6", "-t", "0"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == "User: The model" and lines[-1].startswith("Assistant: ") and len(lines[-1]) > 11


@pytest.mark.slow  # a subprocess end to end: ~30-50 s on a shared 2-core box
def test_two_commands_in_a_fresh_process(tmp_path):
    """The user's path, as processes: import, then one answer (torch unimportable in both)."""
    env = {**os.environ, "NANOCHAT_JAX_BASE_DIR": str(tmp_path / "base"), "JAX_PLATFORMS": "cpu"}
    blocker = tmp_path / "blocker"
    (blocker / "torch").mkdir(parents=True)
    (blocker / "torch" / "__init__.py").write_text("raise ImportError('torch is not installed here')\n")
    env["PYTHONPATH"] = os.pathsep.join([str(blocker), str(REPO_ROOT)])
    run = lambda *args: subprocess.run([sys.executable, *args], cwd=REPO_ROOT, env=env, capture_output=True,  # noqa
                                       text=True, timeout=600)
    r = run("scripts/convert_checkpoint.py", "--direction=import", f"--source-dir={GOLDEN / 'nanochat_current'}")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "chat with it: python scripts/chat_cli.py -i base --model-tag=d2" in r.stdout
    r = run("scripts/chat_cli.py", "-i", "base", "--model-tag=d2", "-p", "Hello", "--max-tokens=4", "-t", "0")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "Assistant: " in r.stdout


def test_import_with_a_tokenizer_of_another_vocab_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_JAX_BASE_DIR", str(tmp_path / "base"))
    src = tmp_path / "ckpt"
    shutil.copytree(GOLDEN / "nanochat_current", src)
    other = tmp_path / "other_tok"
    other.mkdir()
    from nanochat_jax.tokenizer import train_tokenizer
    train_tokenizer(["some other text, a few words"] * 5, vocab_size=280).save(other)
    script = _script("convert_checkpoint")
    with pytest.raises(UserError, match=r"other_tok: the tokenizer has \d+ tokens but .* vocab_size 300"):
        script.main(script.ConvertConfig(direction="import", source_dir=str(src), tokenizer_dir=str(other)))


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_hostile_tokenizer_pickle_is_refused_unrun(tmp_path):
    path = tmp_path / "tokenizer.pkl"
    path.write_bytes(pickle.dumps(_Evil()))
    with pytest.raises(UserError, match=r"tokenizer.pkl: not a pickled tiktoken encoding .* (os|posix)\.system"):
        get_tokenizer(tmp_path)
    path.write_bytes(pickle.dumps({"name": "x"}))  # plain data, but not an encoding
    with pytest.raises(UserError, match="tokenizer.pkl: the pickled object is not a tiktoken Encoding"):
        load_nanochat_tokenizer(path)


def _pt_with(payload: bytes) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("archive/data.pkl", payload)
        z.writestr("archive/byteorder", "little")
    return buf.getvalue()


def test_hostile_or_broken_pt_is_refused_unrun(tmp_path):
    path = tmp_path / "model_000001.pt"
    path.write_bytes(_pt_with(pickle.dumps(_Evil(), protocol=2)))
    with pytest.raises(UserError, match=r"model_000001.pt: cannot be read .* (os|posix)\.system"):
        convert.read_pt(path)
    # a tensor that reads past its storage
    good = (GOLDEN / "nanochat_current" / "token_bytes.pt").read_bytes()
    with zipfile.ZipFile(io.BytesIO(good)) as z:
        names = z.namelist()
        data = {n: z.read(n) for n in names}
    data = {n: (v[:8] if "/data/" in n else v) for n, v in data.items()}  # truncate the storage
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for n, v in data.items():
            z.writestr(n, v)
    path.write_bytes(buf.getvalue())
    with pytest.raises(UserError, match="model_000001.pt: cannot be read"):
        convert.read_pt(path)
    path.write_bytes(b"\x80\x02}q\x00.")  # a bare pickle, the pre-1.6 format
    with pytest.raises(UserError, match="not a torch.save zip archive"):
        convert.read_pt(path)


def test_pt_reader_matches_the_golden_arrays():
    """model_*.pt read without torch equals what the generator saved alongside (via the converter's layout)."""
    sd, meta, step = convert.read_nanochat_checkpoint(GOLDEN / "nanochat_classic")
    assert step == 60 and meta["model_config"]["n_layer"] == 2
    assert all(v.dtype == np.float32 for v in sd.values())
    assert sd["transformer.wte.weight"].shape == (300, 32)  # classic: unpadded vocab rows
