"""The min-p proxy log-prob of the sampled token (docs/lpreg.md section 2), dense.

This is the readable reference: it materialises [..., V] logits. The learner uses
the chunked kernel ``asyncrl.kernels.token_proxy_logprobs`` with the same
semantics; tests compare the two.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def minp_proxy_logprobs(logits: Tensor, targets: Tensor, kappa: float, temperature: float = 1.0) -> Tensor:
    """Log-prob of ``targets`` under the renormalised min-p proxy of ``logits``.

    ``logits`` [..., V] are the raw old-policy logits (before temperature) and
    ``targets`` [...] the sampled token ids. The keep set is
    ``{v : z_v >= max(z) + ln(kappa)}``, i.e. ``p_v >= kappa * p_max`` at temperature 1
    whatever the sampling temperature; the proxy is softmax((z - m) / T) restricted to
    that set. Returns [...] in float32 (float64 for float64 logits), ``-inf`` where the
    target is filtered out. ``kappa = 0`` keeps everything (the proxy is the policy);
    ``kappa = 1`` keeps only the arg-max token(s). No gradient flows (pi_old is fixed).
    """
    if not (0.0 <= kappa <= 1.0):
        raise ValueError(f"kappa must be in [0, 1], got {kappa}")
    if temperature <= 0.0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    with torch.no_grad():
        z = logits.to(torch.float64 if logits.dtype == torch.float64 else torch.float32)
        m = z.max(dim=-1, keepdim=True).values  # (..., 1)
        log_kappa = math.log(kappa) if kappa > 0.0 else -math.inf
        keep = z >= m + log_kappa  # (..., V)
        scaled = torch.where(keep, (z - m) / temperature, torch.full_like(z, -math.inf))
        lse = torch.logsumexp(scaled, dim=-1)  # (...,)
        zy = scaled.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1)  # -inf if filtered
        return zy - lse
