"""The Ray backend's generator restarts, with Ray itself stood in for (fast; the real
thing, a SIGKILLed actor on a local Ray, is tests/integration/test_ray_generator_restart.py):
a generator whose actor died gets a new actor in the same bundle after the backoff, one
whose process failed is rerun on its actor, the backoff doubles, restarts stop at
generator.max_restarts (the run fails naming the count), and nothing is restarted once
the learner has finished or a stop was asked for. The role's process is started
through a guard that makes it die with its actor."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time

import pytest

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.ray  # CI runs these in the step that installs ray (-m "slow or ray")

import asyncrl.cluster.ray_backend as rb  # noqa: E402
from asyncrl.config import load_config  # noqa: E402
from testkit import proc_status  # noqa: E402


SLEEP = time.sleep  # the real one (supervise's sleeps are stubbed)


class Ref:
    """A run() call's ObjectRef: ``outcome`` None while the role runs, then 0 or an exception."""

    def __init__(self, actor) -> None:
        self.actor, self.outcome = actor, None


class Method:
    def __init__(self, fn) -> None:
        self.remote = fn


class Actor:
    def __init__(self, world: World, name: str, options: dict) -> None:
        self.world, self.name, self.options, self.refs = world, name, options, []
        self.run = Method(self._run)
        self.send_signal = Method(lambda sig: None)

    def _run(self, cmd, env, run_dir) -> Ref:
        ref = Ref(self)
        self.refs.append(ref)
        self.world.refs.append(ref)
        return ref


class World:
    """Stands in for the ray calls RayRun makes; ``script`` runs at every ray.wait and
    fails or finishes roles."""

    def __init__(self, monkeypatch) -> None:
        self.refs: list[Ref] = []
        self.actors: list[Actor] = []
        self.killed: list[Actor] = []
        self.script = lambda: None
        options = lambda **kw: Method(lambda name: self._actor(name, kw))  # noqa: E731
        monkeypatch.setattr(rb, "RemoteRole", Method(None))
        rb.RemoteRole.options = options
        monkeypatch.setattr(ray, "wait", self.wait)
        monkeypatch.setattr(ray, "get", self.get)
        monkeypatch.setattr(ray, "kill", self.killed.append)
        monkeypatch.setattr(time, "sleep", lambda s: None)

    def _actor(self, name: str, options: dict) -> Actor:
        self.actors.append(Actor(self, name, options))
        return self.actors[-1]

    def wait(self, refs, num_returns, timeout):
        self.script()
        done = [r for r in refs if r.outcome is not None][:num_returns]
        if not done:
            SLEEP(0.005)
        return done, []

    @staticmethod
    def get(ref):
        if isinstance(ref.outcome, Exception):
            raise ref.outcome
        return ref.outcome

    def running(self, name: str) -> list[Ref]:
        return [r for r in self.refs if r.actor.name == name and r.outcome is None]

    def of(self, name: str) -> list[Actor]:
        return [a for a in self.actors if a.name == name]

    def finish(self) -> None:
        """The learner finishes, then the generators say goodbye (exit 0)."""
        for name in ("learner0", "generator0", "generator1"):
            for r in self.running(name):
                r.outcome = 0


def make_run(monkeypatch, tmp_path, *overrides) -> tuple[rb.RayRun, World]:
    cfg = load_config("quickstart", ["generator.num_workers=2", "generator.restart_backoff_s=0.01",
                                     "cluster.backend=ray", *overrides])
    world = World(monkeypatch)
    run = rb.RayRun(cfg, tmp_path)
    for p in rb.plan_placement(cfg):  # what start() sets up, without placement groups
        run.specs[p.name] = rb.RoleSpec(p, strategy=f"bundle-{p.name}", cmd=["-m", p.role], env={})
        run._new_actor(p.name)
        run._run(p.name)
    return run, world


def actor_died():
    return ray.exceptions.RayActorError()


def process_failed(name: str, code: int):
    return ray.exceptions.RayTaskError("run", "", rb.RoleFailed(f"{name} exited with code {code}; its last output:\n"))


def test_dead_actor_gets_a_new_actor_and_a_failed_process_a_rerun(monkeypatch, tmp_path, caplog):
    run, world = make_run(monkeypatch, tmp_path, "generator.max_restarts=3")

    def script():
        gen0, refs = world.running("generator0"), [r for a in world.of("generator0") for r in a.refs]
        if gen0 and len(refs) == 1:
            gen0[0].outcome = actor_died()
        elif gen0 and len(refs) == 2:  # running on its new actor
            gen0[0].outcome = process_failed("generator0", -9)
        elif gen0 and len(refs) == 3:  # rerun on that actor
            world.finish()

    world.script = script
    with caplog.at_level(logging.INFO, logger="asyncrl.launch"):
        assert run.supervise() == 0
    gen0 = world.of("generator0")
    assert len(gen0) == 2, "a dead actor is replaced, a failed process is rerun on its actor"
    assert gen0[1].options["scheduling_strategy"] == "bundle-generator0"  # the bundle the dead one held
    assert gen0[1].options["name"].endswith("-r1") and not gen0[0].options["name"].endswith("-r1")
    assert [len(a.refs) for a in gen0] == [1, 2] and world.killed == [gen0[0]]
    assert len(world.of("generator1")) == 1 and len(world.of("learner0")) == 1
    text = caplog.text
    assert "generator0 died (its actor died); restarting it in 0.0s (restart 1 of at most 3)" in text
    assert "generator0 restarted (new actor, restart 1 of at most 3)" in text
    assert ("generator0 died (generator0 exited with code -9; its last output:); restarting it in 0.0s "
            "(restart 2") in text
    assert "generator0 restarted (same actor, restart 2 of at most 3)" in text
    assert run.specs["generator0"].restarts == 2 and run.specs["generator1"].restarts == 0


def test_backoff_doubles_and_restarts_stop_at_max_restarts(monkeypatch, tmp_path, caplog):
    run, world = make_run(monkeypatch, tmp_path, "generator.max_restarts=2", "generator.restart_backoff_s=0.1")

    def script():
        for r in world.running("generator1"):
            r.outcome = actor_died()

    world.script = script
    t0 = time.monotonic()
    with caplog.at_level(logging.INFO, logger="asyncrl.launch"):
        assert run.supervise() == 1
    assert time.monotonic() - t0 >= 0.1 + 0.2  # both backoffs waited out
    text = caplog.text
    assert "restarting it in 0.1s (restart 1 of at most 2)" in text and "restarting it in 0.2s (restart 2 of" in text
    assert "generator1 failed; stopping the run" in text
    assert "generator1 died 3 times (generator.max_restarts=2)" in text
    assert len(world.of("generator1")) == 3


@pytest.mark.parametrize("when", ["learner_done", "max_restarts_0"])
def test_no_restart_without_a_running_learner_or_with_restarts_off(monkeypatch, tmp_path, caplog, when):
    run, world = make_run(monkeypatch, tmp_path, f"generator.max_restarts={0 if when == 'max_restarts_0' else 3}")

    def script():
        if when == "learner_done" and world.running("learner0"):
            world.running("learner0")[0].outcome = 0
        elif world.running("generator0"):
            world.running("generator0")[0].outcome = process_failed("generator0", 1)

    world.script = script
    with caplog.at_level(logging.INFO, logger="asyncrl.launch"):
        assert run.supervise() == 1
    assert "generator0 failed; stopping the run" in caplog.text and "restarting it" not in caplog.text
    assert len(world.of("generator0")) == 1


def test_a_roles_process_dies_with_the_process_that_started_it(tmp_path):
    """role_argv's guard: SIGKILL the starter (as Ray does to a killed actor) and the role
    goes too, instead of living on as an orphan."""
    if sys.platform != "linux":
        pytest.skip("parent-death signal is Linux-only")
    starter = (
        "import subprocess, sys, threading\n"
        "from asyncrl.cluster.ray_backend import role_argv\n"
        "def go():\n"  # from a thread, as in a threaded actor
        "    p = subprocess.Popen(role_argv(['-c', 'import time; time.sleep(120)']), start_new_session=True)\n"
        "    print(p.pid, flush=True)\n"
        "    p.wait()\n"
        "t = threading.Thread(target=go); t.start(); t.join()\n")
    from testkit import REPO, subprocess_env

    proc = subprocess.Popen([sys.executable, "-c", starter], cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE,
                            text=True)
    try:
        role = int(proc.stdout.readline())
        deadline = time.monotonic() + 30
        while "python" not in _cmdline(role) or "sleep(120)" not in _cmdline(role):  # exec'd into the role
            assert time.monotonic() < deadline, f"the role never started: {_cmdline(role)!r}"
            time.sleep(0.05)
        assert _state(role) in "SR" and _ppid(role) == proc.pid
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        deadline = time.monotonic() + 10
        while _state(role) not in ("Z", "gone"):
            assert time.monotonic() < deadline, "the role outlived the process that started it"
            time.sleep(0.05)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _state(pid: int) -> str:
    status = proc_status(pid)
    return status["State"][:1] if status else "gone"


def _ppid(pid: int) -> int:
    return int(proc_status(pid)["PPid"])


def _cmdline(pid: int) -> str:
    try:
        return open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode()
    except FileNotFoundError:
        return ""
