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
import math
import os
import re
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Protocol

import msgspec
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


# --------------------------------------------------------------------- buckets


def meta_nbytes(m: TensorMeta) -> int:
    from asyncrl.wire.codec import _TORCH_DTYPES

    return math.prod(m.shape) * _TORCH_DTYPES[m.dtype].itemsize


def bucket_counts(sizes: list[int], bucket_bytes: int) -> list[int]:
    """Tensors per bucket, in order: consecutive tensors while the bucket stays within
    ``bucket_bytes`` (a larger tensor is a bucket of its own); 0 = one bucket."""
    counts: list[int] = []
    used = 0
    for size in sizes:
        if counts and (bucket_bytes <= 0 or used + size <= bucket_bytes):
            counts[-1] += 1
            used += size
        else:
            counts.append(1)
            used = size
    return counts


def cast_dtype(t: torch.Tensor, dtype: torch.dtype | None) -> torch.dtype:
    """The dtype ``t`` travels in: the engine's for floating-point tensors (integer
    buffers stay as they are)."""
    return dtype if dtype is not None and t.is_floating_point() else t.dtype


def cast(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return t.to(cast_dtype(t, dtype))


class WeightStream:
    """The tensors of one version, read once, bucket by bucket: ``fetch(i, metas)``
    returns bucket i only when the consumer gets to it, and this stream keeps no
    reference to a bucket it has handed over, so an engine that loads as it iterates
    holds about one bucket at a time. Iterating yields (name, tensor) pairs (what
    ``Engine.load_weights`` takes); ``buckets()`` yields whole buckets (for engines that
    ship a bucket at a time). ``broadcast`` (nccl): the arguments a vLLM engine passes to
    its workers so that each tensor-parallel rank joins the broadcast itself."""

    def __init__(self, metas: list[TensorMeta], counts: list[int], fetch: Callable[[int, list[TensorMeta]], Named],
                 broadcast: tuple | None = None) -> None:
        if sum(counts) != len(metas):
            raise WireError(f"buckets of {sum(counts)} tensors for {len(metas)}", "arrays")
        self.metas, self.counts, self._fetch, self.broadcast = metas, counts, fetch, broadcast
        self.names = [m.name for m in metas]
        self._read = False

    def buckets(self):
        if self._read:
            raise RuntimeError("a WeightStream is read once")
        self._read = True
        start = 0
        for i, count in enumerate(self.counts):
            metas = self.metas[start : start + count]
            start += count
            bucket = _check_metas(metas, self._fetch(i, metas))
            yield bucket
            del bucket

    def __iter__(self):
        for bucket in self.buckets():
            bucket.reverse()
            while bucket:  # hand each tensor over and forget it
                yield bucket.pop()


def iter_buckets(named, bucket_bytes: int):
    """Buckets of ``named``: a WeightStream's own, else consecutive tensors of about
    ``bucket_bytes`` taken lazily from any iterable."""
    if isinstance(named, WeightStream):
        yield from named.buckets()
        return
    bucket: Named = []
    used = 0
    for name, t in named:
        size = t.numel() * t.element_size()
        if bucket and bucket_bytes > 0 and used + size > bucket_bytes:
            yield bucket
            bucket, used = [], 0
        bucket.append((name, t))
        used += size
    if bucket:
        yield bucket


def _check_metas(metas: list[TensorMeta], named: Named) -> Named:
    got = [(m.name, m.dtype, list(m.shape)) for m in _metas(named)]
    if got != [(m.name, m.dtype, list(m.shape)) for m in metas]:
        raise WireError("a weight bucket does not match its notice", "arrays")
    return named


def _with_buckets(msg: WeightUpdate, bucket_bytes: int) -> WeightUpdate:
    return msgspec.structs.replace(msg, buckets=bucket_counts([meta_nbytes(m) for m in msg.tensors], bucket_bytes))


def _counts(msg: WeightUpdate) -> list[int]:
    return list(msg.buckets) or ([len(msg.tensors)] if msg.tensors else [])


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


class ZmqWeightServer:
    """Learner rank 0's side of bucketed zmq updates: the notice carries no tensors; a
    thread serves bucket after bucket from a ROUTER socket of its own, as each
    generator asks for it (``WeightsPull``). A generator thus has one bucket in flight,
    whatever its engine is busy with; a notice that carried every tensor would be queued
    whole in the generator's socket while it generates. Serves the newest ``keep``
    versions (an older one is answered "superseded"), cast to the engine's dtype
    bucket by bucket as it is asked for."""

    def __init__(self, host: str = "127.0.0.1", bucket_bytes: int = 512 << 20, dtype: torch.dtype | None = None,
                 keys: Path | None = None, keep: int = 2) -> None:
        import threading

        self.bucket_bytes, self.dtype, self.keep = bucket_bytes, dtype, keep
        self.versions: dict[int, tuple[list[TensorMeta], list[int], Named]] = {}
        self.lock = threading.Lock()
        self.served = 0  # buckets sent, for tests
        self._stop = threading.Event()
        ready = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._serve, args=(host, keys, ready), name="asyncrl-weights",
                                       daemon=True)
        self.thread.start()
        ready.wait(30)
        if self.error is not None:
            raise self.error
        if not ready.is_set():
            raise RuntimeError("the zmq weight server did not start")

    def notice(self, named: Named, version: int, idle: Callable[[], None] = lambda: None) -> tuple[WeightUpdate, list]:
        metas = [TensorMeta(name, str(cast_dtype(t, self.dtype)).removeprefix("torch."), list(t.shape))
                 for name, t in named]
        counts = bucket_counts([meta_nbytes(m) for m in metas], self.bucket_bytes)
        with self.lock:
            self.versions[version] = (metas, counts, list(named))
            for old in sorted(self.versions)[: -self.keep]:
                del self.versions[old]
        return WeightUpdate(version=version, tensors=metas, transport="zmq", buckets=counts,
                            serve_port=self.port), []

    def after_notice(self, named: Named) -> None:
        pass

    def _bucket(self, version: int, index: int) -> tuple[WeightUpdate, list]:
        with self.lock:
            entry = self.versions.get(version)
        if entry is None or index >= len(entry[1]):
            return WeightUpdate(version=version, tensors=[]), []  # superseded (or nonsense)
        metas, counts, named = entry
        start = sum(counts[:index])
        return weight_frames([(n, cast(t, self.dtype)) for n, t in named[start : start + counts[index]]], version)

    def _serve(self, host: str, keys: Path | None, ready) -> None:
        import zmq

        from asyncrl.wire import auth
        from asyncrl.wire.codec import Limits, decode_checked, encode
        from asyncrl.wire.schema import PULLS

        try:
            sock = zmq.Context.instance().socket(zmq.ROUTER)
            if keys is not None:
                auth.make_server(sock, keys)
            self.port = sock.bind_to_random_port(f"tcp://{host}")
        except BaseException as e:  # noqa: BLE001 - reported to the constructor
            self.error = e
            ready.set()
            return
        ready.set()
        limits = Limits(max_message_bytes=4096, kinds=PULLS)
        try:
            while not self._stop.is_set():
                if not sock.poll(200):
                    continue
                peer, *frames = sock.recv_multipart(copy=False)
                try:
                    req, _ = decode_checked([f.buffer for f in frames], limits)
                except WireError as e:
                    log.warning("weight server: rejected a request: %.200s", e)
                    continue
                msg, out = self._bucket(req.version, req.bucket)
                sock.send_multipart([peer, *encode(msg, out)], copy=False)
                self.served += 1
        finally:
            sock.close(linger=0)

    def close(self) -> None:
        self._stop.set()
        self.thread.join(5)


class ZmqBucketReceiver:
    """A generator's side of bucketed zmq updates: pulls the buckets of a notice one
    at a time from the learner's weight server (``serve_port`` on ``host``); a bucket's
    tensors are views of the received frames (no copy), released when the engine has
    loaded them."""

    def __init__(self, host: str, keys: Path | None = None, timeout_s: float = 600.0,
                 max_bucket_bytes: int = 65536 << 20) -> None:
        self.host, self.keys, self.timeout_s, self.max_bucket_bytes = host, keys, timeout_s, max_bucket_bytes
        self.sock = None
        self.port = 0

    def _connect(self, port: int):
        import zmq

        from asyncrl.wire import auth

        if self.sock is not None and self.port == port:
            return self.sock
        if self.sock is not None:
            self.sock.close(linger=0)
        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.setsockopt(zmq.MAXMSGSIZE, self.max_bucket_bytes)
        if self.keys is not None:
            auth.make_client(sock, self.keys)
        sock.connect(f"tcp://{self.host}:{port}")
        self.sock, self.port = sock, port
        return sock

    def _pull(self, msg: WeightUpdate, index: int) -> tuple[WeightUpdate, list]:
        from asyncrl.wire.codec import Limits, decode_checked, encode
        from asyncrl.wire.schema import WeightsPull

        sock = self._connect(msg.serve_port)
        sock.send_multipart(encode(WeightsPull(version=msg.version, bucket=index)))
        while True:
            if not sock.poll(int(self.timeout_s * 1000)):
                raise TimeoutError(f"no answer from the learner's weight server ({self.host}:{msg.serve_port}) "
                                   f"for bucket {index} of weights v{msg.version} in {self.timeout_s:.0f}s")
            frames = sock.recv_multipart(copy=False)
            got, rest = decode_checked([f.buffer for f in frames],
                                       Limits(max_message_bytes=self.max_bucket_bytes, kinds=(WeightUpdate,)))
            if (got.version, got.transport) == (msg.version, "zmq") and not got.buckets:
                return got, rest
            log.warning("weight server answered v%d for a pull of v%d; ignored", got.version, msg.version)

    def receive(self, msg: WeightUpdate, frames: list) -> WeightStream | None:
        counts = _counts(msg)
        first = self._pull(msg, 0) if counts else None
        if first is not None and not first[0].tensors:
            log.info("weights v%d were superseded before they were read; waiting for the next version", msg.version)
            return None

        def fetch(i: int, metas: list[TensorMeta]) -> Named:
            nonlocal first
            got, rest = first if i == 0 else self._pull(msg, i)
            first = None
            if not got.tensors:
                raise WireError(f"weights v{msg.version} were superseded while bucket {i} was read", "superseded")
            return frame_tensors(got, rest)

        return WeightStream(list(msg.tensors), counts, fetch)

    def loaded(self, version: int) -> None:
        pass

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close(linger=0)
            self.sock = None


def frame_tensors(msg: WeightUpdate, frames: list) -> Named:
    """Tensors that are views of the (checked) frames of an inline weight message, no
    copy: each keeps its frame alive until the engine drops it."""
    import warnings

    from asyncrl.wire.codec import _weight_layout

    out = []
    with warnings.catch_warnings():  # frames are read-only buffers; engines only read (copy) from them
        warnings.simplefilter("ignore", UserWarning)
        for meta, dtype, buf in _weight_layout(msg, frames):
            raw = torch.frombuffer(buf, dtype=torch.uint8) if buf.nbytes else torch.empty(0, dtype=torch.uint8)
            out.append((meta.name, raw.view(dtype).reshape(meta.shape)))
    return out


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


def _version_files(directory: Path) -> dict[int, Path]:
    """Version -> file, for the complete files of ``directory`` (temporary ones excluded)."""
    found = (_FILE.fullmatch(p.name) for p in directory.iterdir())
    return {int(m.group(1)): directory / m.group(0) for m in found if m}


class DiskWeightSender:
    """Writes ``weights_v{N}.safetensors`` then the ``LATEST`` marker; keeps the newest
    ``keep`` versions up to the one just written (a generator reading an older one when
    it is deleted skips it: a newer notice is already queued behind).

    A new sender (a fresh run, ``run.overwrite``, or ``run.resume=auto``) first removes
    what an earlier learner left in the directory: its versions may be newer than the
    one this learner publishes next (a resumed run republishes its checkpoint's version,
    behind the steps the killed learner had reached), and pruning by position would then
    delete the file the notice names, so the generators would skip it and never get
    weights."""

    def __init__(self, directory: str | Path, keep: int = 3, bucket_bytes: int = 0,
                 dtype: torch.dtype | None = None) -> None:
        self.dir, self.keep = Path(directory), keep
        self.bucket_bytes, self.dtype = bucket_bytes, dtype  # how generators read it; the engine's dtype
        self.dir.mkdir(parents=True, exist_ok=True)
        temporary = [*self.dir.glob(".weights_v*.tmp"), *self.dir.glob(f".{MARKER}.*.tmp")]
        stale = [p for p in (*_version_files(self.dir).values(), *temporary, self.dir / MARKER) if p.exists()]
        for path in stale:
            path.unlink(missing_ok=True)
        if stale:
            log.info("removed %d file(s) an earlier learner left in %s", len(stale), self.dir)

    def notice(self, named: Named, version: int, idle: Callable[[], None] = lambda: None) -> tuple[WeightUpdate, list]:
        from safetensors.torch import save

        tensors = {name: cast(t.detach(), self.dtype).cpu().contiguous() for name, t in named}
        path = weights_file(self.dir, version)
        data = save(tensors, metadata={"version": str(version)})
        _write_atomic(path, data)
        _write_atomic(self.dir / MARKER, json.dumps({"version": version, "file": path.name,
                                                     "bytes": len(data)}).encode())
        self._prune(version)
        msg = WeightUpdate(version=version, tensors=_metas(list(tensors.items())), transport="disk")
        return _with_buckets(msg, self.bucket_bytes), []

    def _prune(self, version: int) -> None:
        """Keep the ``keep`` newest versions up to ``version`` (by number, not by name)."""
        files = _version_files(self.dir)
        for v in sorted(v for v in files if v <= version)[: -self.keep]:
            files[v].unlink(missing_ok=True)

    def after_notice(self, named: Named) -> None:
        pass

    def close(self) -> None:
        pass


_ST_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64", "I64": "int64",
              "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


def _safetensors_index(f) -> tuple[dict, int]:
    """A safetensors file's header (name -> dtype, shape, data offsets) and where its
    data starts: an 8-byte little-endian length, then that much JSON."""
    head = f.read(8)
    if len(head) != 8:
        raise WireError("weights file shorter than a safetensors header", "arrays")
    n = int.from_bytes(head, "little")
    if n > 100 << 20:
        raise WireError(f"safetensors header of {n} bytes", "arrays")
    index = json.loads(f.read(n))
    index.pop("__metadata__", None)
    return index, 8 + n


def _read_tensor(f, start: int, index: dict, meta: TensorMeta) -> torch.Tensor:
    from asyncrl.wire.codec import _TORCH_DTYPES

    entry = index.get(meta.name)
    if entry is None or _ST_DTYPES.get(entry["dtype"]) != meta.dtype or list(entry["shape"]) != list(meta.shape):
        raise WireError(f"weights file does not match its notice at {meta.name[:200]!r}", "arrays")
    begin, end = entry["data_offsets"]
    if end - begin != meta_nbytes(meta):
        raise WireError(f"{meta.name[:200]!r}: {end - begin} bytes in the file", "arrays")
    out = torch.empty(end - begin, dtype=torch.uint8)
    f.seek(start + begin)
    if end > begin and f.readinto(memoryview(out.numpy())) != end - begin:
        raise WireError(f"weights file ends inside {meta.name[:200]!r}", "arrays")
    return out.view(_TORCH_DTYPES[meta.dtype]).reshape(meta.shape)


class DiskWeightReceiver:
    def __init__(self, directory: str | Path) -> None:
        self.dir = Path(directory)

    def receive(self, msg: WeightUpdate, frames: list) -> WeightStream | None:
        """The version's tensors, read bucket by bucket with plain reads (no mapping of
        the whole file: mapped pages would count against the engine's memory). The file
        stays open, so pruning it meanwhile does not cut the read short."""
        path = weights_file(self.dir, msg.version)  # the name comes from the version, never from the peer
        try:
            f = open(path, "rb")
        except FileNotFoundError:
            log.info("weights v%d were superseded before they were read; waiting for the next version", msg.version)
            return None
        try:
            index, start = _safetensors_index(f)
        except BaseException:
            f.close()
            raise
        counts = _counts(msg)

        def fetch(i: int, metas: list[TensorMeta]) -> Named:
            try:
                return [(m.name, _read_tensor(f, start, index, m)) for m in metas]
            finally:
                if i == len(counts) - 1:
                    f.close()

        return WeightStream(list(msg.tensors), counts, fetch)

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


def _by_dtype(rows: list[tuple[str, torch.dtype, list[int]]]) -> dict[torch.dtype, list[int]]:
    """Indices of a bucket's tensors per dtype, dtypes in order of first appearance:
    one flat buffer per dtype is broadcast, laid out the same way on both sides."""
    groups: dict[torch.dtype, list[int]] = {}
    for i, (_, dtype, _) in enumerate(rows):
        groups.setdefault(dtype, []).append(i)
    return groups


def send_bucket(group: BroadcastGroup, named: Named, dtype: torch.dtype | None = None) -> None:
    """Learner rank 0: one bucket, cast to the engine's dtype, packed per dtype on the
    group's device and broadcast; the packed buffers are freed before the next bucket."""
    named = [(n, cast(t.detach(), dtype)) for n, t in named]
    for dt, idx in _by_dtype([(n, t.dtype, list(t.shape)) for n, t in named]).items():
        flat = torch.cat([named[i][1].reshape(-1).to(group.device) for i in idx])
        group.broadcast(flat)
        del flat


def receive_bucket(group: BroadcastGroup, rows: list[tuple[str, torch.dtype, list[int]]]) -> Named:
    """A generator (or one tensor-parallel rank of its engine): one bucket of the
    broadcast, as views of one flat buffer per dtype on the group's device."""
    out: list[tuple[str, torch.Tensor] | None] = [None] * len(rows)
    for dt, idx in _by_dtype(rows).items():
        sizes = [math.prod(rows[i][2]) for i in idx]
        flat = torch.empty(sum(sizes), dtype=dt, device=group.device)
        group.broadcast(flat)
        for i, part in zip(idx, flat.split(sizes)):
            out[i] = (rows[i][0], part.view(rows[i][2]))
    return out  # type: ignore[return-value]


class BroadcastWeightSender:
    """Learner rank 0. The group is created at the first publish, after the notice is
    out: generators join when they read it, so neither side blocks the other at start-up.
    The group has one rank per engine worker: ``ranks_per_generator`` is an engine's
    tensor-parallel size (each vLLM worker joins and loads its own shard)."""

    def __init__(self, host: str, port: int, num_generators: int, backend: str = "nccl",
                 timeout_s: float = 600.0, bucket_bytes: int = 0, dtype: torch.dtype | None = None,
                 ranks_per_generator: int = 1) -> None:
        self.args = (host, port, 0, 1 + num_generators * ranks_per_generator, backend, timeout_s)
        self.bucket_bytes, self.dtype = bucket_bytes, dtype
        self.group: BroadcastGroup | None = None

    def notice(self, named: Named, version: int, idle: Callable[[], None] = lambda: None) -> tuple[WeightUpdate, list]:
        metas = [TensorMeta(n, str(cast_dtype(t, self.dtype)).removeprefix("torch."), list(t.shape))
                 for n, t in named]
        msg = WeightUpdate(version=version, tensors=metas, transport="nccl")
        return _with_buckets(msg, self.bucket_bytes), []

    def after_notice(self, named: Named) -> None:
        if self.group is None:
            self.group = BroadcastGroup(*self.args)
        start = 0
        for count in bucket_counts([t.numel() * cast_dtype(t, self.dtype).itemsize for _, t in named],
                                   self.bucket_bytes):
            send_bucket(self.group, named[start : start + count], self.dtype)
            start += count

    def close(self) -> None:
        if self.group is not None:
            self.group.close()


class BroadcastWeightReceiver:
    """Generator ``worker_id``'s engine holds ranks 1 + worker_id * ranks_per_generator
    onwards. An engine of one rank (hf, sglang) joins from the generator process and
    gets each bucket on its device; a vLLM engine is handed ``WeightStream.broadcast``
    instead and each of its workers joins (``vllm_ext.asyncrl_broadcast_update``)."""

    def __init__(self, host: str, port: int, worker_id: int, num_generators: int, backend: str = "nccl",
                 timeout_s: float = 600.0, ranks_per_generator: int = 1) -> None:
        first = 1 + worker_id * ranks_per_generator
        self.args = (host, port, first, 1 + num_generators * ranks_per_generator, backend, timeout_s)
        self.ranks_per_generator = ranks_per_generator
        self.group: BroadcastGroup | None = None

    def receive(self, msg: WeightUpdate, frames: list) -> WeightStream:
        from asyncrl.wire.codec import _TORCH_DTYPES

        rows = [(m.name, _TORCH_DTYPES[m.dtype], list(m.shape)) for m in msg.tensors]
        host, port, first, world, backend, timeout_s = self.args
        remote = ({"host": host, "port": port, "first_rank": first, "world_size": world, "backend": backend,
                   "timeout_s": timeout_s}, [[n, m.dtype, list(m.shape)] for (n, _, _), m in zip(rows, msg.tensors)],
                  _counts(msg))
        starts = [sum(_counts(msg)[:i]) for i in range(len(_counts(msg)))]

        def fetch(i: int, metas: list[TensorMeta]) -> Named:
            if self.ranks_per_generator != 1:
                raise RuntimeError("a tensor-parallel engine must join the weight broadcast from its workers")
            if self.group is None:
                self.group = BroadcastGroup(*self.args)
            return receive_bucket(self.group, rows[starts[i] : starts[i] + len(metas)])

        return WeightStream(list(msg.tensors), _counts(msg), fetch, broadcast=remote)

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


def _bucket_bytes(tc) -> int:
    return int(tc.bucket_mb * (1 << 20))


def _keys(cfg, run_dir: str | Path) -> Path | None:
    from asyncrl.wire import auth

    return auth.keys_dir(run_dir) if cfg.transport.auth == "curve" else None


def _engine_ranks(cfg) -> int:
    """Broadcast ranks per generator: a vLLM engine's tensor-parallel workers each join."""
    from asyncrl.config import engine_tp_size

    return engine_tp_size(cfg) if cfg.generator.engine == "vllm" else 1


def build_sender(cfg, run_dir: str | Path) -> WeightSender:
    """Learner rank 0's side of ``transport.weights``; tensors leave it in the engine's
    dtype (``model.dtype``), in buckets of ``transport.bucket_mb``."""
    tc, dtype = cfg.transport, getattr(torch, cfg.model.dtype)
    if tc.weights == "disk":
        return DiskWeightSender(weights_dir(cfg, run_dir), bucket_bytes=_bucket_bytes(tc), dtype=dtype)
    if tc.weights == "nccl":
        return BroadcastWeightSender(tc.host, _broadcast_port(tc), cfg.generator.num_workers, "nccl", tc.timeout_s,
                                     bucket_bytes=_bucket_bytes(tc), dtype=dtype,
                                     ranks_per_generator=_engine_ranks(cfg))
    if tc.weights == "cuda_ipc":
        from asyncrl.wire.cuda_ipc import CudaIpcWeightSender

        return CudaIpcWeightSender(cfg.generator.num_workers, tc.timeout_s)
    if tc.bucket_mb > 0:
        return ZmqWeightServer(tc.host, _bucket_bytes(tc), dtype, _keys(cfg, run_dir))
    return ZmqWeights()


def build_receiver(cfg, run_dir: str | Path, worker_id: int, learner_host: str) -> WeightReceiver:
    """A generator's side; ``learner_host`` is the host of the address it connects to."""
    tc = cfg.transport
    if tc.weights == "disk":
        return DiskWeightReceiver(weights_dir(cfg, run_dir))
    if tc.weights == "nccl":
        return BroadcastWeightReceiver(learner_host, _broadcast_port(tc), worker_id, cfg.generator.num_workers,
                                       "nccl", tc.timeout_s, ranks_per_generator=_engine_ranks(cfg))
    if tc.weights == "cuda_ipc":  # on the generator's current CUDA device (the worker set it)
        from asyncrl.wire.cuda_ipc import CudaIpcWeightReceiver

        return CudaIpcWeightReceiver(worker_id)
    if tc.bucket_mb > 0:
        return ZmqBucketReceiver(learner_host, _keys(cfg, run_dir), tc.timeout_s, int(tc.max_weights_mb * (1 << 20)))
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
