"""Write the benchmark-format samples in this folder: a handful of made-up rows per
benchmark, in the veRL layout those benchmarks are distributed in (jsonl + parquet).

    python tests/data/make_samples.py
"""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).parent
DAPO = ("Solve the following math problem step by step. The last line of your response should be of the form "
        "Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\n{q}\n\n"
        'Remember to put your answer on its own line after "Answer:".')
BOXED = "{q} Let's think step by step and output the final answer within \\boxed{{}}."

# name: (data_source, prompt template, [(question, ground truth)])
SETS = {
    "dapo_math_17k": ("math_dapo", DAPO, [
        ("What is the sum of the first 5 positive odd integers?", "25"),
        ("A square has area 49. What is its perimeter?", "28"),
        ("How many positive divisors does 36 have?", "9"),
        ("Compute 17 * 3 - 8.", "43"),
    ]),
    "aime24": ("aime24", BOXED, [
        ("Find the remainder when 2^10 is divided by 1000.", "24"),
        ("Let n be the least positive integer with 12 divisors. Find n.", "60"),
    ]),
    "aime25": ("aime25", BOXED, [
        ("Find the number of ordered pairs (a, b) of digits with a + b = 9.", "10"),
        ("Find 111 + 222 + 333.", "666"),
    ]),
    "math500": ("HuggingFaceH4/MATH-500", BOXED, [
        ("Simplify 6/8.", "\\frac{3}{4}"),
        ("What is sqrt(12) in simplest radical form?", "2\\sqrt{3}"),
    ]),
    "minerva": ("minerva", BOXED, [
        ("A car travels 100 m in 20 s. What is its speed in m/s?", "5"),
        ("What is 0.25 as a fraction?", "\\frac{1}{4}"),
    ]),
    "olympiadbench": ("olympiadbench", BOXED, [
        ("Solve x^2 = 9 for x > 0.", "3"),
        ("Find the interval where x - 1 >= 0 and x < 2.", "[1,2)"),
    ]),
}


def rows(name: str) -> list[dict]:
    source, template, items = SETS[name]
    return [{"data_source": source, "prompt": [{"role": "user", "content": template.format(q=q)}],
             "ability": "MATH", "reward_model": {"style": "rule", "ground_truth": gt},
             "extra_info": {"index": i, "split": "train" if name == "dapo_math_17k" else "test"}}
            for i, (q, gt) in enumerate(items)]


def main() -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    for name in SETS:
        rs = rows(name)
        (HERE / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rs))
        pq.write_table(pa.Table.from_pylist(rs), HERE / f"{name}.parquet")


if __name__ == "__main__":
    main()
