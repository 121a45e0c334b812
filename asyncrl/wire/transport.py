"""ZeroMQ endpoints: the learner's ROUTER and each generator's DEALER.

One bidirectional link per generator: prompts and weights go down, trajectories and
hellos come up. Invalid frames are counted, logged and dropped; the endpoint keeps
serving.
"""

from __future__ import annotations

import logging

import zmq

from asyncrl.wire.codec import WireError, decode, encode
from asyncrl.wire.schema import Message

log = logging.getLogger(__name__)


class _Endpoint:
    def __init__(self, sock: zmq.Socket) -> None:
        self.sock = sock
        self.rejected = 0
        self.poller = zmq.Poller()
        self.poller.register(sock, zmq.POLLIN)

    def _poll(self, timeout_s: float | None) -> bool:
        ms = None if timeout_s is None else int(timeout_s * 1000)
        return bool(self.poller.poll(ms))

    def _decode(self, frames: list) -> tuple[Message, list] | None:
        try:
            return decode(frames)
        except WireError as e:
            self.rejected += 1
            log.warning("rejected message (%d so far): %s", self.rejected, e)
            return None

    def close(self) -> None:
        self.sock.close(linger=0)


class LearnerEndpoint(_Endpoint):
    """Binds; ``recv`` returns (peer identity, message, raw frames)."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, ctx: zmq.Context | None = None) -> None:
        sock = (ctx or zmq.Context.instance()).socket(zmq.ROUTER)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # an unknown peer is an error, not a silent drop
        if port:
            sock.bind(f"tcp://{host}:{port}")
        else:
            port = sock.bind_to_random_port(f"tcp://{host}")
        self.address = f"tcp://{host}:{port}"
        super().__init__(sock)

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
    def __init__(self, address: str, worker_id: int, ctx: zmq.Context | None = None) -> None:
        sock = (ctx or zmq.Context.instance()).socket(zmq.DEALER)
        sock.setsockopt(zmq.IDENTITY, f"gen-{worker_id}".encode())
        sock.connect(address)
        super().__init__(sock)

    def send(self, msg: Message, frames=()) -> None:
        self.sock.send_multipart(encode(msg, frames), copy=False)

    def recv(self, timeout_s: float | None = None) -> tuple[Message, list] | None:
        while self._poll(timeout_s):
            frames = self.sock.recv_multipart(copy=False)
            got = self._decode([f.buffer for f in frames])
            if got is not None:
                return got
        return None
