"""Calculator tool and code sandbox: correct answers, refusals, time limits, containment."""

import os
import random
import threading
import time

import pytest

from nanochat_jax.execution import MAX_EXPR_CHARS, use_calculator

# ----------------------------------------------------------------------------------------------
# Calculator


@pytest.mark.parametrize("expr, expected", [
    ("1+2", "3"),
    ("7*6", "42"),
    ("12/4", "3.0"),  # true division gives a float, printed as Python prints it
    ("10/4", "2.5"),
    ("7//2", "3"),
    ("-7//2", "-4"),
    (" 3 - -2", "5"),  # leading spaces are fine, as in eval()
    ("(2+3)*(4-1)", "15"),
    ("1,234*2", "2468"),  # commas are dropped first: thousands separators
    ("0.1+0.2", "0.30000000000000004"),
    ("48/2 - 0.5", "23.5"),
    ("1.5*4", "6.0"),
    (".5+1.", "1.5"),
    ("123456789*987654321", "121932631112635269"),
    ('"strawberry".count("r")', "3"),
    ("'Mississippi'.count('ss')", "2"),
    ("'profile'.count('f')", "1"),  # nanochat's substring blacklist would refuse this ('file')
    ("'banana'.count('x')", "0"),
])
def test_calculator_values(expr, expected):
    assert use_calculator(expr) == expected


def test_calculator_random_arithmetic_matches_hand_rules():
    # Independent reference: exact integer arithmetic with the operator precedence written out by hand.
    rng = random.Random(1234)
    for _ in range(200):
        a, b, c, d = (rng.randint(-10**6, 10**6) for _ in range(4))
        assert use_calculator(f"{a} + {b} * {c} - {d}") == str(a + b * c - d)
        assert use_calculator(f"({a} - {b}) * ({c} + {d})") == str((a - b) * (c + d))
        if c:
            assert use_calculator(f"{a} // {c}") == str(a // c)
            assert float(use_calculator(f"{a} / {c}")) == a / c


@pytest.mark.parametrize("expr", [
    "__import__('os')",
    "__import__('os').system('echo hi')",
    "open('x')",
    "open('x').read()",
    "9**9**9",
    "2**10",
    "'a'*10**9",
    "'a'*1000",
    "x",
    "x + 1",
    "len('abc')",
    "[i for i in range(10**9)]",
    "sum(range(10**12))",
    "(lambda: 1)()",
    "'abc'.upper().count('A')",  # only .count is an allowed attribute
    "'abc'.__class__",
    "(1).real",
    "1.5.real",
    "'abc'.count",
    "'abc'.count()",
    "1/0",
    "1 if 1 else 2",
    "1 < 2",
    "()",
    "[1, 2]",
    "007",
    "",
    "   ",
    "1 % 2",
    "1;2",
    "1\n+2",
    "3 (4)",
    "'a'.count('a') + 1",
])
def test_calculator_refuses(expr):
    assert use_calculator(expr) is None


def test_calculator_refuses_non_strings_and_huge_input():
    assert use_calculator(None) is None
    assert use_calculator(12) is None
    assert use_calculator("1+" * MAX_EXPR_CHARS + "1") is None  # over the length cap


def test_calculator_never_outlives_its_limit():
    half = (MAX_EXPR_CHARS - 1) // 2
    worst = [
        "9" * half + "*" + "9" * half,  # biggest product the length cap allows
        "*".join(["99"] * (MAX_EXPR_CHARS // 3)),  # longest chain of operations
        "(" * 150 + "1" + ")" * 150,  # deep nesting
        "((((((((((" * 30 + "1",  # parser error path
        "'" + "a" * (MAX_EXPR_CHARS - 20) + "'.count('a')",
        "9**9**9**9",
    ]
    limit = 0.5
    for expr in worst:
        t0 = time.monotonic()
        use_calculator(expr, timeout_s=limit)
        assert time.monotonic() - t0 < limit, expr[:40]
    # The deadline really is checked: with no time at all even a valid long expression gives up.
    chain = "+".join(["1"] * 400)
    assert use_calculator(chain) == "400"
    assert use_calculator(chain, timeout_s=0.0) is None


def test_calculator_in_worker_threads():
    # The reference's SIGALRM only works in the main thread; the web server calls this from workers.
    results = {}

    def work(i):
        results[i] = use_calculator(f"{i} * 3 + 1")

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == {i: str(3 * i + 1) for i in range(8)}


# ----------------------------------------------------------------------------------------------
# Sandbox

from nanochat_jax.execution import ExecutionResult, execute_code  # noqa: E402


def test_correct_program_passes_and_wrong_one_fails():
    a, b = random.randint(1, 1000), random.randint(1, 1000)
    ok = execute_code(f"def add(x, y):\n    return x + y\nassert add({a}, {b}) == {a + b}\nprint(add({a}, {b}))\n")
    assert ok.success and ok.stdout == f"{a + b}\n" and ok.error is None and ok.returncode == 0
    bad = execute_code(f"def add(x, y):\n    return x - y\nassert add({a}, {b}) == {a + b}\n")
    assert not bad.success and bad.error.startswith("AssertionError") and "AssertionError" in bad.stderr
    syntax = execute_code("def f(:\n")
    assert not syntax.success and syntax.error.startswith("SyntaxError")


def test_early_exit_is_not_a_pass():
    # As in HumanEval's harness, leaving before the tests ran (SystemExit or os._exit) is a failure.
    for program in ["import sys\nsys.exit(0)\nassert False", "import os\nos._exit(0)\nassert False"]:
        r = execute_code(program)
        assert not r.success and r.error


def test_infinite_loop_is_killed_on_time():
    t0 = time.monotonic()
    r = execute_code("while True:\n    pass\n", timeout_s=1.0)
    elapsed = time.monotonic() - t0
    assert r.timeout and not r.success and r.returncode == -9
    assert 1.0 <= elapsed < 2.0
    assert execute_code("print('still alive')").stdout == "still alive\n"  # the harness survives


FORK_ATTEMPTS = [
    "import os\nos.fork()",
    "import posix\nposix.fork()",
    "import os\nos.system('true')",
    "import os\nos.posix_spawn('/bin/true', ['true'], {})",
    "import os\nos.execv('/bin/true', ['true'])",
    "import subprocess\nsubprocess.run(['true'])",
    "import multiprocessing\nmultiprocessing.Process(target=print).start()",
    "import pty\npty.fork()",
    "import ctypes\nctypes.CDLL(None).fork()",
    "import _posixsubprocess",
]


def test_fork_bomb_is_contained():
    # Each way of starting a process is tried 200 times, errors swallowed; every success would print a line.
    body = "\n".join(
        f"for _ in range(200):\n    try:\n        exec({src!r})\n        print('forked')\n    except BaseException:\n"
        f"        pass" for src in FORK_ATTEMPTS)
    r = execute_code(body + "\nprint('done')\n", timeout_s=3.0)
    assert r.success, r
    assert r.stdout == "done\n"


def test_huge_allocation_is_refused():
    r = execute_code("x = bytearray(10 * 1024**3)\nprint('allocated')\n", memory_mb=256)
    assert not r.success and r.memory_exceeded and "allocated" not in r.stdout
    assert execute_code("x = bytearray(32 * 1024**2)\nprint(len(x))").stdout == f"{32 * 1024**2}\n"


def test_files_outside_scratch_are_safe(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "inner.txt").write_text("also precious")
    attempts = [
        f"import os; os.remove({str(victim)!r})",
        f"import os; os.unlink({str(victim)!r})",
        f"import posix; posix.unlink({str(victim)!r})",
        f"import pathlib; pathlib.Path({str(victim)!r}).unlink()",
        f"import shutil; shutil.rmtree({str(folder)!r})",
        f"import os; os.rename({str(victim)!r}, {str(tmp_path / 'moved')!r})",
        f"import posix; posix.rename({str(victim)!r}, {str(tmp_path / 'moved')!r})",
        f"open({str(victim)!r}, 'w').write('overwritten')",
        f"open({str(victim)!r}, 'a').write('appended')",
        f"import os; os.truncate({str(victim)!r}, 0)",
        f"import os; os.chmod({str(victim)!r}, 0)",
        f"open({str(tmp_path / 'new.txt')!r}, 'w').write('x')",
        f"import os; os.close(os.open({str(tmp_path / 'new2.txt')!r}, os.O_CREAT | os.O_WRONLY))",
        f"import pathlib; pathlib.Path({str(tmp_path / 'new3.txt')!r}).write_text('x')",
        f"import os; os.mkdir({str(tmp_path / 'newdir')!r})",
        f"import os; os.symlink({str(victim)!r}, 'link'); open('link', 'w').write('via link')",
        f"open('../' * 20 + {str(victim)[1:]!r}, 'w').write('relative')",
        "import os; os.chdir('/')",
        # a directory fd outside, then a "relative" create through it
        f"import os; fd = os.open({str(tmp_path)!r}, os.O_RDONLY)\n"
        "os.open('new4.txt', os.O_CREAT | os.O_WRONLY, dir_fd=fd)",
        f"import os; os.utime({str(victim)!r}, (0, 0))",
    ]
    mtime = victim.stat().st_mtime
    for src in attempts:
        r = execute_code(src, timeout_s=3.0)
        assert not r.success, src
    assert victim.read_text() == "precious" and victim.stat().st_mtime == mtime
    assert (folder / "inner.txt").read_text() == "also precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder", "victim.txt"]


def test_scratch_dir_is_usable_then_removed(monkeypatch):
    monkeypatch.setenv("NANOCHAT_SECRET_TOKEN", "hunter2")
    program = ("import os\n"
               "open('data.txt', 'w').write('abc')\n"
               "os.mkdir('sub')\n"
               "open('sub/x.txt', 'w').write('x')\n"
               "print(os.getcwd())\n"
               "print(open('data.txt').read())\n"
               "print(sorted(os.environ))\n")
    r = execute_code(program)
    assert r.success, r
    cwd, data, env = r.stdout.splitlines()
    assert data == "abc"
    # Nothing inherited (no secret, no PYTHON*); LC_CTYPE is Python's own C-locale coercion (PEP 538).
    assert set(eval(env)) - {"LC_CTYPE"} == {"HOME", "PATH", "TMPDIR"}
    assert "hunter2" not in r.stdout
    assert not os.path.exists(cwd)  # deleted afterwards


def test_no_network():
    r = execute_code("import socket\ns = socket.socket()\ns.connect(('127.0.0.1', 9))\n")
    assert not r.success and "socket" in r.error
    r = execute_code("import socket\nsocket.getaddrinfo('localhost', 80)\n")
    assert not r.success
    r = execute_code("import urllib.request\nurllib.request.urlopen('http://example.com', timeout=1)\n")
    assert not r.success


def test_output_is_capped():
    r = execute_code("print('x' * 5000)", max_output_bytes=1000)
    assert r.success and r.output_truncated and r.stdout == "x" * 1000
    r = execute_code("while True:\n    print('y' * 10000)\n", max_file_mb=1, timeout_s=3.0)
    assert not r.success and not r.timeout and "File too large" in r.error  # stopped by RLIMIT_FSIZE, not time


def test_concurrent_calls_from_threads():
    results = {}

    def work(i):
        results[i] = execute_code(f"print({i} * {i})")

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert {i: r.stdout for i, r in results.items()} == {i: f"{i * i}\n" for i in range(4)}
    assert all(isinstance(r, ExecutionResult) and r.success for r in results.values())
