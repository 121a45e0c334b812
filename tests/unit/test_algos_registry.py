"""Every config type builds its algorithm; the config module stays torch-free."""

from __future__ import annotations

import subprocess
import sys
import typing

import msgspec

from asyncrl.algos import build_algorithm
from asyncrl.algos.config import AlgoConfig
from asyncrl.algos.registry import REGISTRY


def test_every_config_type_is_registered():
    types = set(typing.get_args(AlgoConfig))
    assert types == set(REGISTRY)
    for cls in types:
        algo = build_algorithm(msgspec.convert({"type": cls.__struct_config__.tag}, AlgoConfig))
        for flag in ("needs_entropy", "needs_proxy", "needs_selection"):
            assert isinstance(getattr(algo, flag), bool)


def test_config_import_does_not_load_torch():
    code = "import sys, asyncrl.algos.config; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
