"""Metrics sinks: metrics.jsonl (always), a live console line, TensorBoard and W&B (optional)."""

from __future__ import annotations

import json
import os
import logging
import sys
import time
from pathlib import Path

log = logging.getLogger("asyncrl")

_CONSOLE_KEYS = (
    ("train/reward_mean", "reward", "{:.3f}"),
    ("train/entropy", "entropy", "{:.3f}"),
    ("train/response_length", "len", "{:.1f}"),
    ("eval/accuracy", "eval_acc", "{:.3f}"),
    ("perf/gen_tokens_per_s", "gen tok/s", "{:.0f}"),
    ("perf/train_tokens_per_s", "train tok/s", "{:.0f}"),
)


class MetricsLogger:
    def __init__(self, run_dir: str | Path, *, total_steps: int, console: bool = True, tensorboard: bool = False,
                 wandb: bool = False, config: dict | None = None) -> None:
        self.path = Path(run_dir) / "metrics.jsonl"
        self.file = self.path.open("a")
        self.total, self.console, self.t0 = total_steps, console, time.time()
        # launch pipes our output through to its terminal and tells us if it is one
        self.live = console and (sys.stderr.isatty() or os.environ.get("ASYNCRL_LIVE_CONSOLE") == "1")
        self.tb = self.wb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))
        if wandb:
            import wandb as wandb_mod

            self.wb = wandb_mod.init(mode="offline", dir=str(run_dir), config=config)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        row = {"step": step, "time_s": round(time.time() - self.t0, 3), **metrics}
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in metrics.items():
                self.tb.add_scalar(k, v, step)
        if self.wb is not None:
            self.wb.log(metrics, step=step)
        if self.console:
            parts = [f"step {step}/{self.total}"] + [
                f"{name} {fmt.format(metrics[k])}" for k, name, fmt in _CONSOLE_KEYS if k in metrics
            ]
            line = " | ".join(parts) + f" | {row['time_s']:.0f}s"
            if self.live:  # one line rewritten in place
                sys.stderr.write("\r\033[K" + line)
                sys.stderr.flush()
            elif step % 10 == 0 or "eval/accuracy" in metrics or step == self.total:
                log.info(line)

    def close(self) -> None:
        if self.live:
            sys.stderr.write("\n")
        self.file.close()
        if self.tb is not None:
            self.tb.close()
        if self.wb is not None:
            self.wb.finish()
