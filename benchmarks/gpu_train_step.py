"""A real learner training step on one GPU: the learner's own code (FSDP2 over one
rank, bf16 parameters with float32 reduction, the Triton chunked-logit kernels) on a
randomly initialised Qwen3 with Qwen2.5-0.5B-like dimensions and the 151,936-token
vocabulary. Times GRPO and Lp-Reg steps and reports peak memory; fails if a loss or
gradient norm is not finite.

    python benchmarks/gpu_train_step.py [--json OUT.json]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import torch
import torch.distributed as dist


def make_model_dir(out: str, layers: int) -> str:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from asyncrl.models import save_hf
    from asyncrl.tasks.tokenizer import build_char_tokenizer

    cfg = Qwen3Config(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=layers,
                      num_attention_heads=14, num_key_value_heads=2, head_dim=64, max_position_embeddings=4096,
                      tie_word_embeddings=True)
    torch.manual_seed(0)
    save_hf(Qwen3ForCausalLM(cfg), build_char_tokenizer(), out)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--seqs", type=int, default=32)
    ap.add_argument("--length", type=int, default=2048)
    ap.add_argument("--prompt", type=int, default=256)
    ap.add_argument("--micro", type=int, default=8)
    ap.add_argument("--vary", action="store_true",
                    help="response lengths uniform in [length/10, length] (right-padded), each algorithm with "
                         "learner.packing off and on (issue #15)")
    ap.add_argument("--groups", type=int, default=1,
                    help="samples per prompt: consecutive rows share their first --prompt tokens; with --vary, "
                         "packing also runs with learner.share_prompts off and on")
    ap.add_argument("--json", default="")
    a = ap.parse_args()
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29611", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    cuda = torch.cuda.is_available()  # on CPU this is a smoke test of the script itself
    dist.init_process_group("cpu:gloo,cuda:nccl" if cuda else "gloo")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    from asyncrl.algos import build_algorithm
    from asyncrl.algos.collective import dist_all_gather
    from asyncrl.config import load_config
    from asyncrl.kernels import IGNORE_INDEX
    from asyncrl.learner.batch import Batch
    from asyncrl.learner.main import build_policy
    from asyncrl.learner.train import old_policy_pass, train_on_batch

    model_dir = make_model_dir(tempfile.mkdtemp(), a.layers)
    S, L, P = a.seqs, a.length, a.prompt
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 151936, (S, L), generator=g)
    if S % a.groups:
        raise SystemExit(f"--seqs {S} is not a multiple of --groups {a.groups}")
    ids[:, :P] = ids[torch.arange(S) // a.groups * a.groups, :P]  # a group's rows: one prompt
    tgt = ids.roll(-1, 1).clone()
    tgt[:, : P - 1] = IGNORE_INDEX
    tgt[:, -1] = IGNORE_INDEX
    if a.vary:  # sample i ends at P + its response length; the rest of its row is padding
        ends = P + torch.randint(max((L - P) // 10, 1), L - P, (S,), generator=g)
        tgt[torch.arange(L)[None, :] >= ends[:, None] - 1] = IGNORE_INDEX
        ids[torch.arange(L)[None, :] >= ends[:, None]] = 0
    versions = torch.zeros((S, L), dtype=torch.long)
    batch = Batch(ids, tgt, torch.zeros(S, L), versions, torch.randn(S, generator=g), torch.rand(S, generator=g))
    tokens = int((tgt != IGNORE_INDEX).sum())
    results = []
    layouts = [(False, False)] + ([(True, False)] + [(True, True)] * (a.groups > 1) if a.vary else [])
    for algo, (packing, share) in [(al, lay) for al in ("grpo", "lpreg") for lay in layouts]:
        cfg = load_config("quickstart", [f"model.path={model_dir}", "model.dtype=bfloat16", f"algo.type={algo}",
                                         f"learner.packing={str(packing).lower()}",
                                         f"learner.share_prompts={str(share).lower()}",
                                         f"learner.micro_batch_size={a.micro}", f"generator.max_tokens={L}",
                                         "learner.lr=1e-6", f"generator.samples_per_prompt={a.groups}",
                                         f"learner.prompts_per_step={S // a.groups}"])
        policy, opt = build_policy(cfg)
        all_gather = dist_all_gather()
        # on-policy samples: the behaviour log-probs are the policy's own (zeros would make
        # every importance weight pi_old / pi_behaviour ~ 1/V, and the loss ~ 0)
        old, _, _ = old_policy_pass(policy, batch.to(torch.device("cuda" if cuda else "cpu")), [[slice(0, S)]], cfg, None)
        batch.behaviour_logprobs = old.cpu()
        train_on_batch(policy, opt, build_algorithm(cfg.algo), batch, cfg, all_gather)  # warm-up
        sync()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        times, stats = [], {}
        for _ in range(3):
            t0 = time.perf_counter()
            stats = train_on_batch(policy, opt, build_algorithm(cfg.algo), batch, cfg, all_gather)
            sync()
            times.append(time.perf_counter() - t0)
        finite = all(map(lambda v: v == v and abs(v) != float("inf"), (stats["loss/total"], stats["train/grad_norm"])))
        r = {"algo": algo, "packing": packing, "share_prompts": share,
             "padding_frac": stats.get("perf/padding_frac", float("nan")),
             "shared_frac": stats.get("perf/shared_frac", 0.0),
             "step_s": min(times), "tokens": tokens, "tokens_per_s": tokens / min(times),
             "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan"), "loss": stats["loss/total"],
             "grad_norm": stats["train/grad_norm"], "entropy": stats["train/entropy"], "finite": finite,
             "regularised": stats.get("lpreg/regularised", 0.0)}
        results.append(r)
        print(f"{algo:>6}{' packed' if packing else ''}{' shared' if share else ''}: padding {r['padding_frac']:.1%}  "
              f"shared {r['shared_frac']:.1%}  {r['step_s']:.3f} s/step  {r['tokens_per_s']:.0f} tok/s  peak {r['peak_gib']:.1f} GiB  "
              f"loss {r['loss']:.4f}  grad_norm {r['grad_norm']:.3f}  entropy {r['entropy']:.3f}  "
              f"regularised {r['regularised']:.0f}", flush=True)
        del policy, opt
        if cuda:
            torch.cuda.empty_cache()
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name() if cuda else "cpu", "settings": vars(a), "results": results}, f, indent=1)
    dist.destroy_process_group()
    if not all(r["finite"] for r in results):
        raise SystemExit("non-finite loss or gradient norm")


if __name__ == "__main__":
    main()
