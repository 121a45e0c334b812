"""The ``cuda_ipc`` weight transport on one real GPU (issue #7: "one GPU: learner and one
engine sharing it", which NCCL refuses).

1. Two processes on GPU 0, talking over the real ZeroMQ endpoints on 127.0.0.1: a
   learner-side ``CudaIpcWeightSender`` publishes two versions of a tiny model's
   weights, a generator-side ``Worker`` with an ``hf`` engine on cuda loads them
   through ``CudaIpcWeightReceiver``. The engine's parameters must equal the learner's
   tensors bit for bit, the second version must overwrite the first in place (same
   shared buffers, written only after the first was acknowledged), and a mixed-dtype
   version (bf16, fp32, int64, 0-d, empty) must arrive exactly.
2. ``python -m asyncrl.launch quickstart`` for 3 steps with the learner and the hf
   engine on cuda and ``transport.weights=cuda_ipc``: the run completes, and the
   generator loaded versions 1, 2, 3, the last bit-identical to the learner's final
   checkpoint (digests logged at DEBUG by the generator).

Every wait is bounded; a failure says which side stopped and shows its output."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from testkit import REPO, free_port, run_spawned, subprocess_env

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

WAIT_S = 120.0


def expected(model_dir: str, version: int) -> list[tuple[str, torch.Tensor]]:
    """The learner's weights at ``version``: the tiny model perturbed by a seeded noise
    (a tied lm_head is sent once, as the embedding, as the learner does)."""
    from asyncrl.models import load_model

    g = torch.Generator().manual_seed(version)
    state = load_model(model_dir, "float32").state_dict()
    return [(k, v + torch.randn(v.shape, generator=g)) for k, v in state.items() if k != "lm_head.weight"]


def mixed(version: int) -> list[tuple[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(100 + version)
    return [("w", torch.randn(33, 7, generator=g)), ("b", torch.randn(5, generator=g).bfloat16()),
            ("ids", torch.arange(11, dtype=torch.int64) * version), ("scalar", torch.tensor(float(version))),
            ("empty", torch.zeros(0, 4))]


def _learner(port: int, model_dir: str) -> None:
    from asyncrl.wire.cuda_ipc import CudaIpcWeightSender
    from asyncrl.wire.schema import Hello
    from asyncrl.wire.transport import LearnerEndpoint

    torch.cuda.set_device(0)
    ep = LearnerEndpoint("127.0.0.1", port)
    got = ep.recv(timeout_s=WAIT_S)
    if got is None or not isinstance(got[1], Hello):
        raise RuntimeError(f"learner: no Hello from the generator within {WAIT_S:.0f}s")
    peer = got[0]
    sender = CudaIpcWeightSender(num_generators=1, timeout_s=WAIT_S, max_slots=1)  # one slot: v2 must reuse it
    for v, named in ((1, expected(model_dir, 1)), (2, expected(model_dir, 2)), (3, mixed(3))):
        msg, frames = sender.notice([(k, t.cuda()) for k, t in named], v)  # waits for the previous ack
        ep.send(peer, msg, frames)
    if not sender.acknowledged(3, timeout_s=WAIT_S):  # keep the buffers alive until the generator is done
        raise RuntimeError(f"learner: the generator did not acknowledge v3 within {WAIT_S:.0f}s")
    sender.close()
    ep.close()


def _generator(port: int, model_dir: str, out: str) -> None:
    from asyncrl.generator.hf import HFEngine
    from asyncrl.generator.worker import Worker
    from asyncrl.models import load_model
    from asyncrl.wire.cuda_ipc import CudaIpcWeightReceiver
    from asyncrl.wire.schema import Hello, WeightUpdate
    from asyncrl.wire.transport import GeneratorEndpoint

    torch.cuda.set_device(0)
    engine = HFEngine(load_model(model_dir, "float32").cuda(), pad_id=0)
    link = GeneratorEndpoint(f"tcp://127.0.0.1:{port}", worker_id=0)
    link.send(Hello(worker_id=0, version=0))
    worker = Worker(engine, tok=None, link=link, worker_id=0)
    worker.weights = CudaIpcWeightReceiver(0)
    report = {"handles": [], "states": [], "versions": [], "devices": []}
    for v in (1, 2, 3):
        got = link.recv(timeout_s=WAIT_S)  # decode_checked: every check a generator makes
        if got is None:
            raise RuntimeError(f"generator: no weight notice v{v} within {WAIT_S:.0f}s")
        msg, frames = got
        if not (isinstance(msg, WeightUpdate) and msg.transport == "cuda_ipc" and msg.version == v):
            raise RuntimeError(f"generator: expected the cuda_ipc notice v{v}, got {msg!r:.300}")
        report["handles"].append(sorted((b.dtype, b.handle, b.storage_offset_bytes) for b in msg.ipc_buffers))
        if v < 3:
            worker.handle(msg, frames)  # receive -> engine.load_weights -> acknowledge
            report["versions"].append(engine.version)
            report["states"].append({k: p.detach().cpu().clone() for k, p in engine.model.state_dict().items()})
            report["devices"] += sorted({str(p.device) for p in engine.model.parameters()})
        else:  # not the model's parameters: read the views themselves
            named = worker.weights.receive(msg, frames)
            report["mixed"] = [(k, t.cpu().clone(), str(t.device)) for k, t in named]
            worker.weights.loaded(v)
    torch.save(report, out)
    worker.weights.close()
    link.close()


def _role(rank: int, port: int, model_dir: str, out: str) -> None:
    if rank == 0:
        _learner(port, model_dir)
    else:
        _generator(port, model_dir, out)


def test_learner_and_hf_engine_share_one_gpu(tmp_path, tiny_model_dir):
    out = str(tmp_path / "report.pt")
    run_spawned(_role, (free_port(), str(tiny_model_dir), out), 2, 3 * WAIT_S,
                "cuda_ipc processes (0 = learner, 1 = generator)")
    report = torch.load(out)
    assert report["versions"] == [1, 2] and set(report["devices"]) == {"cuda:0"}
    assert report["handles"][0] == report["handles"][1], "v2 was not written into v1's shared buffers"
    assert report["handles"][2] != report["handles"][0]  # other dtypes: a new slot
    for v, state in zip((1, 2), report["states"]):
        want = dict(expected(str(tiny_model_dir), v))
        for k, t in state.items():
            src = want["model.embed_tokens.weight" if k == "lm_head.weight" else k]  # tied: one tensor
            assert t.dtype == src.dtype and torch.equal(t, src), f"v{v} {k} differs from the learner's"
    assert not torch.equal(report["states"][0]["model.norm.weight"], report["states"][1]["model.norm.weight"])
    got = report["mixed"]
    assert [k for k, _, _ in got] == [k for k, _ in mixed(3)] and {d for _, _, d in got} == {"cuda:0"}
    for (k, t, _), (_, want) in zip(got, mixed(3)):
        assert t.dtype == want.dtype and t.shape == want.shape and torch.equal(t, want), k


# ---------------------------------------------------------------- end to end


def _stop(proc: subprocess.Popen) -> None:
    """Ctrl-C twice (launch kills its roles on the second), then kill launch itself."""
    for sig in (signal.SIGINT, signal.SIGINT):
        if proc.poll() is None:
            proc.send_signal(sig)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                pass
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def _tail(path: Path, n: int = 3000) -> str:
    return f"--- {path.name}:\n{path.read_text(errors='replace')[-n:]}" if path.exists() else f"--- {path.name}: none"


def test_quickstart_on_one_gpu_with_cuda_ipc(tmp_path, tiny_model_dir):
    from safetensors.torch import load_file

    from asyncrl.wire.weights import weights_digest

    run, steps = tmp_path / "run", 3
    cmd = [sys.executable, "-m", "asyncrl.launch", "quickstart", f"model.path={tiny_model_dir}", f"run.dir={run}",
           "transport.weights=cuda_ipc", "cluster.gpus_per_node=1", "cluster.learner_gpus=1",
           "cluster.generator_gpus=1", f"learner.steps={steps}", "learner.prompts_per_step=4",
           "generator.samples_per_prompt=4", "task.eval_size=8", "generator.max_tokens=16",
           "algo.type=entropy_bonus", "algo.coef=0.01", "learner.lr=1e-2",  # a gradient whatever the rewards
           "run.console=false", "run.log_level=DEBUG", "transport.timeout_s=120"]
    log = tmp_path / "launch.log"
    with log.open("w") as f:
        proc = subprocess.Popen(cmd, cwd=REPO, env=subprocess_env(), stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            code = proc.wait(480)
        except subprocess.TimeoutExpired:
            _stop(proc)
            pytest.fail("launch with cuda_ipc did not finish within 480s\n" + "\n".join(
                _tail(p) for p in (log, run / "logs" / "learner0.log", run / "logs" / "generator0.log")))
    logs = "\n".join(_tail(p) for p in (log, run / "logs" / "learner0.log", run / "logs" / "generator0.log"))
    assert code == 0, logs
    gen_log = (run / "logs" / "generator0.log").read_text(errors="replace")
    assert "hf engine on cuda:0" in gen_log, logs
    loaded = re.findall(r"loaded weights v(\d+) in [\d.]+s \(digest (\w+)\)", gen_log)
    assert [int(v) for v, _ in loaded] == list(range(1, steps + 1)), logs  # every version, once, in order
    final = load_file(str(run / "checkpoints" / f"step_{steps}" / "model.safetensors"))
    assert loaded[-1][1] == weights_digest(list(final.items())), "the generator's final weights are not the learner's"
    initial = load_file(str(Path(tiny_model_dir) / "model.safetensors"))
    assert weights_digest(list(initial.items())) != loaded[-1][1]  # training changed them
