"""Packed rows in which a group's samples share one copy of their common prompt.

GRPO samples n answers per prompt, so a padded or plainly packed batch runs every
prompt through the decoder n times, each time with the same inputs and so the same
hidden states. Here consecutive samples whose unscored prefix is identical (the
prompt, up to and including the position that predicts the first answer token) form a
unit: the prefix once, then each sample's own tokens. Every own span attends to its
unit's prefix and causally to itself (``asyncrl.learner.attention``), with position ids
that continue the prefix's, so each sample's hidden states are exactly those of its
padded row; the prefix's hidden states feed every sample of the unit, and the backward
sums their gradients there, as n separate copies would.

The decoder's output reaches the losses through ``slots``: for every position of the
padded (B, L) layout, the packed position computing its hidden state. Several samples'
positions map to one shared slot; selections and aggregations still see padded
(B, L) tensors, so they cannot tell the layouts apart.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from asyncrl.kernels import IGNORE_INDEX
from asyncrl.learner.attention import SpanAttention, plan_span_attention
from asyncrl.learner.packing import first_fit_decreasing, row_lengths


@dataclass(frozen=True)
class Unit:
    """Samples laid out together: ``prefix`` tokens of the first sample's row once
    (0 = nothing shared: a single sample as one span), then each sample's tokens after it."""

    samples: tuple[int, ...]
    prefix: int

    def length(self, lengths: list[int]) -> int:
        return self.prefix + sum(lengths[i] - self.prefix for i in self.samples)


def prefix_lengths(targets: Tensor) -> list[int]:
    """Per row, the positions before its first scored one, plus that one: the inputs
    its first answer token is predicted from (0 for a row with nothing scored)."""
    scored = targets != IGNORE_INDEX
    first = torch.where(scored, torch.arange(targets.shape[1], device=targets.device), targets.shape[1]).min(-1).values
    return [int(f) + 1 if f < targets.shape[1] else 0 for f in first.tolist()]


def plan_units(input_ids: Tensor, targets: Tensor, capacity: int = 0, lengths: list[int] | None = None) -> list[Unit]:
    """Consecutive rows with the same prefix (length and tokens) as one unit, a unit
    no longer than ``capacity`` tokens (0 = no limit; a unit that would grow past it
    starts a new one with its own copy of the prefix). Rows with nothing to score are
    left out; a unit of one sample shares nothing. ``lengths``: the rows'
    :func:`row_lengths` where the caller has them already."""
    lengths = row_lengths(targets).tolist() if lengths is None else lengths
    prefixes = prefix_lengths(targets)
    kept = [i for i, n in enumerate(lengths) if n]
    same = _same_prefix_as_previous(input_ids, kept, prefixes)
    units: list[list[int]] = []
    unit_prefix: list[int] = []
    size = 0
    for j, i in enumerate(kept):
        n, p = lengths[i], prefixes[i]
        if units and same[j] and (capacity == 0 or size + n - p <= capacity):
            units[-1].append(i)
            size += n - p
            continue
        units.append([i])
        unit_prefix.append(p)
        size = n
    return [Unit(tuple(s), p if len(s) > 1 else 0) for s, p in zip(units, unit_prefix)]


def _same_prefix_as_previous(input_ids: Tensor, rows: list[int], prefixes: list[int]) -> list[bool]:
    """For each of ``rows``, whether its prefix has the length and tokens of the previous
    one's (the first: False). One comparison for all rows, so one device sync; equality
    is transitive, so a run of True rows shares the first one's prefix."""
    if len(rows) < 2:
        return [False] * len(rows)
    dev = input_ids.device
    idx = torch.tensor(rows, device=dev)
    p = torch.tensor([prefixes[i] for i in rows], device=dev)
    ids = input_ids.index_select(0, idx)
    beyond = torch.arange(ids.shape[1], device=dev) >= p[1:, None]  # positions past the prefix do not count
    same = ((ids[1:] == ids[:-1]) | beyond).all(-1) & (p[1:] == p[:-1])
    return [False, *same.tolist()]


@dataclass(frozen=True)
class SharedPacked:
    """Units laid end to end in rows. ``spans``: one row per attention span over the
    rows read row-major, (start, length, context start, context length): the span's
    queries attend to the context in full and causally to themselves (a prefix, a
    lone sample and a row's padding tail have no context). ``slots``: the flat packed
    position of every padded (B, L) position the layout computes, -1 elsewhere."""

    input_ids: Tensor  # (R, C) int64
    position_ids: Tensor  # (R, C) int64
    slots: Tensor  # (B, L) int64
    spans: list[tuple[int, int, int, int]]
    attention: SpanAttention  # the spans' attention plan (the decoder's ``prompt_spans``)
    padding: int  # packed positions that are a row's padding tail


def layout_rows(units: list[Unit], lengths: list[int], capacity: int) -> tuple[list[list[int]], int]:
    """(rows of unit indices, row width), as ``asyncrl.learner.packing.pack_rows`` lays
    out samples: 0 = one row of all units in order; else rows of ``capacity`` tokens
    (at least the longest unit), filled first-fit-decreasing."""
    sizes = [u.length(lengths) for u in units]
    if capacity == 0:
        return [list(range(len(units)))] if units else [], max(sum(sizes), 1)
    width = max(capacity, max(sizes, default=0), 1)
    return first_fit_decreasing(sizes, width), width


def pack_shared(input_ids: Tensor, targets: Tensor, pad_id: int, capacity: int = 0) -> SharedPacked:
    """Right-padded rows (B, L) -> rows of units (:func:`plan_units`, :func:`layout_rows`).

    The layout is planned as index lists, then written with one gather or scatter per
    tensor (a copy per span cost 2 ms a quickstart micro-batch)."""
    B, L = input_ids.shape
    lengths = row_lengths(targets).tolist()
    units = plan_units(input_ids, targets, capacity, lengths)
    rows, width = layout_rows(units, lengths, capacity)
    R, dev = max(len(rows), 1), input_ids.device
    src: list[int] = []  # per packed position written: its flat (B, L) source position
    dst: list[int] = []  # ... its flat packed position
    positions: list[int] = []  # ... its position id
    shared_src: list[int] = []  # the other samples' prefix positions ...
    shared_dst: list[int] = []  # ... and the packed position that computes them
    spans: list[tuple[int, int, int, int]] = []
    padding = 0

    def place(row: int, start: int, stop: int, at: int) -> None:
        src.extend(range(row * L + start, row * L + stop))
        dst.extend(range(at, at + stop - start))
        positions.extend(range(start, stop))

    for r, members in enumerate(rows):
        at = r * width  # flat position
        for unit in (units[u] for u in members):
            p = unit.prefix
            ctx = (at, p) if p else (0, 0)
            if p:
                place(unit.samples[0], 0, p, at)
                for i in unit.samples[1:]:
                    shared_src.extend(range(i * L, i * L + p))
                    shared_dst.extend(range(at, at + p))
                spans.append((at, p, 0, 0))
                at += p
            for i in unit.samples:
                n = lengths[i] - p
                if n == 0:  # an answer of one token: its only scored position is the prefix's last
                    continue
                place(i, p, lengths[i], at)
                spans.append((at, n, *ctx))
                at += n
        if at < (r + 1) * width:  # the padding tail: a span of its own, computed, never read
            spans.append((at, (r + 1) * width - at, 0, 0))
            padding += (r + 1) * width - at
    for r in range(len(rows), R):  # nothing to score: one all-padding row
        spans.append((r * width, width, 0, 0))
        padding += width
    src_t, dst_t = torch.tensor(src, dtype=torch.long, device=dev), torch.tensor(dst, dtype=torch.long, device=dev)
    ids = torch.full((R * width,), pad_id, dtype=torch.long, device=dev)
    ids[dst_t] = input_ids.reshape(-1)[src_t]
    pos = torch.zeros((R * width,), dtype=torch.long, device=dev)
    pos[dst_t] = torch.tensor(positions, dtype=torch.long, device=dev)
    slots = torch.full((B * L,), -1, dtype=torch.long, device=dev)
    slots[src_t] = dst_t
    if shared_src:
        slots[torch.tensor(shared_src, dtype=torch.long, device=dev)] = torch.tensor(shared_dst, dtype=torch.long,
                                                                                      device=dev)
    return SharedPacked(ids.view(R, width), pos.view(R, width), slots.view(B, L), spans,
                        plan_span_attention(spans, dev), padding)


def shared_positions(input_ids: Tensor, targets: Tensor, capacity: int) -> tuple[int, int, int]:
    """(real tokens of the padded rows, positions the shared layout computes, of them
    padding), without building it: what ``perf/padding_frac`` and ``perf/shared_frac`` count."""
    lengths = row_lengths(targets).tolist()
    units = plan_units(input_ids, targets, capacity, lengths)
    rows, width = layout_rows(units, lengths, capacity)
    used = sum(u.length(lengths) for u in units)
    computed = max(len(rows), 1) * width
    return sum(lengths), computed, computed - used
