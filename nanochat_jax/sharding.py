"""The device mesh, how each parameter is sharded, and batch placement.

One mesh axis, "data" (Auto/GSPMD axis types: shardings are given at jit boundaries, the model stays
sharding-agnostic): batches are split over it, and params and optimizer state are sharded ZeRO/FSDP-style, each
large array along the axis its Flax Param names gpt.FSDP (LOGICAL_AXES maps it to "data"); optimizer-state leaves,
whose paths end with their parameter's, follow it. An axis that does not divide falls back to the largest one that
does; leaves under MIN_SHARD_SIZE are replicated. Past one process, each feeds its own rows of a batch
(`jax.make_array_from_process_local_data`) after `jax.distributed.initialize()`.
"""

from __future__ import annotations

import math
import os

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from nanochat_jax.common import path_str

DATA = "data"
LOGICAL_AXES = {"fsdp": DATA}  # logical axis name in the Params' metadata -> mesh axis
MIN_SHARD_SIZE = 2**14


def launcher_process_count(env=None) -> int:
    """How many processes the launcher started (1 when none did): JAX_COORDINATOR_ADDRESS + JAX_NUM_PROCESSES,
    Open MPI's OMPI_COMM_WORLD_SIZE, or an srun step's task count. SLURM_NTASKS alone is the allocation's count,
    also seen by the batch script, which is one process (`sbatch -n 8 run.sh` must not wait for 7 peers): trust a
    count only inside a numbered step (not Slurm's reserved ids >= 0xFFFFFFF0); older Slurm lacks
    SLURM_STEP_NUM_TASKS, and then srun's SLURM_NTASKS is the step's count."""
    env = os.environ if env is None else env

    def count(name):
        try:
            return int(env.get(name, "1") or "1")
        except ValueError:
            return 1

    if env.get("JAX_COORDINATOR_ADDRESS"):
        return count("JAX_NUM_PROCESSES")
    if "OMPI_COMM_WORLD_SIZE" in env:  # mpirun's own world (also inside a Slurm allocation)
        return count("OMPI_COMM_WORLD_SIZE")
    if any(k in env for k in ("SLURM_JOB_ID", "SLURM_JOBID", "SLURM_NTASKS", "SLURM_STEP_NUM_TASKS")):
        step_id = env.get("SLURM_STEP_ID", env.get("SLURM_STEPID", ""))
        if not step_id.isdigit() or int(step_id) >= 0xFFFFFFF0:
            return 1  # not inside an srun step: this is the only process, whatever the allocation holds
        return count("SLURM_STEP_NUM_TASKS" if "SLURM_STEP_NUM_TASKS" in env else "SLURM_NTASKS")
    return 1


def maybe_initialize_distributed(distributed: bool | None = None) -> None:
    """Multi-process JAX: `--distributed=1` forces it, None when launcher_process_count() > 1. Must run before any
    JAX computation."""
    env = os.environ
    if distributed is False or (distributed is None and launcher_process_count(env) <= 1):
        return
    if env.get("JAX_COORDINATOR_ADDRESS"):
        jax.distributed.initialize(coordinator_address=env["JAX_COORDINATOR_ADDRESS"],
                                   num_processes=int(env["JAX_NUM_PROCESSES"]), process_id=int(env["JAX_PROCESS_ID"]))
    else:
        jax.distributed.initialize()


def make_mesh(n_devices: int | None = None) -> Mesh:
    """A ("data",) mesh over the first n devices (default: all devices of all processes)."""
    devices = jax.devices()
    n = len(devices) if n_devices in (None, 0, -1) else n_devices
    if n < 1 or n > len(devices):
        raise ValueError(f"--mesh={n_devices} but {len(devices)} device(s) are available "
                         f"({devices[0].platform}); use --mesh=-1 for all of them")
    if jax.process_count() > 1 and n != len(devices):
        raise ValueError(f"multi-process runs use every device: --mesh must be -1 or {len(devices)}, got {n}")
    return jax.make_mesh((n,), (DATA,), axis_types=(AxisType.Auto,), devices=devices[:n])


def spec_for(path: str, shape: tuple[int, ...], n: int, axes: dict[str, tuple]) -> P:
    """PartitionSpec of one array for a mesh of n devices. `axes` maps parameter paths to their logical axis names
    (gpt.param_sharding_axes); `path` is a parameter's path or ends with one (optimizer state)."""
    if n == 1 or math.prod(shape) < MIN_SHARD_SIZE:
        return P()
    parts = path.split("/")
    names = next((axes[key] for key in ("/".join(parts[i:]) for i in range(len(parts))) if key in axes), ())
    preferred = [i for i, name in enumerate(names) if name in LOGICAL_AXES]
    for axis in preferred + sorted(range(len(shape)), key=lambda a: -shape[a]):
        if axis < len(shape) and shape[axis] % n == 0:
            spec = [None] * len(shape)
            spec[axis] = LOGICAL_AXES[names[axis]] if axis in preferred else DATA
            return P(*spec)
    return P()


def tree_shardings(tree, mesh: Mesh, axes: dict[str, tuple], *, shard: bool = True):
    """NamedShardings of a pytree of params or optimizer state (arrays or ShapeDtypeStructs) whose Params' axis names
    are `axes` (gpt.param_sharding_axes); all replicated if shard=False."""
    n = mesh.shape[DATA]

    def one(path, leaf):
        shape = tuple(getattr(leaf, "shape", ()))
        return NamedSharding(mesh, spec_for(path_str(path), shape, n, axes) if shard else P())

    return jax.tree_util.tree_map_with_path(one, tree)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, batch_axis: int = 0, ndim: int = 2) -> NamedSharding:
    spec = [None] * ndim
    spec[batch_axis] = DATA
    return NamedSharding(mesh, P(*spec))


def global_batch(local: np.ndarray, mesh: Mesh, batch_axis: int = 0) -> jax.Array:
    """This process's rows → one global jax.Array sharded over "data" along batch_axis."""
    return jax.make_array_from_process_local_data(batch_sharding(mesh, batch_axis, local.ndim), local)


def local_batch_rows(global_rows: int, mesh: Mesh) -> int:
    """How many rows of a global batch this process feeds (its share of the devices)."""
    return global_rows * len(local_devices(mesh=mesh)) // mesh.size


def local_devices(n: int | None = None, *, mesh: Mesh | None = None) -> list:
    """This process's devices: those in `mesh`, else its first `n` (all when None); one-device work (an Engine, a
    restore without a mesh) goes to local_devices()[0]."""
    if mesh is not None:
        return [d for d in mesh.devices.flat if d.process_index == jax.process_index()]
    devices = jax.local_devices()
    if n is not None and not 1 <= n <= len(devices):
        raise ValueError(f"{n} devices asked for, but this process has {len(devices)} local devices")
    return devices[:n]


def gather_to_process(tree):
    """`tree` with every array whole on this process (for an Engine on one device); a collective across processes."""
    if jax.process_count() == 1:
        return tree
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(tree, tiled=True)


def process_sum(x):
    """Elementwise sum of a small host array over all processes (each passes its own); a collective."""
    x = np.asarray(x)
    if jax.process_count() == 1:
        return x
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x)).sum(0)


def allgather_json(obj) -> list:
    """Every process's `obj` (anything JSON can hold), in process order; a collective. Process 0 writes checkpoint
    metadata alone, so per-process state (loader positions) is gathered into it with this."""
    if jax.process_count() == 1:
        return [obj]
    import json

    from jax.experimental import multihost_utils

    data = np.frombuffer(json.dumps(obj).encode(), np.uint8)
    sizes = np.asarray(multihost_utils.process_allgather(np.array([data.size], np.int64))).reshape(-1)
    buf = np.zeros(int(sizes.max()), np.uint8)
    buf[:data.size] = data
    gathered = np.asarray(multihost_utils.process_allgather(buf)).reshape(len(sizes), -1)
    return [json.loads(bytes(gathered[i, :sizes[i]]).decode()) for i in range(len(sizes))]

