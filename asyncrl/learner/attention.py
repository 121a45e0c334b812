"""Variable-length causal attention for packed rows, as a transformers attention
implementation (``SDPA_VARLEN``): sdpa unless the call carries ``cu_seq_lens_q``, in
which case every sample of the packed rows attends causally within itself only.

transformers' own packed path (position ids that restart, no attention mask) builds a
dense [rows, 1, C, C] block-diagonal boolean mask for sdpa; sdpa then computes all
C x C scores of a row, with no causal block skipping, and the mask itself costs C^2
memory. Here each sample is one causal sdpa call on its own span, so attention costs
what the samples need (sum of n^2 / 2) whatever the row width, and rows can be as
wide as a whole micro-batch: no padding at all.

With ``prompt_spans`` instead (``asyncrl.learner.shared_prompts``), a span may also
attend in full to a context span before it: a group's answers to their one shared
copy of the prompt.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

SDPA_VARLEN = "asyncrl_sdpa_varlen"


def sdpa_varlen_attention(
    module: torch.nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
    dropout: float = 0.0, scaling: float | None = None, cu_seq_lens_q: Tensor | None = None,
    prompt_spans: SpanAttention | None = None, **kwargs,
) -> tuple[Tensor, None]:
    """query [R, H, C, d], key/value [R, Hkv, C, d] -> ([R, C, H, d], None), as sdpa.

    ``cu_seq_lens_q``: cumulative span boundaries (0, ..., R*C) over the rows read
    row-major: a span is one sample, or a row's padding tail (computed, never read)."""
    if prompt_spans is not None:
        if attention_mask is not None:
            raise ValueError("packed rows take no attention mask: their spans are the mask")
        return span_batch_attention(query, key, value, prompt_spans, dropout, scaling), None
    if cu_seq_lens_q is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    if attention_mask is not None:
        raise ValueError("packed rows take no attention mask: their spans are the mask")
    R, H, C, d = query.shape
    flat = lambda t: t.transpose(0, 1).reshape(1, t.shape[1], R * C, d)  # noqa: E731  rows end to end
    bounds = cu_seq_lens_q.tolist()
    spans = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
    if bounds[0] != 0 or bounds[-1] != R * C or min(spans) < 1:
        raise ValueError(f"cu_seq_lens_q must cover 0..{R * C} in positive spans, got {bounds}")
    gqa = H != key.shape[1]
    # split (not slicing) keeps the backward to one concatenation instead of a
    # full-size zero tensor per span
    outs = [F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=scaling, is_causal=True, enable_gqa=gqa)
            for q, k, v in zip(*(flat(t).split(spans, dim=2) for t in (query, key, value)))]
    out = torch.cat(outs, dim=2).reshape(H, R, C, d)
    return out.permute(1, 2, 0, 3).contiguous(), None


@dataclass(frozen=True)
class SpanAttention:
    """Attention over spans with contexts, in a few batched causal sdpa calls.

    Each span becomes a sequence of its context's positions then its own, padded at
    the end to its bucket's length: under causal attention its own queries see the
    whole context and their own earlier tokens and never the padding after them, so
    no mask is needed (and sdpa skips the blocks above the diagonal). Spans are sorted
    by sequence length and bucketed so that none is padded past 1/``BUCKET_FILL`` of
    its length; a span of ``LONG_SPAN`` positions or more gets a call of its own.

    Positions are flat indices over the rows read row-major. One ``index_select``
    gathers every bucket's sequences (its backward is one ``index_add``, also where a
    shared context's positions repeat: on CUDA that sums with atomics, so gradients
    are reproducible to rounding only) and one puts the spans' own queries back. An
    answer's sequence recomputes its context's queries, whose outputs are dropped:
    its attention costs what it costs unshared, and the linear layers see the
    context once."""

    gather: Tensor  # (sum of S * K,) the buckets' sequences, end to end (padding: a span's first position)
    shapes: tuple[tuple[int, int], ...]  # each bucket's S sequences of K positions
    scatter: Tensor  # (positions,) where each flat position's own query is in the gathered outputs
    positions: int


BUCKET_FILL = 0.75
LONG_SPAN = 256


def _sequences(group: list[tuple[int, int, int, int]]) -> tuple[Tensor, Tensor, int]:
    """A bucket's (S, K) positions and the (S, K) mask of the spans' own queries."""
    a, n, ca, cn = (torch.tensor(col, dtype=torch.long)[:, None] for col in zip(*group))  # (S, 1)
    K = int((n + cn).max())
    j = torch.arange(K)[None, :]  # place in the span's sequence
    first = torch.where(cn > 0, ca, a)
    index = torch.where(j < cn, ca + j, torch.where(j < cn + n, a + j - cn, first))
    return index, (j >= cn) & (j < cn + n), K


def plan_span_attention(spans: list[tuple[int, int, int, int]], device: torch.device) -> SpanAttention:
    """``spans``: (start, length, context start, context length), tiling 0..N in order;
    a span attends in full to its context (an earlier span) and causally to itself."""
    starts, lengths = [s[0] for s in spans], [s[1] for s in spans]
    if not spans or starts[0] != 0 or min(lengths) < 1 or any(a + n != b for a, n, b in
                                                              zip(starts, lengths, starts[1:])):
        raise ValueError(f"spans must tile 0..N in order, in positive lengths: {spans}")
    known = {(a, n) for a, n in zip(starts, lengths)}
    for s in spans:
        if s[3] and ((s[2], s[3]) not in known or s[2] >= s[0]):
            raise ValueError(f"span {s}: its context is not an earlier span")
    groups: list[list[tuple[int, int, int, int]]] = []
    for s in sorted(spans, key=lambda s: -(s[1] + s[3])):
        head = groups[-1][0][1] + groups[-1][0][3] if groups else 0
        if groups and head < LONG_SPAN and s[1] + s[3] >= BUCKET_FILL * head:
            groups[-1].append(s)
        else:
            groups.append([s])
    gathers, owns, shapes = [], [], []
    for g in groups:
        index, own, K = _sequences(g)
        gathers.append(index.reshape(-1))
        owns.append(own.reshape(-1))
        shapes.append((len(g), K))
    gather, own = torch.cat(gathers), torch.cat(owns)
    N = starts[-1] + lengths[-1]
    scatter = torch.empty(N, dtype=torch.long)
    scatter[gather[own]] = own.nonzero().squeeze(-1)  # every position is one span's own query once
    return SpanAttention(gather.to(device), tuple(shapes), scatter.to(device), N)


def span_batch_attention(query: Tensor, key: Tensor, value: Tensor, plan: SpanAttention, dropout: float,
                         scaling: float | None) -> Tensor:
    """query [R, H, C, d], key/value [R, Hkv, C, d] -> [R, C, H, d], as :class:`SpanAttention` plans."""
    R, H, C, d = query.shape
    if R * C != plan.positions:
        raise ValueError(f"the span plan covers {plan.positions} positions, the rows hold {R * C}")
    gqa = H != key.shape[1]
    sizes = [S * K for S, K in plan.shapes]
    # positions first: (R*C, heads, d) is a view of the projections' layout, and each
    # bucket's (S, heads, K, d) below has the strides sdpa gets from any transformers model
    q, k, v = (t.transpose(1, 2).reshape(R * C, t.shape[1], d).index_select(0, plan.gather).split(sizes)
               for t in (query, key, value))
    outs = []
    for (S, K), qb, kb, vb in zip(plan.shapes, q, k, v):
        seq = lambda t: t.reshape(S, K, t.shape[1], d).transpose(1, 2)  # noqa: E731  (S, heads, K, d)
        out = F.scaled_dot_product_attention(seq(qb), seq(kb), seq(vb), dropout_p=dropout, scale=scaling,
                                             is_causal=True, enable_gqa=gqa)
        outs.append(out.transpose(1, 2).reshape(S * K, H, d))
    return torch.cat(outs).index_select(0, plan.scatter).reshape(R, C, H, d)  # flat order, as sdpa returns


AttentionInterface.register(SDPA_VARLEN, sdpa_varlen_attention)
# the masks sdpa would get, for the unpacked calls (packed calls pass no mask)
ALL_MASK_ATTENTION_FUNCTIONS.register(SDPA_VARLEN, sdpa_mask)
