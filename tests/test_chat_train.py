"""Midtraining and SFT end to end on CPU, on real conversations from ../shared/data (LocalChat)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import shared_data
from nanochat_jax import gpt
from nanochat_jax.chat_train import ChatTrainConfig, chat_train, lr_multiplier
from nanochat_jax.checkpoint import Checkpointer, checkpoint_dir
from nanochat_jax.dataloader import ConversationPacker
from nanochat_jax.tokenizer import train_tokenizer

T_LEN = 128


class Subset:
    def __init__(self, data, n):
        self.data, self.n = data, n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return self.data[i]


@pytest.fixture(scope="module")
def chats():
    from nanochat_jax.tasks import LocalChat

    root = shared_data()
    return LocalChat("train", data_dir=root), LocalChat("test", data_dir=root)


@pytest.fixture(scope="module")
def tok_dir(chats, tmp_path_factory):
    train, _ = chats
    texts = [m["content"] for i in range(300) for m in train[i]["messages"] if isinstance(m["content"], str)]
    tok = train_tokenizer(iter(texts), vocab_size=512)
    d = tmp_path_factory.mktemp("tok")
    tok.save(d)
    return str(d)


def make_base_checkpoint(tag="d2", vocab=512):
    """A random-init 'base' checkpoint written the way pretraining writes it."""
    cfg = gpt.GPTConfig.from_depth(2, aspect_ratio=64, head_dim=32, max_seq_len=T_LEN, vocab_size=vocab,
                                   compute_dtype="float32", short_window=32)
    params = gpt.init_params(cfg, jax.random.key(0))
    meta = {"step": 0, "model_config": cfg.to_dict(), "max_seq_len": T_LEN, "device_batch_size": 2,
            "total_batch_size": 2 * T_LEN * 2,
            "user_config": {"matrix_lr": 0.02, "embedding_lr": 0.3, "unembedding_lr": 0.008, "scalar_lr": 0.5}}
    with Checkpointer(checkpoint_dir("base", tag), async_save=False) as ck:
        ck.save(0, params=params, meta=meta)
    return cfg


def cfg_for(tok_dir, **kw):
    base = dict(tokenizer_dir=tok_dir, mesh=2, eval_every=-1, eval_tokens=2 * T_LEN * 2, log_every=10,
                chatcore_tasks="")
    return ChatTrainConfig(**{**base, **kw})


def test_lr_schedules():
    assert lr_multiplier(0.0, 0.5) == 1.0 and lr_multiplier(0.49, 0.5) == 1.0
    assert lr_multiplier(0.75, 0.5) == pytest.approx(0.5) and lr_multiplier(1.0, 0.5) == 0.0
    assert lr_multiplier(0.9, 0.2, final_lr_frac=0.1) == pytest.approx(0.5 * 1 + 0.5 * 0.1)


@pytest.mark.slow
def test_sft_loss_drops_on_real_conversations(chats, tok_dir):
    make_base_checkpoint()
    train, val = chats
    # The lr flags are for 2^19-token batches and get scaled by sqrt(B / 2^19), like pretraining's: flags of
    # 1 / scale give this 1,024-token batch lr 0.02 / 0.3 / 0.008 / 0.5 (the report section shows the effective lrs).
    batch = 4 * T_LEN * 2
    scale = (batch / 2**19) ** 0.5
    lrs = {"matrix_lr": 0.02 / scale, "embedding_lr": 0.3 / scale, "unembedding_lr": 0.008 / scale,
           "scalar_lr": 0.5 / scale}
    loop = chat_train(cfg_for(tok_dir, stage="sft", source="base", num_iterations=30, eval_every=30,
                              init_lr_frac=1.0, total_batch_size=batch, chatcore_tasks="ARC-Easy|GSM8K",
                              chatcore_max_problems=4, chatcore_max_new_tokens=8, task_data=str(shared_data()), **lrs),
                      train_data=Subset(train, 400), val_data=Subset(val, 40))
    losses = [loss for _, loss in loop.history]
    assert len(losses) == 30
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 1.0, losses
    assert loop.val_bpb is not None and np.isfinite(loop.val_bpb)
    with Checkpointer(checkpoint_dir("sft", "d2")) as ck:
        assert ck.latest_step() == 30
        assert ck.read_meta()["source"] == "base/d2/0"
    from nanochat_jax.report import get_report
    [sft] = [get_report().metrics(s) for s in get_report().sections() if s["section"] == "Chat SFT"]
    assert sft["steps"] == 30 and sft["final val bpb"] == loop.val_bpb
    assert sft["batch lr scale"] == pytest.approx(scale) and sft["matrix_lr"] == pytest.approx(0.02)
    assert 0 <= sft["last eval ARC-Easy"] <= 1 and "last eval ChatCORE_cat" in sft  # the periodic ChatCORE subset


@pytest.mark.slow
def test_mid_runs_one_epoch_then_sft_resumes_exactly(chats, tok_dir):
    make_base_checkpoint()
    train, val = chats
    small, vsmall = Subset(train, 24), Subset(val, 8)
    mid = chat_train(cfg_for(tok_dir, stage="mid"), train_data=small, val_data=vsmall)
    # One epoch of 24 conversations at 4 rows × 129 tokens per step: the loop stops by itself when the data wraps.
    steps = len(mid.history)
    assert 3 <= steps <= 10, steps  # ≈ 24 × 123 tokens / 512 per step
    with Checkpointer(checkpoint_dir("mid", "d2")) as ck:
        assert ck.latest_step() == steps
    full = chat_train(cfg_for(tok_dir, stage="sft", model_tag="d2", num_iterations=6, save_every=3),
                      train_data=small, val_data=vsmall)
    again = chat_train(cfg_for(tok_dir, stage="sft", model_tag="d2", num_iterations=6, resume=True),
                       train_data=small, val_data=vsmall)
    # resume=True continues from the latest (step 6 → nothing to do) ... so resume from step 3 explicitly:
    assert again.history == []
    with Checkpointer(checkpoint_dir("sft", "d2")) as ck:
        ck._mngr.delete(6)
    resumed = chat_train(cfg_for(tok_dir, stage="sft", model_tag="d2", num_iterations=6, resume=True),
                         train_data=small, val_data=vsmall)
    assert [s for s, _ in resumed.history] == [3, 4, 5]
    assert [loss for s, loss in full.history if s >= 3] == [loss for _, loss in resumed.history]


def test_masked_loss_counts_only_assistant_tokens(chats, tok_dir):
    """The train step's loss on an SFT batch equals a NumPy CE over exactly the tokens whose render mask is 1."""
    from nanochat_jax.tokenizer import get_tokenizer

    tok = get_tokenizer(tok_dir)
    train, _ = chats
    cfg = gpt.GPTConfig.from_depth(2, aspect_ratio=64, head_dim=32, max_seq_len=T_LEN, vocab_size=tok.vocab_size,
                                   compute_dtype="float32")
    params = gpt.init_params(cfg, jax.random.key(3))
    batch = next(ConversationPacker(Subset(train, 50), tok, 2, T_LEN, mode="sft", buffer_size=10))
    loss = float(gpt.forward(params, jnp.asarray(batch["inputs"]), cfg, targets_BT=jnp.asarray(batch["targets"])))
    logits = np.asarray(gpt.forward(params, jnp.asarray(batch["inputs"]), cfg), np.float64)
    # Independent mask: re-render the conversations in the row and mark assistant tokens (mask 1).
    want_mask = np.zeros_like(batch["targets"], bool)
    for b in range(2):
        row, pos = batch["inputs"][b], 0
        while pos < T_LEN:
            if row[pos] != tok.bos_id:
                pos += 1
                continue
            match = None
            for i in range(50):
                ids, mask = tok.render_conversation(train[i], T_LEN + 1)
                if list(row[pos:pos + len(ids)]) == ids[:T_LEN - pos] and len(ids) > 1:
                    match = (ids, mask)
                    break
            if match is None:  # BOS padding
                pos += 1
                continue
            ids, mask = match
            for j in range(1, len(ids)):
                if pos + j - 1 < T_LEN and mask[j]:
                    want_mask[b, pos + j - 1] = True
            pos += len(ids)
    assert want_mask.sum() > 0 and (want_mask == (batch["targets"] >= 0)).all()
    tgt = np.where(want_mask, batch["targets"], 0)
    lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    nll = lse - np.take_along_axis(logits, tgt[..., None], -1)[..., 0]
    assert loss == pytest.approx(nll[want_mask].mean(), rel=1e-5)


def test_mixtures(monkeypatch):
    from nanochat_jax.chat_train import build_mixture
    from nanochat_jax.tasks import DownloadError

    root = str(shared_data())
    mid = build_mixture(ChatTrainConfig(stage="mid", mixture="local", task_data=root), "train")
    sft = build_mixture(ChatTrainConfig(stage="sft", mixture="local", task_data=root), "train")
    val = build_mixture(ChatTrainConfig(stage="sft", mixture="local", task_data=root), "val")
    # local = LocalChat train + ARC-E/C train + GSM8K train + 300 SimpleSpelling + 300 SpellingBee
    from nanochat_jax.tasks import ARC, GSM8K, LocalChat
    want = (len(LocalChat("train", data_dir=root)) + len(ARC("ARC-Easy", "train", data_dir=root))
            + len(ARC("ARC-Challenge", "train", data_dir=root)) + len(GSM8K("main", "train", data_dir=root)) + 600)
    assert len(mid) == len(sft) == want
    assert len(val) == len(LocalChat("test", data_dir=root)) + 200 + 200
    capped = build_mixture(ChatTrainConfig(stage="sft", mixture="local", task_data=root, max_conversations=50), "train")
    assert len(capped) == 50 and capped[7] == sft[7]
    # The reference mixtures need SmolTalk from HuggingFace: offline that is a clear error, not a hang.
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    with pytest.raises(DownloadError):
        build_mixture(ChatTrainConfig(stage="sft", mixture="default", task_data=root), "train")


@pytest.mark.slow
def test_sft_can_start_from_the_source_optimizer_state(chats, tok_dir):
    """--load-optimizer: the base checkpoint's optimizer state (momentum buffers) is restored into SFT's optimizer."""
    from nanochat_jax import optim

    cfg = make_base_checkpoint(tag="opt")
    params = gpt.init_params(cfg, jax.random.key(0))
    tx = optim.build_optimizer(params, optim.OptimConfig(num_iterations=10, model_dim=cfg.n_embd))
    opt_state = tx.init(params)
    # give the momentum buffers recognisable values, then save them with the base checkpoint
    opt_state = jax.tree.map(lambda a: jnp.full_like(a, 0.5) if a.ndim >= 2 else a, opt_state)
    meta = {"step": 7, "model_config": cfg.to_dict(), "max_seq_len": T_LEN, "device_batch_size": 2}
    with Checkpointer(checkpoint_dir("base", "opt"), async_save=False) as ck:
        ck.save(7, params=params, opt_state=opt_state, meta=meta)
    train, val = chats
    kw = dict(stage="sft", source="base", model_tag="opt", num_iterations=1, eval_every=-1)
    chat_train(cfg_for(tok_dir, **kw, load_optimizer=True), train_data=Subset(train, 30), val_data=Subset(val, 8))
    with Checkpointer(checkpoint_dir("sft", "opt")) as ck:
        with_state = ck.restore(1, abstract_params=jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype,
                                sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0])), params))[0]
    # the same step from a fresh optimizer state moves the matrices differently (the restored momentum counts)
    with Checkpointer(checkpoint_dir("sft", "opt"), async_save=False) as ck:
        ck._mngr.delete(1)
    chat_train(cfg_for(tok_dir, **kw, load_optimizer=False), train_data=Subset(train, 30), val_data=Subset(val, 8))
    with Checkpointer(checkpoint_dir("sft", "opt")) as ck:
        fresh = ck.restore(1, abstract_params=jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype,
                           sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0])), params))[0]
    wq = lambda p: np.asarray(p["blocks"]["attn"]["wq"])  # noqa: E731
    assert not np.allclose(wq(with_state), wq(fresh))
    # without an optimizer state in the source, asking for it is a clear error
    make_base_checkpoint(tag="noopt")
    with pytest.raises(ValueError, match="has no optimizer state"):
        chat_train(cfg_for(tok_dir, **{**kw, "model_tag": "noopt"}, load_optimizer=True),
                   train_data=Subset(train, 30), val_data=Subset(val, 8))
