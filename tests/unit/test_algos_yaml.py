"""Every shipped algorithm YAML snippet parses into AlgoConfig and covers every type."""

from __future__ import annotations

import pathlib
import typing

import msgspec
import pytest
import yaml

from asyncrl.algos.config import AlgoConfig

ALGO_DIR = pathlib.Path(__file__).resolve().parents[2] / "asyncrl" / "configs" / "algos"
FILES = sorted(ALGO_DIR.glob("*.yaml"))


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.stem)
def test_snippet_parses(path):
    doc = yaml.safe_load(path.read_text())
    assert list(doc) == ["algo"], "a snippet holds just the algo block"
    cfg = msgspec.convert(doc["algo"], AlgoConfig)
    assert cfg.__struct_config__.tag == path.stem  # file name = algo.type


def test_every_algorithm_has_a_snippet():
    tags = {cls.__struct_config__.tag for cls in typing.get_args(AlgoConfig)}
    assert tags == {p.stem for p in FILES}
