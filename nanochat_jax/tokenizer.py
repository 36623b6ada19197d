"""BPE tokenizer: train with rustbpe, run with tiktoken, render chat conversations to ids + loss masks.

`train_tokenizer` learns GPT-4-style byte-level BPE merges (rustbpe) and appends nanochat's 9 special tokens at
the top of the vocab. Ordinary text is always encoded with `encode_ordinary`, so a user typing "<|bos|>" gets the
literal characters, never the control token. On disk (default `<base dir>/tokenizer/`), no pickle:
  tokenizer.tiktoken  one "base64(token bytes) rank" line per mergeable token (tiktoken's own format)
  tokenizer.json      {"name", "pattern", "special_tokens": {name: id}, "bos_token", "vocab_size"}
  token_bytes.npy     int32[vocab_size]: UTF-8 byte length of each token, 0 for special tokens (summed over a
                      text's ids it gives the bytes that bits-per-byte divides by)
nanochat's own `tokenizer.pkl` loads too, through a restricted unpickler (no code in the file runs).
"""

from __future__ import annotations

import base64
import copy
import io
import json
import os
import pickle
import warnings
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

from nanochat_jax.common import UserError, atomic_write, get_base_dir

# GPT-4's split regex, except numbers split into runs of at most 2 digits (nanochat found {1,2} best at 32K vocab).
SPLIT_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
)

# Ids vocab_size-9 .. vocab_size-1, in this order. <|bos|> starts (delimits) every document; the assistant calls
# the python tool between python_start/end; the engine, not the model, writes its output between output_start/end.
SPECIAL_TOKENS = ["<|bos|>", "<|user_start|>", "<|user_end|>", "<|assistant_start|>", "<|assistant_end|>",
                  "<|python_start|>", "<|python_end|>", "<|output_start|>", "<|output_end|>"]

MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)  # the 256 single bytes must fit, plus the specials

RANKS_FILE = "tokenizer.tiktoken"
META_FILE = "tokenizer.json"
TOKEN_BYTES_FILE = "token_bytes.npy"
NANOCHAT_PICKLE = "tokenizer.pkl"  # nanochat's pickled tiktoken Encoding (its token_bytes.pt we recompute)

PRETRAINED = {"gpt2": "<|endoftext|>", "cl100k_base": "<|endoftext|>"}  # name -> BOS token


def default_tokenizer_dir() -> Path:
    return get_base_dir() / "tokenizer"


# ----------------------------------------------------------------------------------------------
# Training

def train_tokenizer(texts: Iterable[str], vocab_size: int, pattern: str = SPLIT_PATTERN,
                    name: str = "rustbpe") -> "Tokenizer":
    """Learn BPE merges on `texts`; `vocab_size` includes the 9 special tokens (BPE gets vocab_size - 9)."""
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, (int, np.integer)):
        raise TypeError(f"vocab_size must be an int, got {vocab_size!r}")
    if vocab_size < MIN_VOCAB_SIZE:
        # Checked here: rustbpe panics (a BaseException that `except Exception` misses) on a too-small vocab.
        raise ValueError(f"vocab_size={vocab_size} is too small: it must be at least 256 byte tokens + "
                         f"{len(SPECIAL_TOKENS)} special tokens = {MIN_VOCAB_SIZE}")
    import rustbpe
    import tiktoken

    n_chars = 0

    def checked(it: Iterable[str]) -> Iterator[str]:
        nonlocal n_chars
        for i, text in enumerate(it):
            if not isinstance(text, str):
                raise TypeError(f"training text #{i} is a {type(text).__name__}, expected str")
            n_chars += len(text)
            yield text

    bpe = rustbpe.Tokenizer()
    try:
        bpe.train_from_iterator(checked(texts), vocab_size=int(vocab_size) - len(SPECIAL_TOKENS), pattern=pattern)
    except BaseException as e:
        if type(e).__name__ == "PanicException":  # turn a Rust panic into an ordinary, catchable error
            raise RuntimeError(f"rustbpe training failed: {e}") from e
        raise
    if n_chars == 0:
        raise ValueError("no training text: the iterator yielded no characters")
    ranks = {bytes(token): rank for token, rank in bpe.get_mergeable_ranks()}
    if len(ranks) < vocab_size - len(SPECIAL_TOKENS):
        warnings.warn(f"the corpus only supported {len(ranks) - 256} merges, so the vocab is "
                      f"{len(ranks) + len(SPECIAL_TOKENS)} instead of {vocab_size}; use more text for the full vocab",
                      stacklevel=2)
    enc = tiktoken.Encoding(name=name, pat_str=bpe.get_pattern(), mergeable_ranks=ranks,
                            special_tokens={s: len(ranks) + i for i, s in enumerate(SPECIAL_TOKENS)})
    return Tokenizer(enc, mergeable_ranks=ranks)


def iter_training_texts(files: Sequence[str | os.PathLike], max_chars: int, doc_cap: int,
                        stats: dict | None = None) -> Iterator[str]:
    """Documents of `files`, each cropped to `doc_cap` chars, until (and including) the one that crosses max_chars.
    `stats` (if given) gets "chars" and "docs" counts."""
    from nanochat_jax.dataset import iter_texts

    stats = stats if stats is not None else {}
    stats["chars"], stats["docs"] = 0, 0
    for text in iter_texts(files):
        text = text[:doc_cap]
        stats["chars"] += len(text)
        stats["docs"] += 1
        yield text
        if stats["chars"] > max_chars:
            return


def token_bytes_stats(token_bytes: np.ndarray) -> dict:
    """mean/std/max byte length over the non-special tokens (those with a nonzero length)."""
    tb = np.asarray(token_bytes)[np.asarray(token_bytes) > 0]
    return {"mean": float(tb.mean()), "std": float(tb.std()), "max": int(tb.max()), "count": int(tb.size)}


# ----------------------------------------------------------------------------------------------
# Tokenizer

class Tokenizer:
    """A tiktoken Encoding plus nanochat's conventions: BOS id, special tokens by name, chat rendering."""

    def __init__(self, enc, bos_token: str = "<|bos|>", mergeable_ranks: dict[bytes, int] | None = None):
        self.enc = enc
        self._ranks = mergeable_ranks  # kept for save(); tiktoken does not expose them publicly
        specials = enc.special_tokens_set
        if bos_token not in specials:
            raise ValueError(f"BOS token {bos_token!r} is not a special token of encoding {enc.name!r}")
        self.bos_token = bos_token
        self.special_tokens = {s: enc.encode_single_token(s) for s in sorted(specials, key=enc.encode_single_token)}
        self.bos_id = self.special_tokens[bos_token]
        self._token_bytes = None

    def __repr__(self) -> str:
        return f"Tokenizer(name={self.enc.name!r}, vocab_size={self.vocab_size})"

    @property
    def vocab_size(self) -> int:
        return self.enc.n_vocab

    @property
    def name(self) -> str:
        return self.enc.name

    def encode_special(self, name: str) -> int:
        try:
            return self.special_tokens[name]
        except KeyError:
            raise ValueError(f"{name!r} is not a special token of {self.name!r}; "
                             f"known: {list(self.special_tokens)}") from None

    def _as_ids(self, tok: int | str | None) -> list[int]:
        if tok is None:
            return []
        if isinstance(tok, str):
            return [self.encode_special(tok)]
        if isinstance(tok, (int, np.integer)) and not isinstance(tok, bool) and 0 <= tok < self.vocab_size:
            return [int(tok)]
        raise ValueError(f"prepend/append must be a special token name or an id in [0, {self.vocab_size}), "
                         f"got {tok!r}")

    def encode(self, text: str | Sequence[str], prepend: int | str | None = None, append: int | str | None = None,
               num_threads: int = 8) -> list[int] | list[list[int]]:
        """Ids of `text` (or a list of ids per string for a list). Special tokens are never parsed from text."""
        pre, post = self._as_ids(prepend), self._as_ids(append)
        if isinstance(text, str):
            return pre + self.enc.encode_ordinary(text) + post
        if not isinstance(text, (list, tuple)):
            raise TypeError(f"encode expects a str or a list of str, got {type(text).__name__}")
        for i, t in enumerate(text):
            if not isinstance(t, str):
                raise TypeError(f"encode: item {i} is a {type(t).__name__}, expected str")
        rows = self.enc.encode_ordinary_batch(list(text), num_threads=num_threads)
        return [pre + row + post for row in rows] if pre or post else rows

    __call__ = encode

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`; special tokens decode to their literal names, invalid UTF-8 to U+FFFD."""
        return self.enc.decode(ids.tolist() if hasattr(ids, "tolist") else list(ids))  # also numpy / jax arrays

    def id_to_bytes(self, token_id: int) -> bytes:
        """Raw bytes of one token (a special token gives its name's bytes)."""
        return self.enc.decode_single_token_bytes(int(token_id))

    def _bytes_or_empty(self, token_id: int) -> bytes:
        try:
            return self.enc.decode_single_token_bytes(token_id)
        except KeyError:  # unused ids, e.g. the gaps below cl100k_base's special tokens
            return b""

    def token_bytes(self) -> np.ndarray:
        """int32[vocab_size]: raw byte length per id, 0 for special tokens (the bits-per-byte denominator)."""
        if self._token_bytes is None:
            special_ids = set(self.special_tokens.values())
            self._token_bytes = np.array([0 if i in special_ids else len(self._bytes_or_empty(i))
                                          for i in range(self.vocab_size)], dtype=np.int32)
        return self._token_bytes

    # -- storage -----------------------------------------------------------------------------------

    def mergeable_ranks(self) -> dict[bytes, int]:
        if self._ranks is None:  # e.g. a pretrained encoding: rebuild from the non-special ids
            special_ids = set(self.special_tokens.values())
            self._ranks = {self._bytes_or_empty(i): i for i in range(self.vocab_size) if i not in special_ids}
            self._ranks.pop(b"", None)
        return self._ranks

    def save(self, directory: str | os.PathLike | None = None) -> dict[str, Path]:
        """Write tokenizer.tiktoken, token_bytes.npy and tokenizer.json (each atomically); return their paths."""
        directory = Path(directory) if directory is not None else default_tokenizer_dir()
        directory.mkdir(parents=True, exist_ok=True)
        paths = {"ranks": directory / RANKS_FILE, "meta": directory / META_FILE,
                 "token_bytes": directory / TOKEN_BYTES_FILE}
        with atomic_write(paths["ranks"], "wb") as f:
            for token, rank in sorted(self.mergeable_ranks().items(), key=lambda kv: kv[1]):
                f.write(base64.b64encode(token) + b" " + str(rank).encode() + b"\n")
        with atomic_write(paths["token_bytes"], "wb") as f:
            np.save(f, self.token_bytes(), allow_pickle=False)
        meta = {"name": self.name, "pattern": self.enc._pat_str, "special_tokens": self.special_tokens,
                "bos_token": self.bos_token, "vocab_size": self.vocab_size}
        with atomic_write(paths["meta"], "w") as f:  # written last: its presence marks a complete save
            f.write(json.dumps(meta, indent=2) + "\n")  # ASCII-only: no locale dependence
        return paths

    @classmethod
    def load(cls, directory: str | os.PathLike | None = None) -> "Tokenizer":
        """Our files (tokenizer.tiktoken + tokenizer.json), else nanochat's tokenizer.pkl in the same folder."""
        directory = Path(directory) if directory is not None else default_tokenizer_dir()
        meta_path, ranks_path = directory / META_FILE, directory / RANKS_FILE
        if not meta_path.is_file() and not ranks_path.is_file() and (directory / NANOCHAT_PICKLE).is_file():
            return load_nanochat_tokenizer(directory / NANOCHAT_PICKLE)
        for p in (meta_path, ranks_path):
            if not p.is_file():
                raise FileNotFoundError(f"no tokenizer at {str(directory)!r} ({p.name} missing); "
                                        f"run scripts/tok_train.py first (or pass the right --tokenizer-dir)")
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        ranks = {}
        for lineno, line in enumerate(ranks_path.read_bytes().splitlines(), 1):
            if not line:
                continue
            try:
                token_b64, rank = line.split()
                ranks[base64.b64decode(token_b64, validate=True)] = int(rank)
            except ValueError as e:
                raise UserError(f"{ranks_path}:{lineno}: corrupt line {line[:80]!r} ({e})") from None
        specials = {str(k): int(v) for k, v in meta["special_tokens"].items()}
        enc = _encoding(ranks_path, meta.get("name", "rustbpe"), meta["pattern"], ranks, specials)
        if enc.n_vocab != meta["vocab_size"]:
            raise UserError(f"{meta_path}: vocab_size {meta['vocab_size']} but the files define {enc.n_vocab} tokens")
        return cls(enc, bos_token=meta.get("bos_token", "<|bos|>"), mergeable_ranks=ranks)

    @classmethod
    def from_pretrained(cls, name: str) -> "Tokenizer":
        """OpenAI's "gpt2" or "cl100k_base" (BOS = <|endoftext|>). Needs the internet or $TIKTOKEN_CACHE_DIR."""
        import tiktoken

        if name not in PRETRAINED:
            raise ValueError(f"unknown pretrained tokenizer {name!r}; choose one of {sorted(PRETRAINED)}")
        try:
            enc = tiktoken.get_encoding(name)
        except Exception as e:
            raise RuntimeError(f"tiktoken encoding {name!r} is unreachable: it must be downloaded from OpenAI's "
                               f"servers or found in $TIKTOKEN_CACHE_DIR ({type(e).__name__}: {str(e)[:200]})") from e
        return cls(enc, bos_token=PRETRAINED[name])

    # -- chat rendering ----------------------------------------------------------------------------

    def render_conversation(self, conversation: dict, max_tokens: int = 2048) -> tuple[list[int], list[int]]:
        """Token ids of a chat and a same-length mask: 1 where the assistant's tokens are trained on, else 0.

        <|bos|>, then per turn: user  <|user_start|> text <|user_end|>            (all mask 0)
                                 assistant <|assistant_start|>(0) content(1) <|assistant_end|>(1)
        Assistant content is a string or a list of parts: text (1), python wrapped in
        <|python_start|>..<|python_end|> (1), python_output in <|output_start|>..<|output_end|> (0: the tool
        wrote it, the model should not learn to predict it). A leading system message is merged into the first
        user message. The result is cut to max_tokens.
        """
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, (int, np.integer)) or max_tokens < 1:
            raise ValueError(f"max_tokens must be a positive int, got {max_tokens!r}")
        ids: list[int] = [self.bos_id]
        mask: list[int] = [0]

        def add(text: str, m: int, start: str | None = None, end: str | None = None) -> None:
            """Special `start`, the ids of `text`, special `end`; all with mask m."""
            tokens = self._as_ids(start) + self.encode(text) + self._as_ids(end)
            ids.extend(tokens)
            mask.extend([m] * len(tokens))

        for _, role, content in _normalized_messages(conversation):
            if role == "user":
                add(content, 0, "<|user_start|>", "<|user_end|>")
                continue
            add("", 0, start="<|assistant_start|>")
            parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
            for part in parts:
                if part["type"] == "text":
                    add(part["text"], 1)
                elif part["type"] == "python":
                    add(part["text"], 1, "<|python_start|>", "<|python_end|>")
                else:  # python_output
                    add(part["text"], 0, "<|output_start|>", "<|output_end|>")
            add("", 1, end="<|assistant_end|>")
        return ids[:max_tokens], mask[:max_tokens]

    def render_for_completion(self, conversation: dict, max_tokens: int = 2048) -> list[int]:
        """Prompt ids for sampling the last assistant reply: drop that reply, render, append <|assistant_start|>."""
        _normalized_messages(conversation)  # the dropped reply must be well-formed too
        messages = conversation["messages"]
        if messages[-1]["role"] != "assistant":
            raise ValueError(f"render_for_completion: the last message (index {len(messages) - 1}) must be from the "
                             f"assistant (it is the reply to be completed), got role {messages[-1]['role']!r}")
        conversation = {**conversation, "messages": copy.deepcopy(messages[:-1])}
        ids, _ = self.render_conversation(conversation, max_tokens=max_tokens)
        return ids + [self.encode_special("<|assistant_start|>")]


def _encoding(path: Path, name: str, pattern: str, ranks: dict[bytes, int], specials: dict[str, int]):
    """tiktoken Encoding of what `path` holds, else a UserError naming the file."""
    import tiktoken

    if sorted(ranks.values()) != list(range(len(ranks))):
        raise UserError(f"{path}: token ranks are not 0..{len(ranks) - 1} without gaps; the file is corrupt")
    try:
        return tiktoken.Encoding(name=name, pat_str=pattern, mergeable_ranks=ranks, special_tokens=specials)
    except Exception as e:  # tiktoken validates the regex and the ids
        raise UserError(f"{path}: tiktoken rejects the encoding it holds ({type(e).__name__}: {e})") from None


# ----------------------------------------------------------------------------------------------
# nanochat's tokenizer.pkl, without running pickle code

class _PickledEncoding:
    """Stands in for tiktoken.core.Encoding while unpickling: keeps the state its __getstate__ wrote (a dict of
    name/pat_str/mergeable_ranks/special_tokens, or a registered encoding's name)."""

    state = None

    def __setstate__(self, state):
        self.state = state


class _TiktokenUnpickler(pickle.Unpickler):
    """Admits one global, tiktoken.core.Encoding (as _PickledEncoding), and plain data: nothing is imported or
    called."""

    def find_class(self, module, name):
        if (module, name) == ("tiktoken.core", "Encoding"):
            return _PickledEncoding
        raise pickle.UnpicklingError(f"it refers to {module}.{name}, which a tiktoken encoding never does")

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("it holds persistent references, which a tiktoken encoding never does")


def _encoding_state(path: Path) -> dict | str:
    try:
        obj = _TiktokenUnpickler(io.BytesIO(path.read_bytes())).load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError) as e:
        raise UserError(f"{path}: not a pickled tiktoken encoding as nanochat writes it ({e}); refused without "
                        f"running it. Re-save it with nanochat's tokenizer (RustBPETokenizer.save) or pass another "
                        f"tokenizer directory") from None
    state = obj.state if isinstance(obj, _PickledEncoding) else None
    if isinstance(state, str):
        return state
    fields = {"name": str, "pat_str": str, "mergeable_ranks": dict, "special_tokens": dict}
    bad = [k for k, t in fields.items() if not isinstance(state, dict) or not isinstance(state.get(k), t)]
    if bad:
        raise UserError(f"{path}: the pickled object is not a tiktoken Encoding's state (bad or missing {bad}); "
                        f"pass the tokenizer.pkl nanochat's tok_train.py wrote")
    if not all(isinstance(k, bytes) and type(v) is int for k, v in state["mergeable_ranks"].items()) or \
            not all(isinstance(k, str) and type(v) is int for k, v in state["special_tokens"].items()):
        raise UserError(f"{path}: mergeable_ranks must map bytes to int and special_tokens str to int; the file "
                        f"is corrupt or not nanochat's")
    return state


def load_nanochat_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """A Tokenizer from nanochat's tokenizer.pkl (no pickle code runs). BOS is <|bos|> for a trained tokenizer,
    <|endoftext|> for a pickled GPT-2/cl100k reference encoding."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} does not exist; pass the folder holding nanochat's tokenizer.pkl")
    state = _encoding_state(path)
    if isinstance(state, str):
        if state not in PRETRAINED:
            raise UserError(f"{path}: a pickled reference to tiktoken encoding {state!r}, which is not one of "
                            f"{sorted(PRETRAINED)}; pass a trained nanochat tokenizer")
        return Tokenizer.from_pretrained(state)
    enc = _encoding(path, state["name"], state["pat_str"], state["mergeable_ranks"], state["special_tokens"])
    bos = "<|bos|>" if "<|bos|>" in state["special_tokens"] else "<|endoftext|>"
    if bos not in state["special_tokens"]:
        raise UserError(f"{path}: the encoding has no <|bos|> special token (it has "
                        f"{sorted(state['special_tokens'])}); nanochat's tokenizers always do")
    return Tokenizer(enc, bos_token=bos, mergeable_ranks=dict(state["mergeable_ranks"]))


# ----------------------------------------------------------------------------------------------
# Conversation validation (render_conversation and render_for_completion)

_PART_TYPES = ("text", "python", "python_output")


def _normalized_messages(conversation) -> list[tuple[int, str, str | list]]:
    """Validated (original index, role, content) triples with a leading system message merged into the user one."""
    if not isinstance(conversation, dict):
        raise ValueError(f"conversation must be a dict with a 'messages' list, got {type(conversation).__name__}")
    if "messages" not in conversation:
        raise ValueError(f"conversation has no 'messages' key (keys: {sorted(conversation)})")
    messages = conversation["messages"]
    if not isinstance(messages, list):
        raise ValueError(f"conversation['messages'] must be a list, got {type(messages).__name__}")
    if not messages:
        raise ValueError("conversation['messages'] is empty")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ValueError(f"message {i} must be a dict with 'role' and 'content', got {m!r:.100}")
    out = [(i, m["role"], m["content"]) for i, m in enumerate(messages)]
    if out[0][1] == "system":
        if not isinstance(out[0][2], str):
            raise ValueError(f"message 0: system content must be a str, got {type(out[0][2]).__name__}")
        if len(out) < 2 or out[1][1] != "user" or not isinstance(out[1][2], str):
            raise ValueError("message 1: a system message must be followed by a user message with str content")
        out = [(1, "user", out[0][2] + "\n\n" + out[1][2])] + out[2:]
    for turn, (i, role, content) in enumerate(out):
        expected = "user" if turn % 2 == 0 else "assistant"
        if role != expected:
            raise ValueError(f"message {i}: expected role {expected!r} (roles alternate user/assistant, starting "
                             f"with user; only message 0 may be 'system'), got {role!r}")
        if role == "user":
            if not isinstance(content, str):
                raise ValueError(f"message {i}: user content must be a str, got {type(content).__name__}")
        elif isinstance(content, list):
            for j, part in enumerate(content):
                if not isinstance(part, dict) or part.get("type") not in _PART_TYPES:
                    raise ValueError(f"message {i}, part {j}: expected a dict with type in {_PART_TYPES}, "
                                     f"got {part!r:.100}")
                if not isinstance(part.get("text"), str):
                    raise ValueError(f"message {i}, part {j}: 'text' must be a str, got {part.get('text')!r:.100}")
        elif not isinstance(content, str):
            raise ValueError(f"message {i}: assistant content must be a str or a list of parts, "
                             f"got {type(content).__name__}")
    return out


# ----------------------------------------------------------------------------------------------
# Convenience loaders

def get_tokenizer(directory: str | os.PathLike | None = None) -> Tokenizer:
    """The trained tokenizer in `directory` (default <base dir>/tokenizer)."""
    return Tokenizer.load(directory)


def get_token_bytes(directory: str | os.PathLike | None = None) -> np.ndarray:
    """int32[vocab_size] byte length per token id (0 for specials), for bits-per-byte."""
    directory = Path(directory) if directory is not None else default_tokenizer_dir()
    path = directory / TOKEN_BYTES_FILE
    if not path.is_file() and (directory / NANOCHAT_PICKLE).is_file():
        return load_nanochat_tokenizer(directory / NANOCHAT_PICKLE).token_bytes()  # from the tokenizer itself
    if not path.is_file():
        raise FileNotFoundError(f"no {TOKEN_BYTES_FILE} in {str(directory)!r}; run scripts/tok_train.py first "
                                f"(or pass the right --tokenizer-dir)")
    token_bytes = np.load(path, allow_pickle=False)
    if token_bytes.ndim != 1 or token_bytes.dtype != np.int32:
        raise ValueError(f"{path}: expected a 1-D int32 array, got {token_bytes.dtype}{list(token_bytes.shape)}")
    return token_bytes
