"""No host round trips in the steady-state training loop: between steps, `train.fit` (with pretraining's StepLogger
and host-side schedules) reads nothing from the device except each step's metrics, one step late, inside its
explicit allow block.

XLA:CPU hands an array to NumPy without copying, so JAX's device-to-host transfer guard never fires on CPU
(checked: float() of a CPU array passes under "disallow"). The fixture makes every read of an Array's value
check the guard, as a GPU's copy does; on a GPU the real guard applies as well.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src.array import ArrayImpl

from nanochat_jax import gpt, optim, sharding, train
from nanochat_jax.report import ScalarLog

CFG = gpt.GPTConfig.from_depth(2, aspect_ratio=32, head_dim=32, max_seq_len=32, vocab_size=256, short_window=16,
                               embed_dtype="float32", compute_dtype="float32")
A, B = 2, 4


@pytest.fixture
def strict_d2h_guard(monkeypatch):
    read = ArrayImpl._value

    def guarded(self):
        if jax.config.jax_transfer_guard_device_to_host in ("disallow", "disallow_explicit"):
            raise RuntimeError(f"disallowed device-to-host transfer of {self.aval} (guard emulated on CPU)")
        return read.fget(self)

    monkeypatch.setattr(ArrayImpl, "_value", property(guarded))


N_ITER = 5


@pytest.fixture(scope="module")
def setup():
    n_iter = N_ITER
    opt_cfg = optim.OptimConfig(num_iterations=n_iter, model_dim=CFG.n_embd, warmup_steps=2)
    tx = optim.build_optimizer(gpt.param_shapes(CFG), opt_cfg)
    state_shapes = jax.eval_shape(lambda k: train.init_state(CFG, tx, k), jax.random.key(0))
    mesh = sharding.make_mesh(1)
    step_fn, shardings, _ = train.compile_train_step(CFG, tx, mesh, state_shapes, (A, B, CFG.sequence_len))
    init = jax.jit(lambda k: train.init_state(CFG, tx, k), out_shardings=shardings)
    rng = np.random.default_rng()
    host = [rng.integers(0, CFG.vocab_size, (A, B, CFG.sequence_len + 1), dtype=np.int32) for _ in range(n_iter)]

    def batches(start):
        for step in range(start, n_iter):
            yield {"inputs": sharding.global_batch(host[step][..., :-1], mesh, batch_axis=1),
                   "targets": sharding.global_batch(host[step][..., 1:], mesh, batch_axis=1)}, None

    return opt_cfg, step_fn, init, batches


def test_guard_emulation_catches_a_read(strict_d2h_guard):
    x = jax.jit(lambda: jnp.arange(3.0))()
    with jax.transfer_guard_device_to_host("disallow"):
        with pytest.raises(RuntimeError, match="disallowed device-to-host"):
            float(x[1])
        with jax.transfer_guard_device_to_host("allow"):
            assert float(x[1]) == 1.0


def test_steady_state_fit_reads_only_the_late_metrics(strict_d2h_guard, setup):
    n_iter = N_ITER
    opt_cfg, step_fn, init, batches = setup
    loop = train.LoopState()
    step_log = train.StepLogger(loop, ScalarLog(None), n_iter, A * B * CFG.sequence_len,
                                gpt.flops_per_token(CFG), "cpu", 1)
    seen = []

    def report(step, metrics, dt):  # pretraining's report: host schedule + StepLogger
        lrm = optim.current_hyperparams(opt_cfg, step)["lrm"]
        step_log(step, metrics, dt, lrm, "epoch 1")
        seen.append((step, lrm))

    state = train.fit(step_fn, init(jax.random.key(0)), batches(0), start=0, n_iter=2, report=report)  # warm-up
    with jax.transfer_guard_device_to_host("disallow"):
        state = train.fit(step_fn, state, batches(2), start=2, n_iter=n_iter, report=report)
    assert [s for s, _ in seen] == list(range(n_iter))
    np.testing.assert_allclose([lrm for _, lrm in seen], [optim.lr_multiplier(opt_cfg, s) for s in range(n_iter)])

    # The same steps in a plain loop give the losses the logger recorded.
    expected, plain = [], init(jax.random.key(0))
    for batch, _ in batches(0):
        plain, metrics = step_fn(plain, batch)
        expected.append(float(metrics["loss"]))
    np.testing.assert_allclose([loss for _, loss in loop.history], expected, rtol=1e-6)


def test_a_device_read_in_the_report_is_caught(strict_d2h_guard, setup):
    """The bug the issue found: the lr multiplier computed with jnp on the device and read right away."""
    opt_cfg, step_fn, init, batches = setup

    def report(step, metrics, dt):
        float(optim.lr_multiplier(opt_cfg, jnp.asarray(step)))

    with jax.transfer_guard_device_to_host("disallow"):
        with pytest.raises(RuntimeError, match="disallowed device-to-host"):
            train.fit(step_fn, init(jax.random.key(0)), batches(0), start=0, n_iter=4, report=report)
