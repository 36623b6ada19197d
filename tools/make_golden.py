"""Write the golden fixtures under tests/golden/ from nanochat's own PyTorch code (run by hand, never by CI).

The golden tests (tests/test_golden*.py) compare nanochat-jax against numbers produced by the reference itself,
not against a re-derivation written from the same reading of it. This script imports nanochat's modules from a
checkout at a pinned commit and runs them in fp32 on CPU:

    python3.11 -m venv /tmp/torchenv
    /tmp/torchenv/bin/pip install torch==2.13.0 numpy tiktoken rustbpe tokenizers      # the CPU build
    git -C <nanochat clone> archive 92d63d4 | tar -x -C /tmp/nanochat_92d63d4          # current model
    git -C <nanochat clone> archive 7931e09 | tar -x -C /tmp/nanochat_7931e09          # October 2025 ("classic")
    /tmp/torchenv/bin/python tools/make_golden.py --nanochat=/tmp/nanochat_92d63d4 --preset=current
    /tmp/torchenv/bin/python tools/make_golden.py --nanochat=/tmp/nanochat_7931e09 --preset=classic

For each preset it writes
  tests/golden/<preset>.npz   arrays, keyed by nanochat's state-dict names in torch layout (the tests map them to
                              ours with nanochat_jax.convert, so the converter is under test as well):
                              grad0/<key> (gradient at the checkpoint, batch A), sd1/<key> (params after one
                              optimizer step), grad1/<key> (gradient at sd1, batch B), sd2/<key> (after two steps);
                              x_A, y_A, x_B, y_B (int32 batches), logits_A (fp32 logits on batch A),
                              loss_rows_A (per-token loss on batch A), token_bytes, bpb inputs
  tests/golden/<preset>.json  the configs, optimizer settings, loss, bpb, greedy tokens, generator provenance
  tests/golden/nanochat_<preset>/  a nanochat checkpoint directory written by nanochat's own code:
                              model_<step>.pt, meta_<step>.json, tokenizer.pkl, token_bytes.pt

The model is tiny (vocab 300, depth 2, width 32, GQA on the current preset, a short sliding window on its S
layer) and briefly *trained* with nanochat's optimizer first: at init the output projections are zero, so
attention gradients vanish and nothing would be tested. torch.compile is disabled (TORCHDYNAMO_DISABLE=1) so every
op runs eagerly, with eager PyTorch's rounding.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")   # eager: no inductor, no C++ compiler needed
# current nanochat's COMPUTE_DTYPE: fp32 on CPU (the default there anyway)
os.environ.setdefault("NANOCHAT_DTYPE", "float32")

VOCAB = 300
SEQ_LEN = 64          # model context
T = 32                # batch length for logits/grads
B = 2
SHORT_WINDOW = 12     # the current preset's S layer window (nanochat would round T/4 up to 128 > T)
TRAIN_STEPS = 60
GREEDY_TOKENS = 20
SEED = 1337

# Optimizer settings for the two golden steps: constant lr multiplier 1, constant momentum, constant weight decay.
CURRENT_OPT = dict(unembedding_lr=0.008, embedding_lr=0.3, matrix_lr=0.02, weight_decay=0.2, scalar_lr=0.5,
                   momentum=0.95)
CLASSIC_OPT = dict(unembedding_lr=0.004, embedding_lr=0.2, matrix_lr=0.02, weight_decay=0.05, momentum=0.95)


def corpus(nanochat_dir: Path) -> str:
    """Training text: the checkout's own README and docstrings (deterministic for a pinned commit)."""
    parts = [(nanochat_dir / "README.md").read_text(encoding="utf-8")]
    for p in sorted((nanochat_dir / "nanochat").glob("*.py")):
        parts.append(p.read_text(encoding="utf-8"))
    return "\n".join(parts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--nanochat", required=True, help="a nanochat checkout (git archive of the pinned commit)")
    ap.add_argument("--preset", required=True, choices=("current", "classic"),
                    help="current: nanochat 92d63d4's model; classic: the October 2025 (7931e09) model")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "tests" / "golden"),
                    help="folder for the .npz/.json golden files (default: tests/golden)")
    args = ap.parse_args()
    nanochat_dir = Path(args.nanochat).resolve()
    sys.path.insert(0, str(nanochat_dir))

    import numpy as np
    import torch

    torch.manual_seed(SEED)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    from nanochat import gpt as ngpt
    from nanochat import tokenizer as ntok
    from nanochat.engine import Engine
    from nanochat.loss_eval import evaluate_bpb

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    preset = args.preset

    # ---- tokenizer (nanochat's trainer at this commit; the classic one uses the rustbpe crate the pip package ships)
    text = corpus(nanochat_dir)
    tok = ntok.RustBPETokenizer.train_from_iterator(iter([text]), VOCAB)
    assert tok.get_vocab_size() == VOCAB, tok.get_vocab_size()
    special_ids = {tok.encode_special(s) for s in tok.get_special_tokens()}
    token_bytes = torch.tensor([0 if i in special_ids else len(tok.enc.decode_single_token_bytes(i))
                                for i in range(VOCAB)], dtype=torch.int32)
    bos = tok.get_bos_token_id()
    ids = torch.tensor([bos] + tok.encode(text), dtype=torch.long)

    # ---- model
    if preset == "current":
        mcfg = ngpt.GPTConfig(sequence_len=SEQ_LEN, vocab_size=VOCAB, n_layer=2, n_head=2, n_kv_head=1, n_embd=32,
                              window_pattern="SL")
    else:
        mcfg = ngpt.GPTConfig(sequence_len=SEQ_LEN, vocab_size=VOCAB, n_layer=2, n_head=2, n_kv_head=2, n_embd=32)
    with torch.device("meta"):
        model = ngpt.GPT(mcfg)
    model.to_empty(device="cpu")
    model.init_weights()
    if preset == "current":
        model.window_sizes[0] = (SHORT_WINDOW, 0)  # a window shorter than T, so the sliding window is exercised
    model.train()

    def batch(gen):
        starts = torch.randint(0, len(ids) - T - 1, (B,), generator=gen)
        rows = torch.stack([ids[s:s + T + 1] for s in starts.tolist()])
        return rows[:, :-1].contiguous(), rows[:, 1:].contiguous()

    def optimizer(opt_args):
        if preset == "current":
            kw = {k: opt_args[k] for k in ("unembedding_lr", "embedding_lr", "matrix_lr", "weight_decay",
                                           "scalar_lr")}
            opt = model.setup_optimizer(**kw)
            for g in opt.param_groups:
                if g["kind"] == "muon":
                    g["momentum"] = opt_args["momentum"]
            return [opt]
        kw = {k: opt_args[k] for k in ("unembedding_lr", "embedding_lr", "matrix_lr", "weight_decay")}
        opts = model.setup_optimizers(**kw)
        for g in opts[1].param_groups:
            g["momentum"] = opt_args["momentum"]
        return opts

    # ---- brief training, so every block matrix (c_proj included) carries signal
    gen = torch.Generator().manual_seed(SEED)
    train_opts = optimizer(dict(CURRENT_OPT if preset == "current" else CLASSIC_OPT, weight_decay=0.0))
    for _ in range(TRAIN_STEPS):
        x, y = batch(gen)
        loss = model(x, y)
        loss.backward()
        for o in train_opts:
            o.step()
        model.zero_grad(set_to_none=True)
    print(f"[{preset}] trained {TRAIN_STEPS} steps, last loss {loss.item():.4f}", file=sys.stderr)
    model.zero_grad(set_to_none=True)

    def state_dict():
        return {k.removeprefix("_orig_mod."): v.detach().clone() for k, v in model.state_dict().items()}

    sd0 = state_dict()
    sd0_module = model.state_dict()  # what nanochat's base_train saves (an OrderedDict with _metadata) ...
    for k in sd0_module:
        sd0_module[k] = sd0_module[k].clone()  # ... as of now: the optimizer steps below update in place
    x_A, y_A = batch(gen)
    x_B, y_B = batch(gen)

    # ---- forward: logits, loss, per-token losses, bpb
    model.eval()
    with torch.no_grad():
        logits_A = model(x_A).float()
        loss_A = model(x_A, y_A).item()
        loss_rows_A = model(x_A, y_A, loss_reduction="none").view(B, T).float()
        bpb_A = evaluate_bpb(model, [(x_A, y_A), (x_B, y_B)], 2, token_bytes)
    model.train()

    # ---- greedy tokens through nanochat's Engine (KV cache path)
    prompt = [bos] + tok.encode("The model")
    engine = Engine(model, tok)
    model.eval()
    with torch.no_grad():
        gen_rows, _ = engine.generate_batch(prompt, num_samples=1, max_tokens=GREEDY_TOKENS, temperature=0.0,
                                            seed=0)
        # the smallest top-1/top-2 margin along the greedy path (a near-tie would make the test fragile)
        full = torch.tensor([gen_rows[0]], dtype=torch.long)
        lg = model(full)[0, len(prompt) - 1:-1] if full.shape[1] > len(prompt) else None
        margin = None
        if lg is not None:
            top2 = torch.topk(lg.float(), 2, dim=-1).values
            margin = float((top2[:, 0] - top2[:, 1]).min())
    model.train()

    # ---- two optimizer steps from a fresh optimizer state: grad at sd0 on A, step, grad at sd1 on B, step
    opt_args = CURRENT_OPT if preset == "current" else CLASSIC_OPT
    opts = optimizer(opt_args)
    grads, sds = [], [sd0]
    for xb, yb in ((x_A, y_A), (x_B, y_B)):
        model.zero_grad(set_to_none=True)
        model(xb, yb).backward()
        named = {k.removeprefix("_orig_mod."): p for k, p in model.named_parameters()}
        grads.append({k: p.grad.detach().clone() for k, p in named.items()})  # classic Muon edits p.grad in place
        for o in opts:
            o.step()
        sds.append(state_dict())
    model.zero_grad(set_to_none=True)

    # ---- write
    arrays = {"x_A": x_A.numpy().astype(np.int32), "y_A": y_A.numpy().astype(np.int32),
              "x_B": x_B.numpy().astype(np.int32), "y_B": y_B.numpy().astype(np.int32),
              "logits_A": logits_A.numpy(), "loss_rows_A": loss_rows_A.numpy(),
              "token_bytes": token_bytes.numpy()}
    for name, d in (("grad0", grads[0]), ("grad1", grads[1]), ("sd1", sds[1]), ("sd2", sds[2])):
        for k, v in d.items():
            arrays[f"{name}/{k}"] = v.float().numpy()
    if preset == "classic":
        # nanochat/muon.py `zeropower_via_newtonschulz5` itself (bf16, eager) on a wide, a tall and a square matrix
        from nanochat.muon import zeropower_via_newtonschulz5
        g = torch.Generator().manual_seed(SEED + 1)
        for i, shape in enumerate(((24, 40), (40, 24), (32, 32))):
            m = torch.randn(shape, generator=g)
            arrays[f"ns_in{i}"] = m.numpy()
            arrays[f"ns_out{i}"] = zeropower_via_newtonschulz5(m, steps=5).float().numpy()
    np.savez_compressed(out / f"{preset}.npz", **arrays)

    ckpt_dir = out / f"nanochat_{preset}"
    ckpt_dir.mkdir(exist_ok=True)
    step = TRAIN_STEPS
    from nanochat.checkpoint_manager import save_checkpoint
    meta = {"step": step, "model_config": dict(vars(mcfg)), "val_bpb": bpb_A}
    for stale in ckpt_dir.glob("*_*.*"):
        stale.unlink()
    save_checkpoint(str(ckpt_dir), step, sd0_module, None, meta)
    tok.save(str(ckpt_dir))  # tokenizer.pkl (a pickled tiktoken Encoding)
    with open(ckpt_dir / "token_bytes.pt", "wb") as f:
        torch.save(token_bytes, f)

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=nanochat_dir, capture_output=True,
                                text=True).stdout.strip()
    except OSError:
        commit = ""
    info = {
        "preset": preset,
        "nanochat_checkout": nanochat_dir.name,
        "nanochat_commit": commit or nanochat_dir.name.rsplit("_", 1)[-1],
        "torch": torch.__version__,
        "nanochat_model_config": dict(vars(mcfg)),
        "window_sizes": [list(w) for w in getattr(model, "window_sizes", [])],
        "checkpoint_step": step,
        "batch": [B, T],
        "optimizer": opt_args,
        "loss_A": loss_A,
        "bpb": bpb_A,
        "greedy": {"prompt": prompt, "tokens": gen_rows[0][len(prompt):], "max_tokens": GREEDY_TOKENS,
                   "min_top2_margin": margin},
        "sha256_npz": hashlib.sha256((out / f"{preset}.npz").read_bytes()).hexdigest(),
    }
    (out / f"{preset}.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    sizes = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"[{preset}] loss {loss_A:.6f} bpb {bpb_A:.6f} greedy {info['greedy']['tokens']} margin {margin}; "
          f"fixtures now {sizes / 1e6:.2f} MB", file=sys.stderr)


if __name__ == "__main__":
    main()
