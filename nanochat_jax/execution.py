"""Running model-written code: the calculator tool (inside chat) and the HumanEval sandbox.

use_calculator: nanochat's calculator (nanochat/engine.py, `use_calculator`) as a walk over a whitelisted AST
instead of eval() with SIGALRM, so it works from any thread and has no builtins or names to escape through.
execute_code: a whole program in a fresh, limited subprocess; defence in depth against wrong model code, not a
security boundary against an attacker (each measure says what it does and does not guarantee).
"""

from __future__ import annotations

import ast
import contextlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

CALCULATOR_TIMEOUT_S = 3.0  # nanochat's SIGALRM limit
MAX_EXPR_CHARS = 1000  # a model's tool call is a short expression; this also bounds the cost of any one operation
_ARITH_CHARS = frozenset("0123456789*+-/.() ")
_STRING_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789'\"()._ ")
_BINOPS = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b,
           ast.Div: lambda a, b: a / b, ast.FloorDiv: lambda a, b: a // b}
_UNARYOPS = {ast.UAdd: lambda a: +a, ast.USub: lambda a: -a}


class _Refused(Exception):
    pass


def use_calculator(expr: str, timeout_s: float = CALCULATOR_TIMEOUT_S) -> str | None:
    """str(value) of a calculator expression (the text the engine forces after <|output_start|>), or None when it
    is refused, invalid, fails or runs out of time. Accepted, as in nanochat, after removing commas: arithmetic
    (`0123456789*+-/.() `, no `**`; "12/4" -> "3.0") or a string literal's .count(string literal). Nothing else
    is evaluated, so nanochat's substring blacklist is not needed ('profile'.count('f') works). timeout_s is
    checked between operations, each cheap because expr is at most MAX_EXPR_CHARS long."""
    deadline = time.monotonic() + timeout_s
    expr = expr.replace(",", "") if isinstance(expr, str) else ""
    arithmetic = set(expr) <= _ARITH_CHARS and "**" not in expr
    counting = set(expr) <= _STRING_CHARS and ".count(" in expr
    if not expr or len(expr) > MAX_EXPR_CHARS or not (arithmetic or counting):
        return None
    try:
        tree = ast.parse(expr.strip(), mode="eval")  # eval() also ignores leading spaces
        value = _calc(tree.body, deadline)
        text = str(value)  # ints over 4300 digits raise ValueError here: refused too
    except (_Refused, SyntaxError, ValueError, ArithmeticError, TypeError, RecursionError, MemoryError):
        return None
    return text if time.monotonic() <= deadline else None


def _calc(node: ast.AST, deadline: float):
    if time.monotonic() > deadline:
        raise _Refused("timeout")
    if isinstance(node, ast.Constant) and type(node.value) in (int, float, str):
        return node.value
    if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
        return _BINOPS[type(node.op)](_number(node.left, deadline), _number(node.right, deadline))
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARYOPS:
        return _UNARYOPS[type(node.op)](_number(node.operand, deadline))
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "count"
            and not node.keywords and len(node.args) == 1):
        s, sub = _calc(node.func.value, deadline), _calc(node.args[0], deadline)
        if not (type(s) is str and type(sub) is str):
            raise _Refused(".count is only for strings")
        return s.count(sub)
    raise _Refused(f"{type(node).__name__} not allowed")


def _number(node: ast.AST, deadline: float):
    x = _calc(node, deadline)
    if type(x) not in (int, float):
        raise _Refused("arithmetic on non-numbers")  # e.g. 'ab' * 3
    return x


SANDBOX_PATH = "/usr/bin:/bin"


@dataclass
class ExecutionResult:
    """What running one program gave. success: it ran to the end without an exception, in time."""
    success: bool
    stdout: str = ""
    stderr: str = ""
    error: str | None = None  # short reason when not successful
    timeout: bool = False
    memory_exceeded: bool = False
    returncode: int | None = None  # of the child interpreter; negative = killed by that signal
    output_truncated: bool = False  # stdout/stderr were cut to max_output_bytes
    network_isolated: bool = False  # the child ran in its own (empty) network namespace

    def __repr__(self) -> str:  # short: outputs can be a megabyte
        fields = ", ".join(f"{k}={v!r:.200}" for k, v in self.__dict__.items()
                           if k in ("success", "returncode") or v not in ("", None, False))
        return f"ExecutionResult({fields})"


# The child: `python -I -B -c _CHILD <config json>` with the program on stdin; everything before exec(program) is
# ours. Plain source, not a function, so that the child imports nothing from this package.
_CHILD = r'''
import builtins, json, os, resource, signal, sys, traceback
cfg = json.loads(sys.argv[1])
program = sys.stdin.buffer.read().decode("utf-8", "replace")
devnull = os.open(os.devnull, os.O_RDONLY)
os.dup2(devnull, 0)
os.close(devnull)
status_fd = cfg["status_fd"]
_write, _exit = os.write, os._exit

def report(code, **status):
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except BaseException as e:  # e.g. output over the file-size limit
        if code == 0:
            code, status = 1, {"error": "output: " + type(e).__name__ + ": " + str(e), "net": status.get("net")}
    _write(status_fd, json.dumps(status).encode())
    _exit(code)

# Network: a fresh network namespace has only a loopback device that is down, so no packet leaves. Needs root or
# unprivileged user namespaces; without them the audit hook below still refuses sockets from Python.
net_isolated = False
for flags in (os.CLONE_NEWNET, os.CLONE_NEWUSER | os.CLONE_NEWNET):
    try:
        os.unshare(flags)
        net_isolated = True
        break
    except (OSError, AttributeError):
        pass

# Kernel limits, hard and soft alike (root could raise them again, so the audit hook refuses resource.setrlimit).
# RLIMIT_NPROC does not bind root: there, forks are stopped only by the audit hook and the disabled functions.
mem = cfg["memory_bytes"]
limits = [(resource.RLIMIT_FSIZE, cfg["file_bytes"]), (resource.RLIMIT_NPROC, 0), (resource.RLIMIT_CORE, 0),
          (resource.RLIMIT_CPU, cfg["cpu_seconds"]), (resource.RLIMIT_NOFILE, 64)]
if mem:
    limits += [(resource.RLIMIT_AS, mem), (resource.RLIMIT_DATA, mem)]
for which, value in limits:
    try:
        resource.setrlimit(which, (value, value))
    except (OSError, ValueError):
        pass
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # over the file-size limit: the write fails (EFBIG), no crash

# Audit hook (PEP 578): cannot be removed from Python and sees C-level events, so it also stops forks, spawns,
# sockets and deletes that bypass the disabled attributes below. Raw syscalls (ctypes, cffi, _posixsubprocess)
# would bypass it, so importing those is refused.
scratch = os.path.realpath(cfg["scratch"])
BLOCKED = {
    "os.system", "os.fork", "os.forkpty", "os.exec", "os.posix_spawn", "os.spawn", "subprocess.Popen",
    "os.kill", "os.killpg", "signal.pthread_kill", "os.remove", "os.rmdir", "os.rename", "shutil.rmtree",
    "os.chmod", "os.chown", "os.chflags", "os.chdir", "os.chroot", "os.link", "os.symlink", "os.truncate", "os.putenv",
    "os.unsetenv", "os.setxattr", "os.removexattr", "socket.__new__", "socket.connect", "socket.bind",
    "socket.sendto", "socket.getaddrinfo", "socket.gethostbyname", "socket.gethostbyaddr", "ctypes.dlopen",
    "ctypes.dlsym", "resource.setrlimit", "resource.prlimit", "sys.addaudithook",
}
BLOCKED_IMPORTS = {"ctypes", "_ctypes", "cffi", "_cffi_backend", "_posixsubprocess", "multiprocessing",
                   "_multiprocessing"}
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC
_join, _realpath, _isdir, _fspath, _fsdecode = os.path.join, os.path.realpath, os.path.isdir, os.fspath, os.fsdecode

def inside_scratch(path):
    path = _fsdecode(_fspath(path))
    if not path.startswith("/"):
        path = _join(scratch, path)  # cwd is scratch and os.chdir is refused
    path = _realpath(path)
    return path == scratch or path.startswith(scratch + "/")

def hook(event, args):
    if event in BLOCKED:
        raise PermissionError("sandbox: " + event + " is not allowed")
    if event == "import" and args[0].partition(".")[0] in BLOCKED_IMPORTS:
        raise ImportError("sandbox: importing " + args[0] + " is not allowed")
    if event == "open":
        path, mode, flags = args
        writing = flags & WRITE_FLAGS if isinstance(flags, int) and flags >= 0 else any(c in str(mode) for c in "wax+")
        if isinstance(path, int):
            if writing and path not in (1, 2):
                raise PermissionError("sandbox: writing to inherited file descriptors is not allowed")
        elif writing and not inside_scratch(path):
            raise PermissionError("sandbox: writing outside the scratch directory is not allowed: " + repr(path))
        elif mode is None and _isdir(path) and not inside_scratch(path):
            # os.open of a directory would give a dir_fd, and this event does not show dir_fd: a later
            # os.open("x", O_CREAT, dir_fd=fd) would look like a write inside scratch.
            raise PermissionError("sandbox: opening directories outside the scratch directory is not allowed")
    if event in ("os.mkdir", "os.utime") and not isinstance(args[0], int) and not inside_scratch(args[0]):
        raise PermissionError("sandbox: " + event + " outside the scratch directory is not allowed: " + repr(args[0]))

# Defence in depth (as HumanEval's reliability_guard): the destructive functions are simply gone.
import shutil
for name in ("kill", "killpg", "system", "putenv", "unsetenv", "remove", "removedirs", "rmdir", "unlink", "rename",
             "renames", "replace", "truncate", "fork", "forkpty", "fchdir", "chdir", "chroot", "setuid", "setgid",
             "chmod", "fchmod", "lchmod", "chown", "fchown", "lchown", "lchflags", "posix_spawn", "posix_spawnp",
             "execv", "execve", "spawnv", "spawnve", "link", "symlink"):
    if hasattr(os, name):
        setattr(os, name, None)
for name in ("rmtree", "move", "chown"):
    setattr(shutil, name, None)
builtins.exit = builtins.quit = builtins.help = None
sys.addaudithook(hook)

try:
    code = compile(program, "<program>", "exec")
    exec(code, {"__name__": "__main__", "__builtins__": builtins})
except MemoryError as e:
    report(1, error="MemoryError: " + str(e), memory_exceeded=True, net=net_isolated)
except BaseException as e:  # SystemExit too: a program that exits early has not passed its tests
    try:
        traceback.print_exc()
    except BaseException:
        pass
    report(1, error=type(e).__name__ + ": " + str(e)[:500], net=net_isolated)
report(0, ok=True, net=net_isolated)
'''


def execute_code(program: str, timeout_s: float = 5.0, memory_mb: int | None = 256, max_file_mb: int = 16,
                 max_output_bytes: int = 1 << 20, python: str | None = None) -> ExecutionResult:
    """Run `program` in a fresh `python -I -B` (isolated mode, no .pyc) in its own session, with only PATH (and
    HOME/TMPDIR = a scratch directory, its cwd, removed afterwards) and an empty stdin. timeout_s is wall clock
    from startup, backed by RLIMIT_CPU; memory_mb (None: no limit) and max_file_mb (files and captured output) are
    rlimits; _CHILD lists the other measures. A program running as root is not stopped by file permissions, so the
    audit hook is what guards the disk: enough for buggy model code, not for an adversary who reaches raw
    syscalls. success: it ran to its end without an exception (SystemExit included, as in HumanEval's harness).
    The status channel is a file descriptor the program could write itself: this judges mistakes, not forgeries."""
    deadline = time.monotonic() + timeout_s
    scratch = tempfile.mkdtemp(prefix="nanochat_exec_")
    try:  # stdin, outputs and status are nameless temp files, which the child inherits as descriptors
        with tempfile.TemporaryFile() as stdin, tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err, \
                tempfile.TemporaryFile() as status:
            stdin.write(program.encode("utf-8", "replace"))
            stdin.seek(0)
            cfg = {"scratch": scratch, "status_fd": status.fileno(),
                   "memory_bytes": int(memory_mb * 2**20) if memory_mb else 0,
                   "file_bytes": int(max_file_mb * 2**20), "cpu_seconds": max(1, math.ceil(timeout_s) + 1)}
            env = {"PATH": SANDBOX_PATH, "HOME": scratch, "TMPDIR": scratch}
            proc = subprocess.Popen([python or sys.executable, "-I", "-B", "-c", _CHILD, json.dumps(cfg)], stdin=stdin,
                                    stdout=out, stderr=err, cwd=scratch, env=env, pass_fds=(status.fileno(),),
                                    start_new_session=True)
            timed_out = False
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                # Also anything it left behind. Safe after the leader was reaped: Linux does not reuse a pid that
                # is still some live process's group or session id, and with none left the kill finds nothing.
                _kill_session(proc.pid)
                proc.wait()
            stdout, cut_out = _read_capped(out, max_output_bytes)
            stderr, cut_err = _read_capped(err, max_output_bytes)
            try:
                status_info = json.loads(_read_capped(status, 1 << 16)[0] or "{}")
            except ValueError:
                status_info = None
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    status_info = status_info if isinstance(status_info, dict) else {}

    rc = proc.returncode
    result = ExecutionResult(success=False, stdout=stdout, stderr=stderr, returncode=rc,
                             output_truncated=cut_out or cut_err, network_isolated=bool(status_info.get("net")))
    if timed_out:
        result.timeout, result.error = True, f"timed out after {timeout_s:g} s (process group killed)"
    elif status_info.get("ok") is True and rc == 0:
        result.success = True
    elif status_info.get("error"):
        result.error = str(status_info["error"])
        result.memory_exceeded = bool(status_info.get("memory_exceeded"))
    elif rc is not None and rc < 0:
        name = signal.Signals(-rc).name if -rc in signal.valid_signals() else str(-rc)
        result.error = f"killed by signal {name}"
        result.timeout = name == "SIGXCPU"  # the CPU-time backstop
    else:
        result.error = f"exited with code {rc} without reporting a result"
    return result


def _read_capped(f, limit: int) -> tuple[str, bool]:
    f.seek(0)
    data = f.read(limit + 1)
    return data[:limit].decode("utf-8", "replace"), len(data) > limit


def _kill_session(sid: int) -> None:
    """SIGKILL the process group `sid` and every process whose session or group is `sid` (Linux /proc scan)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(sid, signal.SIGKILL)
    try:
        pids = [int(entry) for entry in os.listdir("/proc") if entry.isdigit()]
    except OSError:
        return
    for pid in pids:
        with contextlib.suppress(OSError, IndexError, ValueError):
            with open(f"/proc/{pid}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()  # after "(comm)": state ppid pgrp session ...
            if int(fields[2]) == sid or int(fields[3]) == sid:
                os.kill(pid, signal.SIGKILL)
