"""Triton kernels for token_logprobs / token_proxy_logprobs (CUDA path).

Same mathematics as `torch_chunked` (see there for notation). Layout of the work:

- forward (`_fwd_kernel`): grid (row blocks, vocab splits). Each program
  computes [BLOCK_N, BLOCK_V] logit tiles with `tl.dot` (float32 accumulate)
  over D and keeps an online (max, sum-exp, sum-exp * (s - max), target logit)
  state; the few vocab splits are merged in PyTorch (O(N * splits)). Row blocks
  vary fastest, so programs running together stream the same W tiles (L2 reuse).
- backward: per vocabulary chunk, `_dlogits_kernel` recomputes the logits and
  writes the logit gradient g [N, chunk] (input dtype); then dX (float32
  accumulator, cuBLAS with float32 output) += g @ W_c and dW_c = g^T @ h
  (cuBLAS, one GEMM over all N, so complete per chunk). cuBLAS GEMMs run at
  full tensor-core rate and are deterministic; no atomics anywhere.
- proxy (`_proxy_kernel`, forward only): PASS 1 gives the exact raw row max,
  PASS 2 the kept sum and the raw target logit, with the same tiles (so the
  target logit compared against the threshold is bitwise the one summed).

Under TRITON_INTERPRET=1 (CPU CI) operands are cast to float32 before `tl.dot`
(the interpreter's bf16 dot is wrong) and small blocks are used.
"""

from __future__ import annotations

import logging
import math

import torch
import triton
import triton.language as tl

from asyncrl.kernels.torch_chunked import IGNORE_INDEX

log = logging.getLogger(__name__)

INTERPRET = bool(triton.knobs.runtime.interpret)

# Tests set these to force small tiles / many vocab chunks under the interpreter.
BLOCKS_OVERRIDE: dict | None = None
CHUNK_OVERRIDE: int | None = None
SPLITS_OVERRIDE: int | None = None

_GRAD_CHUNK_BYTES = 1 << 28  # the [N, chunk] gradient buffer of the backward


# ----------------------------------------------------------------------------- kernels
@triton.jit
def _logits_tile(h_ptr, w_ptr, rows, cols, N, V, D, stride_h, stride_w,
                 BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
                 EVEN_D: tl.constexpr, CAST_F32: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """z[BLOCK_N, BLOCK_V] = h[rows] @ w[cols]^T in float32 (out-of-range rows/cols -> 0)."""
    offs_d = tl.arange(0, BLOCK_D)
    h_base = h_ptr + rows.to(tl.int64)[:, None] * stride_h
    w_base = w_ptr + cols.to(tl.int64)[:, None] * stride_w
    row_ok = rows[:, None] < N
    col_ok = cols[:, None] < V
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + offs_d
        if EVEN_D:
            h = tl.load(h_base + dd[None, :], mask=row_ok, other=0.0)
            w = tl.load(w_base + dd[None, :], mask=col_ok, other=0.0)
        else:
            h = tl.load(h_base + dd[None, :], mask=row_ok & (dd[None, :] < D), other=0.0)
            w = tl.load(w_base + dd[None, :], mask=col_ok & (dd[None, :] < D), other=0.0)
        if CAST_F32:
            h = h.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(h, tl.trans(w), acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def _fwd_kernel(h_ptr, w_ptr, tgt_ptr, m_ptr, l_ptr, b_ptr, sy_ptr,
                N, V, D, stride_h, stride_w, inv_t, tiles_per_split,
                WITH_ENTROPY: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
                BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, CAST_F32: tl.constexpr,
                DOT_PRECISION: tl.constexpr):
    """Per (row block, vocab split): running max m of s = z/T, l = sum exp(s - m),
    b = sum exp(s - m) (s - m), and the target's s (0 if not in this split)."""
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    tgt = tl.load(tgt_ptr + rows, mask=rows < N, other=-1)
    m = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    l = tl.zeros((BLOCK_N,), tl.float32)
    b = tl.zeros((BLOCK_N,), tl.float32)
    s_y = tl.zeros((BLOCK_N,), tl.float32)
    t0 = split * tiles_per_split
    t1 = tl.minimum(t0 + tiles_per_split, tl.cdiv(V, BLOCK_V))
    for t in range(t0, t1):
        cols = t * BLOCK_V + tl.arange(0, BLOCK_V)
        z = _logits_tile(h_ptr, w_ptr, rows, cols, N, V, D, stride_h, stride_w,
                         BLOCK_N, BLOCK_V, BLOCK_D, EVEN_D, CAST_F32, DOT_PRECISION)
        col_ok = cols[None, :] < V
        s = tl.where(col_ok, z * inv_t, float("-inf"))  # padded columns -> -inf, never 0
        s_y += tl.sum(tl.where(cols[None, :] == tgt[:, None], s, 0.0), axis=1)
        m_new = tl.maximum(m, tl.max(s, axis=1))  # finite: every tile has a real column
        alpha = tl.exp(m - m_new)
        diff = s - m_new[:, None]
        e = tl.exp(diff)
        if WITH_ENTROPY:
            corr = l * tl.where(l > 0, m - m_new, 0.0)  # avoid 0 * -inf on the first tile
            b = alpha * (b + corr) + tl.sum(e * tl.where(col_ok, diff, 0.0), axis=1)
        l = alpha * l + tl.sum(e, axis=1)
        m = m_new
    out = split * N + rows
    ok = rows < N
    tl.store(m_ptr + out, m, mask=ok)
    tl.store(l_ptr + out, l, mask=ok)
    tl.store(sy_ptr + out, s_y, mask=ok)
    if WITH_ENTROPY:
        tl.store(b_ptr + out, b, mask=ok)


@triton.jit
def _dlogits_kernel(h_ptr, w_ptr, tgt_ptr, lse_ptr, es_ptr, gl_ptr, ge_ptr, g_ptr,
                    N, V, D, v0, ncols, stride_h, stride_w, stride_g, inv_t,
                    WITH_ENTROPY: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
                    BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, CAST_F32: tl.constexpr,
                    DOT_PRECISION: tl.constexpr):
    """g[:, v0:v0+ncols] = dL/dz: recompute s = z/T, p = exp(s - lse), then
    (gl (onehot - p) - ge p (s - E[s])) / T, stored in g's dtype."""
    pid_n = tl.program_id(0)
    pid_v = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    lcols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    cols = v0 + lcols
    row_ok = rows < N
    z = _logits_tile(h_ptr, w_ptr, rows, cols, N, V, D, stride_h, stride_w,
                     BLOCK_N, BLOCK_V, BLOCK_D, EVEN_D, CAST_F32, DOT_PRECISION)
    s = z * inv_t
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    gl = tl.load(gl_ptr + rows, mask=row_ok, other=0.0)
    tgt = tl.load(tgt_ptr + rows, mask=row_ok, other=-1)
    p = tl.exp(s - lse[:, None])
    if WITH_ENTROPY:
        es = tl.load(es_ptr + rows, mask=row_ok, other=0.0)
        ge = tl.load(ge_ptr + rows, mask=row_ok, other=0.0)
        g = -p * (gl[:, None] + ge[:, None] * (s - es[:, None]))
    else:
        g = -p * gl[:, None]
    g += tl.where(cols[None, :] == tgt[:, None], gl[:, None], 0.0)
    g = g * inv_t
    ptrs = g_ptr + rows.to(tl.int64)[:, None] * stride_g + lcols[None, :]
    tl.store(ptrs, g.to(g_ptr.dtype.element_ty), mask=row_ok[:, None] & (lcols[None, :] < ncols))


@triton.jit
def _proxy_kernel(h_ptr, w_ptr, tgt_ptr, m_ptr, thr_ptr, out_a_ptr, out_b_ptr,
                  N, V, D, stride_h, stride_w, inv_t, tiles_per_split,
                  PASS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
                  BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, CAST_F32: tl.constexpr,
                  DOT_PRECISION: tl.constexpr):
    """PASS 1: out_a = raw row max of z over this split.
    PASS 2: out_a = sum exp((z - m)/T) over z >= thr, out_b = raw target logit (0 if elsewhere)."""
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    if PASS == 1:
        acc = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    else:
        acc = tl.zeros((BLOCK_N,), tl.float32)
        z_y = tl.zeros((BLOCK_N,), tl.float32)
        m = tl.load(m_ptr + rows, mask=row_ok, other=0.0)
        thr = tl.load(thr_ptr + rows, mask=row_ok, other=0.0)
        tgt = tl.load(tgt_ptr + rows, mask=row_ok, other=-1)
    t0 = split * tiles_per_split
    t1 = tl.minimum(t0 + tiles_per_split, tl.cdiv(V, BLOCK_V))
    for t in range(t0, t1):
        cols = t * BLOCK_V + tl.arange(0, BLOCK_V)
        z = _logits_tile(h_ptr, w_ptr, rows, cols, N, V, D, stride_h, stride_w,
                         BLOCK_N, BLOCK_V, BLOCK_D, EVEN_D, CAST_F32, DOT_PRECISION)
        col_ok = cols[None, :] < V
        if PASS == 1:
            acc = tl.maximum(acc, tl.max(tl.where(col_ok, z, float("-inf")), axis=1))
        else:
            keep = col_ok & (z >= thr[:, None])
            e = tl.exp((z - m[:, None]) * inv_t)
            acc += tl.sum(tl.where(keep, e, 0.0), axis=1)
            z_y += tl.sum(tl.where(cols[None, :] == tgt[:, None], z, 0.0), axis=1)
    out = split * N + rows
    tl.store(out_a_ptr + out, acc, mask=row_ok)
    if PASS == 2:
        tl.store(out_b_ptr + out, z_y, mask=row_ok)


# ----------------------------------------------------------------------------- launch configs
def _config(dtype: torch.dtype, kind: str) -> dict:
    """Tile sizes and launch options for `kind` in {"fwd", "bwd", "proxy"}."""
    if BLOCKS_OVERRIDE is not None:
        return dict(BLOCKS_OVERRIDE)
    if INTERPRET:
        return dict(BLOCK_N=16, BLOCK_V=64, BLOCK_D=16, num_warps=4, num_stages=1)
    if dtype == torch.float32:  # ieee fp32 dot: smaller K tile keeps shared memory in budget
        return dict(BLOCK_N=128, BLOCK_V=128, BLOCK_D=32, num_warps=8, num_stages=3)
    # H100 sweep (benchmarks/gpu_kernels.py, N=16384 D=1536): 128x256x64 forward 16.5 ms
    # vs 26.6 ms for 128x128x64, 19.0 ms for 256x128x64, 22.6 ms for 64x256x64 (4 warps).
    return dict(BLOCK_N=128, BLOCK_V=256, BLOCK_D=64, num_warps=8, num_stages=3)


def _dot_args(dtype: torch.dtype, d: int, cfg: dict) -> dict:
    return dict(
        EVEN_D=d % cfg["BLOCK_D"] == 0,
        CAST_F32=INTERPRET,
        # float32 inputs get exact fp32 dots (not TF32) so results match the twin.
        DOT_PRECISION="ieee" if dtype == torch.float32 else "tf32",
    )


def _launch_kw(cfg: dict) -> dict:
    return {k: cfg[k] for k in ("BLOCK_N", "BLOCK_V", "BLOCK_D", "num_warps", "num_stages")}


def _splits(n: int, v: int, cfg: dict, device: torch.device) -> tuple[int, int]:
    """(tiles_per_split, n_splits) so the grid has a few programs per SM, no empty split."""
    n_tiles = triton.cdiv(v, cfg["BLOCK_V"])
    if SPLITS_OVERRIDE is not None:
        want = SPLITS_OVERRIDE
    else:
        sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 2
        want = max(1, triton.cdiv(2 * sms, triton.cdiv(n, cfg["BLOCK_N"])))
    per = triton.cdiv(n_tiles, min(want, n_tiles))
    return per, triton.cdiv(n_tiles, per)


def _prepare(hidden: torch.Tensor, weight: torch.Tensor):
    if hidden.dtype != weight.dtype:
        dtype = torch.promote_types(hidden.dtype, weight.dtype)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
    return hidden.contiguous(), weight.contiguous()


# ----------------------------------------------------------------------------- entry points
def forward(hidden, weight, targets, temperature: float, with_entropy: bool):
    """Returns (logprobs [N], lse [N], entropy [N] or None), all float32."""
    h, w = _prepare(hidden, weight)
    n, d = h.shape
    v = w.shape[0]
    cfg = _config(h.dtype, "fwd")
    per, n_splits = _splits(n, v, cfg, h.device)
    tgt = targets.contiguous()
    m, l, b, s_y = (torch.empty(n_splits, n, dtype=torch.float32, device=h.device) for _ in range(4))
    grid = (triton.cdiv(n, cfg["BLOCK_N"]), n_splits)
    _fwd_kernel[grid](h, w, tgt, m, l, b, s_y, n, v, d, h.stride(0), w.stride(0), 1.0 / temperature, per,
                      WITH_ENTROPY=with_entropy, **_dot_args(h.dtype, d, cfg), **_launch_kw(cfg))
    # Merge the vocab splits (every split is non-empty, so l > 0 everywhere).
    m_all = m.amax(0)
    alpha = torch.exp(m - m_all)
    l_all = (alpha * l).sum(0)
    lse = m_all + torch.log(l_all)
    valid = targets != IGNORE_INDEX
    logprobs = torch.where(valid, s_y.sum(0) - lse, 0.0)
    entropy = None
    if with_entropy:
        b_all = (alpha * (b + l * (m - m_all))).sum(0)
        entropy = torch.where(valid, torch.log(l_all) - b_all / l_all, 0.0)
    return logprobs, lse, entropy


def _accumulate_f32(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc (float32) += a @ b, with float32 output even for bf16/fp16 operands."""
    if a.dtype == torch.float32:
        acc.addmm_(a, b)
        return
    try:
        acc.add_(torch.mm(a, b, out_dtype=torch.float32))
    except (RuntimeError, TypeError, NotImplementedError):  # no mm.dtype on this build/device
        log.warning("torch.mm(out_dtype=float32) unavailable; dX chunks are rounded to %s", a.dtype)
        acc.add_(torch.mm(a, b).float())


def _grad_chunk(n: int, v: int, elem_bytes: int, block_v: int) -> int:
    if CHUNK_OVERRIDE is not None:
        return min(CHUNK_OVERRIDE, v)
    chunk = _GRAD_CHUNK_BYTES // (max(n, 1) * elem_bytes)
    chunk = max(1024, min(32768, chunk // block_v * block_v))
    return min(chunk, v)


def backward(hidden, weight, targets, lse, entropy, grad_lp, grad_ent, temperature: float):
    """(dX in hidden.dtype, dW in weight.dtype); see the module docstring for the schedule."""
    h, w = _prepare(hidden, weight)
    n, d = h.shape
    v = w.shape[0]
    cfg = _config(h.dtype, "bwd")
    chunk = _grad_chunk(n, v, h.element_size(), cfg["BLOCK_V"])
    g_buf = torch.empty(n, chunk, dtype=h.dtype, device=h.device)  # (N, C)
    dx = torch.zeros(n, d, dtype=torch.float32, device=h.device)
    dw = torch.empty_like(w)
    with_entropy = grad_ent is not None
    e_s = (lse - entropy) if with_entropy else lse  # E[s]; unused without entropy
    grad_ent = grad_ent if with_entropy else grad_lp
    tgt = targets.contiguous()
    for v0 in range(0, v, chunk):
        nc = min(chunk, v - v0)
        grid = (triton.cdiv(n, cfg["BLOCK_N"]), triton.cdiv(nc, cfg["BLOCK_V"]))
        _dlogits_kernel[grid](h, w, tgt, lse, e_s, grad_lp, grad_ent, g_buf, n, v, d, v0, nc,
                              h.stride(0), w.stride(0), g_buf.stride(0), 1.0 / temperature,
                              WITH_ENTROPY=with_entropy, **_dot_args(h.dtype, d, cfg), **_launch_kw(cfg))
        g = g_buf[:, :nc]
        _accumulate_f32(dx, g, w[v0:v0 + nc])
        torch.mm(g.T, h, out=dw[v0:v0 + nc])
    return dx.to(hidden.dtype), dw.to(weight.dtype)


def proxy_logprobs(hidden, weight, targets, kappa: float, temperature: float):
    """Lp-Reg min-p proxy log-prob, float32 [N] (see torch_chunked.proxy_logprobs)."""
    h, w = _prepare(hidden, weight)
    n, d = h.shape
    v = w.shape[0]
    cfg = _config(h.dtype, "proxy")
    per, n_splits = _splits(n, v, cfg, h.device)
    tgt = targets.contiguous()
    grid = (triton.cdiv(n, cfg["BLOCK_N"]), n_splits)
    common = dict(**_dot_args(h.dtype, d, cfg), **_launch_kw(cfg))
    part_max = torch.empty(n_splits, n, dtype=torch.float32, device=h.device)
    _proxy_kernel[grid](h, w, tgt, part_max, part_max, part_max, part_max, n, v, d,
                        h.stride(0), w.stride(0), 1.0 / temperature, per, PASS=1, **common)
    m = part_max.amax(0)
    thr = m + (math.log(kappa) if kappa > 0 else -math.inf)  # same tensor used in-kernel and below
    total = torch.empty_like(part_max)
    z_y = torch.empty_like(part_max)
    _proxy_kernel[grid](h, w, tgt, m, thr, total, z_y, n, v, d,
                        h.stride(0), w.stride(0), 1.0 / temperature, per, PASS=2, **common)
    z_y = z_y.sum(0)  # exactly one split holds the target
    out = (z_y - m) * (1.0 / temperature) - torch.log(total.sum(0))
    out = torch.where(z_y >= thr, out, -math.inf)
    return torch.where(targets != IGNORE_INDEX, out, 0.0)


# ----------------------------------------------------------------------------- AOT compile specs
def compile_specs(dtype: str = "bf16"):
    """(kernel, signature, constexprs, options) for every kernel as launched on an H100.

    Used by the CPU CI check that compiles each kernel for sm_90 without a GPU.
    """
    tdtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    specs = []
    for kernel, kind, ptrs, extra_ints, extra_f, flags in (
        (_fwd_kernel, "fwd", ["h", "w", "*i64", "*fp32", "*fp32", "*fp32", "*fp32"],
         ["N", "V", "D", "stride_h", "stride_w"], ["inv_t"], {"WITH_ENTROPY": True}),
        (_dlogits_kernel, "bwd", ["h", "w", "*i64", "*fp32", "*fp32", "*fp32", "*fp32", "h"],
         ["N", "V", "D", "v0", "ncols", "stride_h", "stride_w", "stride_g"], ["inv_t"], {"WITH_ENTROPY": True}),
        (_proxy_kernel, "proxy", ["h", "w", "*i64", "*fp32", "*fp32", "*fp32", "*fp32"],
         ["N", "V", "D", "stride_h", "stride_w"], ["inv_t"], {"PASS": 2}),
    ):
        cfg = _config(tdtype, kind)
        names = kernel.arg_names
        sig, pos = {}, 0
        for p in ptrs:
            sig[names[pos]] = f"*{dtype}" if p in ("h", "w") else p
            pos += 1
        for name in names[pos:]:
            if name in extra_ints or name == "tiles_per_split":
                sig[name] = "i32"
            elif name in extra_f:
                sig[name] = "fp32"
            else:
                sig[name] = "constexpr"
        constexprs = dict(flags, BLOCK_N=cfg["BLOCK_N"], BLOCK_V=cfg["BLOCK_V"], BLOCK_D=cfg["BLOCK_D"],
                          EVEN_D=True, CAST_F32=False,
                          DOT_PRECISION="ieee" if tdtype == torch.float32 else "tf32")
        options = {"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]}
        specs.append((kernel, sig, constexprs, options))
    return specs
