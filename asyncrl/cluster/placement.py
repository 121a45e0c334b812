"""The placement plan: which role runs on which node with how many GPUs.

A pure function of the config (``cluster.nodes``, ``gpus_per_node``, ``learner_gpus``,
``generator_gpus``), used by ``--dry-run`` and by the Ray backend to shape its placement
groups. Learner ranks are packed node by node from node 0 (so the ranks of a node are
contiguous: what the hybrid FSDP mesh assumes); generators fill the GPUs left over,
first the learners' last node, then the following nodes. With ``transport.weights:
cuda_ipc`` the generators share learner rank 0's GPU instead (one node).

``generator_gpu`` is the same decision seen from inside a generator process: which
CUDA device its ``hf`` engine runs on.
"""

from __future__ import annotations

from dataclasses import dataclass

from asyncrl.config import Config, ConfigError


@dataclass(frozen=True)
class Placement:
    role: str  # "learner" or "generator"
    index: int  # learner rank or generator worker id
    node: int
    gpus: int
    cpus: float

    @property
    def name(self) -> str:
        return f"{self.role}{self.index}"


def plan_placement(cfg: Config) -> list[Placement]:
    cl, world, workers = cfg.cluster, cfg.learner.world_size, cfg.generator.num_workers
    if cl.gpus_per_node == 0:  # CPU cluster: learners on node 0, generators round-robin over the others
        plan = [Placement("learner", r, 0, 0, cl.cpus_per_role) for r in range(world)]
        others = list(range(1, cl.nodes)) or [0]
        return plan + [Placement("generator", w, others[w % len(others)], 0, cl.cpus_per_role) for w in range(workers)]
    if cfg.transport.weights == "cuda_ipc":  # generators on learner rank 0's GPU: they take no GPU of their own
        plan = [Placement("learner", r, 0, cl.learner_gpus, cl.cpus_per_role) for r in range(world)]
        if world * cl.learner_gpus > cl.gpus_per_node:
            raise ConfigError(_too_small(cfg, f"learner rank {cl.gpus_per_node}"))
        return plan + [Placement("generator", w, 0, 0, cl.cpus_per_role) for w in range(workers)]
    free = [cl.gpus_per_node] * cl.nodes
    plan, node = [], 0
    for r in range(world):
        while node < cl.nodes and free[node] < cl.learner_gpus:
            node += 1
        if node == cl.nodes:
            raise ConfigError(_too_small(cfg, f"learner rank {r}"))
        free[node] -= cl.learner_gpus
        plan.append(Placement("learner", r, node, cl.learner_gpus, cl.cpus_per_role))
    if cl.learner_gpus == 0:
        node = 0
    for w in range(workers):
        while node < cl.nodes and free[node] < max(cl.generator_gpus, 0):
            node += 1
        if node == cl.nodes or (cl.generator_gpus and free[node] < cl.generator_gpus):
            raise ConfigError(_too_small(cfg, f"generator {w}"))
        free[node] -= cl.generator_gpus
        plan.append(Placement("generator", w, node, cl.generator_gpus, cl.cpus_per_role))
    return plan


def generator_gpu(cfg: Config, worker_id: int) -> int | None:
    """The CUDA device index (as the generator's own process numbers devices) that
    generator ``worker_id``'s hf engine runs on; None = the CPU.

    ray: Ray sets CUDA_VISIBLE_DEVICES to the GPUs of the actor's bundle, so its first
    GPU is device 0. local: every process sees every GPU of the machine and learner
    rank r uses device r; with cuda_ipc the generators share rank 0's device, otherwise
    they take the devices after the learners' (as the plan does on one node)."""
    cl = cfg.cluster
    if cl.generator_gpus == 0:
        return None
    if cl.backend == "ray":
        return 0
    if cfg.transport.weights == "cuda_ipc":
        return 0
    return cfg.learner.world_size * cl.learner_gpus + worker_id * cl.generator_gpus


def _too_small(cfg: Config, what: str) -> str:
    cl = cfg.cluster
    need = cfg.learner.world_size * cl.learner_gpus + cfg.generator.num_workers * cl.generator_gpus
    return (f"{what} does not fit: {cl.nodes} node(s) x {cl.gpus_per_node} GPUs, but {cfg.learner.world_size} "
            f"learner rank(s) x {cl.learner_gpus} GPU + {cfg.generator.num_workers} generator(s) x "
            f"{cl.generator_gpus} GPUs need {need} (and a generator's GPUs must be on one node); "
            "raise cluster.nodes or lower learner.world_size / generator.num_workers")


def format_plan(cfg: Config, plan: list[Placement]) -> str:
    """A table per node, for ``--dry-run``."""
    cl = cfg.cluster
    lines = [f"placement plan: backend {cl.backend}, {cl.nodes} node(s) x {cl.gpus_per_node} GPU(s), "
             f"learner mesh {cfg.learner.mesh}, weights via {cfg.transport.weights}"]
    for node in range(cl.nodes):
        here = [p for p in plan if p.node == node]
        used = sum(p.gpus for p in here)
        lines.append(f"node {node}: {used}/{cl.gpus_per_node} GPUs")
        for role in ("learner", "generator"):
            mine = [p for p in here if p.role == role]
            if mine:
                ids = ", ".join(str(p.index) for p in mine)
                label = "ranks" if role == "learner" else "workers"
                gpus = f"{mine[0].gpus} GPU"
                if role == "generator" and cfg.transport.weights == "cuda_ipc":
                    gpus = "on learner rank 0's GPU (cuda_ipc)"
                lines.append(f"  {role} {label} {ids} ({gpus}, {mine[0].cpus:g} CPU each)")
    return "\n".join(lines)
