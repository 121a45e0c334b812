"""ZeroMQ endpoints: the learner's ROUTER and each generator's DEALER.

One bidirectional link per generator: prompts and weights go down, trajectories and
hellos come up. Every received message goes through ``decode_checked`` (sizes, schema,
protocol version, kinds this side takes, array frames); a rejected one is counted per
reason, logged (rate-limited: a flood of garbage cannot fill the disk) and dropped,
and the endpoint keeps serving. libzmq itself drops any frame over the size limit
(ZMQ_MAXMSGSIZE) before allocating it, and closes that connection. With CURVE
(``asyncrl.wire.auth``) a peer without the run's client key cannot connect at all.
"""

from __future__ import annotations

import ipaddress
import logging
import time
from collections import Counter
from pathlib import Path

import zmq

from asyncrl.wire import auth
from asyncrl.wire.codec import Limits, WireError, decode_checked, encode
from asyncrl.wire.schema import DOWNSTREAM, UPSTREAM, Message

log = logging.getLogger(__name__)

MB = 1 << 20


class RateLimitedLog:
    """Per reason: the first ``burst`` lines, then at most one per ``interval_s`` that
    says how many were suppressed in between."""

    def __init__(self, burst: int = 5, interval_s: float = 10.0) -> None:
        self.burst, self.interval_s = burst, interval_s
        self.state: dict[str, list] = {}  # reason -> [lines logged, last line time, suppressed since]

    def warning(self, reason: str, text: str) -> bool:
        now = time.monotonic()
        st = self.state.setdefault(reason, [0, -float("inf"), 0])
        if st[0] >= self.burst and now - st[1] < self.interval_s:
            st[2] += 1
            return False
        more = f" (+{st[2]} more {reason} rejections not logged)" if st[2] else ""
        # %.300r: the detail may echo a peer's bytes; bounded and escaped, no forged log lines
        log.warning("rejected message [%s]: %.300r%s", reason, text, more)
        st[0], st[1], st[2] = st[0] + 1, now, 0
        return True


class _Endpoint:
    def __init__(self, sock: zmq.Socket, limits: Limits, authenticator=None) -> None:
        self.sock, self.limits, self.authenticator = sock, limits, authenticator
        self.rejected = 0
        self.rejected_by: Counter[str] = Counter()  # reason -> count
        self.reject_log = RateLimitedLog()
        self.poller = zmq.Poller()
        self.poller.register(sock, zmq.POLLIN)

    def _poll(self, timeout_s: float | None) -> bool:
        ms = None if timeout_s is None else int(timeout_s * 1000)
        return bool(self.poller.poll(ms))

    def _decode(self, frames: list) -> tuple[Message, list] | None:
        try:
            return decode_checked(frames, self.limits)
        except WireError as e:
            reason, text = e.reason, str(e)
        except Exception as e:  # noqa: BLE001 - a checker bug must not take the receiver down
            reason, text = "internal", f"{type(e).__name__}: {e}"
        self.rejected += 1
        self.rejected_by[reason] += 1
        self.reject_log.warning(reason, text)
        return None

    def close(self) -> None:
        self.sock.close(linger=0)
        if self.authenticator is not None:
            self.authenticator.stop()
            self.authenticator = None


def learner_limits(max_message_mb: float = 64.0) -> Limits:
    return Limits(max_message_bytes=int(max_message_mb * MB), kinds=UPSTREAM)


def generator_limits(max_weights_mb: float = 65536.0) -> Limits:
    # Prompts headers grow with the batch (every prompt's token ids); they come from the
    # (authenticated) learner, so the header may be as large as the message.
    size = int(max_weights_mb * MB)
    return Limits(max_message_bytes=size, max_header_bytes=min(size, 256 * MB), kinds=DOWNSTREAM)


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


class LearnerEndpoint(_Endpoint):
    """Binds; ``recv`` returns (peer identity, message, raw frames)."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, ctx: zmq.Context | None = None, *,
                 limits: Limits = Limits(), keys: Path | None = None) -> None:
        ctx = ctx or zmq.Context.instance()
        sock = ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # an unknown peer is an error, not a silent drop
        # a restarted generator reconnects under its old identity: let it take the route over
        sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
        sock.setsockopt(zmq.MAXMSGSIZE, limits.max_message_bytes)  # per frame, enforced before allocation
        authenticator = None
        if keys is not None:
            authenticator = auth.start_authenticator(ctx, keys)
            auth.make_server(sock, keys)
        try:
            if port:
                sock.bind(f"tcp://{host}:{port}")
            else:
                port = sock.bind_to_random_port(f"tcp://{host}")
        except zmq.ZMQError:
            sock.close(linger=0)
            if authenticator is not None:
                authenticator.stop()
            raise
        self.address = f"tcp://{host}:{port}"
        super().__init__(sock, limits, authenticator)

    @classmethod
    def from_config(cls, tc, run_dir: str | Path) -> LearnerEndpoint:
        """The learner's endpoint as ``transport`` (a TransportConfig) says."""
        if tc.auth == "none" and not _is_loopback(tc.host):
            log.warning("learner binds %s without authentication: anyone who reaches this port can send "
                        "trajectories; set transport.auth=curve", tc.host)
        keys = auth.keys_dir(run_dir) if tc.auth == "curve" else None
        return cls(tc.host, tc.port, limits=learner_limits(tc.max_message_mb), keys=keys)

    def send(self, peer: bytes, msg: Message, frames=()) -> None:
        self.sock.send_multipart([peer, *encode(msg, frames)], copy=False)

    def recv(self, timeout_s: float | None = None) -> tuple[bytes, Message, list] | None:
        """Next valid message, or None if none arrived within timeout_s."""
        while self._poll(timeout_s):
            peer, *frames = self.sock.recv_multipart(copy=False)
            got = self._decode([f.buffer for f in frames])
            if got is not None:
                return peer.bytes, got[0], got[1]
        return None


class GeneratorEndpoint(_Endpoint):
    def __init__(self, address: str, worker_id: int, ctx: zmq.Context | None = None, *,
                 limits: Limits = Limits(), keys: Path | None = None) -> None:
        sock = (ctx or zmq.Context.instance()).socket(zmq.DEALER)
        sock.setsockopt(zmq.IDENTITY, f"gen-{worker_id}".encode())
        sock.setsockopt(zmq.MAXMSGSIZE, limits.max_message_bytes)
        if keys is not None:
            auth.make_client(sock, keys)
        sock.connect(address)
        super().__init__(sock, limits)

    @classmethod
    def from_config(cls, tc, address: str, worker_id: int, run_dir: str | Path) -> GeneratorEndpoint:
        keys = auth.keys_dir(run_dir) if tc.auth == "curve" else None
        return cls(address, worker_id, limits=generator_limits(tc.max_weights_mb), keys=keys)

    def send(self, msg: Message, frames=()) -> None:
        self.sock.send_multipart(encode(msg, frames), copy=False)

    def recv(self, timeout_s: float | None = None) -> tuple[Message, list] | None:
        while self._poll(timeout_s):
            frames = self.sock.recv_multipart(copy=False)
            got = self._decode([f.buffer for f in frames])
            if got is not None:
                return got
        return None
