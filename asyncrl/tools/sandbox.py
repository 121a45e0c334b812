"""The ``python`` tool's parent side: run untrusted code once, in a fresh jailed process,
and turn whatever happens (output, traceback, timeout, a limit) into observation text.

Each call gets a private temporary directory (removed afterwards) holding ``main.py``,
a clean environment, stdin closed, stdout and stderr on one pipe, and a new session so
a timeout kills the whole process group. The jail itself (namespaces, read-only
filesystem, Landlock, rlimits) is ``_jail.py``, run as a separate script; it reports
which layers held on a pipe and this module logs, once per process, any that did not.
"""

from __future__ import annotations

import json
import logging
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

log = logging.getLogger(__name__)

JAIL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_jail.py")
NOBODY = 65534
KILL_GRACE_S = 1.0
GROUP_EXIT_WAIT_S = 5.0  # the jail's own clock fires this much after ours, as a backstop
_warned: set[str] = set()


@dataclass(frozen=True)
class SandboxLimits:
    """What one ``python`` call may use."""

    timeout_s: float = 5.0  # wall clock, then the process group is killed
    max_output_chars: int = 4000  # observation length; the middle of longer output is cut
    memory_mb: int = 1024  # RLIMIT_AS (virtual address space: numpy alone maps ~300 MB)
    cpu_s: int | None = None  # RLIMIT_CPU; None = ceil(timeout_s) + 1
    max_processes: int = 32  # RLIMIT_NPROC inside the sandbox's user namespace (threads count)
    max_file_mb: int = 16  # RLIMIT_FSIZE: the largest file the code may write
    max_open_files: int = 256  # RLIMIT_NOFILE
    work_root: str | None = None  # where private directories are made (None: the system temp dir);
    # as root it must be enterable by uid 65534

    def __post_init__(self) -> None:
        for name in ("timeout_s", "max_output_chars", "memory_mb", "max_processes", "max_file_mb", "max_open_files"):
            if getattr(self, name) <= 0:
                raise ValueError(f"sandbox limit {name} must be > 0, got {getattr(self, name)}")
        if self.max_processes < 4:
            raise ValueError("sandbox max_processes must be >= 4 (the jail and the interpreter count)")


@dataclass
class RunResult:
    """What happened to one call; ``observation()`` is what the model sees."""

    output: str
    dropped: int  # output bytes drained but not kept (the middle of a huge output)
    returncode: int | None  # None: killed by us on timeout
    timed_out: bool
    elapsed_s: float
    layers: dict  # the jail's report (which isolation layers held)
    limits: SandboxLimits

    def observation(self) -> str:
        out = truncate(self.output, self.limits.max_output_chars, self.dropped)
        if self.timed_out:
            note = f"timed out after {self.limits.timeout_s:.1f} s"
        elif self.returncode is not None and self.returncode < 0:
            note = _signal_note(-self.returncode)
        elif self.returncode:
            note = f"exit status {self.returncode}"
        else:
            return out if out else "(no output)"
        return f"{out.rstrip()}\n[{note}]" if out.strip() else note


def _signal_note(sig: int) -> str:
    name = signal.Signals(sig).name if sig in signal.Signals._value2member_map_ else str(sig)
    why = {"SIGXCPU": "CPU time limit", "SIGKILL": "killed (memory, process or time limit)",
           "SIGXFSZ": "file size limit", "SIGSEGV": "crashed"}.get(name, "killed")
    return f"{why}: {name}"


def truncate(text: str, max_chars: int, dropped: int = 0) -> str:
    """Keep the head and the tail (a traceback's last line is the useful one); ``dropped``
    counts output already cut from the middle of ``text``."""
    if len(text) <= max_chars and not dropped:
        return text
    marker = f"\n...[{len(text) - max_chars + dropped} characters truncated]...\n"
    keep = max(max_chars - len(marker), 0)
    return text[: keep // 2] + marker + text[len(text) - (keep - keep // 2):]


def _needed_paths() -> list[str]:
    """What the interpreter must still see when the jail hides unreadable directories."""
    paths = [sys.base_prefix, sys.prefix, os.path.dirname(os.path.realpath(sys.executable))]
    return paths + [p for p in sys.path if p and os.path.isdir(p)]


def _env(workdir: str) -> dict[str, str]:
    """A clean environment: nothing of the trainer's (tokens, keys) is inherited."""
    return {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8",
            "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def run_python(code: str, limits: SandboxLimits) -> RunResult:
    """Run ``code`` jailed; never raises for anything the code does."""
    workdir = tempfile.mkdtemp(prefix="asyncrl-py-", dir=limits.work_root)
    try:
        with open(os.path.join(workdir, "main.py"), "w", encoding="utf-8") as f:
            f.write(code)
        if os.geteuid() == 0:  # the jail runs the code as nobody
            for path in (workdir, os.path.join(workdir, "main.py")):
                os.chown(path, NOBODY, NOBODY)
        return _run_jail(workdir, limits)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _run_jail(workdir: str, limits: SandboxLimits) -> RunResult:
    params = {"workdir": workdir, "python": os.path.realpath(sys.executable), "needed": _needed_paths(),
              "env": _env(workdir), "wall_s": limits.timeout_s + KILL_GRACE_S,
              "memory_bytes": limits.memory_mb << 20, "cpu_s": limits.cpu_s or int(limits.timeout_s) + 2,
              "fsize_bytes": limits.max_file_mb << 20, "nproc": limits.max_processes,
              "nofile": limits.max_open_files}
    report_r, report_w = os.pipe()
    params["report_fd"] = report_w
    start = time.monotonic()
    try:
        proc = subprocess.Popen([sys.executable, "-I", "-S", JAIL, json.dumps(params)], cwd=workdir,
                                env=_env(workdir), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, start_new_session=True, pass_fds=(report_w,),
                                close_fds=True)
    finally:
        os.close(report_w)
    try:
        # Keep enough bytes at each end for max_output_chars characters of any UTF-8.
        raw, dropped, timed_out = _collect(proc, start + limits.timeout_s, 4 * limits.max_output_chars)
    finally:
        _kill_group(proc)
    layers = _read_report(report_r)
    _warn_missing(layers)
    return RunResult(raw.decode("utf-8", errors="replace"), dropped, None if timed_out else proc.returncode,
                     timed_out, time.monotonic() - start, layers, limits)


def _collect(proc: subprocess.Popen, deadline: float, keep_bytes: int) -> tuple[bytes, int, bool]:
    """Read the output until EOF or the deadline, keeping the first and last
    ``keep_bytes`` (the rest is drained and dropped so the child never blocks).
    Returns (kept bytes, bytes dropped, timed out)."""
    head, tail, fd, total = bytearray(), bytearray(), proc.stdout.fileno(), 0
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return bytes(head + tail), total - len(head) - len(tail), True
        ready, _, _ = select.select([fd], [], [], left)
        if not ready:
            continue
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        total += len(chunk)
        if len(head) < keep_bytes:
            room = keep_bytes - len(head)
            head += chunk[:room]
            chunk = chunk[room:]
        if chunk:
            tail = (tail + chunk)[-keep_bytes:]
    dropped = total - len(head) - len(tail)
    try:
        proc.wait(timeout=max(deadline - time.monotonic(), 0.0))
    except subprocess.TimeoutExpired:
        return bytes(head + tail), dropped, True
    return bytes(head + tail), dropped, False


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the jail's whole process group (the PID namespace dies with its pid 1)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
    proc.stdout.close()
    # The jail's pid 1 is in the group but is not our child: wait (bounded) until it and
    # so its whole PID namespace are gone, so a call never returns with its code running.
    deadline = time.monotonic() + GROUP_EXIT_WAIT_S
    while time.monotonic() < deadline:
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.01)
    log.warning("python tool: process group %d still present %.0f s after SIGKILL", proc.pid, GROUP_EXIT_WAIT_S)


def _read_report(fd: int) -> dict:
    try:
        with os.fdopen(fd, "rb") as f:
            data = f.read(65536)
        return json.loads(data.splitlines()[0]) if data else {"errors": ["the jail did not start"]}
    except (OSError, ValueError) as e:
        return {"errors": [f"unreadable jail report: {e}"]}


LAYERS = ("userns", "netns", "readonly_fs", "pidns", "proc", "landlock", "nproc_enforced")


def _warn_missing(layers: dict) -> None:
    """Log once per process each isolation layer this kernel refused."""
    for name in LAYERS:
        if not layers.get(name) and name not in _warned:
            _warned.add(name)
            log.warning("python tool sandbox: layer %r unavailable here (%s); its guarantee does not hold "
                        "(see docs/tools.md)", name, "; ".join(layers.get("errors", [])) or "not reported")
