"""Things every stage needs: the base directory, logging, atomic writes, downloads, peak FLOPs for MFU.
Imports nothing from the package, and JAX only lazily: data and tokenizer tools start fast without a backend.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

BASE_DIR_ENV = "NANOCHAT_JAX_BASE_DIR"
DATA_DIR_ENV = "NANOCHAT_JAX_DATA_DIR"
DEBUG_ENV = "NANOCHAT_JAX_DEBUG"


# Errors a user can fix: one line, no traceback.

class UserError(Exception):
    """A problem the user can fix (a missing or corrupt file, flags that contradict a checkpoint): its message
    names the file and what to do, and scripts print it as one line without a traceback."""


# What scripts report as one line: UserError and the OSError/ValueError our code raises for missing files and bad
# values. Anything else is a bug: full traceback.
USER_ERRORS = (UserError, OSError, ValueError)


def debug_enabled() -> bool:
    return os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")


@contextlib.contextmanager
def held_background_errors():
    """Hold the tracebacks that libraries' background work prints while the block runs (thread and unraisable
    exceptions, asyncio's "Task exception was never retrieved"): replayed if the block succeeds, else kept quiet, as
    the block's own exception speaks for the failure (orbax's concurrent reads of a damaged checkpoint keep failing
    after the first one raised). NANOCHAT_JAX_DEBUG=1 shows them all."""
    import threading

    held = []
    saved = (sys.excepthook, sys.unraisablehook, threading.excepthook)
    asyncio_log = logging.getLogger("asyncio")

    def log_filter(record):  # a callable filter: hold the record, drop it from the log
        held.append((asyncio_log.handle, (record,)))
        return False

    sys.excepthook = lambda *a: held.append((saved[0], a))
    sys.unraisablehook = lambda u: held.append((saved[1], (u,)))
    threading.excepthook = lambda a: held.append((saved[2], (a,)))
    asyncio_log.addFilter(log_filter)

    def release():
        sys.excepthook, sys.unraisablehook, threading.excepthook = saved
        asyncio_log.removeFilter(log_filter)
        for hook, args in held:
            hook(*args)

    try:
        yield
    except BaseException:
        if debug_enabled():
            release()
        raise
    release()


def run_main(main, *args, **kwargs):
    """Run a script's entry point. A user's mistake (USER_ERRORS) ends it with `error: <message>` on stderr and
    exit status 1; Ctrl-C with status 130. NANOCHAT_JAX_DEBUG=1 re-raises, to show the traceback."""
    try:
        return main(*args, **kwargs)
    except USER_ERRORS as e:
        if debug_enabled():
            raise
        # Libraries' half-finished work (e.g. orbax's read coroutines after a corrupt checkpoint) would otherwise
        # print "Exception ignored in ..." tracebacks while the process winds down.
        sys.unraisablehook = lambda unraisable: None
        print(f"error: {e}", file=sys.stderr, flush=True)
        print(f"(set {DEBUG_ENV}=1 to see the traceback)", file=sys.stderr, flush=True)
        sys.exit(1)
    except KeyboardInterrupt:
        if debug_enabled():
            raise
        print("interrupted", file=sys.stderr, flush=True)
        sys.exit(130)


def get_base_dir() -> Path:
    """Where tokenizers, shards, checkpoints and reports live: $NANOCHAT_JAX_BASE_DIR or ~/.cache/nanochat_jax."""
    path = Path(os.environ.get(BASE_DIR_ENV) or Path.home() / ".cache" / "nanochat_jax")
    path.mkdir(parents=True, exist_ok=True)
    return path


# Logging: one format everywhere; only process 0 talks (other processes log warnings and up).

def process_index() -> int:
    """JAX process index if JAX is already imported and initialised, else 0 (never imports JAX itself)."""
    jax = sys.modules.get("jax")
    if jax is None:
        return 0
    try:
        # Asking before the backend exists would initialise it, and then jax.distributed.initialize() could no
        # longer run: until then, trust the launcher's environment.
        from jax._src import xla_bridge

        if not xla_bridge.backends_are_initialized():
            return int(os.environ.get("JAX_PROCESS_ID", "0"))
        return jax.process_index()
    except Exception:
        return 0


def get_logger() -> logging.Logger:
    logger = logging.getLogger("nanochat_jax")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname).1s %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
        logger.propagate = False
    logger.setLevel(logging.INFO if process_index() == 0 else logging.WARNING)
    return logger


def print0(*args, **kwargs) -> None:
    """print() on process 0 only (nanochat's print0)."""
    if process_index() == 0:
        print(*args, **kwargs, flush=True)


# Files: nothing half-written ever carries the final name.

@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb"):
    """Open a temp file next to `path`; on success fsync and rename it over `path`, on error delete it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the mode open() would have
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# Downloads: the one HTTP fetch every dataset, bundle and task file goes through.

class DownloadError(RuntimeError):
    """A download failed: after its last attempt, or at once where retrying cannot help."""


class RetryDownload(Exception):
    """A failure another attempt may fix (HTTP 408/429/5xx, a short body, a file `validate` finds truncated)."""


def download(url: str, path: str | os.PathLike, *, attempts: int = 5, backoff: float = 2.0, timeout: float = 60.0,
             validate=None) -> Path:
    """Stream `url` into a dot-temp file beside `path`, renamed to it once complete and accepted by `validate(tmp)`.
    Connection errors, timeouts, HTTP 408/429/5xx, short bodies and RetryDownload from `validate` are retried after
    backoff**attempt seconds; other HTTP statuses (DownloadError) and other `validate` errors fail at once."""
    import requests

    if attempts < 1:
        raise ValueError(f"attempts must be >= 1, got {attempts}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    last = None
    for attempt in range(1, attempts + 1):
        tmp = path.with_name(f".{path.name}.{os.urandom(4).hex()}.tmp")  # dot: folder listings skip it
        try:
            with requests.get(url, stream=True, timeout=timeout) as r:
                if r.status_code != 200:
                    retry = r.status_code in (408, 429) or r.status_code >= 500
                    raise (RetryDownload if retry else DownloadError)(f"HTTP {r.status_code} {r.reason}")
                with open(tmp, "xb") as f:
                    for chunk in r.iter_content(1 << 20):  # stream: never hold a ~100 MB shard in memory
                        f.write(chunk)
                    f.flush()
                    os.fsync(f.fileno())
                    n_bytes = f.tell()
                # iter_content undoes any Content-Encoding, so only compare sizes for plain bodies
                expected = r.headers.get("Content-Length")
                if expected is not None and r.headers.get("Content-Encoding", "identity") == "identity" \
                        and n_bytes != int(expected):
                    raise RetryDownload(f"connection closed after {n_bytes} of {expected} bytes")
            if validate is not None:
                validate(tmp)
            os.replace(tmp, path)
            return path
        except DownloadError as e:
            raise DownloadError(f"{url}: {e}") from None
        except requests.RequestException as e:
            last = f"{type(e).__name__}: {e}"
        except RetryDownload as e:
            last = str(e)
        finally:
            tmp.unlink(missing_ok=True)
        if attempt < attempts:
            delay = backoff ** attempt
            print0(f"{path.name}: attempt {attempt}/{attempts} failed ({last}); retrying in {delay:.2f} s")
            time.sleep(delay)
    raise DownloadError(f"{url}: failed after {attempts} attempts; last error: {last}")


# Peak dense bf16 FLOP/s per device (no sparsity), for MFU. Matched by substring of device_kind,
# most specific first.

PEAK_BF16_FLOPS = [("H200", 989e12), ("H100 PCIE", 756e12), ("H100", 989e12), ("H800", 989e12), ("H20", 148e12),
                   ("GH200", 989e12), ("B200", 2250e12), ("B100", 1750e12), ("A100", 312e12), ("A800", 312e12),
                   ("A10G", 125e12), ("A10", 125e12), ("L40S", 362e12), ("L4", 121e12), ("RTX 4090", 165e12),
                   ("RTX 3090", 71e12), ("V100", 125e12), ("TPU v5p", 459e12), ("TPU v5 lite", 197e12),
                   ("TPU v4", 275e12), ("TPU v6", 918e12)]  # "H100 PCIE" (756) before "H100" (SXM)


def get_peak_flops(device_kind: str) -> float:
    """Peak bf16 FLOP/s of one device of this kind, or inf (so MFU reads 0) when unknown, e.g. on CPU."""
    return next((flops for name, flops in PEAK_BF16_FLOPS if name.upper() in device_kind.upper()), float("inf"))


def path_str(path) -> str:
    """'blocks/attn/wq' from a jax key path: dict keys, NamedTuple/dataclass fields and sequence indices alike. The
    one naming scheme the sharding rules, optimizer groups and checkpoints all use."""
    return "/".join(next((str(getattr(e, a)) for a in ("key", "name", "idx") if hasattr(e, a)), str(e)) for e in path)


class Timer:
    """`with Timer() as t: ...; t.seconds`"""

    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start
        return False


def pow2_bucket(n: int, minimum: int = 1) -> int:
    """The power of two >= max(n, minimum): lengths padded to these give few static shapes, so few compilations."""
    return 1 << (max(n, minimum) - 1).bit_length()


def format_duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"
