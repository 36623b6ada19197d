"""ConversationPacker: SFT best fit with BOS padding (never crops), midtraining best fit with crop, masks, resume."""

import random

import numpy as np
import pytest

from nanochat_jax.dataloader import ConversationPacker
from nanochat_jax.tokenizer import train_tokenizer

WORDS = "the cat sat on a mat and then it ran far away to see what was there in the big wide world".split()


def random_conversations(n, seed=0):
    rng = random.Random(seed)
    convs = []
    for i in range(n):
        msgs = []
        for turn in range(rng.choice([1, 1, 2, 3])):
            words = " ".join(rng.choices(WORDS, k=rng.randint(1, 30)))
            msgs.append({"role": "user", "content": f"q{i}.{turn} {words}"})
            if rng.random() < 0.3:
                content = [{"type": "text", "text": "let me compute"}, {"type": "python", "text": "2+3"},
                           {"type": "python_output", "text": "5"}, {"type": "text", "text": " so 5"}]
            else:
                content = " ".join(rng.choices(WORDS, k=rng.randint(1, 40)))
            msgs.append({"role": "assistant", "content": content})
        convs.append({"messages": msgs})
    return convs


@pytest.fixture(scope="module")
def setup():
    convs = random_conversations(60)
    texts = [m["content"] if isinstance(m["content"], str) else "let me compute 2+3 5"
             for c in convs for m in c["messages"]]
    return convs, train_tokenizer(iter(texts), vocab_size=380)


def split_row(ids, bos):
    starts = list(np.flatnonzero(ids == bos)) + [len(ids)]
    return [(a, ids[a:b]) for a, b in zip(starts[:-1], starts[1:])]


def test_sft_rows_hold_whole_conversations_and_mask_correctly(setup):
    convs, tok = setup
    T = 96
    renders = [tok.render_conversation(c, max_tokens=T + 1) for c in convs]
    packer = ConversationPacker(convs, tok, batch_size=3, seq_len=T, mode="sft", buffer_size=10)
    seen = []
    while packer.epoch == 0:
        batch = next(packer)
        for b in range(3):
            tgt = batch["targets"][b]
            for start, seg in split_row(batch["inputs"][b], tok.bos_id):
                if len(seg) == 1 and (start + 1 == T or tgt[start] == -1 and start + 1 < T
                                      and batch["inputs"][b][start + 1] == tok.bos_id):
                    assert tgt[start] == -1  # padding predicts nothing
                    continue
                # A whole conversation: find it by its exact ids (the row input drops the last target only).
                matches = [i for i, (ids, _) in enumerate(renders) if ids[:len(seg)] == list(seg)
                           and (len(ids) == len(seg) or start + len(seg) == T)]
                assert matches, f"row {b} holds a segment that is not the start of any conversation"
                i = matches[0]
                ids, mask = renders[i]
                n = len(ids)
                assert start + n <= T + 1, "a conversation was cropped"
                seen.append(i)
                # targets: next token where its mask is 1, else -1
                for j in range(n - 1):
                    want = ids[j + 1] if mask[j + 1] == 1 else -1
                    assert tgt[start + j] == want
    # Until the epoch flips (the cursor wraps), no conversation came twice and none was skipped: everything not yet
    # emitted is still waiting in the buffer.
    assert len(seen) == len(set(seen))
    assert set(seen) | {i for i, _, _ in packer.buffer} == set(range(len(convs)))
    assert packer.tokens_padded > 0


class FixedLengths:
    """A stand-in tokenizer whose conversation i renders to a given length (ids = i+10 after a BOS)."""
    bos_id = 1

    def __init__(self, lengths):
        self.lengths = lengths

    def render_conversation(self, i, max_tokens=2048):
        n = min(self.lengths[i], max_tokens)
        ids = [self.bos_id] + [i + 10] * (self.lengths[i] - 1)
        return ids[:n], ([0] + [1] * (self.lengths[i] - 1))[:n]


def test_best_fit_by_hand():
    lengths = [5, 3, 4, 2]
    data = list(range(len(lengths)))
    sft = ConversationPacker(data, FixedLengths(lengths), batch_size=2, seq_len=7, mode="sft", buffer_size=2)
    batch = next(sft)
    # T+1 = 8, buffer of 2 refilled before each pick. Row 0: {5,3} → 5, {3,4} → 3 fills it. Row 1: {4,2} → 4,
    # {2,5} → 2, {5,3} (the next epoch) → nothing fits the 2 left: BOS padding.
    rows = np.concatenate([batch["inputs"], batch["targets"][:, -1:]], axis=1)
    assert rows[0].tolist() == [1, 10, 10, 10, 10, 1, 11, 11]
    assert batch["inputs"][1].tolist() == [1, 12, 12, 12, 1, 13, 1]
    assert batch["targets"][1].tolist() == [12, 12, 12, -1, 13, -1, -1]
    assert batch["targets"][0].tolist() == [10, 10, 10, 10, -1, 11, 11]  # the 2nd BOS has mask 0
    mid = ConversationPacker(data, FixedLengths([5, 6, 4, 7]), batch_size=1, seq_len=7, mode="mid", buffer_size=4)
    row = next(mid)
    # Mid: 7 fits, then 1 slot left: nothing fits, so the shortest (4) is cropped to 1 token. All targets kept.
    assert row["inputs"][0].tolist() == [1, 13, 13, 13, 13, 13, 13]
    assert row["targets"][0].tolist() == [13, 13, 13, 13, 13, 13, 1]
    assert mid.tokens_cropped == 3


def test_exact_resume_and_sharding(setup):
    convs, tok = setup
    a = ConversationPacker(convs, tok, 2, 64, mode="sft", buffer_size=8)
    for _ in range(5):
        next(a)
    state = a.get_state()
    want = [next(a) for _ in range(4)]
    b = ConversationPacker(convs, tok, 2, 64, mode="sft", buffer_size=8, state=state)
    for w in want:
        got = next(b)
        assert np.array_equal(got["inputs"], w["inputs"]) and np.array_equal(got["targets"], w["targets"])
    # Two shards read disjoint indices covering the dataset.
    s0 = ConversationPacker(convs, tok, 1, 64, shard=0, num_shards=2, buffer_size=5)
    s1 = ConversationPacker(convs, tok, 1, 64, shard=1, num_shards=2, buffer_size=5)
    next(s0), next(s1)
    i0 = {i for i, _, _ in s0.buffer}
    i1 = {i for i, _, _ in s1.buffer}
    assert not i0 & i1 and all(i % 2 == 0 for i in i0) and all(i % 2 == 1 for i in i1)
    assert 0 < s0.progress < 1


def test_mid_mode_trains_on_everything(setup):
    convs, tok = setup
    packer = ConversationPacker(convs, tok, 2, 80, mode="mid", buffer_size=10)
    batch = next(packer)
    assert (batch["targets"] >= 0).all()  # no padding, no masking (the reference's midtraining loss)
    assert np.array_equal(batch["inputs"][:, 1:], batch["targets"][:, :-1])
    masked = ConversationPacker(convs, tok, 2, 80, mode="mid", mask_targets=True, buffer_size=10)
    assert (next(masked)["targets"] == -1).any()


def test_bad_arguments(setup):
    convs, tok = setup
    with pytest.raises(ValueError, match="mode must be"):
        ConversationPacker(convs, tok, 1, 8, mode="pretrain")
    with pytest.raises(ValueError, match="fewer than the 100 shards"):
        ConversationPacker(convs, tok, 1, 8, shard=0, num_shards=100)
