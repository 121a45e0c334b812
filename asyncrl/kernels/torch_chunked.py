"""Chunked pure-PyTorch twin of the Triton kernels (CPU path and fallback).

Same mathematics as `triton_impl`: the lm_head matmul is done one vocabulary
chunk at a time in float32, an online (max, sum-exp, expected-logit) merge gives
log-sum-exp and entropy, and the backward recomputes each chunk. Peak extra
memory is a few [N, chunk] float32 buffers instead of [N, V].

Notation: z = h @ W^T (raw logits), s = z / T (scaled), p = softmax(s),
lse = logsumexp(s), entropy H = lse - sum_v p_v s_v.
"""

from __future__ import annotations

import math

import torch

IGNORE_INDEX = -100

# Elements of one [N, chunk] float32 buffer; ~16 MiB keeps the CPU matmuls
# efficient while bounding memory (tuned with benchmarks/kernels.py).
_CHUNK_ELEMS = 1 << 22
# Tests set this to force many small (ragged) chunks.
CHUNK_OVERRIDE: int | None = None


def default_chunk(n_rows: int, vocab: int) -> int:
    """Vocabulary columns per chunk for `n_rows` tokens (a multiple of 256)."""
    if CHUNK_OVERRIDE is not None:
        return min(CHUNK_OVERRIDE, vocab)
    chunk = _CHUNK_ELEMS // max(n_rows, 1)
    chunk = max(1024, min(32768, chunk // 256 * 256))
    return min(chunk, vocab)


def _chunk_bounds(vocab: int, chunk: int):
    for v0 in range(0, vocab, chunk):
        yield v0, min(vocab, v0 + chunk)


def _gather_in_chunk(z: torch.Tensor, tgt: torch.Tensor, v0: int, v1: int):
    """z[n, tgt[n] - v0] where tgt[n] lies in [v0, v1), else 0; and that mask."""
    inside = (tgt >= v0) & (tgt < v1)  # (N,)
    cols = (tgt - v0).clamp_(0, v1 - v0 - 1)
    picked = z.gather(1, cols[:, None]).squeeze(1)
    return torch.where(inside, picked, 0.0), inside


def forward(hidden, weight, targets, temperature: float, with_entropy: bool,
            chunk: int | None = None):
    """Returns (logprobs [N], lse [N], entropy [N] or None), all float32.

    Ignored rows (targets == -100) get logprob 0 and entropy 0; lse is still
    the real value (the backward zeroes their gradient instead).
    """
    n, _ = hidden.shape
    vocab = weight.shape[0]
    chunk = chunk or default_chunk(n, vocab)
    inv_t = 1.0 / temperature
    h = hidden.float()  # (N, D)
    valid = targets != IGNORE_INDEX
    tgt = torch.where(valid, targets, 0)

    m = l = b = None  # running max of s, sum exp(s - m), sum exp(s - m) (s - m)
    s_y = torch.zeros(n, dtype=torch.float32, device=h.device)
    for v0, v1 in _chunk_bounds(vocab, chunk):
        s = h @ weight[v0:v1].float().T  # (N, C)
        if temperature != 1.0:
            s.mul_(inv_t)
        picked, _ = _gather_in_chunk(s, tgt, v0, v1)
        s_y += picked
        m_c = s.amax(1)
        m_new = m_c if m is None else torch.maximum(m, m_c)
        s.sub_(m_new[:, None])  # s - m_new, in place
        e = torch.exp(s)
        l_c = e.sum(1)
        b_c = (e.mul_(s)).sum(1) if with_entropy else None
        if m is None:
            l, b = l_c, b_c
        else:
            # Rescale the old partial sums to the new max: exp(s - m') =
            # exp(s - m) * alpha, and (s - m') = (s - m) + (m - m').
            shift = m - m_new  # <= 0
            alpha = torch.exp(shift)
            if with_entropy:
                b = alpha * (b + l * shift) + b_c
            l = alpha * l + l_c
        m = m_new

    lse = m + torch.log(l)
    logprobs = torch.where(valid, s_y - lse, 0.0)
    entropy = None
    if with_entropy:
        entropy = torch.where(valid, torch.log(l) - b / l, 0.0)
    return logprobs, lse, entropy


def backward(hidden, weight, targets, lse, entropy, grad_lp, grad_ent,
             temperature: float, chunk: int | None = None):
    """Gradients (dX in hidden.dtype, dW in weight.dtype), float32 accumulation.

    grad_lp / grad_ent are [N] float32 (grad_ent may be None) and already zero
    on ignored rows. Per chunk: g_s = grad_lp (onehot - p) - grad_ent p (s - E[s]),
    g_z = g_s / T, dX += g_z @ W_c, dW_c = g_z^T @ h.
    """
    n, d = hidden.shape
    vocab = weight.shape[0]
    chunk = chunk or default_chunk(n, vocab)
    inv_t = 1.0 / temperature
    h = hidden.float()
    tgt = torch.where(targets != IGNORE_INDEX, targets, 0)
    rows = torch.arange(n, device=h.device)
    dx = torch.zeros(n, d, dtype=torch.float32, device=h.device)
    dw = torch.empty_like(weight)
    neg_gl = (-grad_lp)[:, None]
    e_s = None if grad_ent is None else (lse - entropy)[:, None]  # E[s]
    for v0, v1 in _chunk_bounds(vocab, chunk):
        w_c = weight[v0:v1].float()  # (C, D)
        s = h @ w_c.T  # (N, C)
        if temperature != 1.0:
            s.mul_(inv_t)
        if grad_ent is None:
            g = s.sub_(lse[:, None]).exp_().mul_(neg_gl)  # -gl p
        else:
            t = (s - e_s).mul_(-grad_ent[:, None]).add_(neg_gl)  # -ge (s - Es) - gl
            g = s.sub_(lse[:, None]).exp_().mul_(t)
            del t
        inside = (tgt >= v0) & (tgt < v1)
        g.index_put_((rows[inside], tgt[inside] - v0), grad_lp[inside], accumulate=True)
        if temperature != 1.0:
            g.mul_(inv_t)
        dx.addmm_(g, w_c)
        if dw.dtype == torch.float32:
            torch.mm(g.T, h, out=dw[v0:v1])
        else:
            dw[v0:v1] = g.T @ h
        del g, s
    return dx.to(hidden.dtype), dw


def proxy_logprobs(hidden, weight, targets, kappa: float, temperature: float,
                   chunk: int | None = None):
    """Lp-Reg min-p proxy log-prob of each target (forward only), float32 [N].

    Pass 1: exact raw row max m. Pass 2: sum exp((z - m)/T) over z >= m + ln kappa.
    Returns -inf where the target is filtered out, 0 on ignored rows.
    """
    n, _ = hidden.shape
    vocab = weight.shape[0]
    chunk = chunk or default_chunk(n, vocab)
    inv_t = 1.0 / temperature
    ln_kappa = math.log(kappa) if kappa > 0 else -math.inf
    h = hidden.float()
    valid = targets != IGNORE_INDEX
    tgt = torch.where(valid, targets, 0)

    # Both passes compute z with identical chunk shapes, so z is bitwise equal.
    m = torch.full((n,), -math.inf, dtype=torch.float32, device=h.device)
    for v0, v1 in _chunk_bounds(vocab, chunk):
        m = torch.maximum(m, (h @ weight[v0:v1].float().T).amax(1))
    thr = (m + ln_kappa)[:, None]
    total = torch.zeros(n, dtype=torch.float32, device=h.device)
    z_y = torch.zeros(n, dtype=torch.float32, device=h.device)
    for v0, v1 in _chunk_bounds(vocab, chunk):
        z = h @ weight[v0:v1].float().T  # (N, C)
        picked, _ = _gather_in_chunk(z, tgt, v0, v1)
        z_y += picked
        keep = z >= thr
        e = z.sub_(m[:, None]).mul_(inv_t).exp_()
        total += torch.where(keep, e, 0.0).sum(1)
    out = (z_y - m) * inv_t - torch.log(total)
    out = torch.where(z_y >= thr[:, 0], out, -math.inf)
    return torch.where(valid, out, 0.0)
