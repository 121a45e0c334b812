"""The jailed ``python`` tool through ToolPool: ordinary output, tracebacks, truncation,
and the hostile five (an endless loop, a 10 GB allocation, a fork bomb, writes outside
the private directory, a TCP connection), each checked for containment, not only for
an answer; the pool answers normally afterwards.

Real processes and sockets on 127.0.0.1 only. The fork bomb is bounded (200 sleeping
children at most) so a broken containment cannot hurt the machine.
"""

import os
import shutil
import socket
import tempfile
import time

import pytest

from asyncrl.tools import ToolPool
from asyncrl.tools.sandbox import SandboxLimits, run_python

TIMEOUT_S = 2.0
MAX_PROCS = 16


@pytest.fixture(scope="module")
def work_root():
    # World-enterable (as root the code runs as uid 65534), so leftovers can be found by cwd.
    root = tempfile.mkdtemp(prefix="asyncrl-tooltest-")
    os.chmod(root, 0o755)
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def pool(work_root):
    with ToolPool(processes=2, timeout_s=TIMEOUT_S, max_output_chars=500, max_processes=MAX_PROCS,
                  work_root=work_root) as p:
        yield p


def _limits(work_root, **kw) -> SandboxLimits:
    return SandboxLimits(timeout_s=TIMEOUT_S, max_output_chars=500, max_processes=MAX_PROCS, work_root=work_root, **kw)


def _processes_under(root: str) -> list[int]:
    """Live processes started for a private directory inside ``root``: the sandbox's
    environment names it (TMPDIR); their cwd cannot say, it lies in another mount namespace."""
    found, marker = [], f"TMPDIR={root}/".encode()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                if any(v.startswith(marker) for v in f.read().split(b"\0")):
                    found.append(int(pid))
        except OSError:
            pass
    return found


def test_output_traceback_and_truncation(pool):
    code_ok = "import math\nprint(sum(i * i for i in range(10)), math.factorial(5))"
    code_err = "def f():\n    raise ValueError('bad input 42')\nf()"
    obs_ok, obs_err, obs_big, calc = pool.run([("python", code_ok), ("python", code_err),
                                               ("python", "print('a' * 100000 + 'END')"), ("calculator", "6*7")])
    assert obs_ok == "285 120\n"
    assert "ValueError: bad input 42" in obs_err and "line 2, in f" in obs_err and obs_err.endswith("[exit status 1]")
    assert len(obs_big) <= 500 and obs_big.startswith("aaa") and "END" in obs_big  # the tail is kept
    assert "characters truncated" in obs_big
    assert calc == "42"


def test_environment_is_clean_and_stdin_closed(pool, monkeypatch):
    monkeypatch.setenv("ASYNCRL_SECRET_TOKEN", "hunter2")
    obs = pool.run([("python", "import os, sys\nprint(sorted(os.environ))\nprint(repr(sys.stdin.read()))")])[0]
    assert "ASYNCRL_SECRET_TOKEN" not in obs and "hunter2" not in obs
    assert "''" in obs  # stdin is /dev/null


def test_unknown_tool_is_a_clear_error(pool):
    with pytest.raises(ValueError, match="unknown tool"):
        pool.run([("python", "print(1)"), ("shell", "ls")])
    with pytest.raises(ValueError, match="unknown tool"):
        ToolPool(1, 1.0, 100, tools=("python", "browser"))


def test_endless_loop_times_out_and_leaves_no_process(pool, work_root):
    start = time.monotonic()
    obs = pool.run([("python", "print('spinning', flush=True)\nwhile True:\n    pass")])[0]
    elapsed = time.monotonic() - start
    assert obs.startswith("spinning") and obs.endswith(f"[timed out after {TIMEOUT_S:.1f} s]")
    assert elapsed < TIMEOUT_S + 5.0
    assert _processes_under(work_root) == []


def test_ten_gigabytes_is_refused(pool, work_root):
    obs = pool.run([("python", "x = bytearray(10 * 2**30)\nprint('allocated', len(x))")])[0]
    assert "MemoryError" in obs and "allocated" not in obs
    assert _processes_under(work_root) == []


def test_fork_bomb_is_capped_and_cleaned_up(work_root):
    # Each child leaves the process group (setsid) and sleeps: a cap that failed would
    # show as 200 children, a cleanup that failed as sleepers left behind.
    code = (
        "import os, time\n"
        "n = 0\n"
        "for _ in range(200):\n"
        "    try:\n"
        "        pid = os.fork()\n"
        "    except OSError as e:\n"
        "        print('fork refused:', e.strerror)\n"
        "        break\n"
        "    if pid == 0:\n"
        "        os.setsid()\n"
        "        time.sleep(30)\n"
        "        os._exit(0)\n"
        "    n += 1\n"
        "print('children', n, flush=True)\n"
    )
    res = run_python(code, _limits(work_root))
    obs = res.observation()
    assert "fork refused: Resource temporarily unavailable" in obs, obs
    children = int(obs.split("children")[1].split()[0])
    assert 0 < children < MAX_PROCS
    assert res.layers["nproc_enforced"] and res.layers["pidns"]
    assert _processes_under(work_root) == []


def test_writes_outside_the_directory_do_not_land(work_root):
    target = tempfile.mkdtemp(prefix="asyncrl-tooltest-target-")
    os.chmod(target, 0o777)  # open to every uid: only the jail can stop the write
    victim = os.path.join(target, "victim.txt")
    outside = f"/tmp/asyncrl-planted-{os.getpid()}-{time.monotonic_ns()}"
    with open(victim, "w") as f:
        f.write("original")
    os.chmod(victim, 0o666)
    try:
        code = (
            f"import os\n"
            f"for op, path in [('new', {target!r} + '/planted.txt'), ('overwrite', {victim!r}),"
            f" ('new', {outside!r})]:\n"
            f"    try:\n"
            f"        open(path, 'w' if op == 'new' else 'r+').write('pwned')\n"
            f"        print(op, path, 'WRITTEN')\n"
            f"    except OSError as e:\n"
            f"        print(op, 'refused:', e.strerror)\n"
            f"try:\n"
            f"    os.chmod({victim!r}, 0o777)\n"
            f"    print('chmod DONE')\n"
            f"except OSError as e:\n"
            f"    print('chmod refused:', e.strerror)\n"
            f"open('inside.txt', 'w').write('ok')\n"
            f"print('inside', open('inside.txt').read())\n"
        )
        res = run_python(code, _limits(work_root))
        obs = res.observation()
        assert "WRITTEN" not in obs and "DONE" not in obs, obs
        assert obs.count("refused: Read-only file system") == 4, obs
        assert "inside ok" in obs  # its own directory is writable
        assert not os.path.exists(os.path.join(target, "planted.txt"))
        assert not os.path.exists(outside)
        with open(victim) as f:
            assert f.read() == "original"
        assert os.stat(victim).st_mode & 0o777 == 0o666
    finally:
        shutil.rmtree(target, ignore_errors=True)
        if os.path.exists(outside):
            os.remove(outside)


def test_no_network_tcp_or_udp(work_root):
    tcp = socket.socket()
    tcp.bind(("127.0.0.1", 0))
    tcp.listen(8)
    tcp.settimeout(0.5)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    udp.settimeout(0.5)
    try:
        code = (
            "import socket\n"
            "print('interfaces', [name for _, name in socket.if_nameindex()])\n"
            "try:\n"
            f"    socket.create_connection(('127.0.0.1', {tcp.getsockname()[1]}), timeout=1)\n"
            "    print('tcp CONNECTED')\n"
            "except OSError as e:\n"
            "    print('tcp refused:', e.strerror)\n"
            "try:\n"
            "    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
            f"    s.sendto(b'x', ('127.0.0.1', {udp.getsockname()[1]}))\n"
            "    print('udp SENT')\n"
            "except OSError as e:\n"
            "    print('udp refused:', e.strerror)\n"
        )
        res = run_python(code, _limits(work_root))
        obs = res.observation()
        assert "interfaces ['lo']" in obs, obs  # an empty network namespace
        assert "tcp refused" in obs and "CONNECTED" not in obs, obs
        assert "udp refused" in obs and "SENT" not in obs, obs
        with pytest.raises(socket.timeout):
            tcp.accept()
        with pytest.raises(socket.timeout):
            udp.recvfrom(16)
    finally:
        tcp.close()
        udp.close()


def test_pool_still_answers_after_the_hostile_cases(pool, work_root):
    obs = pool.run([("python", "print('still here')"), ("calculator", "2 ** 10")])
    assert obs == ["still here\n", "1024"]
    assert _processes_under(work_root) == []
    assert os.listdir(work_root) == []  # every private directory was removed
