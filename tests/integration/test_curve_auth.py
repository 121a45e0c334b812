"""CURVE on the learner link: keys from the run directory, a generator with the run's
client key gets through, a peer without it (plain, or with a key of its own) delivers
nothing. 127.0.0.1 only; every wait is bounded."""

from __future__ import annotations

import stat

import pytest
import zmq
import zmq.auth

from asyncrl.config import Config, TransportConfig
from asyncrl.wire.auth import create_keys
from asyncrl.wire.codec import encode
from asyncrl.wire.schema import Hello, Shutdown
from asyncrl.wire.transport import GeneratorEndpoint, LearnerEndpoint

TIMEOUT_S = 10.0
DENIED_WAIT_S = 1.5  # a refused peer's message would have arrived well within this


@pytest.fixture
def curve(tmp_path):
    create_keys(tmp_path)
    ctx = zmq.Context()
    tc = TransportConfig(auth="curve")
    learner = LearnerEndpoint(tc.host, 0, ctx=ctx, keys=tmp_path / "keys")
    yield tmp_path, ctx, learner
    learner.close()
    ctx.term()


def test_keys_are_private_files_in_the_run_dir(tmp_path):
    keys = create_keys(tmp_path)
    assert keys == tmp_path / "keys"
    assert stat.S_IMODE(keys.stat().st_mode) == 0o700
    names = {p.relative_to(keys).as_posix() for p in keys.rglob("*") if p.is_file()}
    assert names == {"server.key", "server.key_secret", "client.key", "client.key_secret", "authorized/client.key"}
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in keys.rglob("*") if p.is_file())
    old = (keys / "client.key").read_bytes()
    create_keys(tmp_path)  # a new run in the same directory: the old client key is no longer authorized
    assert (keys / "client.key").read_bytes() != old


def test_generator_with_the_run_key_gets_through_both_ways(curve):
    run_dir, ctx, learner = curve
    gen = GeneratorEndpoint.from_config(TransportConfig(auth="curve"), learner.address, 3, run_dir)
    try:
        gen.send(Hello(worker_id=3, version=0))
        got = learner.recv(timeout_s=TIMEOUT_S)
        assert got is not None and got[0] == b"gen-3" and got[1] == Hello(worker_id=3, version=0)
        learner.send(got[0], Shutdown(reason="bye"))
        down = gen.recv(timeout_s=TIMEOUT_S)
        assert down is not None and down[0] == Shutdown(reason="bye")
    finally:
        gen.close()


def test_peer_without_the_key_delivers_nothing(curve):
    run_dir, ctx, learner = curve
    plain = ctx.socket(zmq.DEALER)  # no CURVE at all
    plain.connect(learner.address)
    stranger = ctx.socket(zmq.DEALER)  # CURVE with the right server key but its own, unauthorized keypair
    public, secret = zmq.curve_keypair()
    stranger.curve_publickey, stranger.curve_secretkey = public, secret
    stranger.curve_serverkey, _ = zmq.auth.load_certificate(run_dir / "keys" / "server.key")
    stranger.connect(learner.address)
    try:
        plain.send_multipart(encode(Hello(worker_id=66, version=0)))
        stranger.send_multipart(encode(Hello(worker_id=67, version=0)))
        assert learner.recv(timeout_s=DENIED_WAIT_S) is None
        assert learner.rejected == 0  # nothing even reached the decoder
        # the authorized generator still gets through on the same endpoint
        gen = GeneratorEndpoint.from_config(TransportConfig(auth="curve"), learner.address, 1, run_dir)
        try:
            gen.send(Hello(worker_id=1, version=0))
            got = learner.recv(timeout_s=TIMEOUT_S)
            assert got is not None and got[1] == Hello(worker_id=1, version=0)
            assert learner.recv(timeout_s=0.3) is None  # and the strangers' messages never arrive
        finally:
            gen.close()
    finally:
        plain.close(linger=0)
        stranger.close(linger=0)


def test_config_switches_the_learner_to_curve(tmp_path):
    create_keys(tmp_path)
    cfg = Config(transport=TransportConfig(auth="curve", max_message_mb=1.0))
    learner = LearnerEndpoint.from_config(cfg.transport, tmp_path)
    try:
        assert learner.sock.curve_server and learner.authenticator is not None
        assert learner.sock.getsockopt(zmq.MAXMSGSIZE) == 1 << 20
    finally:
        learner.close()
