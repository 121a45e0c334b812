"""FSDP2 and its companions as functions applied to a model (no distributed code lives
in model files): the device mesh (1-D shard or 2-D hybrid), activation checkpointing
per decoder layer, then ``fully_shard`` with mixed precision. Gradient accumulation is
the micro-batch loop in ``asyncrl.algos.minibatch``."""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.utils.checkpoint import checkpoint


def build_mesh(device_type: str, world_size: int, *, mesh: str = "shard", ranks_per_node: int = 0) -> DeviceMesh:
    """shard: a 1-D mesh over every rank. hybrid (HSDP): a 2-D ("replicate", "shard")
    mesh, parameters sharded over the ``ranks_per_node`` ranks of a node and replicated
    across nodes, so the per-layer all-gathers stay on the node's fast links and only
    the gradient all-reduce crosses nodes. Ranks must be numbered node by node (launch
    places them so)."""
    if mesh == "shard":
        return init_device_mesh(device_type, (world_size,))
    if ranks_per_node < 1 or world_size % ranks_per_node:
        raise ValueError(f"hybrid mesh: world size {world_size} is not a multiple of {ranks_per_node} ranks per node")
    return init_device_mesh(device_type, (world_size // ranks_per_node, ranks_per_node),
                            mesh_dim_names=("replicate", "shard"))


def apply_activation_checkpointing(policy: nn.Module) -> nn.Module:
    """Recompute every decoder layer's forward in the backward instead of keeping its
    activations. The layer's ``forward`` is wrapped in place (non-reentrant
    ``torch.utils.checkpoint``), not the module, so parameter names, and hence the
    checkpoints and the weights sent to generators, keep their Hugging Face names; the
    FSDP hooks applied afterwards sit outside the recomputed region."""
    for layer in policy.lm.model.layers:
        layer.forward = functools.partial(checkpoint, layer.forward, use_reentrant=False)
    return policy


def apply_fsdp(policy: nn.Module, mesh: DeviceMesh, *, param_dtype: torch.dtype = torch.float32,
               reduce_dtype: torch.dtype = torch.float32, activation_checkpointing: bool = False) -> FSDPModule:
    """Shard every decoder layer, then the root (embeddings, final norm, lm_head).

    Mixed precision: parameters are gathered in ``param_dtype`` (bf16 on GPU) for the
    forward and backward, gradients reduced in ``reduce_dtype`` (float32) into float32
    master weights. On a 2-D mesh ``fully_shard`` shards over "shard" and replicates
    over "replicate" (HSDP).

    The root wraps the whole per-token computation, so inside its forward the lm_head
    weight handed to the chunked-logit kernels is the unsharded parameter. Gradients
    are summed, not averaged: every rank's loss is already its share of the global
    mini-batch loss (see asyncrl.algos.minibatch).
    """
    if activation_checkpointing:
        apply_activation_checkpointing(policy)
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    for layer in policy.lm.model.layers:
        fully_shard(layer, mesh=mesh, mp_policy=mp)
    fully_shard(policy, mesh=mesh, mp_policy=mp)
    for module in policy.modules():  # each FSDP unit reduces its own gradients; set it on all
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)  # plain SUM: gloo has no PREMUL_SUM/AVG
    return policy


def parallelize(policy: nn.Module, cfg, device_type: str, world_size: int) -> nn.Module:
    """The learner's parallelism as the config says (``learner.mesh``,
    ``learner.activation_checkpointing``, ``model.dtype``).

    One rank in float32 has nothing to shard, cast or reduce, so the model stays a plain
    module: FSDP2 would still copy every layer's parameters in and out and its
    gradients once per micro-batch, 6-10% of a quickstart training step on CPU
    (``benchmarks/learner_ab.py``), for the same update."""
    param_dtype = getattr(torch, cfg.model.dtype)
    if world_size == 1 and param_dtype == torch.float32:
        return apply_activation_checkpointing(policy) if cfg.learner.activation_checkpointing else policy
    cl = cfg.cluster
    per_node = cl.gpus_per_node // cl.learner_gpus if cl.learner_gpus else world_size
    mesh = build_mesh(device_type, world_size, mesh=cfg.learner.mesh, ranks_per_node=per_node)
    return apply_fsdp(policy, mesh, param_dtype=param_dtype, activation_checkpointing=cfg.learner.activation_checkpointing)
