"""Weight sync: one protocol, four transports (``transport.weights``).

Every transport sends the generators a ``WeightUpdate`` notice over the ZeroMQ link (so
weights stay ordered with prompts: a batch that needs version v finds v loaded); what
differs is where the tensors travel:

- ``zmq``: in the notice itself, one raw frame per tensor (works anywhere; default).
- ``disk``: a safetensors file in ``transport.weights_dir``, written to a temporary
  name, fsynced, then renamed (``os.replace`` is atomic), then the ``LATEST`` marker is
  replaced the same way. A file named like a version is therefore always complete: a
  learner killed mid-write leaves only a ``.tmp`` file that no reader opens. For engines
  that reload from storage (an external server, a restarted worker).
- ``nccl``: broadcast from learner rank 0 to every generator over a process group of
  its own (rank 0 + one rank per generator), rendezvous over TCP on rank 0's host. GPU
  learners and GPU engines only; the same code runs over gloo on CPU for tests.
- ``cuda_ipc``: learner rank 0 and the engines on one GPU (where NCCL refuses two ranks
  on one device): the notice carries CUDA IPC handles of buffers in rank 0's GPU memory,
  the generator copies from them and acknowledges (``asyncrl.wire.cuda_ipc``).

The learner side is a ``WeightSender`` (``notice`` builds the message, ``after_notice``
moves the tensors where they do not ride on the message); the generator side a
``WeightReceiver`` (``receive`` turns a notice into named tensors for
``Engine.load_weights``, ``loaded`` runs once the engine has copied them).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Protocol

import torch

from asyncrl.wire.codec import WireError, weight_frames, weight_tensors
from asyncrl.wire.schema import TensorMeta, WeightUpdate

log = logging.getLogger(__name__)

Named = list[tuple[str, torch.Tensor]]


class WeightSender(Protocol):
    def notice(self, named: Named, version: int, idle: Callable[[], None] = lambda: None) -> tuple[WeightUpdate, list]:
        """The message (and raw frames) every generator receives for this version.
        ``idle`` runs while the sender waits (cuda_ipc: for acknowledgements), so the
        hub keeps serving generators meanwhile (a restarted one's Hello among them)."""
        ...

    def after_notice(self, named: Named) -> None:
        """Called once the notice is sent to every generator."""
        ...

    def close(self) -> None: ...


class WeightReceiver(Protocol):
    def receive(self, msg: WeightUpdate, frames: list) -> Named | None:
        """The tensors of this version; None if it was superseded before it could be read."""
        ...

    def loaded(self, version: int) -> None:
        """Called once the engine has copied what ``receive`` returned (cuda_ipc: the
        learner may now overwrite its buffers)."""
        ...

    def close(self) -> None: ...


def _metas(named: Named) -> list[TensorMeta]:
    return [TensorMeta(name, str(t.dtype).removeprefix("torch."), list(t.shape)) for name, t in named]


def _check_against(msg: WeightUpdate, named: Named) -> Named:
    """What arrived must be exactly what the notice declared (names, dtypes, shapes)."""
    got = [(m.name, m.dtype, m.shape) for m in _metas(named)]
    want = [(m.name, m.dtype, list(m.shape)) for m in msg.tensors]
    if got != want:
        raise WireError(f"weights v{msg.version} do not match their notice", "arrays")
    return named


# ------------------------------------------------------------------------- zmq


class ZmqWeights:
    """Tensors as raw frames of the notice (sender and receiver in one)."""

    def notice(self, named: Named, version: int, idle: Callable[[], None] = lambda: None) -> tuple[WeightUpdate, list]:
        return weight_frames(named, version)

    def after_notice(self, named: Named) -> None:
        pass

    def receive(self, msg: WeightUpdate, frames: list) -> Named:
        return weight_tensors(msg, frames)

    def loaded(self, version: int) -> None:
        pass

    def close(self) -> None:
        pass


# ------------------------------------------------------------------------ disk

MARKER = "LATEST"
_FILE = re.compile(r"weights_v(\d{8})\.safetensors")


def weights_file(directory: Path, version: int) -> Path:
    return Path(directory) / f"weights_v{version:08d}.safetensors"


def _write_atomic(path: Path, data: bytes, chunk: int = 64 << 20) -> None:
    """temp file + fsync + rename: ``path`` never exists half-written."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        for i in range(0, len(data), chunk):
            f.write(data[i : i + chunk])
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class DiskWeightSender:
    """Writes ``weights_v{N}.safetensors`` then the ``LATEST`` marker; keeps the newest
    ``keep`` versions (a generator reading an older one when it is deleted skips it: a
    newer notice is already queued behind)."""

    def __init__(self, directory: str | Path, keep: int = 3) -> None:
        self.dir, self.keep = Path(directory), keep
        self.dir.mkdir(parents=True, exist_ok=True)

    def notice(self, named: Named, version: int, idle: Callable[[], None] = lambda: None) -> tuple[WeightUpdate, list]:
        from safetensors.torch import save

        tensors = {name: t.detach().cpu().contiguous() for name, t in named}
        path = weights_file(self.dir, version)
        data = save(tensors, metadata={"version": str(version)})
        _write_atomic(path, data)
        _write_atomic(self.dir / MARKER, json.dumps({"version": version, "file": path.name,
                                                     "bytes": len(data)}).encode())
        for old in sorted(self.dir.glob("weights_v*.safetensors"))[: -self.keep]:
            old.unlink(missing_ok=True)
        return WeightUpdate(version=version, tensors=_metas(named), transport="disk"), []

    def after_notice(self, named: Named) -> None:
        pass

    def close(self) -> None:
        pass


class DiskWeightReceiver:
    def __init__(self, directory: str | Path) -> None:
        self.dir = Path(directory)

    def receive(self, msg: WeightUpdate, frames: list) -> Named | None:
        from safetensors.torch import load_file

        path = weights_file(self.dir, msg.version)  # the name comes from the version, never from the peer
        try:
            tensors = load_file(str(path))
        except FileNotFoundError:
            log.info("weights v%d were superseded before they were read; waiting for the next version", msg.version)
            return None
        return _check_against(msg, [(m.name, tensors[m.name]) for m in msg.tensors if m.name in tensors])

    def load_latest(self) -> tuple[int, Named] | None:
        """The newest complete version named by the marker (an engine starting late)."""
        from safetensors.torch import load_file

        try:
            marker = json.loads((self.dir / MARKER).read_text())
        except FileNotFoundError:
            return None
        if not _FILE.fullmatch(marker["file"]):
            raise WireError(f"weights marker names {marker['file']!r}", "arrays")
        return int(marker["version"]), list(load_file(str(self.dir / marker["file"])).items())

    def loaded(self, version: int) -> None:
        pass

    def close(self) -> None:
        pass


# ------------------------------------------------------------------------ nccl


class BroadcastGroup:
    """A process group of its own between learner rank 0 (rank 0) and the generators
    (ranks 1..N), beside the learner's torch.distributed world, built directly from a
    TCPStore (no global state: a learner already has a default group). ``backend`` is
    nccl in production; gloo runs the same code on CPU."""

    def __init__(self, host: str, port: int, rank: int, world_size: int, backend: str = "nccl",
                 timeout_s: float = 600.0) -> None:
        import torch.distributed as dist

        timeout = timedelta(seconds=timeout_s)
        store = dist.TCPStore(host, port, world_size, is_master=rank == 0, timeout=timeout)
        store = dist.PrefixStore("asyncrl/weights", store)
        if backend == "nccl":
            opts = dist.ProcessGroupNCCL.Options()
            opts._timeout = timeout
            self.pg = dist.ProcessGroupNCCL(store, rank, world_size, opts)
            self.device = torch.device("cuda", torch.cuda.current_device())
        elif backend == "gloo":
            self.pg = dist.ProcessGroupGloo(store, rank, world_size, timeout)
            self.device = torch.device("cpu")
        else:
            raise ValueError(f"weight broadcast backend {backend!r}: use nccl (GPU) or gloo (CPU)")
        self.store, self.rank = store, rank

    def broadcast(self, tensor: torch.Tensor) -> None:
        import torch.distributed as dist

        opts = dist.BroadcastOptions()
        opts.rootRank = 0
        self.pg.broadcast([tensor], opts).wait()

    def close(self) -> None:
        self.pg = None


class BroadcastWeightSender:
    """Learner rank 0. The group is created at the first publish, after the notice is
    out: generators join when they read it, so neither side blocks the other at start-up."""

    def __init__(self, host: str, port: int, num_generators: int, backend: str = "nccl",
                 timeout_s: float = 600.0) -> None:
        self.args = (host, port, 0, 1 + num_generators, backend, timeout_s)
        self.group: BroadcastGroup | None = None

    def notice(self, named: Named, version: int, idle: Callable[[], None] = lambda: None) -> tuple[WeightUpdate, list]:
        return WeightUpdate(version=version, tensors=_metas(named), transport="nccl"), []

    def after_notice(self, named: Named) -> None:
        if self.group is None:
            self.group = BroadcastGroup(*self.args)
        for _, t in named:
            self.group.broadcast(t.detach().to(self.group.device).contiguous())

    def close(self) -> None:
        if self.group is not None:
            self.group.close()


class BroadcastWeightReceiver:
    """Generator ``worker_id`` is rank 1 + worker_id; tensors land on its device."""

    def __init__(self, host: str, port: int, worker_id: int, num_generators: int, backend: str = "nccl",
                 timeout_s: float = 600.0) -> None:
        self.args = (host, port, 1 + worker_id, 1 + num_generators, backend, timeout_s)
        self.group: BroadcastGroup | None = None

    def receive(self, msg: WeightUpdate, frames: list) -> Named:
        from asyncrl.wire.codec import _TORCH_DTYPES

        if self.group is None:
            self.group = BroadcastGroup(*self.args)
        out = []
        for m in msg.tensors:
            t = torch.empty(m.shape, dtype=_TORCH_DTYPES[m.dtype], device=self.group.device)
            self.group.broadcast(t)
            out.append((m.name, t))
        return out

    def loaded(self, version: int) -> None:
        pass

    def close(self) -> None:
        if self.group is not None:
            self.group.close()


# ---------------------------------------------------------------------- config


def weights_dir(cfg, run_dir: str | Path) -> Path:
    return Path(cfg.transport.weights_dir or Path(run_dir) / "weights")


def _broadcast_port(tc) -> int:
    return tc.weights_port or tc.port + 1


def build_sender(cfg, run_dir: str | Path) -> WeightSender:
    """Learner rank 0's side of ``transport.weights``."""
    tc = cfg.transport
    if tc.weights == "disk":
        return DiskWeightSender(weights_dir(cfg, run_dir))
    if tc.weights == "nccl":
        return BroadcastWeightSender(tc.host, _broadcast_port(tc), cfg.generator.num_workers, "nccl", tc.timeout_s)
    if tc.weights == "cuda_ipc":
        from asyncrl.wire.cuda_ipc import CudaIpcWeightSender

        return CudaIpcWeightSender(cfg.generator.num_workers, tc.timeout_s)
    return ZmqWeights()


def build_receiver(cfg, run_dir: str | Path, worker_id: int, learner_host: str) -> WeightReceiver:
    """A generator's side; ``learner_host`` is the host of the address it connects to."""
    tc = cfg.transport
    if tc.weights == "disk":
        return DiskWeightReceiver(weights_dir(cfg, run_dir))
    if tc.weights == "nccl":
        return BroadcastWeightReceiver(learner_host, _broadcast_port(tc), worker_id, cfg.generator.num_workers,
                                       "nccl", tc.timeout_s)
    if tc.weights == "cuda_ipc":  # on the generator's current CUDA device (the worker set it)
        from asyncrl.wire.cuda_ipc import CudaIpcWeightReceiver

        return CudaIpcWeightReceiver(worker_id)
    return ZmqWeights()


def weights_digest(named: Named) -> str:
    """A fingerprint of weights, bit for bit (names, dtypes, shapes, bytes; order-free):
    what a generator loaded can be compared with what the learner saved."""
    h = hashlib.sha256()
    for name, t in sorted(named, key=lambda x: x[0]):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{list(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]
