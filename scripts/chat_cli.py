"""Chat with a trained model in the terminal, replies streamed as they are generated.

    python scripts/chat_cli.py                         # the largest SFT model, interactive
    python scripts/chat_cli.py -i base -p "hello"     # one shot from the base model, then exit
    python scripts/chat_cli.py -i rl --model-tag=d20 --step=500 -t 0.8 -k 50 --max-tokens=512

Type `clear` to start a new conversation, `quit` or `exit` (or Ctrl-D) to leave. The conversation is kept as
tokens: <|bos|> then per turn <|user_start|> text <|user_end|> <|assistant_start|> reply <|assistant_end|>; each
reply is generated from the whole conversation so far (with the calculator tool, as the engine does it).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

from nanochat_jax.config import parse_flags, print_config, require

PHASES = ("base", "mid", "sft", "rl")


@dataclass(frozen=True)
class ChatConfig:
    """Interactive chat with a checkpoint (see the module docstring)."""
    source: str = field(default="sft", metadata={"help": "checkpoint phase: base|mid|sft|rl (-i)"})
    model_tag: str | None = field(default=None, metadata={"help": "default: the largest d<N> of the phase"})
    step: int | None = field(default=None, metadata={"help": "default: the latest step"})
    prompt: str = field(default="", metadata={"help": "one-shot prompt: answer it and exit (-p)"})
    temperature: float = field(default=0.6, metadata={"help": "0 = greedy (-t)"})
    top_k: int = field(default=50, metadata={"help": "0 = off (-k)"})
    max_tokens: int = field(default=256, metadata={"help": "per reply"})
    seed: int = field(default=42, metadata={"help": "turn i samples with seed + i"})
    tokenizer_dir: str | None = field(default=None, metadata={"help": "default: the one the checkpoint was trained "
                                                                      "with, else <base dir>/tokenizer"})

    def __post_init__(self):
        require(self.source in PHASES, f"-i/--source must be one of {PHASES}, got {self.source!r}")
        require(self.temperature >= 0, f"-t/--temperature must be >= 0, got {self.temperature}")
        require(self.top_k >= 0, f"-k/--top-k must be >= 0 (0 = off), got {self.top_k}")
        require(self.max_tokens >= 1, f"--max-tokens must be >= 1, got {self.max_tokens}")


ALIASES = {"-i": "source", "-p": "prompt", "-t": "temperature", "-k": "top_k"}


class StreamPrinter:
    """Prints a reply as tokens arrive, but only complete UTF-8 text (a multi-byte character can span tokens)."""

    def __init__(self, tokenizer, out=sys.stdout):
        self.tokenizer, self.out = tokenizer, out
        self.tokens: list[int] = []
        self.printed = 0

    def add(self, token: int) -> None:
        self.tokens.append(token)
        text = self.tokenizer.decode(self.tokens)
        if not text.endswith("\ufffd"):
            self.out.write(text[self.printed:])
            self.out.flush()
            self.printed = len(text)


def reply(engine, tokenizer, conversation: list[int], cfg: ChatConfig, seed: int) -> list[int]:
    """Stream one assistant reply to stdout; return its tokens, ending with <|assistant_end|>."""
    assistant_end = tokenizer.encode_special("<|assistant_end|>")
    printer = StreamPrinter(tokenizer)
    tokens: list[int] = []
    for i, (column, _) in enumerate(engine.generate(conversation, max_tokens=cfg.max_tokens,
                                                    temperature=cfg.temperature, top_k=cfg.top_k, seed=seed)):
        if i == 0:  # after any compilation log lines
            print("\nAssistant: ", end="", flush=True)
        token = column[0]
        if token in engine.stop_ids:
            break
        tokens.append(token)
        printer.add(token)
    print(flush=True)
    return tokens + [assistant_end]  # also closes a reply cut off by max_tokens


def main(argv=None) -> None:
    cfg = parse_flags(ChatConfig, argv, aliases=ALIASES)
    print_config(cfg)
    from nanochat_jax.checkpoint import load_model, load_tokenizer
    from nanochat_jax.engine import Engine

    params, model_cfg, meta = load_model(cfg.source, cfg.model_tag, cfg.step)
    tokenizer = load_tokenizer(meta, cfg.tokenizer_dir)
    if tokenizer.vocab_size != model_cfg.vocab_size:
        raise SystemExit(f"the tokenizer has {tokenizer.vocab_size} tokens but the model was trained with "
                         f"{model_cfg.vocab_size}; pass the matching --tokenizer-dir")
    engine = Engine(params, model_cfg, tokenizer)
    del params
    sp = tokenizer.encode_special
    bos, user_start, user_end, assistant_start = (sp(s) for s in ("<|bos|>", "<|user_start|>", "<|user_end|>",
                                                                  "<|assistant_start|>"))
    print(f"\nnanochat-jax: {cfg.source} model, step {meta.get('step')}. Type 'clear' to start over, "
          f"'quit' or 'exit' to leave.")
    conversation = [bos]
    turn = 0
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
                conversation = [bos]
                print("(conversation cleared)")
                continue
            if not message:
                continue
        conversation += [user_start, *tokenizer.encode(message), user_end, assistant_start]
        conversation += reply(engine, tokenizer, conversation, cfg, seed=cfg.seed + turn)
        turn += 1
        if cfg.prompt:
            return


if __name__ == "__main__":
    main()
