"""Start a run: ``python -m asyncrl.launch CONFIG.yaml [a.b.c=value ...]``.

CONFIG is a YAML path or the name of a shipped config (``quickstart``). The config is
validated before anything starts (and before torch is imported, so errors and
``--help`` are instant), written resolved to ``<run.dir>/config.yaml``, and then the
roles start as local processes: learner ranks (torch.distributed) and generator
workers. Ctrl-C drains (the learner finishes its step and saves a checkpoint) and
exits 0. A generator that dies is restarted (``generator.max_restarts``, with backoff;
the learner re-issues its prompts in flight); a learner that fails stops the generators
and launch exits non-zero with its error and the command that resumes the run
(``run.resume=auto``) from its last checkpoint.
"""

from __future__ import annotations

import argparse
import collections
import logging
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import msgspec

from asyncrl.cluster import ray_address
from asyncrl.config import Config, ConfigError, advisories, load_config, to_yaml
from asyncrl.tasks.reasoning_gym import check_run

log = logging.getLogger("asyncrl.launch")


@dataclass
class Role:
    name: str
    proc: subprocess.Popen
    cmd: list[str]
    env: dict
    tail: collections.deque = field(default_factory=lambda: collections.deque(maxlen=64))
    restarts: int = 0
    restart_at: float | None = None  # when a dead role is due to be started again

    @property
    def is_generator(self) -> bool:
        return self.name.startswith("generator")

    def forward_output(self) -> None:
        """Copy the role's output to ours as it comes (raw chunks, so a live progress
        line's carriage returns work) and keep its last lines for error reports."""
        fd = self.proc.stdout.fileno()
        pending = b""
        while chunk := os.read(fd, 65536):
            sys.stderr.buffer.write(chunk)
            sys.stderr.buffer.flush()
            *lines, pending = (pending + chunk).split(b"\n")
            self.tail.extend(line.decode(errors="replace") for line in lines)
        if pending:
            self.tail.append(pending.decode(errors="replace"))


def _spawn(name: str, cmd: list[str], env: dict) -> Role:
    role = Role(name, _popen(cmd, env), cmd, env)
    threading.Thread(target=role.forward_output, name=f"out-{name}", daemon=True).start()
    return role


def _popen(cmd: list[str], env: dict) -> subprocess.Popen:
    return subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _respawn(role: Role) -> None:
    role.proc = _popen(role.cmd, role.env)
    role.restarts += 1
    role.restart_at = None
    threading.Thread(target=role.forward_output, name=f"out-{role.name}-{role.restarts}", daemon=True).start()


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def prepare_run_dir(cfg: Config) -> tuple[Config, Path]:
    run_dir = Path(cfg.run.dir)
    resume = cfg.run.resume == "auto"
    if (run_dir / "metrics.jsonl").exists() and not (cfg.run.overwrite or resume):
        raise ConfigError(
            f"run directory {run_dir} already holds a run; continue it with run.resume=auto, choose another "
            "run.dir=... or pass run.overwrite=true"
        )
    if not resume:  # a fresh run: what an overwritten run left would mislead (or be resumed by mistake)
        shutil.rmtree(run_dir / "logs", ignore_errors=True)
        shutil.rmtree(run_dir / "checkpoints" / "state", ignore_errors=True)
        (run_dir / "metrics.jsonl").unlink(missing_ok=True)
        (run_dir / "trained_groups.jsonl").unlink(missing_ok=True)
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    if cfg.transport.port == 0:
        cfg = msgspec.structs.replace(cfg, transport=msgspec.structs.replace(cfg.transport, port=free_port(cfg.transport.host)))
    (run_dir / "config.yaml").write_text(to_yaml(cfg))
    if cfg.transport.auth == "curve":  # fresh keys before any role starts: roles load them at start-up
        from asyncrl.wire.auth import create_keys

        create_keys(run_dir)
    return cfg, run_dir


def start_roles(cfg: Config, run_dir: Path) -> list[Role]:
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port("127.0.0.1")),
               WORLD_SIZE=str(cfg.learner.world_size), PYTHONUNBUFFERED="1",
               ASYNCRL_LIVE_CONSOLE="1" if sys.stderr.isatty() else "0")
    roles = []
    for rank in range(cfg.learner.world_size):
        cmd = [sys.executable, "-m", "asyncrl.learner.main", "--run-dir", str(run_dir)]
        roles.append(_spawn(f"learner{rank}", cmd, env | {"RANK": str(rank), "LOCAL_RANK": str(rank)}))
    address = f"tcp://{cfg.transport.host}:{cfg.transport.port}"
    for w in range(cfg.generator.num_workers):
        cmd = [sys.executable, "-m", "asyncrl.generator.worker", "--run-dir", str(run_dir), "--worker-id", str(w),
               "--address", address]
        roles.append(_spawn(f"generator{w}", cmd, env))
    return roles


def resume_command(config: str, overrides: list[str]) -> str:
    """The command line that continues this run from its newest complete checkpoint."""
    kept = [o for o in overrides if not o.replace(" ", "").startswith(("run.resume=", "run.overwrite="))]
    return shlex.join([sys.executable, "-m", "asyncrl.launch", config, *kept, "run.resume=auto"])


def supervise(roles: list[Role], run_dir: Path, cfg: Config | None = None, resume_cmd: str = "",
              grace_s: float = 60.0) -> int:
    """Wait for the run; return launch's exit code. Restarts dead generators (bounded,
    with backoff); a failed learner stops everything and says how to resume."""
    stopping: list[float] = []
    max_restarts = cfg.generator.max_restarts if cfg else 0
    backoff = cfg.generator.restart_backoff_s if cfg else 1.0

    def on_signal(signum, _frame):
        if stopping:  # second Ctrl-C: do not wait any longer
            for r in roles:
                r.proc.kill()
            return
        stopping.append(time.monotonic())
        log.info("stopping: the learner finishes its step and saves a checkpoint (Ctrl-C again to kill)")
        for r in roles:
            if r.proc.poll() is None:
                r.proc.send_signal(signal.SIGINT)

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    learner0 = roles[0]
    while True:
        time.sleep(0.2)
        # generators exit 0 when the learner says goodbye; only an error code is a failure
        failed = [r for r in roles if r.proc.poll() not in (None, 0)]
        learner_alive = learner0.proc.poll() is None
        for r in failed:
            if r.is_generator and learner_alive and not stopping and r.restarts < max_restarts:
                _restart_generator(r, backoff, max_restarts)
        failed = [r for r in failed if r.restart_at is None and r.proc.poll() not in (None, 0)]
        if failed:
            bad = failed[0]
            time.sleep(0.3)  # let its last output arrive
            log.error("%s exited with code %s; stopping the run. Its last output (full log: %s):\n%s",
                      bad.name, bad.proc.returncode, run_dir / "logs" / f"{bad.name}.log",
                      "\n".join(list(bad.tail)[-20:]))
            if bad.is_generator and max_restarts and bad.restarts >= max_restarts:
                log.error("%s died %d times (generator.max_restarts=%d)", bad.name, bad.restarts + 1, max_restarts)
            _stop_generators(roles)
            _terminate(roles)
            if not bad.is_generator and resume_cmd:
                log.error("to resume from the last checkpoint in %s:\n  %s", run_dir / "checkpoints" / "state",
                          resume_cmd)
            return 1
        if learner0.proc.poll() == 0 or all(r.proc.poll() is not None for r in roles):
            deadline = time.monotonic() + 30
            while any(r.proc.poll() is None for r in roles) and time.monotonic() < deadline:
                time.sleep(0.2)
            _terminate(roles)
            codes = {r.name: r.proc.returncode for r in roles}
            bad = [n for n, c in codes.items() if c not in (0, -signal.SIGTERM)]
            if bad:
                log.error("roles exited with errors: %s", {n: codes[n] for n in bad})
                return 1
            return 0
        if stopping and time.monotonic() - stopping[0] > grace_s:
            log.error("roles did not stop within %.0fs after Ctrl-C; killing them", grace_s)
            _terminate(roles)
            return 1


def _restart_generator(role: Role, backoff: float, max_restarts: int) -> None:
    """Schedule a dead generator's restart (exponential backoff), or start it when due."""
    now = time.monotonic()
    if role.restart_at is None:
        delay = backoff * 2**role.restarts
        role.restart_at = now + delay
        log.warning("%s died (exit code %s); restarting it in %.1fs (restart %d of at most %d)", role.name,
                    role.proc.returncode, delay, role.restarts + 1, max_restarts)
    elif now >= role.restart_at:
        _respawn(role)
        log.info("%s restarted (pid %d)", role.name, role.proc.pid)


def _stop_generators(roles: list[Role], timeout_s: float = 10.0) -> None:
    """Ctrl-C to every live generator (they stop at their next poll and exit 0)."""
    live = [r for r in roles if r.is_generator and r.proc.poll() is None]
    for r in live:
        r.proc.send_signal(signal.SIGINT)
    deadline = time.monotonic() + timeout_s
    while any(r.proc.poll() is None for r in live) and time.monotonic() < deadline:
        time.sleep(0.1)


def _terminate(roles: list[Role]) -> None:
    for r in roles:
        if r.proc.poll() is None:
            r.proc.terminate()
    deadline = time.monotonic() + 10
    for r in roles:
        try:
            r.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            r.proc.kill()
            r.proc.wait()


def dry_run(config: str, overrides: list[str]) -> int:
    """Print the placement plan for the configured cluster size; touch nothing."""
    from asyncrl.cluster.placement import format_plan, plan_placement

    try:
        cfg = load_config(config, overrides)
        print(format_plan(cfg, plan_placement(cfg)))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m asyncrl.launch", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config", help="YAML path or shipped config name (e.g. quickstart)")
    ap.add_argument("overrides", nargs="*", help="dotted overrides, e.g. learner.lr=1e-4 algo.type=lpreg")
    ap.add_argument("--dry-run", action="store_true",
                    help="print the placement plan (role -> node, GPUs) for cluster.* and start nothing")
    args = ap.parse_intermixed_args(argv)  # --dry-run may come after the overrides
    if args.dry_run:
        return dry_run(args.config, args.overrides)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s launch %(levelname)s: %(message)s", datefmt="%H:%M:%S")
    try:
        cfg = load_config(args.config, args.overrides)
        check_run(cfg)  # reasoning_gym: the package, the dataset and its config, before any role starts
        cfg, run_dir = prepare_run_dir(cfg)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    log.info("run directory %s: %d learner rank(s), %d generator(s), algo %s",
             run_dir, cfg.learner.world_size, cfg.generator.num_workers, cfg.algo.__struct_config__.tag)
    for advice in advisories(cfg):
        log.warning("%s", advice)
    if cfg.cluster.backend == "ray":  # Ray actors in placement groups: asyncrl.cluster.ray_backend
        ray_address.prepare(cfg.cluster.address)  # before Ray is imported
        from asyncrl.cluster.ray_backend import launch as ray_launch

        code = ray_launch(cfg, run_dir)
    else:
        roles = start_roles(cfg, run_dir)
        code = supervise(roles, run_dir, cfg, resume_command(args.config, args.overrides))
    if code == 0:
        log.info("done: metrics in %s, checkpoints in %s", run_dir / "metrics.jsonl", run_dir / "checkpoints")
        log.info("figures and summary: python -m asyncrl.report %s", shlex.quote(str(run_dir)))
    return code


if __name__ == "__main__":
    sys.exit(main())
