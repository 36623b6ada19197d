"""scripts/memory_estimate.py: its JSON, and its numbers against the compiled train step's own memory analysis;
the GPU peak tables it and the benchmarks rely on."""

import importlib.util
import json
import math
import sys

import jax
import pytest
from conftest import REPO_ROOT

from nanochat_jax import common, gpt, optim, pretrain, sharding, train


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


TINY_FLAGS = ["--depth=1", "--aspect-ratio=32", "--head-dim=32", "--max-seq-len=64", "--vocab-size=512",
              "--device-batch-size=4", "--mesh=8", "--gpu=h100"]


def test_memory_estimate_json_and_compiled_memory_analysis(capsys):
    me = load_script("memory_estimate")
    result = me.main(TINY_FLAGS)
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert json.loads(last) == json.loads(json.dumps(result))
    for key in ("peak_bytes_per_device", "saved_activation_bytes_per_sequence", "param_bytes_per_device",
                "optimizer_bytes_per_device", "fits", "usable_bytes_per_device", "method"):
        assert key in result, key
    assert result["fits"] is True and result["usable_bytes_per_device"] == 0.9 * 80e9

    # Independently: compile the same step (flash stand-in attention, bf16) at device batch 4.
    mesh = sharding.make_mesh(8)
    pcfg = pretrain.PretrainConfig(depth=1, aspect_ratio=32, head_dim=32, max_seq_len=64, attention="xla",
                                compute_dtype="bfloat16")
    model_cfg = pretrain.build_model_config(pcfg, 512, on_gpu=False)
    tx = optim.build_optimizer(gpt.param_shapes(model_cfg), optim.OptimConfig(num_iterations=1000,
                                                                              model_dim=model_cfg.n_embd))
    state_shapes = jax.eval_shape(lambda k: train.init_state(model_cfg, tx, k), jax.random.key(0))
    with me.flash_attention_standin():
        m = train.compile_train_step(model_cfg, tx, mesh, state_shapes, (1, 8 * 4, 64))[2]["memory"]
    assert result["peak_bytes_per_device"] == (m["argument_size_in_bytes"] + m["output_size_in_bytes"]
                                               - m["alias_size_in_bytes"] + m["temp_size_in_bytes"])
    assert result["temp_bytes_per_device"] == m["temp_size_in_bytes"]
    # Per-sequence activations: at least the residual stream of every layer in bf16, far less than fp32 logits x 10.
    D, T, L, V = model_cfg.n_embd, 64, 1, 512
    assert L * T * D * 2 < result["saved_activation_bytes_per_sequence"] < 10 * T * V * 4 + 40 * L * T * D * 2
    # The state: fp32 params and AdamW/Muon moments, sharded over 8 devices (small leaves replicated).
    total = sum(math.prod(s.shape) * s.dtype.itemsize for s in jax.tree.leaves(state_shapes["params"]))
    assert total / 8 <= result["param_bytes_per_device"] < total / 2


def test_memory_estimate_user_errors(capsys):
    me = load_script("memory_estimate")
    for flags, message in [(TINY_FLAGS[:-1] + ["--gpu=tpu"], "--gpu must be one of"),
                           (TINY_FLAGS + ["--usable-fraction=1.5"], "--usable-fraction must be in")]:
        with pytest.raises(SystemExit):
            me.main(flags)
        assert message in capsys.readouterr().err


def test_gpu_peak_tables():
    assert common.get_peak_flops("NVIDIA A800-SXM4-80GB") == 312e12
    assert common.get_peak_flops("NVIDIA H100 PCIe") == 756e12
    assert common.get_peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    bench_infer = load_script("bench_infer")
    assert bench_infer.peak_bandwidth("NVIDIA A800-SXM4-80GB") == 2.039e12
    assert bench_infer.peak_bandwidth("NVIDIA A800 80GB PCIe") == 1.935e12
    assert bench_infer.peak_bandwidth("NVIDIA H100 PCIe") == 2.0e12
