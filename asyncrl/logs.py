"""Logging for every role: to stderr (launch shows it) and to <run_dir>/logs/<role>.log."""

from __future__ import annotations

import logging
import sys
from pathlib import Path


def setup_logging(run_dir: str | Path, role: str, level: str = "INFO") -> None:
    logs = Path(run_dir) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    fmt = logging.Formatter(f"%(asctime)s {role} %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
    root = logging.getLogger()
    root.handlers.clear()
    for h in (logging.StreamHandler(sys.stderr), logging.FileHandler(logs / f"{role}.log")):
        h.setFormatter(fmt)
        root.addHandler(h)
    root.setLevel(level)
    # transformers and torch are chatty at INFO
    for noisy in ("transformers", "torch", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
