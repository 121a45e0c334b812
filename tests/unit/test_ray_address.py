"""A loopback ``cluster.address``: kept as it is where Ray is imported after
``prepare``, refused with the fix where Ray was imported before (it would hang)."""

from __future__ import annotations

import os
import sys

import pytest

from asyncrl.cluster import ray_address


@pytest.mark.parametrize("address, loopback", [
    ("127.0.0.1:6379", True), ("127.0.1.1:6379", True), ("localhost:6379", True), ("[::1]:6379", True),
    ("10.0.0.5:6379", False), ("head.example:6379", False), ("auto", False), ("ray://10.0.0.5:10001", False),
])
def test_is_loopback(address, loopback):
    assert ray_address.is_loopback(address) is loopback


def test_prepare_sets_the_variable_only_before_ray_is_imported(monkeypatch):
    monkeypatch.delenv(ray_address.ENV, raising=False)
    monkeypatch.delitem(sys.modules, "ray", raising=False)
    ray_address.prepare("10.0.0.5:6379")
    assert ray_address.ENV not in os.environ
    ray_address.prepare("127.0.0.1:6379")
    assert os.environ[ray_address.ENV] == "0"
    monkeypatch.delenv(ray_address.ENV)
    monkeypatch.setitem(sys.modules, "ray", object())  # imported already: too late to matter
    ray_address.prepare("127.0.0.1:6379")
    assert ray_address.ENV not in os.environ


def test_a_loopback_address_ray_would_rewrite_is_refused(monkeypatch):
    ray_constants = pytest.importorskip("ray._private.ray_constants")
    monkeypatch.setattr(ray_constants, "ENABLE_RAY_CLUSTER", True)
    with pytest.raises(RuntimeError, match="RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0"):
        ray_address.check_not_rewritten("127.0.0.1:6379")
    ray_address.check_not_rewritten("10.0.0.5:6379")  # another machine's: Ray's to resolve
    monkeypatch.setattr(ray_constants, "ENABLE_RAY_CLUSTER", False)
    ray_address.check_not_rewritten("127.0.0.1:6379")
