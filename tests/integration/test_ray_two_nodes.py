"""``cluster.backend: ray`` against a real two-node Ray cluster on this machine: two
raylets (``ray.cluster_utils.Cluster``), both on 127.0.0.1, one CPU each. The launch
connects with ``cluster.address`` like on a real cluster (generators reach learner
rank 0 at its node's address, the run directory is shared storage), and with one CPU
per node the learner's placement group and the generators' cannot share a node. The
run must complete, and Ray's actor table must show the learner and the generator
actors on different nodes.

The cluster lives in its own temp dir (RAY_TMPDIR) so it neither reads nor overwrites
another session's /tmp/ray; RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 keeps Ray from
replacing 127.0.0.1 with the machine's external address, so nothing leaves loopback.
The launch runs without that variable, as a user's would: it must keep the loopback
``cluster.address`` itself (``asyncrl.cluster.ray_address``; before, Ray rewrote it to
the external address and ``ray.init`` retried forever)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from testkit import REPO, WARM_BASE, WARM_RUN, assert_policy_gradient_ran, subprocess_env

ray = pytest.importorskip("ray")
pytestmark = [pytest.mark.slow, pytest.mark.ray]  # a cluster start and one Ray launch: about a minute

STEPS = 2
RUN = [f"learner.steps={STEPS}", "learner.prompts_per_step=4", *WARM_RUN, "task.eval_size=4",
       "learner.world_size=1", "generator.num_workers=1", "cluster.cpus_per_role=1", "learner.threads=1",
       "generator.threads=1", "run.console=false", "transport.timeout_s=120"]


@pytest.fixture
def two_nodes(monkeypatch):
    """(address, [node ids]) of a running two-node cluster, shut down afterwards."""
    from ray.cluster_utils import Cluster

    tmp = tempfile.mkdtemp(prefix="r2n", dir="/tmp")  # short: unix socket paths stay under 107 characters
    (Path(tmp) / "ray").mkdir()
    for k, v in {"RAY_TMPDIR": tmp, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled",
                 "RAY_USAGE_STATS_ENABLED": "0"}.items():
        monkeypatch.setenv(k, v)  # for the cluster's processes and the launch that connects to it
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "node_ip_address": "127.0.0.1",
                                                            "include_dashboard": False})
    try:
        cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1")
        cluster.wait_for_nodes(timeout=120)
        yield cluster.address, [n.node_id for n in cluster.list_all_nodes()]
    finally:
        cluster.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)


# Ray's actor table (the GCS's: the state API would need the dashboard), read by a
# separate, time-limited Python: ray.init has no timeout of its own
_ACTOR_NODES = """
import json, sys, ray
from ray._private.state import actors
ray.init(address=sys.argv[1], _node_ip_address="127.0.0.1", log_to_driver=False)
print(json.dumps({a["Name"]: a["Address"]["NodeID"] for a in actors().values()}))
"""


def actor_nodes(address: str, launch_pid: int) -> dict[str, str]:
    """Role name -> node id of every actor the launch started (dead ones included:
    Ray keeps finished actors in its table)."""
    try:
        out = subprocess.run([sys.executable, "-c", _ACTOR_NODES, address], env=subprocess_env(),
                             capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail("could not read the cluster's actor table within 120s")
    assert out.returncode == 0, out.stderr[-3000:]
    table = json.loads(out.stdout.strip().splitlines()[-1])
    suffix = f"-{launch_pid}"
    return {name.removeprefix("asyncrl-").removesuffix(suffix): node for name, node in table.items()
            if name.startswith("asyncrl-") and name.endswith(suffix)}


def test_learner_and_generator_on_different_nodes(two_nodes, tmp_path):
    address, nodes = two_nodes
    assert len(set(nodes)) == 2
    run_dir, log = tmp_path / "run", tmp_path / "launch.log"
    cmd = [sys.executable, "-m", "asyncrl.launch", "quickstart", f"model.path={WARM_BASE}", f"run.dir={run_dir}",
           "cluster.backend=ray", f"cluster.address={address}", "cluster.nodes=2", *RUN]
    env = subprocess_env()
    del env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"]
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            code = proc.wait(300)
        except subprocess.TimeoutExpired:
            proc.kill()  # launch's own process; its actors die with the cluster
            proc.wait()
            pytest.fail(f"two-node launch did not finish within 300s:\n{log.read_text()[-3000:]}")
    text = log.read_text(errors="replace")
    assert code == 0, text[-4000:]
    assert "generators connect to tcp://127.0.0.1:" in text, text[-3000:]

    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "loss/total" in r]
    assert [r["step"] for r in train] == list(range(1, STEPS + 1))
    assert_policy_gradient_ran(train)
    assert (run_dir / "checkpoints" / f"step_{STEPS}" / "model.safetensors").exists()

    placed = actor_nodes(address, proc.pid)
    assert set(placed) == {"learner0", "generator0"}, placed
    assert placed["learner0"] in nodes and placed["generator0"] in nodes
    assert placed["learner0"] != placed["generator0"], f"both roles ran on node {placed['learner0']}"
