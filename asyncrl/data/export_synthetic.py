"""Write the synthetic arith task as a dataset file in veRL's layout.

    python -m asyncrl.data.export_synthetic --out data/arith.parquet --n 1024 [--split test]

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
    ap.add_argument("--split", default="train")
    args = ap.parse_args(argv)
    out = write_rows(synthetic_rows(args.n, args.seed, args.terms, args.digits, args.split), args.out)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("asyncrl.data").info("wrote %d rows to %s", args.n, out)


if __name__ == "__main__":
    main()
