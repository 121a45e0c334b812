"""Dataset files in veRL's layout, so existing RLVR data works unchanged.

One row (parquet, or one JSON object per line in ``.jsonl``)::

    {"data_source": "math_dapo",
     "prompt": [{"role": "user", "content": "Solve ... Answer: $Answer"}],
     "reward_model": {"style": "rule", "ground_truth": "34"},
     "extra_info": {...}}                       # optional, carried through untouched

The prompt is rendered with the model tokenizer's chat template
(``add_generation_prompt=True``); prompts over ``data.max_prompt_length`` tokens are an
error, cut from the left, or dropped (``data.truncation``). Training rows are served by
:class:`DatasetSource`: epoch after epoch, each a seeded permutation, so a stream
position alone says which row comes next (exact resume).
"""

from __future__ import annotations

import json
import logging
import random
from functools import lru_cache
from pathlib import Path

from asyncrl.tasks import Problem

log = logging.getLogger(__name__)

LAYOUT = ("veRL layout: prompt=[{role, content}, ...], data_source, reward_model={style, ground_truth}, "
          "extra_info (optional)")


class DatasetError(ValueError):
    """A data file or row that does not follow the veRL layout, or breaks a data.* limit."""


def read_rows(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        raise DatasetError(f"data file {path} does not exist")
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise DatasetError(f"reading {path} needs pyarrow: pip install 'asyncrl[math]'") from None
        return pq.read_table(path).to_pylist()
    if path.suffix in (".jsonl", ".json"):
        rows = []
        for i, line in enumerate(path.read_text().splitlines()):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise DatasetError(f"{path} line {i + 1}: not valid JSON ({e.msg})") from None
        return rows
    raise DatasetError(f"data file {path}: unknown format {path.suffix!r}; use .parquet or .jsonl")


def check_row(row, where: str) -> tuple[list[dict], str, str]:
    """(messages, data_source, ground_truth) of a row, or a DatasetError naming what is missing."""
    def missing(field: str, got: str = "missing") -> DatasetError:
        return DatasetError(f"{where}: field {field!r} is {got} ({LAYOUT})")

    if not isinstance(row, dict):
        raise DatasetError(f"{where}: a row must be a mapping, got {type(row).__name__} ({LAYOUT})")
    messages = row.get("prompt")
    if messages is None:
        raise missing("prompt")
    if not isinstance(messages, list) or not messages:
        raise missing("prompt", f"{type(messages).__name__}, not a non-empty list of chat messages")
    for j, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise missing(f"prompt[{j}]", "not a {role: str, content: str} message")
    data_source = row.get("data_source")
    if not isinstance(data_source, str) or not data_source:
        raise missing("data_source", "missing" if data_source is None else f"{data_source!r}, not a name")
    rm = row.get("reward_model")
    if not isinstance(rm, dict):
        raise missing("reward_model", "missing" if rm is None else f"a {type(rm).__name__}, not a mapping")
    gt = rm.get("ground_truth")
    if isinstance(gt, list) and gt:  # some benchmark exports keep a one-element list
        gt = gt[0]
    if gt is None or isinstance(gt, (dict, list)) or str(gt) == "":
        raise missing("reward_model.ground_truth", "missing" if gt is None else "empty or not a scalar")
    return messages, data_source, str(gt)


def chat_ids(tok, messages: list[dict]) -> list[int]:
    out = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    ids = out["input_ids"] if hasattr(out, "keys") else out  # transformers 5 returns a BatchEncoding
    return list(ids)


def load_problems(paths: list[str], tok, max_prompt_length: int, truncation: str) -> list[Problem]:
    """Every row of ``paths`` (in order) as a Problem with chat-templated ``prompt_ids``."""
    problems, dropped = [], 0
    for path in paths:
        for i, row in enumerate(read_rows(path)):
            where = f"{path} row {i}"
            messages, data_source, gt = check_row(row, where)
            ids = chat_ids(tok, messages)
            if len(ids) > max_prompt_length:
                if truncation == "error":
                    raise DatasetError(
                        f"{where}: prompt is {len(ids)} tokens > data.max_prompt_length={max_prompt_length}; "
                        "raise it, or set data.truncation=left (keep the end) or data.truncation=drop"
                    )
                if truncation == "drop":
                    dropped += 1
                    continue
                ids = ids[-max_prompt_length:]
            text = "\n".join(m["content"] for m in messages if m["role"] == "user")
            problems.append(Problem(prompt=text, ground_truth=gt, data_source=data_source, prompt_ids=tuple(ids)))
    if dropped:
        log.warning("dropped %d prompts longer than data.max_prompt_length=%d", dropped, max_prompt_length)
    if not problems:
        raise DatasetError(f"no usable rows in {paths}")
    return problems


class DatasetSource:
    """A finite list of problems as an endless stream: position ``index`` is row
    ``perm(epoch)[index % n]`` of epoch ``index // n``; ``perm`` is a permutation seeded
    by (seed, epoch), or the identity without shuffling."""

    def __init__(self, problems: list[Problem], seed: int, shuffle: bool = True) -> None:
        self.problems, self.seed, self.shuffle = problems, seed, shuffle

    def position(self, index: int) -> tuple[int, int]:
        """(epoch, row) of stream position ``index``."""
        if index < 0:
            raise IndexError(f"stream positions start at 0, got {index}")
        epoch, k = divmod(index, len(self.problems))
        return epoch, self._perm(epoch)[k] if self.shuffle else k

    @lru_cache(maxsize=2)  # noqa: B019 - the current and the next epoch; sources live for the run
    def _perm(self, epoch: int) -> list[int]:
        order = list(range(len(self.problems)))
        random.Random(f"{self.seed}/epoch{epoch}").shuffle(order)  # str seeds hash deterministically
        return order

    def problem(self, index: int) -> Problem:
        return self.problems[self.position(index)[1]]
