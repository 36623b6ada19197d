"""Convert between nanochat's PyTorch checkpoints and our parameter pytree (NumPy only).

nanochat writes `model_<step:06d>.pt` (a torch state dict) and `meta_<step:06d>.json` (its "model_config":
sequence_len, vocab_size, n_layer, n_head, n_kv_head, n_embd, window_pattern); nanochat/checkpoint_manager.py,
`save_checkpoint`. Two layouts: "current" (92d63d4: vocab rows padded to 64, value embeddings with their ve_gate,
resid/x0 lambdas, smear, backout) and "classic" (October 2025: exactly vocab_size rows, none of the extras; see
`_torch_shapes`). torch Linear weights are (out, in); ours are (in, out), blocks stacked on a leading layer axis.
In-between nanochat versions differ in ways the keys do not show (RoPE base, gate widths): refused, not guessed.
Reading needs no torch (`read_pt`: a restricted unpickler admits only tensors and plain containers, no code runs);
writing (export) imports torch.
"""

from __future__ import annotations

import collections
import io
import json
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import jax
import numpy as np

from nanochat_jax import gpt
from nanochat_jax.common import UserError, atomic_write, path_str
from nanochat_jax.gpt import GPTConfig

NANOCHAT_PAD_VOCAB = 64       # current nanochat pads wte/lm_head/value_embeds rows to a multiple of this
COMPILE_PREFIX = "_orig_mod."  # torch.compile'd modules save their keys with this prefix
# torch block matrix -> (group, name) in our params["blocks"]; current-model extras: torch key -> our key
_BLOCK_MATS = {"attn.c_q": ("attn", "wq"), "attn.c_k": ("attn", "wk"), "attn.c_v": ("attn", "wv"),
               "attn.c_proj": ("attn", "wo"), "mlp.c_fc": ("mlp", "w_fc"), "mlp.c_proj": ("mlp", "w_proj")}
_EXTRAS = {"resid_lambdas": "resid_lambdas", "x0_lambdas": "x0_lambdas", "smear_gate.weight": "smear_gate",
           "smear_lambda": "smear_lambda", "backout_lambda": "backout_lambda"}


# ----------------------------------------------------------------------------------------------
# Config

def strip_compile_prefix(sd: dict[str, Any]) -> dict[str, Any]:
    return {k.removeprefix(COMPILE_PREFIX): v for k, v in sd.items()}


def nanochat_format(keys) -> str:
    """'head' or 'classic' from the state-dict key names; ValueError for an in-between architecture."""
    keys = {k.removeprefix(COMPILE_PREFIX) for k in keys}
    features = {"value_embeds": any(k.startswith("value_embeds.") for k in keys),
                **{k: k in keys for k in _EXTRAS}}
    if all(features.values()):
        return "head"
    if not any(features.values()):
        return "classic"
    have = sorted(k for k, v in features.items() if v)
    lack = sorted(k for k, v in features.items() if not v)
    raise ValueError(f"nanochat state dict is neither the current (92d63d4) nor the classic (October 2025) model: "
                     f"it has {have} but lacks {lack}. Intermediate nanochat architectures are not supported "
                     f"(their RoPE base and gate widths cannot be read from the keys); convert with the nanochat "
                     f"version that wrote it to the current format first")


def config_from_nanochat(meta: dict[str, Any], keys, **overrides) -> GPTConfig:
    """GPTConfig for a nanochat checkpoint: meta is its JSON (or just "model_config"), the state dict's `keys` decide
    current vs classic, overrides set runtime fields (compute_dtype, attn_backend...)."""
    mc = meta.get("model_config", meta)
    required = ("sequence_len", "vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd")
    missing = [k for k in required if k not in mc]
    if missing:
        raise ValueError(f"nanochat model_config lacks {missing} (got keys {sorted(mc)}); is this a nanochat "
                         f"meta_<step>.json?")
    dims = {k: int(mc[k]) for k in required}
    if dims["n_embd"] % dims["n_head"]:
        raise ValueError(f"nanochat model_config: n_embd {dims['n_embd']} is not divisible by n_head {dims['n_head']}")
    dims["head_dim"] = dims["n_embd"] // dims["n_head"]
    # GPTConfig's defaults are the current architecture (RoPE 100k, QK x1.2, all extras, reference init).
    classic = gpt._CLASSIC_FEATURES if nanochat_format(keys) == "classic" else {}
    window_pattern = str(mc.get("window_pattern", "L")).upper()  # nanochat patches a missing one to L
    return GPTConfig(**{**dims, **classic, "window_pattern": window_pattern, **overrides})


def config_from_nanochat_meta(meta: dict[str, Any], keys=None, **overrides) -> GPTConfig:
    """Like config_from_nanochat; without keys, current iff the meta has a window_pattern (classic metas lack it)."""
    if keys is None:
        mc = meta.get("model_config", meta)
        keys = ["value_embeds.0.weight", *_EXTRAS] if "window_pattern" in mc else []
    return config_from_nanochat(meta, keys, **overrides)


def _format_of_config(cfg: GPTConfig) -> str:
    """Which nanochat layout cfg can be written as; ValueError when nanochat has no such model."""
    flags = (cfg.use_value_embeds, cfg.use_lambdas, cfg.use_smear, cfg.use_backout)
    if all(flags):
        fmt, want = "head", dict(rope_base=100_000.0, qk_scale=1.2)
    elif not any(flags):
        fmt, want = "classic", dict(rope_base=10_000.0, qk_scale=1.0)
    else:
        raise ValueError(f"config has use_value_embeds/use_lambdas/use_smear/use_backout = {flags}: nanochat has "
                         f"only the all-on (current) and all-off (classic) models")
    if fmt == "classic" and set(cfg.window_pattern) != {"L"}:
        raise ValueError(f"config cannot be expressed as a nanochat classic checkpoint: window_pattern "
                         f"{cfg.window_pattern!r} (the Oct 2025 model has full attention only, 'L')")
    want.update(softcap=15.0, short_window=None)
    bad = {k: (getattr(cfg, k), v) for k, v in want.items() if getattr(cfg, k) != v}
    if bad:
        raise ValueError(f"config cannot be expressed as a nanochat {fmt} checkpoint: (ours, nanochat's) = {bad}")
    if cfg.n_embd != cfg.n_head * cfg.head_dim:
        raise ValueError("nanochat requires head_dim == n_embd // n_head")
    return fmt


def _torch_shapes(cfg: GPTConfig, fmt: str) -> dict[str, tuple[int, ...]]:
    """torch key -> shape of every tensor of the nanochat model `cfg` but the vocab tables (wte, lm_head,
    value_embeds.{i}; Vp rows)."""
    L, D, H, K, hd = cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.n_kv_head, cfg.head_dim
    mats = {"attn.c_q": (H * hd, D), "attn.c_k": (K * hd, D), "attn.c_v": (K * hd, D), "attn.c_proj": (D, H * hd),
            "mlp.c_fc": (4 * D, D), "mlp.c_proj": (D, 4 * D)}
    shapes = {f"transformer.h.{i}.{name}.weight": shape for i in range(L) for name, shape in mats.items()}
    if fmt == "head":
        shapes |= {f"transformer.h.{i}.attn.ve_gate.weight": (K, gpt.VE_GATE_CHANNELS)
                   for i in gpt.value_embed_layers(cfg)}
        shapes |= {"resid_lambdas": (L,), "x0_lambdas": (L,), "smear_gate.weight": (1, gpt.SMEAR_CHANNELS),
                   "smear_lambda": (1,), "backout_lambda": (1,)}
    return shapes


# ----------------------------------------------------------------------------------------------
# State dict <-> params

def params_from_state_dict(sd: dict[str, Any], cfg: GPTConfig) -> gpt.Params:
    """Our params (NumPy arrays) from a nanochat state dict of NumPy arrays in torch layout. Matrices and scalars
    become float32, wte/value_embeds cfg.embed_dtype; vocab rows are zero-padded to cfg.padded_vocab."""
    sd = strip_compile_prefix(sd)
    fmt = _format_of_config(cfg)
    L, D, K, hd = cfg.n_layer, cfg.n_embd, cfg.n_kv_head, cfg.head_dim
    ve_layers = gpt.value_embed_layers(cfg)
    f32, edt = np.float32, np.dtype(gpt._DTYPES[cfg.embed_dtype])  # jnp.bfloat16 is ml_dtypes', a NumPy dtype
    expected = _torch_shapes(cfg, fmt)
    vocab_keys = ["transformer.wte.weight", "lm_head.weight"] + [f"value_embeds.{i}.weight" for i in ve_layers]

    missing = sorted(set(expected) - set(sd) | set(vocab_keys) - set(sd))
    unexpected = sorted(set(sd) - set(expected) - set(vocab_keys))
    if missing or unexpected:
        raise ValueError(f"nanochat state dict does not match the {fmt} model of this config "
                         f"(n_layer={L}, VE layers {ve_layers}): missing keys {missing}, unexpected keys {unexpected}")
    for k, shape in expected.items():
        if tuple(np.shape(sd[k])) != shape:
            raise ValueError(f"nanochat state dict key {k!r} has shape {tuple(np.shape(sd[k]))}, expected {shape} "
                             f"for this config")

    def vocab_table(k: str, width: int, dtype) -> np.ndarray:
        a = np.asarray(sd[k])
        if a.ndim != 2 or a.shape[1] != width or not cfg.vocab_size <= a.shape[0] <= cfg.padded_vocab:
            raise ValueError(f"nanochat state dict key {k!r} has shape {a.shape}, expected (rows, {width}) with "
                             f"vocab_size {cfg.vocab_size} <= rows <= padded vocab {cfg.padded_vocab}")
        out = np.zeros((cfg.padded_vocab, width), dtype)
        out[:a.shape[0]] = a.astype(dtype)
        return out

    def mat(k: str) -> np.ndarray:
        return np.asarray(sd[k]).astype(f32).T

    blocks: dict[str, dict[str, np.ndarray]] = {"attn": {}, "mlp": {}}
    for tname, (group, ours) in _BLOCK_MATS.items():
        blocks[group][ours] = np.stack([mat(f"transformer.h.{i}.{tname}.weight") for i in range(L)])
    params: gpt.Params = {
        "wte": vocab_table("transformer.wte.weight", D, edt),
        "lm_head": vocab_table("lm_head.weight", D, f32).T.copy(),
        "blocks": blocks,
    }
    if fmt == "head":
        params["value_embeds"] = np.stack([vocab_table(f"value_embeds.{i}.weight", K * hd, edt) for i in ve_layers])
        params["ve_gate"] = np.stack([mat(f"transformer.h.{i}.attn.ve_gate.weight") for i in ve_layers])
        ours = gpt.param_shapes(cfg)  # the (1,) lambdas are scalars here
        params |= {name: mat(k).reshape(ours[name].shape) for k, name in _EXTRAS.items()}
    return params


def state_dict_from_params(params: gpt.Params, cfg: GPTConfig) -> dict[str, np.ndarray]:
    """Inverse of params_from_state_dict: NumPy arrays in torch layout, current or classic keys (from the config's
    feature flags), vocab tables with nanochat's row count (padded to 64 or exact), dtypes kept."""
    fmt = _format_of_config(cfg)
    want = gpt.param_shapes(cfg)
    have_keys, want_keys = _leaf_paths(params), _leaf_paths(want)
    if have_keys.keys() != want_keys.keys():
        raise ValueError(f"params do not match the config: missing {sorted(want_keys.keys() - have_keys.keys())}, "
                         f"unexpected {sorted(have_keys.keys() - want_keys.keys())}")
    bad = {k: (have_keys[k], want_keys[k]) for k in want_keys if have_keys[k] != want_keys[k]}
    if bad:
        raise ValueError(f"param shapes (got, expected) do not match the config: {bad}")

    rows = cfg.vocab_size if fmt == "classic" else -(-cfg.vocab_size // NANOCHAT_PAD_VOCAB) * NANOCHAT_PAD_VOCAB

    def vocab_table(a) -> np.ndarray:
        a = np.asarray(a)
        if rows <= a.shape[0]:
            return a[:rows].copy()  # rows past vocab_size are padding, never read
        return np.concatenate([a, np.zeros((rows - a.shape[0], a.shape[1]), a.dtype)])

    sd: dict[str, np.ndarray] = {"transformer.wte.weight": vocab_table(params["wte"])}
    for tname, (group, ours) in _BLOCK_MATS.items():
        stacked = np.asarray(params["blocks"][group][ours])
        for i in range(cfg.n_layer):
            sd[f"transformer.h.{i}.{tname}.weight"] = stacked[i].T.copy()
    sd["lm_head.weight"] = vocab_table(np.asarray(params["lm_head"]).T)
    if fmt == "head":
        for j, i in enumerate(gpt.value_embed_layers(cfg)):
            sd[f"transformer.h.{i}.attn.ve_gate.weight"] = np.asarray(params["ve_gate"])[j].T.copy()
            sd[f"value_embeds.{i}.weight"] = vocab_table(np.asarray(params["value_embeds"])[j])
        shapes = _torch_shapes(cfg, fmt)
        sd |= {k: np.asarray(params[name]).T.reshape(shapes[k]).copy() for k, name in _EXTRAS.items()}
    return sd


def _leaf_paths(tree) -> dict[str, tuple[int, ...]]:
    return {path_str(path): tuple(np.shape(leaf)) for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def nanochat_model_config(cfg: GPTConfig) -> dict[str, Any]:
    """The "model_config" nanochat's meta JSON holds for cfg (the classic GPTConfig had no window_pattern)."""
    mc = {k: getattr(cfg, k) for k in ("sequence_len", "vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd")}
    if _format_of_config(cfg) == "head":
        mc["window_pattern"] = cfg.window_pattern
    return mc


# ----------------------------------------------------------------------------------------------
# Reading .pt files without torch

def _pt_dtypes() -> dict[str, Any]:
    import ml_dtypes

    return {"FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
            "BFloat16Storage": ml_dtypes.bfloat16, "LongStorage": np.int64, "IntStorage": np.int32,
            "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_}


class _StorageType:
    def __init__(self, name: str, dtype):
        self.name, self.dtype = name, np.dtype(dtype)


def _rebuild_tensor(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                    metadata=None):
    """torch._utils._rebuild_tensor_v2 for NumPy: a bounds-checked strided view of the storage, copied."""
    if not isinstance(storage, np.ndarray) or storage.ndim != 1:
        raise pickle.UnpicklingError("a tensor whose storage is not a storage reference")
    size, stride = tuple(int(n) for n in size), tuple(int(n) for n in stride)
    offset = int(storage_offset)
    if len(size) != len(stride) or offset < 0 or any(n < 0 for n in size) or any(st < 0 for st in stride):
        raise pickle.UnpicklingError(f"a tensor with a bad layout (offset {offset}, size {size}, stride {stride})")
    if 0 in size:
        return np.zeros(size, storage.dtype)
    last = offset + sum((n - 1) * st for n, st in zip(size, stride))
    if last >= storage.size:
        raise pickle.UnpicklingError(f"a tensor reads element {last} of a storage of {storage.size}")
    item = storage.itemsize
    view = np.lib.stride_tricks.as_strided(storage[offset:], shape=size, strides=[st * item for st in stride])
    return np.array(view)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None):
    return data


class _PtUnpickler(pickle.Unpickler):
    """Admits tensors (torch._utils._rebuild_tensor_v2 / _rebuild_parameter over the archive's storages) and
    collections.OrderedDict; storages are read from the zip, every other global is refused."""

    def __init__(self, data: bytes, archive: zipfile.ZipFile, prefix: str):
        super().__init__(io.BytesIO(data))
        self.archive, self.prefix = archive, prefix
        self.dtypes = _pt_dtypes()
        self.storages: dict[str, np.ndarray] = {}

    def find_class(self, module, name):
        allowed = {("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor, ("collections", "OrderedDict"):
                   collections.OrderedDict, ("torch._utils", "_rebuild_parameter"): _rebuild_parameter}
        if (module, name) in allowed:
            return allowed[module, name]
        if module == "torch" and name in self.dtypes:
            return _StorageType(name, self.dtypes[name])
        raise pickle.UnpicklingError(f"it refers to {module}.{name}, which is not a tensor or a plain container")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType) and isinstance(pid[2], str)):
            raise pickle.UnpicklingError(f"an unknown persistent reference {str(pid)[:80]}")
        _, stype, key, _location, numel = pid
        if key not in self.storages:
            try:
                raw = self.archive.read(f"{self.prefix}/data/{key}")
            except KeyError:
                raise pickle.UnpicklingError(f"storage {key} is missing from the archive") from None
            if len(raw) % stype.dtype.itemsize:
                raise pickle.UnpicklingError(f"storage {key} has {len(raw)} bytes, not a whole number of "
                                             f"{stype.name} elements")
            self.storages[key] = np.frombuffer(raw, stype.dtype.newbyteorder("<"))
        arr = self.storages[key]
        if arr.dtype != stype.dtype.newbyteorder("<") or arr.size < int(numel):
            raise pickle.UnpicklingError(f"storage {key} is used with two dtypes or is too short")
        return arr


def read_pt(path: str | Path):
    """The object a torch.save file holds (tensors as NumPy arrays, bf16 as ml_dtypes.bfloat16), read without torch
    or running pickled code: only tensors and plain containers are admitted, else a UserError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} does not exist")
    if not zipfile.is_zipfile(path):
        raise UserError(f"{path}: not a torch.save zip archive (PyTorch >= 1.6 writes one); re-save it with a "
                        f"recent PyTorch: torch.save(torch.load(f), f)")
    try:
        with zipfile.ZipFile(path) as zf:
            pkls = [n for n in zf.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
            if len(pkls) != 1:
                raise pickle.UnpicklingError(f"expected one <archive>/data.pkl, found {pkls[:4]}")
            prefix = pkls[0].split("/")[0]
            if f"{prefix}/byteorder" in zf.namelist() and zf.read(f"{prefix}/byteorder").strip() != b"little":
                raise pickle.UnpicklingError("big-endian tensors")
            return _PtUnpickler(zf.read(pkls[0]), zf, prefix).load()
    except (pickle.UnpicklingError, zipfile.BadZipFile, EOFError, ValueError, TypeError, AttributeError,
            IndexError, KeyError) as e:
        raise UserError(f"{path}: cannot be read as a checkpoint of tensors ({e}); refused without running it. "
                        f"Pass a model_<step>.pt / token_bytes.pt written by nanochat") from None


def read_pt_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """A state dict (str -> array) from a .pt file, the _orig_mod. prefix stripped."""
    obj = read_pt(path)
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, np.ndarray)
                                            for k, v in obj.items()):
        raise UserError(f"{path}: expected a state dict (names -> tensors), got {type(obj).__name__}; pass "
                        f"nanochat's model_<step>.pt")
    return strip_compile_prefix(dict(obj))


# ----------------------------------------------------------------------------------------------
# Files

def find_nanochat_steps(directory: str | Path) -> list[int]:
    return sorted(int(m.group(1)) for p in Path(directory).glob("model_*.pt")
                  if (m := re.fullmatch(r"model_(\d+)\.pt", p.name)))


def read_nanochat_checkpoint(directory: str | Path, step: int | None = None):
    """(state dict of NumPy arrays with the _orig_mod. prefix stripped, meta dict, step); step None: the largest."""
    directory = Path(directory)
    steps = find_nanochat_steps(directory)
    if not steps:
        raise FileNotFoundError(f"no nanochat checkpoint (model_<step>.pt) in {directory}")
    if step is None:
        step = steps[-1]
    if step not in steps:
        raise FileNotFoundError(f"no model_{step:06d}.pt in {directory}; steps there: {steps}")
    meta_path = directory / f"meta_{step:06d}.json"
    if not meta_path.is_file():
        raise FileNotFoundError(f"{meta_path} is missing (nanochat writes it next to model_{step:06d}.pt)")
    sd = read_pt_state_dict(directory / f"model_{step:06d}.pt")  # no torch needed
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{meta_path}: not valid JSON ({e}); copy it again from where the checkpoint came "
                        f"from") from None
    if not isinstance(meta, dict):
        raise UserError(f"{meta_path}: expected a JSON object with a model_config, got {type(meta).__name__}")
    return sd, meta, step


def load_nanochat_checkpoint(directory: str | Path, step: int | None = None, **config_overrides):
    """(params, GPTConfig, nanochat meta) from a nanochat checkpoint directory; step None: the largest."""
    sd, meta, step = read_nanochat_checkpoint(directory, step)
    cfg = config_from_nanochat(meta, sd.keys(), **config_overrides)
    return params_from_state_dict(sd, cfg), cfg, meta


def save_nanochat_checkpoint(directory: str | Path, step: int, params: gpt.Params, cfg: GPTConfig,
                             meta: dict[str, Any] | None = None) -> Path:
    """Write model_<step>.pt and meta_<step>.json as nanochat does (meta gets step and model_config set)."""
    try:
        import torch
    except ImportError as e:
        raise ImportError("writing nanochat .pt checkpoints needs PyTorch: pip install torch (CPU build is "
                          "enough)") from e
    bf16 = np.dtype(gpt._DTYPES["bfloat16"])  # torch cannot take ml_dtypes' bfloat16: go through float32
    sd = {k: torch.from_numpy(a.astype(np.float32)).to(torch.bfloat16) if a.dtype == bf16 else
          torch.from_numpy(np.ascontiguousarray(a)) for k, a in state_dict_from_params(params, cfg).items()}
    directory = Path(directory)
    model_path = directory / f"model_{step:06d}.pt"
    with atomic_write(model_path, "wb") as f:
        torch.save(sd, f)
    full_meta = {**(meta or {}), "step": int(step), "model_config": nanochat_model_config(cfg)}
    with atomic_write(directory / f"meta_{step:06d}.json", "w") as f:
        json.dump(full_meta, f, indent=2)
    return model_path

