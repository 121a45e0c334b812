"""A Ray cluster on this machine's loopback interface (``cluster.address=127.0.0.1:PORT``).

Ray rewrites a loopback bootstrap address to the machine's external one, so that other
machines could reach it. For a cluster whose nodes listen on 127.0.0.1 only (one
machine, or tests) that address points at nothing, and ``ray.init`` retries forever
with "Failed to connect to GCS". Ray skips the rewrite where
``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, read once when Ray is imported: so
:func:`prepare` must run before anything imports ``ray``, and
:func:`check_not_rewritten` refuses to start (rather than hang) where it ran too late.
"""

from __future__ import annotations

import ipaddress
import os
import sys

ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def is_loopback(address: str) -> bool:
    """Whether a ``host:port`` Ray address names this machine's loopback interface."""
    host = (address.rpartition(":")[0] or address).strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a hostname, "auto", a ray:// client address: left to Ray
        return False


def prepare(address: str) -> None:
    """Before Ray is imported: keep a loopback ``address`` as it is."""
    if address and is_loopback(address) and "ray" not in sys.modules:
        os.environ.setdefault(ENV, "0")


def check_not_rewritten(address: str) -> None:
    """After Ray is imported, before ``ray.init``: raise where Ray would rewrite a loopback
    ``address`` (and so never connect)."""
    if not (address and is_loopback(address)):
        return
    from ray._private import ray_constants  # private: read for loopback addresses only

    if ray_constants.ENABLE_RAY_CLUSTER:
        raise RuntimeError(
            f"cluster.address={address} is on loopback, but Ray was imported without {ENV}=0 and would "
            "connect to this machine's external address instead, retrying forever: set "
            f"{ENV}=0 in the environment, or give the head node's external address")
