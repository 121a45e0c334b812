"""Rollout batch: trajectory groups -> padded tensors, and each rank's share of them."""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor

from asyncrl.algos import compute_advantages
from asyncrl.kernels import IGNORE_INDEX
from asyncrl.learner.hub import Group


@dataclass
class Batch:
    """S samples, right-padded to length L (prompt + response - 1). A multi-turn
    response's environment tokens are in ``input_ids`` only (context): no target, no
    behaviour log-prob, no version, as for the prompt."""

    input_ids: Tensor  # (S, L) int64
    targets: Tensor  # (S, L) int64, the next token where the model sampled it, IGNORE_INDEX elsewhere
    behaviour_logprobs: Tensor  # (S, L) float32, the generator's sampled log-probs (0 elsewhere)
    versions: Tensor  # (S, L) int64, policy version that sampled each target token (-1 elsewhere)
    advantages: Tensor  # (S,) float32
    rewards: Tensor  # (S,) float32

    @property
    def mask(self) -> Tensor:
        """The tokens the model sampled: the only ones trained on, selected or counted."""
        return self.targets != IGNORE_INDEX

    def rows(self, sl: slice) -> "Batch":
        return Batch(**{f.name: getattr(self, f.name)[sl] for f in fields(self)})

    def to(self, device: torch.device) -> "Batch":
        return Batch(**{f.name: getattr(self, f.name).to(device, non_blocking=True) for f in fields(self)})


def build_batch(groups: list[Group], pad_id: int, scale_advantages: bool) -> Batch:
    n = len(groups[0].samples)
    if any(len(g.samples) != n for g in groups):
        raise ValueError("every group must hold the same number of samples")
    rewards = torch.tensor([[s.reward for s in g.msg.samples] for g in groups], dtype=torch.float32)
    advantages = compute_advantages(rewards, scale=scale_advantages).reshape(-1)
    rows = [(g.msg.prompt_ids, s) for g in groups for s in g.samples]
    L = max(len(p) + len(s.token_ids) - 1 for p, s in rows)
    S = len(rows)
    ids = torch.full((S, L), pad_id, dtype=torch.long)
    tgt = torch.full((S, L), IGNORE_INDEX, dtype=torch.long)
    blp = torch.zeros((S, L), dtype=torch.float32)
    ver = torch.full((S, L), -1, dtype=torch.long)
    for i, (prompt, s) in enumerate(rows):
        seq = torch.tensor(list(prompt) + s.token_ids.tolist(), dtype=torch.long)
        P, R = len(prompt), len(s.token_ids)
        ids[i, : P + R - 1] = seq[:-1]
        resp = slice(P - 1, P - 1 + R)  # position t predicts token t + 1
        # environment tokens are context (in input_ids) but never targets: every selection,
        # aggregation and normaliser derives from mask = targets != IGNORE_INDEX
        model = torch.from_numpy(s.model_mask())
        tgt[i, resp] = torch.where(model, seq[P:], IGNORE_INDEX)
        blp[i, resp] = torch.where(model, torch.from_numpy(s.logprobs.astype("float32")), 0.0)
        ver[i, resp] = torch.where(model, torch.from_numpy(s.versions.astype("int64")), -1)
    return Batch(ids, tgt, blp, ver, advantages, rewards.reshape(-1))


def save_batch(batch: Batch, path: str | Path) -> None:
    """One batch as a safetensors file (``debug.record_batches``; read back by :func:`load_batch`)."""
    from safetensors.torch import save_file

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file({f.name: getattr(batch, f.name).contiguous() for f in fields(batch)}, str(path))


def load_batch(path: str | Path) -> Batch:
    from safetensors.torch import load_file

    return Batch(**load_file(str(path)))


def broadcast_batch(batch: Batch | None, src: int = 0) -> Batch | None:
    """Rank ``src`` sends the whole batch to every rank (tensors only, no pickle).
    ``None`` from the source means "stop" and is returned on every rank."""
    if dist.get_world_size() == 1:
        return batch
    is_src = dist.get_rank() == src
    shape = torch.tensor(list(batch.input_ids.shape) if is_src and batch is not None else [0, 0])
    dist.broadcast(shape, src)
    S, L = shape.tolist()
    if S == 0:
        return None
    if not is_src:
        batch = Batch(
            torch.empty((S, L), dtype=torch.long), torch.empty((S, L), dtype=torch.long),
            torch.empty((S, L)), torch.empty((S, L), dtype=torch.long), torch.empty(S), torch.empty(S),
        )
    for f in fields(batch):
        dist.broadcast(getattr(batch, f.name), src)
    return batch


def rank_rows(num_samples: int, mini_batches: int, world: int, rank: int) -> list[slice]:
    """This rank's contiguous share of each mini-batch (rank r holds slice r, so the
    concatenation over ranks is the mini-batch in order, as selection requires)."""
    per_mb = num_samples // mini_batches
    per_rank = per_mb // world
    return [slice(m * per_mb + rank * per_rank, m * per_mb + (rank + 1) * per_rank) for m in range(mini_batches)]
