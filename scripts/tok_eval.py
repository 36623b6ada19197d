"""Compression of our tokenizer vs GPT-2 and GPT-4 (cl100k_base): UTF-8 bytes per token on a few kinds of text.

    python scripts/tok_eval.py [--tokenizer-dir=...] [--data-dir=...]

The baselines come from tiktoken, which downloads them (or reads $TIKTOKEN_CACHE_DIR); offline, they are
reported as unavailable and only our tokenizer's table is printed.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

from nanochat_jax import dataset
from nanochat_jax.common import run_main
from nanochat_jax.config import flag, parse_flags, print_config
from nanochat_jax.report import get_report
from nanochat_jax.tokenizer import Tokenizer, get_tokenizer

NEWS = """\
Officials in the harbour town of Westmere confirmed on Tuesday that the ferry service to the outer islands will \
resume next month, ending a suspension that began after storms damaged the main pier in February. The regional \
transport authority said repairs cost about $4.2 million, roughly 30% more than first estimated, because divers \
found cracks in two support columns. "We know families and small businesses have struggled," said the authority's \
director, adding that the first sailing is scheduled for 7:15 a.m. on the 12th. Fares will stay at last year's level \
until at least the end of the summer season."""

KOREAN = """\
도서관은 오전 아홉 시에 문을 엽니다. 주말에는 아이들을 위한 그림책 읽기 모임이 열리고, 평일 저녁에는 \
어른들을 위한 글쓰기 강좌가 있습니다. 새로 들어온 책은 입구 옆 진열대에서 먼저 확인할 수 있으며, \
대출 기간은 이 주일입니다. 궁금한 점이 있으면 안내 데스크에 계신 사서에게 편하게 물어보세요."""

CODE = """\
class RunningMean:
    \"\"\"Mean of a stream of numbers without storing them.\"\"\"

    def __init__(self):
        self.count = 0
        self.total = 0.0

    def update(self, value: float) -> float:
        self.count += 1
        self.total += value
        return self.total / self.count


def chunks(items, size):
    for start in range(0, len(items), size):
        yield items[start:start + size]


if __name__ == "__main__":
    rm = RunningMean()
    for batch in chunks(list(range(100)), 8):
        print(f"{len(batch):3d} -> {rm.update(sum(batch) / len(batch)):.3f}")
"""

MATH = r"""\begin{theorem}
Let $f:[a,b]\to\mathbb{R}$ be continuous and differentiable on $(a,b)$. Then there is $c\in(a,b)$ with
\[ f'(c) = \frac{f(b)-f(a)}{b-a}. \]
\end{theorem}
\begin{proof}
Define $g(x) = f(x) - \frac{f(b)-f(a)}{b-a}(x-a)$. Then $g(a)=g(b)=f(a)$, so by Rolle's theorem some
$c$ satisfies $g'(c)=0$, i.e. $\sum_{i=1}^{n} \alpha_i x_i \le \int_a^b |f'(t)|\,dt$ holds with equality iff $n=1$.
\end{proof}"""

SCIENCE = """\
Photosynthesis in most plants takes place in the chloroplasts, where chlorophyll absorbs mainly red and blue \
light. The light-dependent reactions split water molecules, releasing oxygen and producing the energy carriers ATP \
and NADPH. In the Calvin cycle these carriers drive the fixation of carbon dioxide into three-carbon sugars, a step \
catalysed by the enzyme RuBisCO. Because RuBisCO also reacts with oxygen, some species have evolved C4 or CAM \
pathways that concentrate carbon dioxide around the enzyme and reduce wasteful photorespiration in hot, dry climates."""

SAMPLES = {"news": NEWS, "korean": KOREAN, "code": CODE, "math": MATH, "science": SCIENCE}
BASELINES = {"GPT-2": "gpt2", "GPT-4": "cl100k_base"}


@dataclass(frozen=True)
class TokEvalConfig:
    """Compare our tokenizer's compression with GPT-2 and GPT-4."""
    tokenizer_dir: str | None = flag(None, "tokenizer folder (None: <base dir>/tokenizer)")
    data_dir: str | None = flag(None, "parquet shards for the train/val samples")


def shard_samples(data_dir: str | None) -> dict[str, str]:
    """First row group of the first train shard and of the val shard; empty (with a note) when there is no data."""
    try:
        files = dataset.list_parquet_files(dataset.resolve_data_dir(data_dir))
        paths = {"data-train": dataset.split_files(files, "train")[0], "data-val": dataset.split_files(files, "val")[0]}
    except (FileNotFoundError, ValueError) as e:
        print(f"note: no shard samples ({e})")
        return {}
    return {name: "\n".join(dataset.read_shard_texts(dataset.open_shard(p), p, 0)) for name, p in paths.items()}


def compression(tokenizer: Tokenizer, text: str) -> tuple[int, int, float]:
    """(utf-8 bytes, tokens, bytes per token)."""
    n_bytes, n_tokens = len(text.encode("utf-8")), len(tokenizer.encode(text))
    return n_bytes, n_tokens, n_bytes / max(n_tokens, 1)


def main(argv=None) -> None:
    cfg = parse_flags(TokEvalConfig, argv)
    print_config(cfg)
    ours = get_tokenizer(cfg.tokenizer_dir)
    texts = {**SAMPLES, **shard_samples(cfg.data_dir)}
    results = {name: compression(ours, text) for name, text in texts.items()}

    print(f"\nOurs ({ours.name}, vocab {ours.vocab_size:,})")
    print(f"{'text':<12} {'bytes':>9} {'tokens':>9} {'ratio':>7}")
    for name, (n_bytes, n_tokens, ratio) in results.items():
        print(f"{name:<12} {n_bytes:>9,} {n_tokens:>9,} {ratio:>7.2f}")
    ratios = {f"{name} bytes/token": ratio for name, (_, _, ratio) in results.items()}
    get_report().log("Tokenizer evaluation", {"vocab_size": ours.vocab_size, **ratios})

    for label, enc_name in BASELINES.items():
        try:
            baseline = Tokenizer.from_pretrained(enc_name)
        except RuntimeError as e:
            print(f"\n{label} ({enc_name}): not available offline ({e})")
            continue
        print(f"\nOurs vs {label} ({enc_name}, vocab {baseline.vocab_size:,}); "
              f"diff % = (baseline tokens - ours) / baseline tokens, positive = ours is better")
        print(f"{'text':<12} {'bytes':>9} {label + ' tok':>10} {label + ' ratio':>12} {'ours tok':>9} "
              f"{'ours ratio':>10} {'diff %':>8}")
        for name, text in texts.items():
            n_bytes, ours_tokens, ours_ratio = results[name]
            _, base_tokens, base_ratio = compression(baseline, text)
            diff = 100.0 * (base_tokens - ours_tokens) / max(base_tokens, 1)
            print(f"{name:<12} {n_bytes:>9,} {base_tokens:>10,} {base_ratio:>12.2f} {ours_tokens:>9,} "
                  f"{ours_ratio:>10.2f} {diff:>+7.1f}%")


if __name__ == "__main__":
    run_main(main, sys.argv[1:])
