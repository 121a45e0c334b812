"""Seeded generator of malformed wire messages (tests/unit/test_wire_fuzz.py and
benchmarks/wire_fuzz.py).

``cases(seed, side)`` yields ``Case``s: valid messages of the kinds that ``side``
("learner" or "generator") receives, interleaved with mutations that are invalid by
construction (random bytes, truncation, wrong version or kind, missing/extra/ill-typed
fields, out-of-range numbers, frames that disagree with the header, oversized and
foreign messages), so a receiver's rejection count can be checked exactly.
``bit_flips`` yields mutations whose validity is unknown (for "never crashes" checks).
"""

from __future__ import annotations

import functools
import math
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import msgspec
import numpy as np

from asyncrl.wire.codec import Limits
from asyncrl.wire.schema import (
    DOWNSTREAM, MAX_DIMS, MAX_SAMPLES, MAX_TOKENS, PROTOCOL_VERSION, UPSTREAM, WEIGHT_DTYPES, Hello, Message,
    PromptGroup, Prompts, SampleMeta, Shutdown, TensorMeta, TrajectoryGroup, WeightUpdate,
)

ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8, "int64": 8, "int32": 4, "int16": 2, "int8": 1,
            "uint8": 1, "bool": 1}
_TAGS = {"hello", "prompts", "trajectories", "weights", "weights_ack", "shutdown"}
_MAP_FIRST_BYTES = set(range(0x80, 0x90)) | {0xDE, 0xDF}  # a header is always a msgpack map


@dataclass
class Case:
    label: str
    frames: list[bytes]
    valid: bool
    msg: Message | None = None  # the message a receiver must return, for valid cases


def fuzz_limits(kinds: tuple[type, ...]) -> Limits:
    """Small limits so that oversize cases stay cheap to send."""
    return Limits(max_message_bytes=256 << 10, max_header_bytes=32 << 10, max_frames=64, kinds=kinds)


# ------------------------------------------------------------------ valid messages


def _ints(r: random.Random, n: int, below: int) -> list[int]:
    """n random ints in [0, below) (below a power of two), faster than n randrange calls."""
    return (np.frombuffer(r.randbytes(4 * n), "<u4") % below).tolist()


def _valid_trajectory(r: random.Random) -> tuple[Message, list[bytes]]:
    lengths = [r.randrange(0, 33) for _ in range(r.randrange(1, 9))]
    if not sum(lengths):
        lengths[0] = 1
    total = sum(lengths)
    msg = TrajectoryGroup(group_id=r.randrange(-1000, 10**6), worker_id=r.randrange(64),
                          data_source=r.choice(["asyncrl/arith", "math", "aime"]),
                          prompt_ids=_ints(r, r.randrange(0, 40), 2**17),
                          samples=[SampleMeta(n, r.uniform(-1, 1), r.choice(["stop", "length"])) for n in lengths],
                          purpose=r.choice(["train", "eval"]), gen_seconds=r.uniform(0, 10))
    mask = _model_mask(r, lengths)
    logprobs = np.frombuffer(r.randbytes(4 * total), "<f4").copy()  # any bit pattern is a legal log-prob
    versions = np.frombuffer(r.randbytes(4 * total), "<i4") & 0x7FFFFFFF  # versions >= 0
    logprobs[mask == 0], versions[mask == 0] = 0.0, -1  # environment tokens: not sampled
    frames = [r.randbytes(4 * total), logprobs.tobytes(), versions.astype("<i4").tobytes(), mask.tobytes()]
    return msg, frames


def _model_mask(r: random.Random, lengths: list[int]) -> np.ndarray:
    """uint8 model mask of samples of ``lengths``: single-turn (all ones) or model turns
    and environment observations alternating, every non-empty sample starting with a
    model turn."""
    out = []
    for n in lengths:
        m = np.ones(n, np.uint8)
        if r.random() < 0.5:
            at, model = 0, True
            while at < n:
                run = r.randrange(1, 9)
                m[at:at + run] = model
                at, model = at + run, not model
        out.append(m)
    return np.concatenate(out)


def _first_tokens(msg: TrajectoryGroup) -> list[int]:
    """Offsets of the non-empty samples' first tokens in the concatenated frames."""
    starts = np.cumsum([0] + [s.num_tokens for s in msg.samples[:-1]])
    return [int(a) for a, s in zip(starts, msg.samples) if s.num_tokens]


def _valid_weights(r: random.Random) -> tuple[Message, list[bytes]]:
    metas, frames = [], []
    for i in range(r.randrange(0, 5)):
        dtype = r.choice(WEIGHT_DTYPES)
        shape = [r.randrange(0, 7) for _ in range(r.randrange(0, 4))]
        metas.append(TensorMeta(f"layers.{i}.w", dtype, shape))
        frames.append(r.randbytes(math.prod(shape) * ITEMSIZE[dtype]))
    return WeightUpdate(version=r.randrange(2**31), tensors=metas), frames


def _valid_prompts(r: random.Random) -> tuple[Message, list[bytes]]:
    groups = [PromptGroup(r.randrange(-100, 10**6), _ints(r, r.randrange(1, 30), 2**15),
                          str(r.randrange(1000)), "asyncrl/arith") for _ in range(r.randrange(0, 5))]
    return Prompts(groups=groups, min_version=r.randrange(100), n=r.randrange(1, 17), temperature=r.uniform(0, 2),
                   top_p=r.uniform(0.01, 1.0), max_tokens=r.randrange(1, 4096),
                   purpose=r.choice(["train", "eval"])), []


def valid_message(r: random.Random, kinds: tuple[type, ...]) -> tuple[Message, list[bytes]]:
    kind = r.choice(kinds)
    if kind is Hello:
        return Hello(worker_id=r.randrange(1000), version=r.randrange(2**31)), []
    if kind is TrajectoryGroup:
        return _valid_trajectory(r)
    if kind is WeightUpdate:
        return _valid_weights(r)
    if kind is Prompts:
        return _valid_prompts(r)
    return Shutdown(reason=r.choice(["", "done", "learner finished"])), []


# ------------------------------------------------------------------ invalid by construction


def _enc(obj) -> bytes:
    return msgspec.msgpack.encode(obj)


def _leaves(obj, out: list, top: bool = True) -> list:
    """(container, key) of every value inside a decoded header, nested ones included."""
    items = obj.items() if isinstance(obj, dict) else enumerate(obj)
    for k, v in items:
        out.append((obj, k))
        if isinstance(v, (dict, list)):
            _leaves(v, out, False)
    return out


def _wrong_value(v):
    """A value msgspec must refuse where ``v`` stands (no int for a float, no str for a list...)."""
    if isinstance(v, bool):
        return "true"
    if isinstance(v, int):
        return random.choice(["7", [1], None, 1.5, True, {"a": 1}])
    if isinstance(v, float):
        return random.choice(["0.5", [0.5], None, True, {"a": 1}])
    if isinstance(v, str):
        return random.choice([1, [v], None, b"bytes", 2.5, {"a": 1}])
    if isinstance(v, list):
        return random.choice([1, "x", None, {"a": 1}, 2.5])
    return random.choice([1, "x", None, [1]])  # a nested struct


@functools.cache
def _required(tp: type) -> tuple[str, ...]:
    return tuple(f.encode_name for f in msgspec.structs.fields(tp) if f.required)


def _struct_dicts(d: dict) -> list[tuple[dict, type]]:
    """Every struct (as a dict) inside header ``d``, with its type."""
    top = {"hello": Hello, "prompts": Prompts, "trajectories": TrajectoryGroup, "weights": WeightUpdate,
           "shutdown": Shutdown}[d["kind"]]
    out = [(d, top)]
    for key, tp in (("groups", PromptGroup), ("samples", SampleMeta), ("tensors", TensorMeta)):
        out += [(x, tp) for x in d.get(key, [])]
    return out


def _out_of_range(r: random.Random, d: dict) -> bool:
    """Set one field to a value outside the schema's bounds; False if none applies."""
    choices: list[Callable[[], None]] = []
    kind = d["kind"]
    nan = float("nan")
    if kind == "hello":
        choices += [lambda: d.update(worker_id=r.choice([-1, 2**31])), lambda: d.update(version=r.choice([-1, 2**31]))]
    if kind == "trajectories":
        s = r.choice(d["samples"])
        choices += [lambda: d.update(samples=[]), lambda: d.update(purpose=r.choice(["", "test", "TRAIN"])),
                    lambda: s.update(num_tokens=r.choice([-1, -(2**40), MAX_TOKENS + 1, 2**63])),
                    lambda: s.update(reward=r.choice([nan, math.inf, -math.inf, 1e31])),
                    lambda: s.update(finish_reason="x" * 65), lambda: d.update(gen_seconds=r.choice([-1.0, nan])),
                    lambda: d.update(group_id=2**63), lambda: d.update(worker_id=-1),
                    lambda: d.update(prompt_ids=d["prompt_ids"] + [r.choice([-1, 2**31])]),
                    lambda: d.update(samples=d["samples"] * (MAX_SAMPLES // len(d["samples"]) + 1))]
    if kind == "prompts":
        choices += [lambda: d.update(n=r.choice([0, -3, MAX_SAMPLES + 1, 2**62])),
                    lambda: d.update(max_tokens=r.choice([0, MAX_TOKENS + 1, 2**62])),
                    lambda: d.update(temperature=r.choice([-0.1, nan, 1e4])),
                    lambda: d.update(top_p=r.choice([0.0, 1.5, nan, -1.0])),
                    lambda: d.update(min_version=-1), lambda: d.update(purpose="x")]
    if kind == "weights":
        choices.append(lambda: d.update(version=-1))
        if d["tensors"]:
            t = r.choice(d["tensors"])
            choices += [lambda: t.update(dtype=r.choice(["Tensor", "__class__", "float", "complex64", "torch.float32",
                                                         "", "FloatTensor", "qint8", "uint64"])),
                        lambda: t.update(shape=t["shape"] + [r.choice([-1, -(2**40), 2**49])]),
                        lambda: t.update(shape=[1] * (MAX_DIMS + 1))]
    if not choices:
        return False
    r.choice(choices)()
    return True


def _frame_mismatch(r: random.Random, msg: Message, frames: list[bytes]) -> tuple[str, list[bytes], Message] | None:
    """Header valid by the schema, frames inconsistent with it."""
    if isinstance(msg, (Hello, Prompts, Shutdown)):
        return "extra_frame", frames + [r.randbytes(r.randrange(0, 16)) for _ in range(r.randrange(1, 4))], msg
    if isinstance(msg, TrajectoryGroup):
        what = r.choice(["missing_frames", "extra_frame", "short_frame", "long_frame", "huge_length",
                         "sum_mismatch", "zero_tokens", "negative_version", "mask_value", "env_version",
                         "env_logprob", "starts_with_env"])
        if what == "missing_frames":
            return what, frames[: r.randrange(0, 4)], msg
        if what == "extra_frame":
            return what, frames + [r.randbytes(4 * r.randrange(0, 8))], msg
        if what in ("short_frame", "long_frame"):
            i, k = r.randrange(4), r.randrange(1, 9)
            fr = list(frames)
            fr[i] = fr[i][:-k] if what == "short_frame" else fr[i] + r.randbytes(k)
            return what, fr, msg
        samples = [SampleMeta(s.num_tokens, s.reward, s.finish_reason) for s in msg.samples]
        if what == "huge_length":
            samples[r.randrange(len(samples))].num_tokens = MAX_TOKENS
        elif what == "sum_mismatch":
            samples[r.randrange(len(samples))].num_tokens += r.choice([-1, 1, 7]) if samples[0].num_tokens else 3
        if what in ("huge_length", "sum_mismatch"):
            return what, frames, msgspec.structs.replace(msg, samples=samples)
        if what == "zero_tokens":
            zero = [SampleMeta(0, s.reward, s.finish_reason) for s in samples]
            return what, [b"", b"", b"", b""], msgspec.structs.replace(msg, samples=zero)
        return _mask_mismatch(r, what, msg, frames)
    if isinstance(msg, WeightUpdate):
        what = r.choice(["frame_count", "size_mismatch", "numel_overflow", "absurd_extent"])
        if what == "frame_count" or not msg.tensors:
            fr = frames + [b""] if not frames or r.random() < 0.5 else frames[:-1]
            return "frame_count", fr, msg
        metas, fr, i = list(msg.tensors), list(frames), r.randrange(len(msg.tensors))
        m = metas[i]
        if what == "size_mismatch":
            k = ITEMSIZE[m.dtype] * r.randrange(1, 4)
            fr[i] = fr[i] + r.randbytes(k) if r.random() < 0.5 or not fr[i] else fr[i][: max(0, len(fr[i]) - k)]
            if len(fr[i]) == len(frames[i]):  # cannot shorten an empty frame: lengthen it
                fr[i] = frames[i] + r.randbytes(ITEMSIZE[m.dtype])
        elif what == "numel_overflow":  # int64 product wraps to 0: an empty frame "matches"
            metas[i], fr[i] = TensorMeta(m.name, "float32", [2**31, 2**33]), b""
        else:
            metas[i], fr[i] = TensorMeta(m.name, m.dtype, [2**40, 2**40, 0]), b""
        return what, fr, WeightUpdate(version=msg.version, tensors=metas)
    return None


def _mask_mismatch(r: random.Random, what: str, msg: TrajectoryGroup,
                   frames: list[bytes]) -> tuple[str, list[bytes], Message]:
    """Frames of the right sizes whose model mask disagrees with the versions or log-probs
    (or with itself): each rule of ``codec._check_mask`` broken once."""
    lp = np.frombuffer(frames[1], "<f4").copy()
    versions = np.frombuffer(frames[2], "<i4").copy()
    mask = np.frombuffer(frames[3], "u1").copy()
    model, env = np.flatnonzero(mask == 1), np.flatnonzero(mask == 0)
    if what == "env_version" and len(env):  # an observation token claiming a policy version
        versions[r.choice(env)] = r.choice([0, 1, 7, 2**31 - 1, -2])
    elif what == "env_logprob" and len(env):  # an observation token claiming a sampled log-prob
        lp[r.choice(env)] = r.choice([-0.5, -1e-30, float("nan"), float("-inf"), 1.0])
    elif what == "starts_with_env":  # otherwise consistent: log-prob 0.0 and version -1
        i = r.choice(_first_tokens(msg))
        mask[i], lp[i], versions[i] = 0, 0.0, -1
    elif what == "mask_value":
        mask[r.randrange(len(mask))] = r.randrange(2, 256)
    else:  # negative_version (or a mutation with no environment token to mutate): a model token's
        what = "negative_version"
        versions[r.choice(model)] = r.choice([-1, -(2**31)])
    return what, [frames[0], lp.tobytes(), versions.tobytes(), mask.tobytes()], msg


def invalid_case(r: random.Random, kinds: tuple[type, ...], limits: Limits) -> Case:
    msg, frames = valid_message(r, kinds)
    head = _enc(msg)
    what = r.choices(
        ["random_bytes", "truncated", "trailing", "wrong_version", "unknown_kind", "no_kind", "missing_field",
         "extra_field", "wrong_type", "out_of_range", "not_a_map", "empty_header", "frames", "foreign_kind",
         "oversize_header", "oversize_total", "too_many_frames",
         "bad_utf8"],
        weights=[8, 6, 4, 5, 5, 2, 6, 6, 10, 10, 3, 1, 16, 4, 0.3, 0.3, 0.5, 3])[0]
    if what == "random_bytes":
        b = bytearray(r.randbytes(r.randrange(1, 256)))
        while b[0] in _MAP_FIRST_BYTES:
            b[0] = r.randrange(256)
        return Case(what, [bytes(b)] + frames, False)
    if what == "truncated":
        return Case(what, [head[: r.randrange(0, len(head))]] + frames, False)
    if what == "trailing":
        return Case(what, [head + r.randbytes(r.randrange(1, 9))] + frames, False)
    if what == "not_a_map":
        obj = r.choice([[1, 2, 3], 7, "hello", None, b"\x00\x01", 1.5, True, [{"kind": "hello"}]])
        return Case(what, [_enc(obj)] + frames, False)
    if what == "empty_header":
        return Case(what, [b""] + frames, False)
    if what == "frames":
        label, fr, m = _frame_mismatch(r, msg, frames)
        return Case(f"frames/{label}", [_enc(m)] + fr, False)
    if what == "foreign_kind":
        other = DOWNSTREAM if kinds == UPSTREAM else UPSTREAM
        m, fr = valid_message(r, other)
        return Case(what, [_enc(m)] + fr, False)
    if what == "oversize_header":
        d = msgspec.to_builtins(msg)
        d["pad"] = "x" * (limits.max_header_bytes + 1)  # would also be an unknown field: size is checked first
        return Case(what, [_enc(d)] + frames, False)
    if what == "oversize_total":
        part = limits.max_message_bytes // 2 - 1  # every frame passes ZMQ_MAXMSGSIZE, the sum does not
        return Case(what, [head] + frames + [bytes(part)] * 3, False)
    if what == "too_many_frames":
        return Case(what, [head] + [b""] * limits.max_frames, False)
    d = msgspec.to_builtins(msg)
    if what == "wrong_version":
        d["proto"] = r.choice([v for v in (0, 1, 2, 3, -1, 255, 2**40, -(2**63)) if v != PROTOCOL_VERSION])
    elif what == "unknown_kind":
        d["kind"] = r.choice(["pickle", "__class__", "", "Hello", "exec", r.randbytes(4).hex()])
        assert d["kind"] not in _TAGS
    elif what == "no_kind":
        del d["kind"]
    elif what == "missing_field":
        required = [(s, name) for s, tp in _struct_dicts(d) for name in _required(tp)]
        s, name = r.choice(required) if required else (d, "kind")
        del s[name]
    elif what == "extra_field":
        s, _ = r.choice(_struct_dicts(d))
        s[r.choice(["extra", "__class__", "payload", "Kind", "protocol"])] = r.choice([1, "x", None, [1]])
    elif what == "wrong_type":
        container, key = r.choice(_leaves(d, []))
        container[key] = _wrong_value(container[key])
    elif what == "bad_utf8":  # msgspec raises UnicodeDecodeError, not DecodeError, for these
        strings = [(c, k) for c, k in _leaves(d, []) if isinstance(c[k], str)]
        c, k = r.choice(strings)
        c[k] = "\x01" * 4
        head = _enc(d).replace(b"\xa4\x01\x01\x01\x01", b"\xa4" + r.choice([b"\xff\xfe\xfd\xfc", b"ab\xc3(", b"\xed\xa0\x80a"]), 1)
        return Case(what, [head] + frames, False)
    elif what == "out_of_range":
        if not _out_of_range(r, d):
            d["proto"], what = 0, "wrong_version"
    return Case(what, [_enc(d)] + frames, False)


def cases(seed: int, kinds: tuple[type, ...], limits: Limits, n: int, valid_fraction: float = 0.1) -> Iterator[Case]:
    """``n`` cases: valid messages (a ``valid_fraction`` of them) among invalid ones."""
    r = random.Random(seed)
    random.seed(seed)  # _wrong_value draws from the module RNG
    for _ in range(n):
        if r.random() < valid_fraction:
            msg, frames = valid_message(r, kinds)
            yield Case("valid", [_enc(msg)] + frames, True, msg)
        else:
            yield invalid_case(r, kinds, limits)


def bit_flips(seed: int, kinds: tuple[type, ...], n: int) -> Iterator[list[bytes]]:
    """Valid messages with random bytes flipped, cut or spliced: validity unknown."""
    r = random.Random(seed)
    for _ in range(n):
        msg, frames = valid_message(r, kinds)
        fr = [bytearray(_enc(msg))] + [bytearray(f) for f in frames]
        for _ in range(r.randrange(1, 4)):
            f = r.choice(fr)
            if not f:
                continue
            i = r.randrange(len(f))
            op = r.randrange(4)
            if op == 0:
                f[i] ^= 1 << r.randrange(8)
            elif op == 1:
                f[i] = r.choice([0x00, 0x7F, 0x80, 0xC0, 0xC1, 0xCC, 0xCF, 0xD3, 0xDC, 0xDD, 0xFF])
            elif op == 2:
                del f[i:]
            else:
                f[i:i] = r.randbytes(r.randrange(1, 5))
        yield [bytes(f) for f in fr]
