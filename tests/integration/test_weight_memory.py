"""Bucketed weight updates keep an engine's memory flat: with a ~100M-parameter model
(412 MB in float32) and 32 MiB buckets, the engine process's peak resident memory
during an update exceeds its resident memory before it by less than two buckets plus
a small constant, on the zmq transport (buckets pulled from the learner's weight
server) and on disk (buckets read from the safetensors file with plain reads); the
engine then holds exactly the weights sent. The control: the unbucketed zmq update
(the whole model inline in one message, ``transport.bucket_mb=0``) needs about a full
model more, so the measurement can tell the two apart.

The engine process is a subprocess running the ``hf`` engine (in-place ``copy_``) and
the transport's receiver; its peak is the kernel's (VmHWM after resetting it through
/proc/self/clear_refs)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from asyncrl.wire.codec import encode
from asyncrl.wire.weights import DiskWeightSender, ZmqWeightServer, ZmqWeights, weights_digest

from testkit import REPO, subprocess_env

pytestmark = pytest.mark.slow

MB = 1 << 20
BUCKET = 32 * MB
SLACK = 24 * MB  # the small constant: allocator and interpreter noise, zmq buffers, one tensor's bookkeeping


def config():
    from transformers import Qwen3Config

    return Qwen3Config(vocab_size=8192, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                       num_attention_heads=16, num_key_value_heads=8, head_dim=64, max_position_embeddings=256,
                       tie_word_embeddings=True)


ENGINE = textwrap.dedent("""
    import json, sys, torch
    from transformers import Qwen3Config, Qwen3ForCausalLM
    from asyncrl.generator.hf import HFEngine
    from asyncrl.wire.codec import decode_checked
    from asyncrl.wire.transport import generator_limits
    from asyncrl.wire import weights as w

    def status(key):
        return int(next(l for l in open("/proc/self/status") if l.startswith(key)).split()[1]) * 1024

    kind, notice_path, arg = sys.argv[1], sys.argv[2], sys.argv[3]
    torch.set_num_threads(1)
    torch.manual_seed(0)
    engine = HFEngine(Qwen3ForCausalLM(Qwen3Config(**json.loads(arg))), pad_id=0)
    frames = open(notice_path, "rb").read()
    parts = [frames[8:8 + int.from_bytes(frames[:8], "little")]]
    rest = frames[8 + len(parts[0]):]
    while rest:  # length-prefixed frames (the inline control carries the tensors)
        n = int.from_bytes(rest[:8], "little")
        parts.append(rest[8:8 + n])
        rest = rest[8 + n:]
    receiver = {"zmq": lambda: w.ZmqBucketReceiver("127.0.0.1", timeout_s=120),
                "disk": lambda: w.DiskWeightReceiver(sys.argv[4]), "inline": w.ZmqWeights}[kind]()
    open("/proc/self/clear_refs", "w").write("5")  # VmHWM := VmRSS
    before = status("VmRSS")
    msg, fr = decode_checked(parts, generator_limits())
    engine.load_weights(receiver.receive(msg, fr), msg.version)
    del msg, fr, parts, frames, rest
    peak = status("VmHWM")
    sent = {m: t for m, t in engine.model.state_dict().items() if m != "lm_head.weight"}
    print(json.dumps({"extra": peak - before, "digest": w.weights_digest(list(sent.items()))}))
""")


def frames_file(path, msg, frames) -> None:
    with open(path, "wb") as f:
        for part in encode(msg, frames):
            b = memoryview(part).cast("B")
            f.write(len(b).to_bytes(8, "little"))
            f.write(b)


@pytest.fixture(scope="module")
def new_weights():
    from transformers import Qwen3ForCausalLM

    torch.manual_seed(1)
    model = Qwen3ForCausalLM(config())
    named = [(k, v.detach().clone()) for k, v in model.state_dict().items() if k != "lm_head.weight"]
    assert 95e6 < sum(t.numel() for _, t in named) < 110e6  # ~100M parameters
    return named


def engine_extra(kind: str, notice, tmp_path, weights_dir="") -> dict:
    path = tmp_path / f"{kind}.notice"
    frames_file(path, *notice)
    cfg = {k: v for k, v in config().to_dict().items() if k in (
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "head_dim", "max_position_embeddings", "tie_word_embeddings")}
    proc = subprocess.run([sys.executable, "-c", ENGINE, kind, str(path), json.dumps(cfg), str(weights_dir)],
                          cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def largest_bucket(msg) -> int:
    from asyncrl.wire.weights import meta_nbytes

    out, start = 0, 0
    for count in msg.buckets:
        out = max(out, sum(meta_nbytes(m) for m in msg.tensors[start : start + count]))
        start += count
    return out


def test_zmq_update_stays_under_two_buckets(new_weights, tmp_path):
    server = ZmqWeightServer("127.0.0.1", BUCKET, torch.float32)
    try:
        notice = server.notice(new_weights, 1)
        assert len(notice[0].buckets) > 10 and largest_bucket(notice[0]) <= BUCKET
        got = engine_extra("zmq", notice, tmp_path)
    finally:
        server.close()
    print(f"zmq: peak extra {got['extra'] / MB:.1f} MiB (bound {(2 * BUCKET + SLACK) / MB:.0f} MiB)")
    assert got["digest"] == weights_digest(new_weights)
    assert got["extra"] < 2 * BUCKET + SLACK


def test_disk_update_stays_under_two_buckets(new_weights, tmp_path):
    sender = DiskWeightSender(tmp_path / "w", bucket_bytes=BUCKET, dtype=torch.float32)
    notice = sender.notice(new_weights, 1)
    assert len(notice[0].buckets) > 10
    got = engine_extra("disk", notice, tmp_path, tmp_path / "w")
    print(f"disk: peak extra {got['extra'] / MB:.1f} MiB (bound {(2 * BUCKET + SLACK) / MB:.0f} MiB)")
    assert got["digest"] == weights_digest(new_weights)
    assert got["extra"] < 2 * BUCKET + SLACK


def test_unbucketed_control_needs_a_full_model_more(new_weights, tmp_path):
    model_bytes = sum(t.numel() * t.element_size() for _, t in new_weights)
    got = engine_extra("inline", ZmqWeights().notice(new_weights, 1), tmp_path)
    print(f"inline: peak extra {got['extra'] / MB:.1f} MiB (model {model_bytes / MB:.0f} MiB)")
    assert got["digest"] == weights_digest(new_weights)
    assert got["extra"] > 0.9 * model_bytes
