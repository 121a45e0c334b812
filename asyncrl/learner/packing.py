"""Sequence packing for the learner's forward, and micro-batches sized by tokens.

A rollout batch is right-padded to its longest sample, so with lengths that vary 10x
most of a padded [rows, L] block is padding the decoder still computes. Packing lays
samples end to end in rows, each with its own position ids (restarting at 0), and the
decoder attends within a sample only: through ``asyncrl.learner.attention`` (one
causal span per sample, so a row can hold a whole micro-batch and there is no padding)
or, for other attention implementations, through transformers' block-diagonal mask
built from the restarting position ids. A sample is never split across rows.

Only the decoder's input layout changes: the per-token results are scattered back to
the padded [rows, L] layout, so token selections and aggregations see exactly the
tensors they see without packing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from asyncrl.kernels import IGNORE_INDEX


def row_lengths(targets: Tensor) -> Tensor:
    """Real tokens of each right-padded row (prompt + response - 1): one past its last
    scored position; 0 for a row with nothing to score (it needs no forward)."""
    scored = targets != IGNORE_INDEX  # (B, L)
    last = torch.where(scored, torch.arange(targets.shape[1], device=targets.device), -1).max(-1).values
    return last + 1


def first_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Rows of sample indices, each row's total length <= ``capacity`` (longest first,
    into the first row with room; ties keep index order, so the layout is deterministic)."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        n = lengths[i]
        if n == 0:
            continue
        for r, free in enumerate(room):
            if n <= free:
                rows[r].append(i)
                room[r] -= n
                break
        else:
            rows.append([i])
            room.append(capacity - n)
    return rows


@dataclass(frozen=True)
class Packed:
    """Samples laid end to end in rows. ``source`` maps each packed position to its flat
    index in the padded (B, L) layout (-1 at a packed row's padding); ``cu_seq_lens``
    are the span boundaries over the rows read row-major (a span: one sample, or a
    row's padding tail), as ``asyncrl.learner.attention`` takes them."""

    input_ids: Tensor  # (R, C) int64
    position_ids: Tensor  # (R, C) int64, restarting at 0 for every sample
    targets: Tensor  # (R, C) int64, IGNORE_INDEX where not scored
    source: Tensor  # (R, C) int64
    cu_seq_lens: Tensor  # (spans + 1,) int32, on the CPU

    @property
    def padding_frac(self) -> float:
        return float((self.source < 0).float().mean()) if self.source.numel() else 0.0


def pack_rows(lengths: list[int], capacity: int) -> tuple[list[list[int]], int]:
    """(rows of sample indices, row width): ``capacity`` 0 = one row of all samples in
    order (no padding); else rows of ``capacity`` tokens (at least the longest sample),
    filled first-fit-decreasing."""
    if capacity == 0:
        return [[i for i, n in enumerate(lengths) if n]], max(sum(lengths), 1)
    capacity = max(capacity, max(lengths, default=0), 1)
    return first_fit_decreasing(lengths, capacity), capacity


def pack(input_ids: Tensor, targets: Tensor, pad_id: int, capacity: int = 0) -> Packed:
    """Pack right-padded rows (B, L) as :func:`pack_rows` lays them out; each sample's
    real tokens (:func:`row_lengths`) only: what follows its last scored position
    cannot affect a scored one under causal attention."""
    B, L = input_ids.shape
    lengths = row_lengths(targets).tolist()
    rows, width = pack_rows(lengths, capacity)
    R = max(len(rows), 1)
    dev = input_ids.device
    ids = torch.full((R, width), pad_id, dtype=torch.long, device=dev)
    tgt = torch.full((R, width), IGNORE_INDEX, dtype=torch.long, device=dev)
    pos = torch.zeros((R, width), dtype=torch.long, device=dev)
    src = torch.full((R, width), -1, dtype=torch.long, device=dev)
    bounds = [0]
    for r, samples in enumerate(rows):
        at = 0
        for i in samples:
            n = lengths[i]
            ids[r, at:at + n] = input_ids[i, :n]
            tgt[r, at:at + n] = targets[i, :n]
            pos[r, at:at + n] = torch.arange(n, device=dev)
            src[r, at:at + n] = torch.arange(i * L, i * L + n, device=dev)
            at += n
            bounds.append(r * width + at)
        if at < width:  # the padding tail: a span of its own
            bounds.append((r + 1) * width)
    bounds += [(r + 1) * width for r in range(len(rows), R)]  # an empty pack: one all-padding row
    return Packed(ids, pos, tgt, src, torch.tensor(bounds, dtype=torch.int32))


def unpack(values: Tensor, packed: Packed, shape: torch.Size, fill: float = 0.0) -> Tensor:
    """Per-token values at the packed rows' scored positions (in packed row-major order,
    as ``values[packed.targets != IGNORE_INDEX]`` would list them) -> the padded (B, L)
    layout, ``fill`` elsewhere. Differentiable in ``values``."""
    scored = packed.targets != IGNORE_INDEX
    index = packed.source[scored]
    out = torch.full(tuple(shape), fill, dtype=values.dtype, device=values.device)
    return out.index_put((index // shape[1], index % shape[1]), values)  # not a view: FSDP hooks stay intact


def token_budget_slices(rows: slice, lengths: Tensor, max_rows: int, max_tokens: int) -> list[slice]:
    """Consecutive micro-batches of ``rows``: at most ``max_rows`` rows each and, with
    ``max_tokens`` > 0, at most that many real tokens (a longer single sample gets a
    micro-batch of its own). Global normalisers and selections make the gradient the
    same for any split, so the split only trades memory for speed."""
    out, start, tokens = [], rows.start, 0
    for i in range(rows.start, rows.stop):
        n = int(lengths[i])
        if i > start and (i - start >= max_rows or (max_tokens and tokens + n > max_tokens)):
            out.append(slice(start, i))
            start, tokens = i, 0
        tokens += n
    if rows.stop > start:
        out.append(slice(start, rows.stop))
    return out


def split_to_count(slices: list[slice], count: int, lengths: Tensor) -> list[slice]:
    """``slices`` refined to ``count`` micro-batches by halving the one with the most
    tokens (that has more than one row), so every rank runs the same number of forwards
    (FSDP's all-gathers are collectives). ``count`` is at most the number of rows."""
    out = list(slices)
    while len(out) < count:
        splittable = [i for i, sl in enumerate(out) if sl.stop - sl.start > 1]
        if not splittable:
            raise ValueError(f"cannot split {sum(s.stop - s.start for s in out)} rows into {count} micro-batches")
        i = max(splittable, key=lambda i: (int(lengths[out[i]].sum()), -i))
        sl = out[i]
        mid = sl.start + (sl.stop - sl.start) // 2
        out[i:i + 1] = [slice(sl.start, mid), slice(mid, sl.stop)]
    return out


def input_positions(lengths: Tensor, micro: list[slice], width: int, capacity: int | None) -> tuple[int, int]:
    """(real tokens, positions the decoder computes) over ``micro``: padded rows are
    ``width`` long; packed rows (``capacity`` not None) as :func:`pack_rows` lays them out."""
    real = processed = 0
    for sl in micro:
        lens = [int(n) for n in lengths[sl]]
        real += sum(lens)
        if capacity is None:
            processed += len(lens) * width
        else:
            rows, row_width = pack_rows(lens, capacity)
            processed += max(len(rows), 1) * row_width
    return real, processed
