"""``cluster.backend: ray``: the roles as Ray actors in placement groups.

Each role runs unchanged: a ``RoleActor`` starts the role's own entry point
(``python -m asyncrl.learner.main`` / ``asyncrl.generator.worker``) as a child process
with the torch.distributed variables, so signals, process groups and CUDA devices
behave exactly as with the local backend. Ray provides the placement (GPUs per role,
learner ranks packed node by node: one STRICT_PACK group per node), the node addresses
(learner rank 0's actor reports its IP: MASTER_ADDR, and on a real cluster the ZeroMQ
host the generators connect to) and the health signal. A generator whose process fails
or whose actor dies is restarted as with the local backend (``generator.max_restarts``,
``generator.restart_backoff_s`` doubling): a dead actor is replaced by a new one in the
same placement-group bundle, and the learner re-issues the groups it had in flight when
the new process says Hello. Any other failure stops the run with its error, exit 1.
A role's process dies with its actor (Linux parent-death signal), so a killed actor
leaves no orphan talking to the learner under its successor's identity.

Without ``cluster.address`` a private single-node Ray starts for the run, bound to
loopback only, with its temp dir under /tmp (unix socket paths must stay under 107
characters). The run directory must be on storage every node sees (docs/cluster.md).
This is the only module that imports ray.
"""

from __future__ import annotations

import collections
import hashlib
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import msgspec
import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from asyncrl.cluster import ray_address
from asyncrl.cluster.placement import Placement, plan_placement
from asyncrl.config import Config, to_yaml

log = logging.getLogger("asyncrl.launch")

PLACEMENT_TIMEOUT_S = 300.0


class RoleFailed(RuntimeError):
    """A role's process exited with an error; the message carries its last output."""


# Runs first in the role's process: ask for SIGKILL when the actor that started it dies
# (prctl PR_SET_PDEATHSIG = 1; it survives the exec), exit if that already happened,
# then exec the role. Not a preexec_fn: that runs in a forked copy of this
# multi-threaded actor, where taking any lock may deadlock. The signal fires when the
# *thread* that started the process exits: that is the Ray thread blocked in run() for
# the role's whole life, so in effect the actor's life.
_DIE_WITH_PARENT = ("import ctypes, os, signal, sys; ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL); "
                    "os.getppid() == int(sys.argv[1]) or sys.exit('the actor that started this role is gone'); "
                    "os.execv(sys.executable, [sys.executable, *sys.argv[2:]])")


def role_argv(cmd: list[str]) -> list[str]:
    """The command line of a role started by this process (the actor)."""
    if sys.platform != "linux":  # no parent-death signal: a killed actor may leave its role running
        return [sys.executable, *cmd]
    return [sys.executable, "-c", _DIE_WITH_PARENT, str(os.getpid()), *cmd]


class RoleActor:
    """Runs one role's entry point as a child process on the actor's node."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.proc: subprocess.Popen | None = None
        self.tail: collections.deque[str] = collections.deque(maxlen=40)

    def node_ip(self) -> str:
        return ray.util.get_node_ip_address()

    def free_port(self) -> int:
        with socket.socket() as s:
            s.bind(("", 0))
            return s.getsockname()[1]

    def run(self, cmd: list[str], env: dict[str, str], run_dir: str) -> int:
        """Start the role, forward its output, return 0 or raise RoleFailed."""
        if not (Path(run_dir) / "config.yaml").exists():
            raise RoleFailed(f"{self.name}: {run_dir}/config.yaml is not visible on node {self.node_ip()}; "
                             "put run.dir on storage shared by every node")
        self.tail.clear()  # a restart on this actor starts a new story
        self.proc = subprocess.Popen(role_argv(cmd), env=os.environ | env, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        for raw in self.proc.stdout:  # Ray forwards the actor's stdout to the driver
            line = raw.decode(errors="replace").rstrip("\n")
            self.tail.append(line)
            sys.stdout.write(f"{line}\n")
            sys.stdout.flush()
        code = self.proc.wait()
        if code != 0:
            raise RoleFailed(f"{self.name} exited with code {code}; its last output:\n" + "\n".join(self.tail))
        return code

    def send_signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)


RemoteRole = ray.remote(max_concurrency=4)(RoleActor)  # run() blocks; send_signal() must still get through


def init_ray(cfg: Config, run_dir: Path, plan: list[Placement]) -> bool:
    """Connect to ``cluster.address`` or start a private loopback Ray; True if started here."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if cfg.cluster.address:
        ray_address.check_not_rewritten(cfg.cluster.address)  # a loopback address: refuse rather than hang
        ray.init(address=cfg.cluster.address, log_to_driver=True)
        return False
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    # loopback only, so no token: with token auth Ray would write ~/.ray/auth_token
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    tag = hashlib.sha1(str(run_dir.resolve()).encode()).hexdigest()[:8]
    cpus = sum(p.cpus for p in plan)
    ray.init(num_cpus=max(int(cpus + 0.999), 1), num_gpus=sum(p.gpus for p in plan) and cfg.cluster.gpus_per_node,
             _node_ip_address="127.0.0.1", include_dashboard=False, _temp_dir=f"/tmp/ray_{tag}",
             log_to_driver=True, configure_logging=False)
    return True


def place(plan: list[Placement], generator_strategy: str) -> tuple[list, dict[str, PlacementGroupSchedulingStrategy]]:
    """Placement groups for the plan: one STRICT_PACK group per learner node (ranks of a
    node stay together and in order), one PACK or SPREAD group for the generators."""
    groups, strategy = [], {}
    by_node: dict[int, list[Placement]] = collections.defaultdict(list)
    for p in plan:
        if p.role == "learner":
            by_node[p.node].append(p)
    members_of = [by_node[n] for n in sorted(by_node)]
    gens = [p for p in plan if p.role == "generator"]
    names = [f"asyncrl-learner-n{n}" for n in sorted(by_node)] + ["asyncrl-generators"]
    kinds = ["STRICT_PACK"] * len(members_of) + [generator_strategy]
    for members, kind, name in zip([*members_of, gens], kinds, names):
        if not members:
            continue
        pg = placement_group([_bundle(p) for p in members], strategy=kind, name=name)
        groups.append(pg)
        for i, p in enumerate(members):
            strategy[p.name] = PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=i)
    return groups, strategy


def _bundle(p: Placement) -> dict[str, float]:
    return {"CPU": p.cpus, "GPU": p.gpus} if p.gpus else {"CPU": p.cpus}


@dataclass
class RoleSpec:
    """What it takes to (re)start one role, and its restart state."""

    placement: Placement
    strategy: PlacementGroupSchedulingStrategy
    cmd: list[str]
    env: dict[str, str]
    restarts: int = 0
    restart_at: float | None = None  # when a dead role is due to start again
    actor_died: bool = False  # the actor went with it: the restart needs a new actor


class RayRun:
    """The actors of one run and their supervision."""

    def __init__(self, cfg: Config, run_dir: Path) -> None:
        self.cfg, self.run_dir = cfg, run_dir
        self.actors: dict[str, object] = {}
        self.specs: dict[str, RoleSpec] = {}
        self.groups: list = []
        self.pending: dict = {}  # ObjectRef of a run() call -> role name

    def start(self) -> None:
        cfg, run_dir = self.cfg, self.run_dir
        plan = plan_placement(cfg)
        self.groups, strategies = place(plan, cfg.cluster.placement.upper())
        try:
            ray.get([pg.ready() for pg in self.groups], timeout=PLACEMENT_TIMEOUT_S)
        except ray.exceptions.GetTimeoutError:
            raise RuntimeError(f"the Ray cluster cannot host the placement plan within {PLACEMENT_TIMEOUT_S:.0f}s "
                               f"(see `ray status`; `python -m asyncrl.launch CONFIG --dry-run` shows the plan)"
                               ) from None
        for p in plan:
            self.specs[p.name] = RoleSpec(p, strategies[p.name], [], {})
            self._new_actor(p.name)
        rank0 = self.actors["learner0"]
        ip = ray.get(rank0.node_ip.remote())
        master_port = ray.get(rank0.free_port.remote())
        if cfg.cluster.address:  # a real cluster: generators reach rank 0 at its node address
            tc = msgspec.structs.replace(cfg.transport, host=ip, port=ray.get(rank0.free_port.remote()))
            self.cfg = cfg = msgspec.structs.replace(cfg, transport=tc)
            (run_dir / "config.yaml").write_text(to_yaml(cfg))
        master = "127.0.0.1" if not cfg.cluster.address else ip
        log.info("learner rank 0 on %s; generators connect to tcp://%s:%d", ip, cfg.transport.host,
                 cfg.transport.port)
        base = {"MASTER_ADDR": master, "MASTER_PORT": str(master_port), "WORLD_SIZE": str(cfg.learner.world_size),
                "PYTHONUNBUFFERED": "1", "ASYNCRL_LIVE_CONSOLE": "0"}
        address = f"tcp://{cfg.transport.host}:{cfg.transport.port}"
        for p in plan:
            spec = self.specs[p.name]
            if p.role == "learner":  # with GPUs Ray sets CUDA_VISIBLE_DEVICES: the rank's GPU is device 0
                spec.cmd = ["-m", "asyncrl.learner.main", "--run-dir", str(run_dir)]
                spec.env = base | {"RANK": str(p.index), "LOCAL_RANK": "0" if p.gpus else str(p.index)}
            else:
                spec.cmd = ["-m", "asyncrl.generator.worker", "--run-dir", str(run_dir), "--worker-id", str(p.index),
                            "--address", address]
                spec.env = base
            self._run(p.name)

    def _new_actor(self, name: str) -> None:
        """An actor for the role in its placement-group bundle (a replacement takes the
        bundle its dead predecessor held). If the bundle cannot be placed again (its node
        is gone), the replacement never starts; the learner then stops for lack of
        trajectories after transport.timeout_s, which fails the run."""
        spec, p = self.specs[name], self.specs[name].placement
        suffix = f"-r{spec.restarts}" if spec.restarts else ""  # names of dead actors may not be free yet
        self.actors[name] = RemoteRole.options(
            name=f"asyncrl-{name}-{os.getpid()}{suffix}", num_cpus=p.cpus, num_gpus=p.gpus,
            scheduling_strategy=spec.strategy).remote(name)

    def _run(self, name: str) -> None:
        spec = self.specs[name]
        self.pending[self.actors[name].run.remote(spec.cmd, spec.env, str(self.run_dir))] = name

    def supervise(self, grace_s: float = 60.0) -> int:
        stopping: list[float] = []

        def on_signal(signum, _frame):
            if stopping:
                log.error("second Ctrl-C: killing the roles")
                self.kill()
                return
            stopping.append(time.monotonic())
            log.info("stopping: the learner finishes its step and saves a checkpoint (Ctrl-C again to kill)")
            for a in self.actors.values():
                a.send_signal.remote(signal.SIGINT)

        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, on_signal)
            signal.signal(signal.SIGTERM, on_signal)
        learner_done = None
        while self.pending or any(s.restart_at is not None for s in self.specs.values()):
            ready, _ = ray.wait(list(self.pending), num_returns=1, timeout=0.5) if self.pending else ([], [])
            for ref in ready:
                name = self.pending.pop(ref)
                try:
                    ray.get(ref)
                except (ray.exceptions.RayTaskError, ray.exceptions.RayActorError) as e:
                    if not self.actors:  # killed on purpose
                        return 1
                    if self._may_restart(name, stopping):
                        self._schedule_restart(name, e)
                        continue
                    log.error("%s failed; stopping the run. %s", name, _cause(e))
                    self._log_restarts_spent(name)
                    self.kill()
                    return 1
                if name == "learner0":
                    learner_done = time.monotonic()
            self._restart_due(stopping)
            if not self.pending:  # only restarts left (due later): do not spin
                time.sleep(0.2)
            if learner_done and time.monotonic() - learner_done > 30:
                log.warning("roles still running 30s after the learner finished: %s", sorted(self.pending.values()))
                self.kill()
                return 0
            if stopping and time.monotonic() - stopping[0] > grace_s:
                log.error("roles did not stop within %.0fs after Ctrl-C; killing them", grace_s)
                self.kill()
                return 1
            if not self.actors:
                return 1
        return 0

    # ------------------------------------------------------- generator restarts

    def _learner_running(self) -> bool:
        return "learner0" in self.pending.values()

    def _may_restart(self, name: str, stopping: list) -> bool:
        """As with the local backend: a generator, while the learner runs and no stop was
        asked for, within generator.max_restarts."""
        return (self.specs[name].placement.role == "generator" and self._learner_running() and not stopping
                and self.specs[name].restarts < self.cfg.generator.max_restarts)

    def _schedule_restart(self, name: str, e: Exception) -> None:
        spec, g = self.specs[name], self.cfg.generator
        spec.actor_died = isinstance(e, ray.exceptions.RayActorError)
        delay = g.restart_backoff_s * 2**spec.restarts
        spec.restart_at = time.monotonic() + delay
        why = "its actor died" if spec.actor_died else _cause(e).splitlines()[0]
        log.warning("%s died (%s); restarting it in %.1fs (restart %d of at most %d)", name, why, delay,
                    spec.restarts + 1, g.max_restarts)

    def _restart_due(self, stopping: list) -> None:
        now = time.monotonic()
        for name, spec in self.specs.items():
            if spec.restart_at is None or now < spec.restart_at:
                continue
            spec.restart_at = None
            if stopping or not self._learner_running():  # the run is ending: nobody needs it
                log.info("%s not restarted: the run is ending", name)
                continue
            spec.restarts += 1
            if spec.actor_died:
                try:
                    ray.kill(self.actors[name])  # gone already; drop Ray's handle for good
                except Exception:  # noqa: BLE001 - nothing left to kill
                    pass
                self._new_actor(name)
            self._run(name)
            log.info("%s restarted (%s, restart %d of at most %d)", name,
                     "new actor" if spec.actor_died else "same actor", spec.restarts, self.cfg.generator.max_restarts)

    def _log_restarts_spent(self, name: str) -> None:
        spec, max_restarts = self.specs[name], self.cfg.generator.max_restarts
        if spec.placement.role == "generator" and max_restarts and spec.restarts >= max_restarts:
            log.error("%s died %d times (generator.max_restarts=%d)", name, spec.restarts + 1, max_restarts)

    def kill(self) -> None:
        for a in self.actors.values():
            try:
                a.send_signal.remote(signal.SIGTERM)
            except Exception:  # noqa: BLE001 - an actor already gone
                pass
        time.sleep(1.0)
        for a in self.actors.values():
            try:
                ray.kill(a)
            except Exception:  # noqa: BLE001 - an actor already gone
                pass
        self.actors = {}

    def close(self) -> None:
        if self.actors:
            self.kill()
        for pg in self.groups:
            remove_placement_group(pg)


def _cause(e: Exception) -> str:
    """The role's own message (RoleFailed) or the actor's death, without Ray's wrapping."""
    if isinstance(e, ray.exceptions.RayTaskError) and isinstance(e.cause, RoleFailed):
        return str(e.cause)
    return f"{type(e).__name__}: {e}"


def launch(cfg: Config, run_dir: Path) -> int:
    """Start every role as a Ray actor and wait for the run; launch's exit code."""
    plan = plan_placement(cfg)
    started = init_ray(cfg, run_dir, plan)
    run = RayRun(cfg, run_dir)
    try:
        run.start()
        return run.supervise()
    except RuntimeError as e:
        log.error("%s", e)
        return 1
    finally:
        run.close()
        if started:
            ray.shutdown()
