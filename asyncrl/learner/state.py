"""Resumable checkpoints: ``<run.dir>/checkpoints/state/step_N/``.

A checkpoint holds everything a run needs to continue as if it had never stopped:

- ``dcp/``: model and optimiser state, sharded by torch.distributed.checkpoint (each
  rank writes its own FSDP2 shards; ``get_state_dict``/``set_state_dict``);
- ``rng_rank{r}.safetensors``: every learner rank's torch RNG state (CPU, and CUDA's);
- ``hub.msgpack`` (rank 0, msgspec): the policy version, the data position
  (``hub.train_index``), the training group ids still in flight (re-requested on
  resume: a group id is its problem's stream position) and the buffered, not yet
  trained trajectory groups in their wire encoding (msgpack header + raw arrays);
- ``COMPLETE``: the completeness marker, written last.

Generators need no saved RNG: every engine batch is seeded from (run seed, its first
group id, the engine's policy version) (``asyncrl.generator.worker.batch_seed``), so a
re-issued or resumed group samples the same answers given the same weights.

Writes go to ``step_N.tmp`` and are renamed into place after the marker, so a directory
named ``step_N`` with a marker is complete; ``resume: auto`` only ever picks those.
The HF export users load (``checkpoints/step_N``) stays in ``asyncrl.learner.checkpoint``.
The directory must be on a filesystem every rank sees (multi-node: a shared one).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import time
from pathlib import Path

import msgspec
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

log = logging.getLogger(__name__)

MARKER = "COMPLETE"
_STEP_DIR = re.compile(r"step_(\d+)")


class HubState(msgspec.Struct, forbid_unknown_fields=True):
    """Rank 0's side of a checkpoint (see the module docstring)."""

    version: int
    train_index: int
    outstanding: list[int]
    next_worker: int
    dropped_total: int
    buffer: list[list[bytes]]  # one wire-encoded TrajectoryGroup per buffered group, oldest first


def state_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints" / "state"


def complete_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """(step, path) of every complete checkpoint under ``root``, oldest first. A directory
    without the marker (a save that was interrupted) or not named ``step_N`` is ignored."""
    found = []
    for p in root.iterdir() if root.is_dir() else ():
        m = _STEP_DIR.fullmatch(p.name)
        if m and p.is_dir() and (p / MARKER).is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(root: Path) -> Path | None:
    found = complete_checkpoints(root)
    return found[-1][1] if found else None


def _write_marker(path: Path) -> None:
    with open(path / MARKER, "w") as f:
        f.write("ok\n")
        f.flush()
        os.fsync(f.fileno())


class Checkpointer:
    """Saves (a collective: every rank calls) and resumes the run's state."""

    def __init__(self, run_dir: str | Path, keep: int, marker_delay_s: float = 0.0) -> None:
        self.root = state_root(run_dir)
        self.keep, self.marker_delay_s = keep, marker_delay_s
        self.last_saved = -1

    def save(self, step: int, policy, opt, hub_state: HubState | None) -> Path:
        """Write ``step_N.tmp``, then the marker, then rename it to ``step_N``."""
        rank0 = dist.get_rank() == 0
        final, tmp = self.root / f"step_{step}", self.root / f"step_{step}.tmp"
        if rank0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        dist.barrier()
        model_sd, optim_sd = get_state_dict(policy, opt)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=tmp / "dcp")
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state()
        save_file(rng, tmp / f"rng_rank{dist.get_rank()}.safetensors")
        if rank0:
            (tmp / "hub.msgpack").write_bytes(msgspec.msgpack.encode(hub_state))
        dist.barrier()  # every rank's shards are on disk
        if rank0:
            time.sleep(self.marker_delay_s)  # debug: a window to kill us mid-checkpoint
            _write_marker(tmp)
            if final.exists():  # saved this step before (an earlier, interrupted run)
                shutil.rmtree(final)
            os.replace(tmp, final)
            self._prune()
            log.info("saved resumable checkpoint %s", final)
        dist.barrier()
        self.last_saved = step
        return final

    def _prune(self) -> None:
        for _, path in complete_checkpoints(self.root)[: -self.keep]:
            shutil.rmtree(path, ignore_errors=True)
        for p in self.root.glob("step_*.tmp"):  # interrupted saves (ours is renamed by now)
            shutil.rmtree(p, ignore_errors=True)

    def resume(self, policy, opt) -> tuple[int, HubState | None]:
        """Load the newest complete checkpoint into ``policy`` and ``opt`` (every rank) and
        restore this rank's RNG. Returns (its step, rank 0's HubState, None elsewhere), or
        (0, None) if there is none."""
        path = latest_checkpoint(self.root)
        if path is None:
            log.info("resume=auto: no complete checkpoint in %s; starting fresh", self.root)
            return 0, None
        model_sd, optim_sd = get_state_dict(policy, opt)
        sd = {"model": model_sd, "optim": optim_sd}
        dcp.load(sd, checkpoint_id=path / "dcp")
        set_state_dict(policy, opt, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
        rng = path / f"rng_rank{dist.get_rank()}.safetensors"
        if rng.exists():  # a run resumed with more ranks than it saved: new ranks keep their seed
            states = load_file(rng)
            torch.set_rng_state(states["torch"])
            if "cuda" in states and torch.cuda.is_available():
                torch.cuda.set_rng_state(states["cuda"])
        hub_state = None
        if dist.get_rank() == 0:
            hub_state = msgspec.msgpack.decode((path / "hub.msgpack").read_bytes(), type=HubState)
        step = int(_STEP_DIR.fullmatch(path.name).group(1))
        self.last_saved = step
        log.info("resumed from %s (policy version %d)", path, step)
        return step, hub_state
