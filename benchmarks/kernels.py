"""CPU benchmark: dense PyTorch vs the chunked twin (asyncrl.kernels, impl="torch").

For N in {1024, 4096} x D=896 x V=151936 (Qwen2.5-0.5B lm_head), float32,
forward+backward of sum(logprobs): wall time and peak extra memory. Each case
runs in a fresh subprocess (glibc told to return big buffers to the OS), whose
peak RSS (VmHWM) is reset after the inputs are built and a tiny warm-up ran;
"extra" = peak RSS - RSS before the step - bytes of the gradients (dX, dW),
which every implementation must produce. Prints a table, writes JSON.

    python benchmarks/kernels.py [out.json] [--ns 1024 4096] [--threads 2]
"""

import argparse
import json
import os
import pathlib
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
TARGET_MEM, TARGET_TIME = 1 / 8, 1.4  # chunked vs dense, at N=1024


def _status_kib(field: str) -> int:
    for line in pathlib.Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def run_case(impl: str, n: int, d: int, v: int, threads: int) -> dict:
    """Runs inside the per-case subprocess."""
    import torch

    from asyncrl.kernels import token_logprobs

    torch.set_num_threads(threads)
    torch.manual_seed(0)

    def step(h, w, t):
        if impl == "dense":
            logp = torch.log_softmax(h @ w.T, dim=-1)  # (N, V) materialised
            loss = logp.gather(1, t[:, None]).sum()
        else:
            loss = token_logprobs(h, w, t, impl="torch")[0].sum()
        loss.backward()

    # Warm up the code path (libraries, thread pools) on a tiny problem.
    hs, ws = torch.randn(8, d, requires_grad=True), torch.randn(1000, d, requires_grad=True)
    step(hs, ws, torch.randint(0, 1000, (8,)))
    del hs, ws

    h = torch.randn(n, d, requires_grad=True)
    w = (torch.randn(v, d) * d**-0.5).requires_grad_()
    t = torch.randint(0, v, (n,))
    pathlib.Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    base = _status_kib("VmRSS")
    start = time.perf_counter()
    step(h, w, t)
    seconds = time.perf_counter() - start
    peak = _status_kib("VmHWM")
    grad_bytes = (h.numel() + w.numel()) * 4
    return {"impl": impl, "N": n, "D": d, "V": v, "threads": threads, "seconds": seconds,
            "peak_rss_delta_mib": (peak - base) / 1024,
            "peak_extra_mib": (peak - base) / 1024 - grad_bytes / 2**20}


def spawn(impl: str, n: int, d: int, v: int, threads: int) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", OMP_NUM_THREADS=str(threads))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    out = subprocess.run([sys.executable, __file__, "--case", impl, str(n), str(d), str(v), str(threads)],
                         env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        sys.exit(f"case {impl} N={n} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", nargs="?", default=str(ROOT / "benchmarks/results/kernels.json"))
    p.add_argument("--ns", type=int, nargs="+", default=[1024, 4096])
    p.add_argument("--d", type=int, default=896)
    p.add_argument("--v", type=int, default=151936)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--case", nargs=5, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.case:
        impl, n, d, v, threads = args.case
        print(json.dumps(run_case(impl, int(n), int(d), int(v), int(threads))))
        return

    rows = []
    print(f"{'N':>6} {'impl':>8} {'time s':>8} {'peak extra MiB':>15} {'RSS delta MiB':>14}")
    for n in args.ns:
        pair = {}
        for impl in ("dense", "chunked"):
            r = spawn(impl, n, args.d, args.v, args.threads)
            pair[impl] = r
            rows.append(r)
            print(f"{n:>6} {impl:>8} {r['seconds']:>8.2f} {r['peak_extra_mib']:>15.0f} {r['peak_rss_delta_mib']:>14.0f}",
                  flush=True)
        mem = pair["chunked"]["peak_extra_mib"] / pair["dense"]["peak_extra_mib"]
        tim = pair["chunked"]["seconds"] / pair["dense"]["seconds"]
        ok = "" if n != 1024 else f"  (targets: <= {TARGET_MEM:.3f}, <= {TARGET_TIME})"
        print(f"{n:>6} chunked/dense: memory {mem:.3f}, time {tim:.2f}{ok}", flush=True)
        rows.append({"N": n, "memory_ratio": mem, "time_ratio": tim})
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"D": args.d, "V": args.v, "dtype": "float32", "rows": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
