"""Write a built-in task as a dataset file in veRL's layout.

    python -m asyncrl.data.export_synthetic --out data/arith.parquet --n 1024 [--split test]
    python -m asyncrl.data.export_synthetic --out data/countdown.parquet --n 1024 --config countdown [a.b=c ...]

Without ``--config``: the arith task (``--terms``, ``--digits``, ``--seed``). With it: the
config's task, e.g. reasoning-gym's countdown; ``--split train`` is the training stream
of ``run.seed`` (``--seed`` overrides it), ``--split test`` the held-out split (its first
``--n`` problems). A reasoning-gym row's ``reward_model.ground_truth`` is the JSON its
verifier reads (dataset, config, entry, partial reward), so the file scores exactly as
the task does; ``extra_info`` names the dataset for readers of the file.

The file trains exactly like the built-in task (``data.train_files=[data/arith.parquet]``):
the char tokenizer's chat template renders a user message to its bare content, so the
prompt token ids are unchanged. ``.jsonl`` output needs no pyarrow.
"""

from __future__ import annotations

import argparse
import logging
import json
from pathlib import Path

from asyncrl.tasks import build_task


def synthetic_rows(n: int, seed: int, terms: int = 3, digits: int = 3, split: str = "train") -> list[dict]:
    task = build_task("arith", terms=terms, digits=digits)
    rows = []
    for i in range(n):
        p = task.sample(seed, i)
        rows.append({"data_source": p.data_source, "prompt": [{"role": "user", "content": p.prompt}],
                     "ability": "arith", "reward_model": {"style": "rule", "ground_truth": p.ground_truth},
                     "extra_info": {"split": split, "index": i}})
    return rows


def task_rows(cfg, n: int, split: str = "train") -> list[dict]:
    """``n`` problems of the config's task (arith or reasoning_gym) as veRL rows."""
    import msgspec

    from asyncrl.data import build_eval_problems, build_train_source

    if split == "test":
        cfg = msgspec.structs.replace(cfg, task=msgspec.structs.replace(cfg.task, eval_size=n))
        problems = build_eval_problems(cfg)
    else:
        source = build_train_source(cfg)
        problems = [source.problem(i) for i in range(n)]
    system = cfg.task.name == "reasoning_gym" and cfg.task.prompt == "question" and cfg.task.system_prompt
    rows = []
    for i, p in enumerate(problems):
        messages = [{"role": "user", "content": p.prompt}]
        if system:
            from reasoning_gym.utils import SYSTEM_PROMPTS

            messages.insert(0, {"role": "system", "content": SYSTEM_PROMPTS[cfg.task.system_prompt]})
        rows.append({"data_source": p.data_source, "prompt": messages, "ability": p.data_source.split("/")[0],
                     "reward_model": {"style": "rule", "ground_truth": p.ground_truth},
                     "extra_info": {"split": split, "index": i, "dataset": p.data_source.split("/")[-1]}})
    return rows


def write_rows(rows: list[dict], out: str | Path) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), out)
    elif out.suffix == ".jsonl":
        out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        raise SystemExit(f"--out {out}: use a .parquet or .jsonl file name")
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="FILE.parquet or FILE.jsonl")
    ap.add_argument("--n", type=int, default=1024, help="rows")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--terms", type=int, default=3)
    ap.add_argument("--digits", type=int, default=3)
    ap.add_argument("--split", default="train", help="train, or test (with --config: the held-out split)")
    ap.add_argument("--config", help="a config (shipped name or YAML) whose task to export, e.g. countdown")
    ap.add_argument("overrides", nargs="*", help="with --config: dotted overrides, e.g. task.dataset=puzzle24")
    args = ap.parse_intermixed_args(argv)
    if args.config:
        from asyncrl.config import ConfigError, load_config

        try:
            cfg = load_config(args.config, [*args.overrides, *([f"run.seed={args.seed}"] if args.seed else [])])
            rows = task_rows(cfg, args.n, args.split)
        except ConfigError as e:
            raise SystemExit(f"error: {e}") from None
    else:
        rows = synthetic_rows(args.n, args.seed, args.terms, args.digits, args.split)
    out = write_rows(rows, args.out)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("asyncrl.data").info("wrote %d rows to %s", args.n, out)


if __name__ == "__main__":
    main()
