"""The sandbox's child side: run as a script (``python -I -S _jail.py PARAMS``), it walls
itself in and then executes the untrusted ``main.py`` in its working directory.

Standard library only, and no ``asyncrl`` import: it runs before any untrusted code but
also before the site directories are on the path. The layers, each reported as a JSON
line on the report pipe so the parent can say which ones held (``sandbox.py`` reads it):

1. a new user namespace, with the uids mapped so that the code ends up as one
   unprivileged uid (65534 when the pool runs as root; RLIMIT_NPROC is ignored for
   uid 0, so a root sandbox without this would have no process cap);
2. a new network namespace (only a downed loopback: no network at all);
3. a new mount namespace where every mount is read-only except the private working
   directory; directories the unprivileged uid cannot enter on the way to the
   interpreter (``/root`` when Python lives under it) are covered by an empty tmpfs and
   only the interpreter's own directories are bound back, so the code cannot read them;
4. a new PID namespace: the code runs as its pid 1, so when it exits or is killed every
   process it started dies with it (``setsid`` cannot escape), and ``/proc`` shows only it;
5. Landlock (when the kernel has it): writes only beneath the working directory, no TCP
   bind/connect, no signals or abstract sockets outside the sandbox;
6. rlimits: address space, CPU seconds, file size, processes, open files, no core files.

A layer the kernel refuses is skipped and reported; ``execve`` then drops every
capability the namespaces gave this process.
"""

import ctypes
import json
import os
import resource
import signal
import stat
import sys
import time

NOBODY = 65534
CLONE_NEWNS, CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x20000, 0x10000000, 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_BIND, MS_REC, MS_PRIVATE = 1, 2, 4, 4096, 16384, 1 << 18
AT_FDCWD, AT_RECURSIVE = -100, 0x8000
MOUNT_ATTR_RDONLY, MOUNT_ATTR_NOSUID, MOUNT_ATTR_NODEV = 0x1, 0x2, 0x4
SYS_MOUNT_SETATTR, SYS_LANDLOCK_CREATE, SYS_LANDLOCK_ADD_RULE, SYS_LANDLOCK_RESTRICT = 442, 444, 445, 446
PR_SET_PDEATHSIG, PR_SET_NO_NEW_PRIVS = 1, 38

libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]


def _check(ret: int, what: str) -> int:
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return ret


def _mount(src, target, fstype, flags, data=None) -> None:
    enc = lambda s: None if s is None else s.encode()  # noqa: E731
    _check(libc.mount(enc(src), enc(target), enc(fstype), flags, enc(data)), f"mount {target}")


class _MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]


def _mount_setattr(path: str, attr_set: int, attr_clr: int) -> None:
    attr = _MountAttr(attr_set, attr_clr, 0, 0)
    _check(libc.syscall(SYS_MOUNT_SETATTR, AT_FDCWD, path.encode(), AT_RECURSIVE, ctypes.byref(attr),
                        ctypes.sizeof(attr)), f"mount_setattr {path}")


# --- 1. user namespace -------------------------------------------------------------------

def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def enter_user_namespace(flags: int) -> int:
    """Unshare the user namespace (and ``flags``) and map ids so the code runs as one
    unprivileged uid. Returns that uid. As root the map must be written by a process
    still outside with CAP_SETUID (a root process inside may only map uid 0 onto
    itself, which would let the code take uid 0 back); a forked helper does it."""
    if os.geteuid() != 0:
        uid, gid = os.getuid(), os.getgid()
        _check(libc.unshare(CLONE_NEWUSER | flags), "unshare")
        _write("/proc/self/uid_map", f"{uid} {uid} 1")
        _write("/proc/self/setgroups", "deny")
        _write("/proc/self/gid_map", f"{gid} {gid} 1")
        return uid
    os.setgroups([])
    go_r, go_w = os.pipe()
    done_r, done_w = os.pipe()
    me = os.getpid()
    helper = os.fork()
    if helper == 0:  # still in the parent namespaces, with root's capabilities
        os.close(go_w)
        ok = os.read(go_r, 1) == b"1"
        try:
            if ok:
                _write(f"/proc/{me}/uid_map", f"{NOBODY} {NOBODY} 1")
                _write(f"/proc/{me}/setgroups", "deny")
                _write(f"/proc/{me}/gid_map", f"{NOBODY} {NOBODY} 1")
            os.write(done_w, b"1" if ok else b"0")
        finally:
            os._exit(0)
    os.close(go_r)
    try:
        _check(libc.unshare(CLONE_NEWUSER | flags), "unshare")
    except OSError:
        os.write(go_w, b"0")
        os.waitpid(helper, 0)
        raise
    os.write(go_w, b"1")
    ok = os.read(done_r, 1) == b"1"
    os.waitpid(helper, 0)
    if not ok:
        raise OSError("could not write the uid map")
    return NOBODY


# --- 3. mount namespace ------------------------------------------------------------------

def _blocked_ancestor(path: str, uid: int) -> str | None:
    """The top-most directory on ``path`` that ``uid`` may not enter (no x bit for it)."""
    parts = os.path.abspath(path).split("/")[1:]
    cur = ""
    for part in parts:
        cur += "/" + part
        try:
            st = os.stat(cur)
        except OSError:
            return None
        if not stat.S_ISDIR(st.st_mode):
            return None
        if not (st.st_mode & 0o001 or (st.st_uid == uid and st.st_mode & 0o100)):
            return cur
    return None


def blocked_paths(needed: list[str], uid: int) -> dict[str, list[str]]:
    """{directory ``uid`` cannot enter: [needed paths beneath it]}. Called before the user
    namespace exists: inside it, files of unmapped owners all stat as uid 65534."""
    paths = sorted({os.path.realpath(p) for p in needed if os.path.isdir(p)})
    paths = [p for p in paths if not any(p.startswith(q + "/") for q in paths)]  # a bound dir brings its subdirs
    blocked: dict[str, list[str]] = {}
    for path in paths:
        top = _blocked_ancestor(path, uid)
        if top is not None and path != top:
            blocked.setdefault(top, []).append(path)
    return blocked


def open_grafts(blocked: dict[str, list[str]]) -> dict[str, list[tuple[str, int]]]:
    """O_PATH handles on the needed paths, taken while this process can still walk
    through the blocked directories (bind mounts from them work after the uid drop)."""
    return {top: [(p, os.open(p, os.O_PATH | os.O_DIRECTORY)) for p in paths] for top, paths in blocked.items()}


def cover_blocked(grafts: dict[str, list[tuple[str, int]]]) -> list[str]:
    """Cover each blocked directory with an empty tmpfs and bind the needed paths back
    (after the uid drop: a directory made by a uid without a name in here fails)."""
    _mount(None, "/", None, MS_REC | MS_PRIVATE)
    for top, paths in grafts.items():
        _mount("tmpfs", top, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755,size=1m")
        for path, fd in paths:
            os.makedirs(path, mode=0o755, exist_ok=True)
            _mount(f"/proc/self/fd/{fd}", path, None, MS_BIND | MS_REC)
            os.close(fd)
    return list(grafts)


def seal_filesystem(workdir: str) -> bool:
    """Every mount read-only (and nosuid, nodev) except ``workdir``."""
    _mount(None, "/", None, MS_REC | MS_PRIVATE)
    _mount(workdir, workdir, None, MS_BIND)
    _mount_setattr("/", MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV, 0)
    _mount_setattr(workdir, 0, MOUNT_ATTR_RDONLY)
    return True


# --- 5. Landlock -------------------------------------------------------------------------

class _RulesetAttr(ctypes.Structure):
    _fields_ = [("handled_access_fs", ctypes.c_uint64), ("handled_access_net", ctypes.c_uint64),
                ("scoped", ctypes.c_uint64)]


class _PathBeneath(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


def landlock(workdir: str) -> int:
    """Allow writes only beneath ``workdir`` (and to /dev/null), no TCP bind/connect and
    (ABI 6+) no signals or abstract unix sockets outside. Returns the ABI used, 0 if the
    kernel has no Landlock."""
    abi = libc.syscall(SYS_LANDLOCK_CREATE, None, 0, 1)  # LANDLOCK_CREATE_RULESET_VERSION
    if abi <= 0:
        return 0
    write_fs = (1 << 1) | (1 << 4) | (1 << 5) | sum(1 << b for b in range(6, 13))  # write, remove, make_*
    write_fs |= (1 << 13 if abi >= 2 else 0) | (1 << 14 if abi >= 3 else 0)  # refer, truncate
    attr = _RulesetAttr(write_fs, 0b11 if abi >= 4 else 0, 0b11 if abi >= 6 else 0)
    size = ctypes.sizeof(attr) if abi >= 6 else (16 if abi >= 4 else 8)
    ruleset = _check(libc.syscall(SYS_LANDLOCK_CREATE, ctypes.byref(attr), size, 0), "landlock_create_ruleset")
    for path, access in ((workdir, write_fs), ("/dev/null", (1 << 1) | (1 << 14 if abi >= 3 else 0))):
        fd = os.open(path, os.O_PATH)
        rule = _PathBeneath(access, fd)
        _check(libc.syscall(SYS_LANDLOCK_ADD_RULE, ruleset, 1, ctypes.byref(rule), 0), f"landlock rule {path}")
        os.close(fd)
    _check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")
    _check(libc.syscall(SYS_LANDLOCK_RESTRICT, ruleset, 0), "landlock_restrict_self")
    os.close(ruleset)
    return abi


# --- 6. rlimits and the run --------------------------------------------------------------

def set_rlimits(p: dict) -> None:
    for name, value in (("RLIMIT_AS", p["memory_bytes"]), ("RLIMIT_CPU", p["cpu_s"]),
                        ("RLIMIT_FSIZE", p["fsize_bytes"]), ("RLIMIT_NPROC", p["nproc"]),
                        ("RLIMIT_NOFILE", p["nofile"]), ("RLIMIT_CORE", 0)):
        resource.setrlimit(getattr(resource, name), (value, value))


def _try(report: dict, key: str, fn, *args):
    try:
        result = fn(*args)
        report[key] = True if result is None else result
    except OSError as e:
        report[key] = False
        report.setdefault("errors", []).append(f"{key}: {e}")
    return report[key]


def wall_in(p: dict, report: dict, grafts) -> None:
    """In the forked child, pid 1 of the new PID namespace: mount its own /proc, seal the
    filesystem, Landlock, rlimits, then execve the code (which drops every capability)."""
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)  # the jail process dies -> so do we
    workdir = p["workdir"]
    if report["pidns"]:  # before the seal: a new proc mount under a sealed / is refused
        _try(report, "proc", _mount, "proc", "/proc", "proc", MS_NOSUID | MS_NODEV)
    if grafts:
        _try(report, "covered", cover_blocked, grafts)
    if report["mountns"]:
        _try(report, "readonly_fs", seal_filesystem, workdir)
    report["uid"] = os.geteuid()
    _try(report, "landlock", landlock, workdir)
    set_rlimits(p)
    os.chdir(workdir)
    os.write(p["report_fd"], (json.dumps(report) + "\n").encode())
    os.close(p["report_fd"])
    os.execve(p["python"], [p["python"], "-I", "-B", "-u", "main.py"], p["env"])


def main() -> None:
    p = json.loads(sys.argv[1])
    report: dict = {"errors": []}
    was_root = os.geteuid() == 0
    blocked = blocked_paths(p["needed"], NOBODY) if was_root else {}
    uid = _try(report, "userns", enter_user_namespace, CLONE_NEWNET | CLONE_NEWNS | CLONE_NEWPID)
    report["netns"] = report["mountns"] = report["pidns"] = uid is not False
    report["nproc_enforced"] = (uid is not False) or not was_root  # uid 0 ignores RLIMIT_NPROC
    grafts = None
    if uid is not False:
        grafts = _try(report, "grafts", open_grafts, blocked)
        report.pop("grafts")  # fds, not a result; a failure is in "errors"
        if was_root:  # now take the unprivileged uid for good (kuid 0 has no name in here;
            # the namespace's capabilities stay until execve)
            os.setresgid(NOBODY, NOBODY, NOBODY)
            os.setresuid(NOBODY, NOBODY, NOBODY)
    child = os.fork()
    if child == 0:
        try:
            wall_in(p, report, grafts)
        except BaseException:  # the output is the observation: say why the jail failed
            import traceback

            traceback.print_exc()
        finally:
            os._exit(127)
    os.close(p["report_fd"])
    # Our own wall clock, in case the parent that should kill us is gone.
    deadline = time.monotonic() + p["wall_s"]
    while True:
        pid, status = os.waitpid(child, os.WNOHANG)
        if pid:
            break
        if time.monotonic() > deadline:
            os.kill(child, signal.SIGKILL)
            pid, status = os.waitpid(child, 0)
            break
        time.sleep(0.02)
    if os.WIFSIGNALED(status):
        signal.signal(os.WTERMSIG(status), signal.SIG_DFL)
        os.kill(os.getpid(), os.WTERMSIG(status))  # pass the child's death on as ours
    os._exit(os.waitstatus_to_exitcode(status))


if __name__ == "__main__":
    main()
