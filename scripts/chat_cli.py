"""Chat with a trained model in the terminal, replies streamed as they are generated.

    python scripts/chat_cli.py                         # the largest SFT model, interactive
    python scripts/chat_cli.py -i base -p "hello"     # one shot from the base model, then exit
    python scripts/chat_cli.py -i rl --model-tag=d20 --step=500 -t 0.8 -k 50 --max-tokens=512

Type `clear` to start a new conversation, `quit` or `exit` (or Ctrl-D) to leave. The conversation is kept as
tokens: <|bos|> then per turn <|user_start|> text <|user_end|> <|assistant_start|> reply <|assistant_end|>; each
reply is generated from the whole conversation so far (with the calculator tool, as the engine does it).

Context. Prompt + reply never exceed the model's sequence_len: a reply is cut to the room left, and when less
than min(--max-tokens, a quarter of the context) is left the oldest turns are dropped, with a one-line note.
stdout carries only the conversation; notes go to stderr, and so do log lines (compilations), with -v only.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import sys
from dataclasses import dataclass

from nanochat_jax.common import get_logger, run_main
from nanochat_jax.config import CHECKPOINT_TOKENIZER, flag, parse_flags, print_config, require

PHASES = ("base", "mid", "sft", "rl")


@dataclass(frozen=True)
class ChatConfig:
    """Interactive chat with a checkpoint (see the module docstring)."""
    source: str = flag("sft", "checkpoint phase: base|mid|sft|rl (-i)")
    model_tag: str | None = flag(None, "default: the largest d<N> of the phase")
    step: int | None = flag(None, "default: the latest step")
    prompt: str = flag("", "one-shot prompt: answer it and exit (-p)")
    temperature: float = flag(0.6, "0 = greedy (-t)")
    top_k: int = flag(50, "0 = off (-k)")
    max_tokens: int = flag(256, "per reply")
    seed: int = flag(42, "turn i samples with seed + i")
    verbose: bool = flag(False, "show the config and log lines (model loading, compilations) on stderr (-v)")
    # not RuntimeFlags: the chat runs on one device with the checkpoint's own compute dtype and attention
    tokenizer_dir: str | None = flag(None, CHECKPOINT_TOKENIZER)

    def __post_init__(self):
        require(self.source in PHASES, f"-i/--source must be one of {PHASES}, got {self.source!r}")
        require(self.temperature >= 0, f"-t/--temperature must be >= 0, got {self.temperature}")
        require(self.top_k >= 0, f"-k/--top-k must be >= 0 (0 = off), got {self.top_k}")
        require(self.max_tokens >= 1, f"--max-tokens must be >= 1, got {self.max_tokens}")


ALIASES = {"-i": "source", "-p": "prompt", "-t": "temperature", "-k": "top_k", "-v": "verbose"}


def note(text: str) -> None:
    """A message about the chat, not part of it: stderr."""
    print(text, file=sys.stderr, flush=True)


@contextlib.contextmanager
def logs_to_stderr(verbose: bool):
    """While inside: the package's log lines go to stderr, and only with verbose (else warnings and up)."""
    log = get_logger()
    saved = log.handlers[:]
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(saved[0].formatter if saved else None)
    handler.setLevel(logging.INFO if verbose else logging.WARNING)
    log.handlers = [handler]
    try:
        yield
    finally:
        log.handlers = saved


def reply(engine, tokenizer, conversation: list[int], max_tokens: int, cfg: ChatConfig, seed: int) -> list[int]:
    """Stream one assistant reply (at most max_tokens) to stdout; return its tokens, ending with <|assistant_end|>.
    Only complete UTF-8 text is printed: a multi-byte character can span tokens."""
    tokens, printed = [], 0
    for i, (column, _) in enumerate(engine.generate(conversation, max_tokens=max_tokens,
                                                    temperature=cfg.temperature, top_k=cfg.top_k, seed=seed)):
        if i == 0:  # after the wait for the prefill (and any compilation)
            print("\nAssistant: ", end="", flush=True)
        if column[0] in engine.stop_ids:
            break
        tokens.append(column[0])
        text = tokenizer.decode(tokens)
        if not text.endswith("\ufffd"):
            print(text[printed:], end="", flush=True)
            printed = len(text)
    print(flush=True)
    return tokens + [tokenizer.encode_special("<|assistant_end|>")]  # also closes a reply cut off by max_tokens


def main(argv=None) -> None:
    cfg = parse_flags(ChatConfig, argv, aliases=ALIASES)
    with logs_to_stderr(cfg.verbose):
        chat(cfg)


def chat(cfg: ChatConfig) -> None:
    if cfg.verbose:
        print_config(cfg, file=sys.stderr)
    from nanochat_jax.checkpoint import load_model, load_tokenizer, require_same_vocab
    from nanochat_jax.engine import Engine

    params, model_cfg, meta = load_model(cfg.source, cfg.model_tag, cfg.step)
    tokenizer = load_tokenizer(meta, cfg.tokenizer_dir)
    require_same_vocab(model_cfg, tokenizer, f"the {cfg.source} model")
    engine = Engine(params, model_cfg, tokenizer)
    del params
    user_start, user_end, assistant_start = map(tokenizer.encode_special, ("<|user_start|>", "<|user_end|>",
                                                                           "<|assistant_start|>"))
    context = model_cfg.sequence_len
    reserve = min(cfg.max_tokens, context // 4)  # room a reply gets before the oldest turns go
    note(f"nanochat-jax: {cfg.source} model, step {meta.get('step')}, {context}-token context. Type 'clear' to "
         f"start over, 'quit' or 'exit' to leave.")
    turns: list[list[int]] = []  # whole turns: user message and reply
    replies = 0
    while True:
        if cfg.prompt:
            message = cfg.prompt
            print(f"\nUser: {message}")
        else:
            try:
                message = input("\nUser: ").strip()
            except (EOFError, KeyboardInterrupt):
                print()
                return
            if message.lower() in ("quit", "exit"):
                return
            if message.lower() == "clear":
                turns = []
                note("(conversation cleared)")
                continue
            if not message:
                continue
        turn = [user_start, *tokenizer.encode(message), user_end, assistant_start]
        if 1 + len(turn) >= context:
            too_long = f"(that message is {len(turn)} tokens; this model's context is {context} tokens: shorten it)"
            if cfg.prompt:
                raise SystemExit(too_long)
            note(too_long)
            continue
        dropped = len(turns)  # the oldest turns go until <|bos|> + turns + turn leave `reserve` for the reply
        while turns and 1 + sum(map(len, turns)) + len(turn) + reserve > context:
            turns.pop(0)
        dropped -= len(turns)
        prompt = [tokenizer.bos_id, *itertools.chain(*turns), *turn]
        if dropped:
            note(f"(the chat outgrew this model's {context}-token context: dropped the oldest {dropped} turn(s); "
                 f"'clear' starts over)")
        elif len(prompt) > context * 3 // 4:
            note(f"(the chat is {len(prompt)} of this model's {context} context tokens: the oldest turns will be "
                 f"dropped when it is full; 'clear' starts over)")
        max_tokens = min(cfg.max_tokens, context - len(prompt))
        answer = reply(engine, tokenizer, prompt, max_tokens, cfg, seed=cfg.seed + replies)
        if max_tokens < cfg.max_tokens and len(answer) > max_tokens:
            note(f"(the reply was cut at the end of this model's {context}-token context)")
        turns.append(turn + answer)
        replies += 1
        if cfg.prompt:
            return


if __name__ == "__main__":
    run_main(main)
