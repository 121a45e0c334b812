"""GPU benchmark of asyncrl.kernels.token_logprobs (Triton) vs dense PyTorch and cuBLAS.

For each hidden size: forward+backward time and peak extra memory of the fused
kernels and of dense PyTorch (logits materialised; OOM is caught and reported),
beside a cuBLAS GEMM of the same shape (N x D @ D x V). The fused path does
8*N*V*D flops (forward, recompute, dX, dW), reported as TFLOP/s and as a
fraction of the GEMM rate (target >= 0.6). Run by benchmarks/gpu_check.sh.
"""

import argparse
import json
import sys

import torch

from asyncrl.kernels import token_logprobs, triton_impl


def cuda_time(fn, iters: int) -> float:
    """Median seconds per call of fn (after one warm-up call)."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return sorted(times)[len(times) // 2]


def peak_extra(fn) -> float:
    """Peak GiB allocated by fn beyond what was allocated before it."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**30


def dense_fwd_bwd(h, w, t, with_entropy):
    logits = (h @ w.T).float()  # (N, V)
    logp = torch.log_softmax(logits, -1)
    loss = logp.gather(1, t[:, None]).sum()
    if with_entropy:
        loss = loss + (logp.exp() * logp).sum()
    loss.backward()


def fused_fwd_bwd(h, w, t, with_entropy):
    lp, ent = token_logprobs(h, w, t, with_entropy=with_entropy)
    (lp.sum() + (ent.sum() if with_entropy else 0.0)).backward()


def run_case(n, d, v, dtype, iters, with_entropy):
    flops = 8 * n * v * d
    h = torch.randn(n, d, device="cuda", dtype=dtype).requires_grad_()
    w = (torch.randn(v, d, device="cuda", dtype=dtype) * d**-0.5).requires_grad_()
    t = torch.randint(0, v, (n,), device="cuda")

    def clear():
        h.grad = w.grad = None

    row = {"N": n, "D": d, "V": v, "dtype": str(dtype).split(".")[-1], "entropy": with_entropy}
    gemm_s = cuda_time(lambda: torch.mm(h.detach(), w.detach().T), iters)
    row["gemm_tflops"] = 2 * n * v * d / gemm_s / 1e12
    clear()
    row["fused_fwd_ms"] = 1e3 * cuda_time(lambda: token_logprobs(h.detach(), w.detach(), t), iters)
    row["fused_ms"] = 1e3 * cuda_time(lambda: (clear(), fused_fwd_bwd(h, w, t, with_entropy)), iters)
    clear()
    row["fused_peak_gib"] = peak_extra(lambda: fused_fwd_bwd(h, w, t, with_entropy))
    row["fused_tflops"] = flops / (row["fused_ms"] / 1e3) / 1e12
    row["fused_vs_gemm"] = row["fused_tflops"] / row["gemm_tflops"]
    row["fwd_vs_gemm"] = (2 * n * v * d / (row["fused_fwd_ms"] / 1e3) / 1e12) / row["gemm_tflops"]
    clear()
    try:
        row["dense_ms"] = 1e3 * cuda_time(lambda: (clear(), dense_fwd_bwd(h, w, t, with_entropy)), max(2, iters // 2))
        clear()
        row["dense_peak_gib"] = peak_extra(lambda: dense_fwd_bwd(h, w, t, with_entropy))
    except torch.OutOfMemoryError:
        row["dense_ms"], row["dense_peak_gib"] = None, "OOM"
    clear()
    del h, w
    torch.cuda.empty_cache()
    return row


def sweep_forward(n, d, v, dtype, configs, iters=5):
    """Forward-kernel time for a few tile configs (tuning data for the next run)."""
    h = torch.randn(n, d, device="cuda", dtype=dtype)
    w = torch.randn(v, d, device="cuda", dtype=dtype) * d**-0.5
    t = torch.randint(0, v, (n,), device="cuda")
    out = []
    for cfg in configs:
        triton_impl.BLOCKS_OVERRIDE = cfg
        try:
            ms = 1e3 * cuda_time(lambda: token_logprobs(h, w, t), iters)
            out.append({**cfg, "fwd_ms": ms, "fwd_tflops": 2 * n * v * d / (ms / 1e3) / 1e12})
        except Exception as exc:  # a config that does not fit is data too
            out.append({**cfg, "error": f"{type(exc).__name__}: {str(exc)[:200]}"})
        finally:
            triton_impl.BLOCKS_OVERRIDE = None
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--json", default=None, help="write results here")
    p.add_argument("--n", type=int, default=16384)
    p.add_argument("--dims", type=int, nargs="+", default=[1536, 3584])
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--no-sweep", action="store_true")
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("gpu_kernels.py: no CUDA device")
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}", flush=True)

    rows = []
    for d in args.dims:
        for ent in (False, True):
            rows.append(run_case(args.n, d, args.vocab, torch.bfloat16, args.iters, ent))
            r = rows[-1]
            dense = "OOM" if r["dense_ms"] is None else f"{r['dense_ms']:.1f} ms"
            print(f"N={r['N']} D={r['D']} V={r['V']} bf16 entropy={ent}: GEMM {r['gemm_tflops']:.0f} TFLOP/s | "
                  f"fused fwd {r['fused_fwd_ms']:.1f} ms ({r['fwd_vs_gemm']:.0%} of GEMM) | fused fwd+bwd "
                  f"{r['fused_ms']:.1f} ms = {r['fused_tflops']:.0f} TFLOP/s = {r['fused_vs_gemm']:.0%} of GEMM, "
                  f"peak {r['fused_peak_gib']:.2f} GiB | dense "
                  f"{dense}, peak {r['dense_peak_gib']} GiB",
                  flush=True)
    rows.append(run_case(4096, 1536, args.vocab, torch.float32, 2, False))
    r = rows[-1]
    print(f"fp32 (ieee dots) N=4096 D=1536: fused {r['fused_ms']:.1f} ms, {r['fused_vs_gemm']:.0%} of fp32 GEMM", flush=True)

    sweep = []
    if not args.no_sweep:
        cfgs = [dict(BLOCK_N=bn, BLOCK_V=bv, BLOCK_D=bd, num_warps=nw, num_stages=ns)
                for bn, bv, bd, nw, ns in [(128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (64, 256, 64, 4, 4),
                                           (128, 128, 128, 8, 2), (256, 128, 64, 8, 3)]]
        sweep = sweep_forward(args.n, args.dims[0], args.vocab, torch.bfloat16, cfgs)
        for s in sweep:
            print("fwd sweep:", s, flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "rows": rows, "fwd_sweep": sweep}, f, indent=1)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
