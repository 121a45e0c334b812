"""``parallelize``: which learner gets FSDP2. One float32 rank trains the plain module
(nothing to shard, cast or reduce); mixed precision keeps FSDP2 even on one rank, for
its bf16 parameter casts and float32 gradient reduction."""

from __future__ import annotations

import msgspec
import pytest
import torch
from torch.distributed.fsdp import FSDPModule

from asyncrl.config import Config
from asyncrl.learner.fsdp import parallelize
from asyncrl.learner.policy import Policy
from asyncrl.models import tiny_qwen3_config
from testkit import one_gloo_rank

_rank = pytest.fixture(scope="module")(one_gloo_rank)


def tiny_policy(dtype: torch.dtype) -> Policy:
    from transformers import Qwen3ForCausalLM

    torch.manual_seed(0)
    config = tiny_qwen3_config(21, eos_id=1, pad_id=0)
    config._attn_implementation = "sdpa"
    return Policy(Qwen3ForCausalLM(config).to(dtype))


def config(dtype: str, checkpointing: bool = False) -> Config:
    return msgspec.convert({"model": {"dtype": dtype}, "learner": {"activation_checkpointing": checkpointing}}, Config)


def logprobs_and_grads(policy: Policy, ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The learner's forward (``Policy.forward``: through FSDP's root hooks) and the
    gradient of the summed log-probs of the next tokens."""
    policy.zero_grad()
    targets = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], 1)
    logprobs, _, _ = policy(ids, targets, temperature=1.0)
    logprobs.sum().backward()
    return logprobs.detach(), {n: p.grad.clone() for n, p in policy.named_parameters()}


def test_one_float32_rank_trains_the_plain_module(_rank):
    policy = tiny_policy(torch.float32)
    assert parallelize(policy, config("float32"), "cpu", 1) is policy
    assert not any(isinstance(m, FSDPModule) for m in policy.modules())


def test_activation_checkpointing_applies_to_the_plain_module(_rank):
    """The plain path still wraps every layer in checkpoint (and gives the same gradients)."""
    ids = torch.randint(2, 21, (2, 9))
    reference, ref_grads = logprobs_and_grads(tiny_policy(torch.float32), ids)
    policy = parallelize(tiny_policy(torch.float32), config("float32", checkpointing=True), "cpu", 1)
    assert all(getattr(layer.forward, "func", None) is torch.utils.checkpoint.checkpoint
               for layer in policy.lm.model.layers)
    logprobs, grads = logprobs_and_grads(policy, ids)
    torch.testing.assert_close(logprobs, reference, rtol=0, atol=1e-6)
    for name, grad in ref_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_bf16_on_one_rank_keeps_fsdp_mixed_precision(_rank):
    """Parameters stay float32 (the optimiser's copy); the decoder computes in bf16."""
    policy = parallelize(tiny_policy(torch.float32), config("bfloat16"), "cpu", 1)
    assert isinstance(policy, FSDPModule)
    assert all(isinstance(layer, FSDPModule) for layer in policy.lm.model.layers)
    assert {p.dtype for p in policy.parameters()} == {torch.float32}
    seen = []
    policy.lm.model.layers[0].register_forward_hook(lambda m, args, out: seen.append(args[0].dtype))
    _, grads = logprobs_and_grads(policy, torch.randint(2, 21, (2, 9)))
    assert seen == [torch.bfloat16]
    assert {g.dtype for g in grads.values()} == {torch.float32}
