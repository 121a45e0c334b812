"""reasoning-gym's procedural datasets as asyncrl tasks (``task.name: reasoning_gym``).

    task: {name: reasoning_gym, dataset: countdown, config: {min_numbers: 3, max_numbers: 4}}
    task: {name: reasoning_gym, dataset: {countdown: 2, chain_sum: 1}, config: {chain_sum: {min_terms: 2}}}

``task.dataset`` names one dataset or weights a mix (reasoning-gym's own
``CompositeDataset`` draws from it); ``task.config`` is passed to the generator (for a
mix, one mapping per dataset). The package is the optional extra ``asyncrl[tasks]``.

Splits. reasoning-gym seeds item ``idx`` of a dataset with seed ``s`` from ``s + idx``
(``Random(s + idx)``, some ``np.random.seed``, which needs < 2**32), and some datasets
only index below their ``size``. So the seed space [0, 2**32) is cut into regions of
``REGION`` seeds: the held-out split is region 0 (the same problems whatever
``run.seed``, so runs compare on one set), the training stream of ``run.seed`` r is
region 1 + r % 62, the warm-start's is region 63. A region is read in chunks of
``CHUNK`` items, each chunk one dataset instance seeded at its first seed, which is the
same as one endless dataset for the ``seed + idx`` generators. Distinct seeds can
still draw the same problem (small problem spaces), so the training and warm-start
streams skip any problem whose prompt is in the held-out split and take one from a
spare position instead: the splits are disjoint by construction, not by chance.

Scoring. The ground truth is JSON carrying everything the dataset's ``score_answer``
needs: the dataset name and config, the entry (question, answer, metadata; tuples and
sets tagged so they come back as they were) and ``task.partial_reward``. The answer is
the last ``<answer>...</answer>`` (reasoning-gym's ``extract_answer``); a score of 1.0
is correct (reward 1), a partial score s < 1 earns ``partial_reward * s``. Rows
exported in veRL's layout (``python -m asyncrl.data.export_synthetic``) carry the same
JSON, so they score identically when trained from files.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from asyncrl.config import ConfigError, TaskConfig
from asyncrl.tasks.base import Problem, register_verifier_prefix

log = logging.getLogger(__name__)

PREFIX = "reasoning_gym/"  # data_source = PREFIX + dataset name
INSTALL = "pip install 'asyncrl[tasks]' (the reasoning-gym package)"
REGION = 1 << 26  # seeds per split region; 64 regions fill [0, 2**32)
CHUNK = 1 << 13  # items per dataset instance within a region
PRIMARY = 1 << 23  # stream positions below this are primary; spares sit above (8 tries each)
EVAL_REGION, WARMSTART_REGION = 0, 63
COMPACT = ("countdown", "puzzle24")  # datasets with a compact rendering (asyncrl.tasks.compact)


def require():
    try:
        import reasoning_gym
    except ImportError:
        raise ConfigError(f"task.name=reasoning_gym needs reasoning-gym, which is not installed: {INSTALL}") from None
    return reasoning_gym


@dataclass(frozen=True)
class Spec:
    name: str
    weight: float
    config: dict


def specs(tc: TaskConfig) -> list[Spec]:
    """task.dataset / task.config as one (name, weight, generator config) per dataset."""
    if isinstance(tc.dataset, str):
        return [Spec(tc.dataset, 1.0, dict(tc.config))]
    extra = sorted(set(tc.config) - set(tc.dataset))
    if extra:
        raise ConfigError(f"task.config.{extra[0]}: not a dataset of the mix task.dataset={dict(tc.dataset)}; for a "
                          "mix, task.config maps each dataset name to its generator settings")
    for name, c in tc.config.items():
        if not isinstance(c, dict):
            raise ConfigError(f"task.config.{name} must be a mapping of {name}'s generator settings, got {c!r}")
    return [Spec(name, float(w), dict(tc.config.get(name, {}))) for name, w in tc.dataset.items()]


def check_task(tc: TaskConfig) -> None:
    """Start-up check: the package is there, every dataset exists, its config is valid
    (unknown keys and the generator's own checks), the prompt rendering fits. Raises
    ConfigError naming the key."""
    rg = require()
    from reasoning_gym.factory import DATASETS

    for s in specs(tc):
        if s.name not in DATASETS or s.name == "composite":
            import difflib

            near = difflib.get_close_matches(s.name, DATASETS, n=3)
            hint = f"did you mean {', '.join(near)}?" if near else f"known: {', '.join(sorted(DATASETS))}"
            raise ConfigError(f"task.dataset: reasoning-gym has no dataset {s.name!r}; {hint}")
        where = "task.config" + (f".{s.name}" if not isinstance(tc.dataset, str) else "")
        for key in ("seed", "size"):
            if key in s.config:
                raise ConfigError(f"{where}.{key}: asyncrl sets it (the splits are seeded by run.seed); remove it")
        fields = DATASETS[s.name][1].__dataclass_fields__
        for key in s.config:
            if key not in fields:
                raise ConfigError(f"{where}.{key}: {s.name} has no setting {key!r}; its settings: "
                                  + ", ".join(f for f in fields if f not in ("seed", "size")))
        try:
            rg.create_dataset(s.name, **s.config, seed=0, size=1)[0]
        except Exception as e:  # the generator's validate() asserts, or a value it cannot use
            raise ConfigError(f"{where}: {s.name} rejects this config: {type(e).__name__}: {e}") from None
        if tc.prompt == "compact" and s.name not in COMPACT:
            raise ConfigError(f"task.prompt=compact has a rendering for {', '.join(COMPACT)} only, not {s.name}; "
                              "use task.prompt=question (needs a model whose tokenizer reads the full question)")


# ---------------------------------------------------------------- ground truth


def pack(obj: Any) -> Any:
    """JSON-ready, with tuples and sets tagged (some scorers compare tuples, e.g. ARC grids)."""
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj):
            return {k: pack(v) for k, v in obj.items()}
        return {"__items__": [[pack(k), pack(v)] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [pack(x) for x in obj]}
    if isinstance(obj, (set, frozenset)):
        return {"__set__": [pack(x) for x in sorted(obj, key=repr)]}
    if isinstance(obj, list):
        return [pack(x) for x in obj]
    if obj is None or isinstance(obj, (str, bool, int, float)):
        return obj
    if hasattr(obj, "item"):  # numpy scalars
        return obj.item()
    return str(obj)


def unpack(obj: Any) -> Any:
    if isinstance(obj, list):
        return [unpack(x) for x in obj]
    if isinstance(obj, dict):
        if len(obj) == 1:
            (k, v), = obj.items()
            if k == "__tuple__":
                return tuple(unpack(x) for x in v)
            if k == "__set__":
                return {unpack(x) for x in v}
            if k == "__items__":
                return {unpack(a): unpack(b) for a, b in v}
        return {k: unpack(v) for k, v in obj.items()}
    return obj


def ground_truth(name: str, config: dict, entry: dict, partial_reward: float) -> str:
    return json.dumps({"dataset": name, "config": config, "partial_reward": partial_reward, "entry": pack(entry)})


@lru_cache(maxsize=64)
def _scorer(name: str, config_json: str):
    return require().create_dataset(name, **json.loads(config_json)).score_answer


def dataset_score(response: str, ground_truth: str) -> float:
    """The dataset's own score_answer on the response's last <answer> tag."""
    from reasoning_gym.utils import extract_answer

    gt = json.loads(ground_truth)
    score_answer = _scorer(gt["dataset"], json.dumps(gt["config"], sort_keys=True))
    try:
        return float(score_answer(extract_answer(response), unpack(gt["entry"])))
    except Exception as e:  # a scorer that trips over an odd answer: no credit
        log.debug("%s score_answer raised %s on %r", gt["dataset"], e, response[:200])
        return 0.0


def score(response: str, ground_truth: str) -> float:
    """The reward: 1.0 for an exact score of 1.0, else partial_reward times the score."""
    s = dataset_score(response, ground_truth)
    return 1.0 if s >= 1.0 else json.loads(ground_truth)["partial_reward"] * max(s, 0.0)


register_verifier_prefix(PREFIX, score)


# ---------------------------------------------------------------- problems and splits


class ReasoningGymTask:
    """Problems of one dataset or a weighted mix, split into a held-out set and
    disjoint seeded streams (see the module docstring)."""

    def __init__(self, tc: TaskConfig, tok=None) -> None:
        check_task(tc)
        self.tc, self.tok, self.specs = tc, tok, specs(tc)
        self.config_of = {s.name: s.config for s in self.specs}
        self._eval: list[Problem] | None = None

    @lru_cache(maxsize=8)  # noqa: B019 - a few live chunks per task; tasks live for the run
    def _chunk(self, seed: int):
        from reasoning_gym.composite import CompositeConfig, CompositeDataset, DatasetSpec

        rg = require()
        if len(self.specs) == 1:
            s = self.specs[0]
            return rg.create_dataset(s.name, **s.config, seed=seed, size=CHUNK)
        mix = [DatasetSpec(s.name, s.weight, s.config) for s in self.specs]
        return CompositeDataset(CompositeConfig(size=CHUNK, seed=seed, datasets=mix))

    def entry(self, region: int, position: int) -> dict:
        seed = region * REGION + (position // CHUNK) * CHUNK
        return self._chunk(seed)[position % CHUNK]

    def to_problem(self, entry: dict) -> Problem:
        name = entry["metadata"].get("source_dataset", self.specs[0].name)
        return Problem(prompt=self.render(entry), data_source=PREFIX + name,
                       ground_truth=ground_truth(name, self.config_of.get(name, {}), entry, self.tc.partial_reward),
                       prompt_ids=self._chat_ids(entry))

    def render(self, entry: dict) -> str:
        if self.tc.prompt == "compact":
            from asyncrl.tasks.compact import compact_prompt

            m = entry["metadata"]
            return compact_prompt(m["numbers"], m.get("target", 24))
        return entry["question"]

    def _chat_ids(self, entry: dict) -> tuple[int, ...]:
        """Question prompts through the tokenizer's chat template (with reasoning-gym's
        system prompt), as a chat model expects; compact prompts are tokenized as is."""
        if self.tc.prompt == "compact" or self.tok is None or not getattr(self.tok, "chat_template", None):
            return ()
        from asyncrl.data.files import chat_ids

        return tuple(chat_ids(self.tok, self.messages(entry)))

    def messages(self, entry: dict) -> list[dict]:
        out = [{"role": "user", "content": self.render(entry)}]
        if self.tc.prompt == "question" and self.tc.system_prompt:
            from reasoning_gym.utils import SYSTEM_PROMPTS

            out.insert(0, {"role": "system", "content": SYSTEM_PROMPTS[self.tc.system_prompt]})
        return out

    def eval_problems(self) -> list[Problem]:
        if self._eval is None:
            self._eval = [self.to_problem(self.entry(EVAL_REGION, i)) for i in range(self.tc.eval_size)]
        return self._eval

    def stream(self, run_seed: int, warmstart: bool = False) -> TaskStream:
        region = WARMSTART_REGION if warmstart else 1 + run_seed % (WARMSTART_REGION - 1)
        return TaskStream(self, region, frozenset(p.prompt for p in self.eval_problems()))


class TaskStream:
    """An endless stream of one region's problems that never repeats a held-out prompt:
    position i is read at i, else at the spares i + k * PRIMARY (k = 1..7)."""

    def __init__(self, task: ReasoningGymTask, region: int, held_out: frozenset[str]) -> None:
        self.task, self.region, self.held_out = task, region, held_out

    def entry(self, index: int) -> dict:
        if index < 0:
            raise IndexError(f"stream positions start at 0, got {index}")
        base = index % PRIMARY  # past 8M problems the stream starts over
        for k in range(8):
            e = self.task.entry(self.region, base + k * PRIMARY)
            if self.task.render(e) not in self.held_out:
                return e
        raise ConfigError(
            f"task.config draws held-out problems again and again (8 tries at stream position {index}): the dataset "
            f"has too few distinct problems to hold out task.eval_size={self.task.tc.eval_size}; make it harder or "
            "lower task.eval_size")

    def problem(self, index: int) -> Problem:
        return self.task.to_problem(self.entry(index))


def check_run(cfg) -> None:
    """launch's start-up check of a run whose problems come from reasoning-gym."""
    uses_task = not (cfg.data.train_files and cfg.data.eval_files)
    if cfg.task.name == "reasoning_gym" and uses_task:
        check_task(cfg.task)
