"""FSDP2 as a function applied to a model (no distributed code lives in model files)."""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard


def apply_fsdp(policy: nn.Module, mesh: DeviceMesh, *, param_dtype: torch.dtype = torch.float32) -> FSDPModule:
    """Shard every decoder layer, then the root (embeddings, final norm, lm_head).

    The root wraps the whole per-token computation, so inside its forward the lm_head
    weight handed to the chunked-logit kernels is the unsharded parameter. Gradients
    are reduced in float32 and summed, not averaged: every rank's loss is already its
    share of the global mini-batch loss (see asyncrl.algos.minibatch).
    """
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for layer in policy.lm.model.layers:
        fully_shard(layer, mesh=mesh, mp_policy=mp)
    fully_shard(policy, mesh=mesh, mp_policy=mp)
    for module in policy.modules():  # each FSDP unit reduces its own gradients; set it on all
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)  # plain SUM: gloo has no PREMUL_SUM/AVG
    return policy
