"""sharding.launcher_process_count / maybe_initialize_distributed: which environments start multi-process JAX.

The environments are written out as a launcher sets them (Slurm's sbatch batch script, an srun step inside it,
an salloc shell, Open MPI's mpirun, the explicit JAX_* variables); none of them starts anything here:
jax.distributed.initialize is replaced by a recorder.
"""

import os

import pytest

from nanochat_jax import sharding

JOB = {"SLURM_JOB_ID": "4242", "SLURM_JOBID": "4242", "SLURM_NNODES": "1", "SLURM_JOB_NODELIST": "gpu01"}
BATCH_SCRIPT = {**JOB, "SLURM_NTASKS": "8", "SLURM_NPROCS": "8", "SLURM_TASKS_PER_NODE": "8"}  # sbatch -n 8
SRUN_STEP = {**BATCH_SCRIPT, "SLURM_STEP_ID": "0", "SLURM_STEPID": "0", "SLURM_STEP_NUM_TASKS": "8",
             "SLURM_STEP_NODELIST": "gpu01", "SLURM_PROCID": "3", "SLURM_LOCALID": "3"}


@pytest.mark.parametrize("env,expected", [
    ({}, 1),                                                               # no launcher
    (BATCH_SCRIPT, 1),                                                     # sbatch -n 8 script runs python itself
    ({**BATCH_SCRIPT, "SLURM_STEP_ID": "4294967291"}, 1),                  # the batch step's reserved id
    ({**BATCH_SCRIPT, "SLURM_STEP_ID": "4294967290"}, 1),                  # salloc's interactive step
    (SRUN_STEP, 8),                                                        # srun -n 8 python ...
    ({**SRUN_STEP, "SLURM_STEP_ID": "5", "SLURM_STEP_NUM_TASKS": "1", "SLURM_NTASKS": "1"}, 1),  # srun -n 1
    ({**SRUN_STEP, "SLURM_STEP_NUM_TASKS": "2", "SLURM_NTASKS": "2"}, 2),  # a 2-task step in an 8-task job
    ({k: v for k, v in SRUN_STEP.items() if k != "SLURM_STEP_NUM_TASKS"}, 8),  # older Slurm: the step's NTASKS
    ({**JOB, "SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "4"}, 4),       # no --ntasks on the job
    ({"OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_RANK": "1"}, 4),       # mpirun -n 4
    ({"OMPI_COMM_WORLD_SIZE": "1"}, 1),
    ({**BATCH_SCRIPT, "OMPI_COMM_WORLD_SIZE": "2"}, 2),                    # mpirun -n 2 inside the allocation
    ({"JAX_COORDINATOR_ADDRESS": "h:1234", "JAX_NUM_PROCESSES": "3", "JAX_PROCESS_ID": "0"}, 3),
])
def test_launcher_process_count(env, expected):
    assert sharding.launcher_process_count(env) == expected


@pytest.mark.parametrize("env,flag,calls", [
    (BATCH_SCRIPT, None, []),
    (SRUN_STEP, None, [{}]),
    (SRUN_STEP, False, []),
    ({}, True, [{}]),
    ({"JAX_COORDINATOR_ADDRESS": "h:1234", "JAX_NUM_PROCESSES": "3", "JAX_PROCESS_ID": "2"}, None,
     [{"coordinator_address": "h:1234", "num_processes": 3, "process_id": 2}]),
])
def test_maybe_initialize_distributed_starts_only_for_several_processes(monkeypatch, env, flag, calls):
    for key in list(os.environ):
        if key.startswith(("SLURM_", "OMPI_", "JAX_COORDINATOR", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")):
            monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    seen = []
    monkeypatch.setattr(sharding.jax.distributed, "initialize", lambda **kw: seen.append(kw))
    sharding.maybe_initialize_distributed(flag)
    assert seen == calls


def test_local_devices():
    import jax

    assert sharding.local_devices() == jax.local_devices() and len(jax.local_devices()) == 8
    assert sharding.local_devices(3) == jax.local_devices()[:3]
    for bad in (0, 9):
        with pytest.raises(ValueError, match="has 8 local devices"):
            sharding.local_devices(bad)


def test_gather_to_process_gives_arrays_an_engine_can_take():
    import jax
    import numpy as np

    x = np.random.default_rng().normal(size=(16, 4)).astype(np.float32)
    mesh = sharding.make_mesh(8)
    tree = {"w": jax.device_put(x, sharding.batch_sharding(mesh))}
    whole = sharding.gather_to_process(tree)
    one = jax.device_put(whole["w"], sharding.local_devices()[0])  # what Engine.set_params does
    np.testing.assert_array_equal(np.asarray(one), x)
