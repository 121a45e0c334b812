"""ZeroMQ CURVE keys for a run: who may talk to the learner.

With ``transport.auth: curve`` launch calls :func:`create_keys` before any role starts.
The learner's ROUTER is a CURVE server that accepts only the client public keys in
``<run_dir>/keys/authorized/`` (checked by a ZAP handler, ``ThreadAuthenticator``);
generators load the client keypair and the server's public key, so they also know they
talk to the real learner. Everything on the link is encrypted. A generator on another
machine needs the run directory's ``keys/`` (a shared filesystem or a copy made with
the same 0600 permissions).

Layout::

    keys/server.key  keys/server.key_secret        learner
    keys/client.key  keys/client.key_secret        generators
    keys/authorized/client.key                     public keys the learner accepts
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

log = logging.getLogger(__name__)


def keys_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "keys"


def create_keys(run_dir: str | Path) -> Path:
    """Fresh server and client keypairs in ``<run_dir>/keys``; returns that directory."""
    if not zmq.has("curve"):
        raise RuntimeError("transport.auth=curve needs libzmq built with CURVE (libsodium); reinstall pyzmq")
    keys = keys_dir(run_dir)
    if keys.exists():  # keys of an earlier run in this directory must not stay authorized
        shutil.rmtree(keys)
    # 0700 before any secret is written: nobody else can even list the directory
    (keys / "authorized").mkdir(parents=True, mode=0o700)
    os.chmod(keys, 0o700)
    zmq.auth.create_certificates(keys, "server")
    public, _ = zmq.auth.create_certificates(keys, "client")
    shutil.copyfile(public, keys / "authorized" / "client.key")
    for f in keys.rglob("*"):
        os.chmod(f, 0o700 if f.is_dir() else 0o600)
    return keys


def _load(path: Path) -> tuple[bytes, bytes | None]:
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: transport.auth=curve needs the keys that launch writes "
                                f"to <run.dir>/keys (copy that directory to machines that run generators)")
    return zmq.auth.load_certificate(path)


def start_authenticator(ctx: zmq.Context, keys: Path) -> ThreadAuthenticator:
    """The ZAP handler of ``ctx``: CURVE clients whose public key is in keys/authorized."""
    auth = ThreadAuthenticator(ctx, log=logging.getLogger(f"{__name__}.zap"))
    auth.start()
    auth.configure_curve(domain="*", location=str(keys / "authorized"))
    return auth


def make_server(sock: zmq.Socket, keys: Path) -> None:
    """Make ``sock`` a CURVE server (before it binds)."""
    public, secret = _load(keys / "server.key_secret")
    sock.curve_publickey, sock.curve_secretkey = public, secret
    sock.curve_server = True


def make_client(sock: zmq.Socket, keys: Path) -> None:
    """Make ``sock`` a CURVE client of the run's server (before it connects)."""
    public, secret = _load(keys / "client.key_secret")
    server_public, _ = _load(keys / "server.key")
    sock.curve_publickey, sock.curve_secretkey, sock.curve_serverkey = public, secret, server_public
