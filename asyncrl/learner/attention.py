"""Variable-length causal attention for packed rows, as a transformers attention
implementation (``SDPA_VARLEN``): sdpa unless the call carries ``cu_seq_lens_q``, in
which case every sample of the packed rows attends causally within itself only.

transformers' own packed path (position ids that restart, no attention mask) builds a
dense [rows, 1, C, C] block-diagonal boolean mask for sdpa; sdpa then computes all
C x C scores of a row, with no causal block skipping, and the mask itself costs C^2
memory. Here each sample is one causal sdpa call on its own span, so attention costs
what the samples need (sum of n^2 / 2) whatever the row width, and rows can be as
wide as a whole micro-batch: no padding at all.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

SDPA_VARLEN = "asyncrl_sdpa_varlen"


def sdpa_varlen_attention(
    module: torch.nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
    dropout: float = 0.0, scaling: float | None = None, cu_seq_lens_q: Tensor | None = None, **kwargs,
) -> tuple[Tensor, None]:
    """query [R, H, C, d], key/value [R, Hkv, C, d] -> ([R, C, H, d], None), as sdpa.

    ``cu_seq_lens_q``: cumulative span boundaries (0, ..., R*C) over the rows read
    row-major: a span is one sample, or a row's padding tail (computed, never read)."""
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


AttentionInterface.register(SDPA_VARLEN, sdpa_varlen_attention)
# the masks sdpa would get, for the unpacked calls (packed calls pass no mask)
ALL_MASK_ATTENTION_FUNCTIONS.register(SDPA_VARLEN, sdpa_mask)
