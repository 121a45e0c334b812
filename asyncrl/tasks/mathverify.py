"""Math answer verifiers: math-verify equivalence on the last boxed answer, and exact match.

Registered by data_source: exact names (``exact_match``) and substrings that cover the
common benchmark spellings (``aime`` matches AIME2024, math-ai/aime25, ...; ``math``
matches math_dapo, HuggingFaceH4/MATH-500, ...). ``math-verify`` is imported on first
use, so the synthetic task needs no extra packages (install ``asyncrl[math]``).

Policy, fixed here so every call site agrees:
- The answer is the content of the *last* ``\\boxed{...}`` (or ``\\fbox{...}``) in the
  response; earlier boxes are working. Without a box, math-verify's own final-answer
  extraction (``Answer: 7``, ``the answer is 7``, a trailing expression) decides.
- No extractable answer, or a comparison over the time limit, scores 0.
- math-verify times parsing and comparison with ``signal.alarm``, which only works on a
  process's main thread; elsewhere the limit is skipped here, and the bound must come
  from the process around the call (:class:`asyncrl.rewards.RewardPool`).
"""

from __future__ import annotations

import logging
import re
import threading

from asyncrl.tasks.base import register_verifier, register_verifier_pattern

log = logging.getLogger(__name__)

TIMEOUT_S = 5  # math-verify's per-parse and per-comparison limit (whole seconds: signal.alarm)
MATH_SOURCES = ("aime", "amc", "math", "minerva", "olympiad", "dapo", "gsm8k", "hmmt", "deepscaler", "numina")


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` / ``\\fbox{...}`` (braces balanced), or None."""
    found = list(re.finditer(r"\\(?:boxed|fbox)\s*(\{)?", text))
    if not found:
        return None
    last = found[-1]
    if last.group(1) is None:  # "\boxed 5": the next token
        rest = text[last.end():].split()
        return rest[0].rstrip("$.") if rest else None
    depth = 0
    for j in range(last.start(1), len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[last.start(1) + 1 : j]
    return None  # unbalanced: the answer was cut off


def _timeout() -> int | None:
    return TIMEOUT_S if threading.current_thread() is threading.main_thread() else None


def math_score(response: str, ground_truth: str) -> float:
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    limit = _timeout()
    gold_text = ground_truth if "$" in ground_truth or "\\boxed" in ground_truth else f"${ground_truth}$"
    gold = parse(gold_text, extraction_config=[LatexExtractionConfig(), ExprExtractionConfig()],
                 parsing_timeout=limit)
    if not gold:
        log.warning("ground truth %r could not be parsed; every answer scores 0", ground_truth)
        return 0.0
    boxed = last_boxed(response)
    pred_text = f"$\\boxed{{{boxed}}}$" if boxed is not None else response
    pred = parse(pred_text, extraction_config=[LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()],
                 parsing_timeout=limit)
    if not pred:
        return 0.0
    return 1.0 if verify(gold, pred, timeout_seconds=limit) else 0.0


def normalize(text: str) -> str:
    return " ".join(text.strip().strip("$").split()).rstrip(".")


def exact_score(response: str, ground_truth: str) -> float:
    """The last boxed answer (else the whole response), whitespace-normalised, equals the truth."""
    boxed = last_boxed(response)
    return 1.0 if normalize(boxed if boxed is not None else response) == normalize(ground_truth) else 0.0


register_verifier("exact_match", exact_score)
for _sub in MATH_SOURCES:
    register_verifier_pattern(_sub, math_score)
