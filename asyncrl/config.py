"""Typed run configuration: YAML + dotted overrides -> validated msgspec Structs.

Nothing here imports torch, so ``python -m asyncrl.launch --help`` and config errors
are instant. Every section forbids unknown keys; errors name the key and the fix.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any, Literal

import msgspec
import yaml

from asyncrl.algos.config import AlgoConfig, GRPOConfig

CONFIG_DIR = Path(__file__).parent / "configs"


class ConfigError(ValueError):
    """A config problem, with a message that says what to write instead."""


class _Section(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    pass


class RunConfig(_Section):
    dir: str = "runs/quickstart"
    """Run directory: resolved config.yaml, metrics.jsonl, checkpoints/, logs/."""
    overwrite: bool = False
    """Allow a run directory that already holds a run (its metrics.jsonl is replaced)."""
    resume: Literal["never", "auto"] = "never"
    """auto = continue from the newest complete checkpoint in <dir>/checkpoints/state (start
    fresh if there is none); metrics.jsonl is appended to. never = refuse a used run.dir."""
    seed: int = 0
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    tensorboard: bool = False
    """Also write TensorBoard event files to <dir>/tensorboard (needs tensorboard)."""
    wandb: bool = False
    """Also log to Weights & Biases in offline mode (needs wandb)."""
    console: bool = True
    """Live progress line on the terminal."""


class ModelConfig(_Section):
    path: str = "builtin:quickstart-base"
    """A Hugging Face model directory, or builtin:NAME for a model shipped in asyncrl/assets."""
    dtype: Literal["float32", "bfloat16"] = "float32"


class TaskConfig(_Section):
    """The built-in problem source when no data files are given: ``arith`` (3-term
    addition, the quickstart), ``reasoning_gym`` (asyncrl/tasks/reasoning_gym.py),
    ``spark`` (the Lp-Reg testbed, asyncrl/tasks/spark.py; no settings) or ``calc_tool``
    (``a*b+c`` with a calculator tool, asyncrl/tasks/calc_tool.py; with ``env.type: calc_tool``)."""

    name: Literal["arith", "reasoning_gym", "spark", "calc_tool"] = "arith"
    terms: int = 3
    """arith, calc_tool: terms per problem."""
    digits: int = 3
    """arith, calc_tool: digits per term."""
    eval_size: int = 512
    """Held-out problems (a split disjoint from training)."""
    dataset: str | dict[str, float] = "countdown"
    """reasoning_gym: a dataset name (countdown, puzzle24, chain_sum, basic_arithmetic, ...)
    or a weighted mix ``{countdown: 2, chain_sum: 1}``."""
    config: dict[str, Any] = {}
    """reasoning_gym: the generator's settings (its config fields, e.g. ``{min_numbers: 3}``);
    for a mix, one mapping per dataset name."""
    prompt: Literal["question", "compact"] = "question"
    """reasoning_gym: question = the dataset's own question (chat template and
    ``system_prompt`` when the tokenizer has one); compact = a short rendering for the
    built-in char-level models (countdown and puzzle24: ``19,9,3>13:``)."""
    system_prompt: Literal["default", "DeepSeekZero", "simple", "direct", "chain_of_draft", ""] = "default"
    """reasoning_gym, question prompts: reasoning-gym's system prompt of this name ("" = none)."""
    partial_reward: float = 1.0
    """reasoning_gym: an answer the dataset's scorer gives s < 1 earns partial_reward * s
    (0 = binary reward, 1 = the scorer's own partial credit); a score of 1.0 is correct."""

    def __post_init__(self) -> None:
        if self.eval_size < 1:
            raise ValueError("task.eval_size must be >= 1")
        if not 0 <= self.partial_reward <= 1:
            raise ValueError("task.partial_reward must be in [0, 1] (0 = binary reward)")
        if isinstance(self.dataset, dict) and (not self.dataset or min(self.dataset.values()) <= 0):
            raise ValueError("task.dataset: a mix needs at least one dataset and every weight > 0, "
                             "e.g. task.dataset={countdown: 2, chain_sum: 1}")
        if self.name in ("arith", "calc_tool") and (self.terms < 2 or self.digits < 1):
            raise ValueError("task.terms must be >= 2 and task.digits >= 1")


class DataConfig(_Section):
    """Dataset files in veRL's layout (parquet or jsonl); see docs in asyncrl/data/files.py."""

    train_files: list[str] = []
    """Training files; empty = the synthetic ``task`` (no files needed)."""
    eval_files: list[str] = []
    """Evaluation files; empty = ``task.eval_size`` held-out synthetic problems."""
    max_prompt_length: int = 1024
    """Longest prompt in tokens after the chat template; see ``truncation``."""
    truncation: Literal["error", "left", "drop"] = "error"
    """A longer prompt: error (name the row), left (keep its last tokens), drop (skip the row)."""
    shuffle: bool = True
    """Shuffle training rows, a new seeded permutation every epoch."""
    reward_processes: int = 2
    """Verifier processes per generator when training from files (0 = score inline)."""
    reward_timeout_s: float = 10.0
    """Per-answer verification time limit; an answer over it scores 0."""
    overlong_buffer_len: int = 0
    """DAPO overlong penalty: the last N tokens before generator.max_tokens are penalised
    linearly down to -overlong_penalty_factor (0 = off)."""
    overlong_penalty_factor: float = 1.0

    def __post_init__(self) -> None:
        if self.max_prompt_length < 1:
            raise ValueError("data.max_prompt_length must be >= 1")
        if self.reward_processes < 0:
            raise ValueError("data.reward_processes must be >= 0 (0 = score inline)")
        if self.reward_timeout_s <= 0:
            raise ValueError("data.reward_timeout_s must be > 0")
        if self.overlong_buffer_len < 0:
            raise ValueError("data.overlong_buffer_len must be >= 0 (0 = no overlong penalty)")


_EVAL_TEMPERATURES = {"aime": 0.6, "aime24": 0.6, "aime25": 0.6}


class EvalConfig(_Section):
    """Evaluation sampling: per-data_source temperatures, k samples per problem."""

    k: int = 1
    """Samples per problem; reports mean@k and pass@k."""
    temperature: float = 0.0
    """Temperature for sources without an override; 0 = generator.temperature."""
    top_p: float = 0.0
    """0 = generator.top_p."""
    max_tokens: int = 0
    """0 = generator.max_tokens."""
    temperature_by_source: dict[str, float] = msgspec.field(default_factory=lambda: dict(_EVAL_TEMPERATURES))
    """Per-data_source temperature. A key matches a data_source equal to it or containing
    it (case-insensitive; the longest matching key wins), so ``aime`` covers AIME2024,
    math-ai/aime25, ..."""
    preset: Literal["none", "lpreg_paper"] = "none"
    """A named protocol in place of k and the temperatures above (asyncrl/eval/sampling.py).
    lpreg_paper: the Lp-Reg paper's evaluation: sources matching aime (AIME24, AIME25) or
    amc sampled at temperature 0.6, every other source greedy, one sample each; eval.top_p
    and eval.max_tokens still apply."""

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ValueError("eval.k must be >= 1")
        if self.preset != "none":
            own = [key for key, changed in (("eval.k", self.k != 1), ("eval.temperature", self.temperature != 0),
                                            ("eval.temperature_by_source",
                                             self.temperature_by_source != _EVAL_TEMPERATURES)) if changed]
            if own:
                raise ValueError(f"eval.preset={self.preset} sets the samples per problem and the temperatures; "
                                 f"remove {', '.join(own)} or set eval.preset=none")
        if self.temperature < 0 or any(t <= 0 for t in self.temperature_by_source.values()):
            raise ValueError("eval temperatures must be > 0 (eval.temperature 0 = generator.temperature)")
        if not 0 <= self.top_p <= 1:
            raise ValueError("eval.top_p must be in (0, 1] (0 = generator.top_p)")


class VLLMOptions(_Section):
    """Settings of the ``vllm`` engine (in-process ``vllm.LLM``); see docs/engines.md."""

    kv_cache_gb: float = 0.25
    """KV-cache size in GiB. 0 = let vLLM size it from gpu_memory_utilization (GPU only:
    on CPU that reserves a fraction of all host memory and fails on a shared machine)."""
    gpu_memory_utilization: float = 0.5
    """Fraction of GPU memory vLLM may take (weights + KV) when kv_cache_gb is 0."""
    enforce_eager: bool = True
    """No CUDA graphs / torch.compile: starts in seconds; set false for GPU throughput."""
    max_model_len: int = 0
    """Longest prompt + answer in tokens; 0 = the model's max_position_embeddings."""
    multiprocessing: bool = False
    """Run vLLM's V1 engine core in a process of its own (vLLM's default on GPUs: the
    scheduler overlaps with the client) instead of in the generator process (faster to
    start; what CPU runs use). Set by the engine, never inherited from
    VLLM_ENABLE_V1_MULTIPROCESSING."""
    tensor_parallel_size: int = 0
    """GPUs (or CPU ranks) one engine is sharded over, with vLLM's multiprocessing
    executor when > 1; 0 = cluster.generator_gpus (at least 1)."""

    def __post_init__(self) -> None:
        if self.tensor_parallel_size < 0:
            raise ValueError("generator.vllm.tensor_parallel_size must be >= 0 (0 = cluster.generator_gpus)")
        if self.kv_cache_gb < 0:
            raise ValueError("generator.vllm.kv_cache_gb must be >= 0 (0 = sized by gpu_memory_utilization)")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError("generator.vllm.gpu_memory_utilization must be in (0, 1]")


class SGLangOptions(_Section):
    """Settings of the ``sglang`` engine (CUDA only); see docs/engines.md."""

    url: str = ""
    """Empty = start an in-process sglang.Engine; else the base URL of a running SGLang
    server (http://host:port), whose weights are then updated from disk."""
    mem_fraction_static: float = 0.5
    """Fraction of GPU memory for weights + KV (in-process engine only)."""
    weights_dir: str = ""
    """Server mode: where to write safetensors for /update_weights_from_disk; must be
    readable by the server. Empty = <run.dir>/sglang_weights."""


class GeneratorConfig(_Section):
    engine: Literal["hf", "vllm", "sglang"] = "hf"
    num_workers: int = 1
    samples_per_prompt: int = 8
    temperature: float = 1.0
    top_p: float = 1.0
    """Must be 1 for training (the learner's log-probs are of the full distribution)."""
    max_tokens: int = 64
    threads: int = 2
    """torch intra-op threads per generator process."""
    on_weight_update: Literal["continue", "restart"] = "continue"
    """New weights arriving while a batch is being generated. continue: applied between
    decode steps; each sample's later tokens are sampled (and versioned) by the new
    weights, its prefix re-encoded with them. restart: the batch is abandoned and
    resampled from scratch with the new weights, so every sample comes from one
    version, at the cost of the work done so far (sglang: no effect, its requests
    always run to completion)."""
    max_resamples: int = 2
    """restart: times one batch may be resampled; later updates reach it as with
    continue (a slow generator among fast ones would otherwise restart on every update)."""
    vllm: VLLMOptions = msgspec.field(default_factory=VLLMOptions)
    sglang: SGLangOptions = msgspec.field(default_factory=SGLangOptions)

    max_restarts: int = 3
    """Times launch restarts a generator process that died (per worker); its prompts in
    flight are re-issued once. 0 = a dead generator fails the run."""
    restart_backoff_s: float = 1.0
    """Wait before a generator's first restart; doubles with each further one."""

    def __post_init__(self) -> None:
        if self.num_workers < 1:
            raise ValueError("generator.num_workers must be >= 1")
        if self.max_resamples < 0:
            raise ValueError("generator.max_resamples must be >= 0")
        if self.max_restarts < 0 or self.restart_backoff_s < 0:
            raise ValueError("generator.max_restarts and generator.restart_backoff_s must be >= 0")
        if self.samples_per_prompt < 1:
            raise ValueError("generator.samples_per_prompt must be >= 1")
        if self.temperature <= 0:
            raise ValueError("generator.temperature must be > 0 (greedy is not supported for RL)")
        if self.top_p != 1.0:
            # the engines return log-probs of the nucleus-renormalised distribution, the
            # learner those of the full one: every importance weight would be biased
            # (measured at top_p 0.7: mean 0.986, min 0.72), most on high-entropy tokens
            raise ValueError(f"generator.top_p={self.top_p} is not supported for training: the learner computes "
                             "log-probs of the full distribution at generator.temperature, so the engine must "
                             "sample from that distribution; set generator.top_p=1 (eval.top_p may be < 1)")


class LearnerConfig(_Section):
    world_size: int = 1
    """Learner ranks (torch.distributed: gloo on CPU, NCCL on GPU), FSDP2 over all."""
    steps: int = 200
    """Rollout batches to train on (the policy version after training)."""
    prompts_per_step: int = 32
    ppo_mini_batches: int = 1
    """Optimiser steps per rollout batch (1 = on-policy, the paper's 8 = off-policy)."""
    micro_batch_size: int = 256
    """Samples per forward/backward on one rank (gradient accumulation above that)."""
    max_tokens_per_micro_batch: int = 0
    """Also cap a micro-batch at this many real tokens (prompt + response; a longer
    sample gets one of its own), so memory follows tokens, not rows. 0 = rows only."""
    packing: bool = False
    """Pack several samples into each row of the decoder's input (per-sample position
    ids, block-diagonal attention) instead of padding every row to the longest sample."""
    pack_row_tokens: int = 0
    """Length of a packed row (at least the longest sample; 0 = a micro-batch's samples
    all in one row, no padding). With sdpa, attention runs per sample whatever the row
    width; other attention implementations get a dense block-diagonal mask per row."""
    share_prompts: bool = True
    """With packing, consecutive samples of one prompt share a single copy of it in the
    packed rows (each answer attends to it): the prompt's forward and backward run
    once per group instead of once per sample, with the same loss and gradient. Needs
    sdpa attention on full-attention layers; elsewhere each sample keeps its own copy."""
    max_staleness: int = 0
    """0 = strictly on-policy; k = generation may run k versions ahead."""
    off_policy: Literal["decoupled", "tis", "none"] = "decoupled"
    """Correction for samples from older weights (the behaviour policy). decoupled: PPO
    ratio against the learner's recomputed pi_old (the proximal policy) times the weight
    pi_old / pi_behaviour, tokens whose weight exceeds is_cap dropped (AReaL's decoupled
    PPO); tis: the same ratio times min(pi_old / pi_behaviour, is_cap) (truncated IS);
    none: PPO ratio against the generator's sampled log-probs, no recomputation."""
    is_cap: float = 5.0
    """Cap of the behaviour importance weight (truncated for tis, dropped for decoupled)."""
    lr: float = 1e-4
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    betas: tuple[float, float] = (0.9, 0.999)
    threads: int = 2
    """torch intra-op threads per learner rank."""
    borrow_threads: int = 0
    """Extra torch threads the learner uses while no generator is working: on one shared
    host (local backend, world_size 1) the learner borrows the cores an idle generator
    leaves free, checked before every micro-batch (so keep micro_batch_size a fraction
    of the batch). Trades bitwise run-to-run reproducibility for throughput; 0 = off."""
    mesh: Literal["shard", "hybrid"] = "shard"
    """FSDP2 device mesh: shard = every parameter sharded over all ranks (1-D mesh);
    hybrid = HSDP, a 2-D (replicate, shard) mesh: sharded within a node, replicated
    across nodes (``cluster.gpus_per_node // cluster.learner_gpus`` ranks per node)."""
    activation_checkpointing: bool = False
    """Recompute each decoder layer's activations in the backward (less memory, ~30% more
    compute): what long responses (8k tokens) need on large models."""
    eval_every: int = 0
    """Evaluate every N steps (0 = only before training and at the end)."""
    checkpoint_every: int = 0
    """Save a resumable checkpoint every N steps (0 = only at the end or on Ctrl-C)."""
    keep_checkpoints: int = 3
    """Resumable checkpoints (checkpoints/state/step_N) to keep; older ones are deleted."""
    max_bad_steps: int = 3
    """A step whose loss or gradient norm is NaN/Inf is skipped (no optimiser step); this
    many in a row stop the run before the weights are corrupted."""

    def __post_init__(self) -> None:
        for name in ("world_size", "steps", "prompts_per_step", "ppo_mini_batches", "micro_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"learner.{name} must be >= 1, got {getattr(self, name)}")
        if self.max_staleness < 0:
            raise ValueError("learner.max_staleness must be >= 0")
        if self.checkpoint_every < 0:
            raise ValueError("learner.checkpoint_every must be >= 0 (0 = only at the end)")
        if self.keep_checkpoints < 1 or self.max_bad_steps < 1:
            raise ValueError("learner.keep_checkpoints and learner.max_bad_steps must be >= 1")
        if self.lr <= 0:
            raise ValueError("learner.lr must be > 0")
        if self.threads < 1 or self.borrow_threads < 0:
            raise ValueError("learner.threads must be >= 1 and learner.borrow_threads >= 0")
        if self.max_tokens_per_micro_batch < 0 or self.pack_row_tokens < 0:
            raise ValueError("learner.max_tokens_per_micro_batch and learner.pack_row_tokens must be >= 0 (0 = off)")
        if self.borrow_threads and self.world_size != 1:
            raise ValueError("learner.borrow_threads needs learner.world_size 1 (only rank 0 sees the generators); "
                             "set learner.borrow_threads=0")


class TransportConfig(_Section):
    host: str = "127.0.0.1"
    """Interface the learner binds; 127.0.0.1 keeps everything on this machine."""
    port: int = 0
    """0 = pick a free port."""
    timeout_s: float = 600.0
    """Give up with an error if no trajectory arrives for this long."""
    auth: Literal["none", "curve"] = "none"
    """"curve": ZeroMQ CURVE (encrypted, only holders of the run's client key may send);
    launch writes the keys to <run.dir>/keys. Use it whenever host is not loopback."""
    max_message_mb: float = 64.0
    """Largest message the learner accepts (one trajectory group); a bigger frame is
    dropped by libzmq before it is allocated."""
    max_weights_mb: float = 65536.0
    """Largest weight update a generator accepts (every tensor of one version)."""
    weights: Literal["zmq", "disk", "nccl", "cuda_ipc"] = "zmq"
    """How new weights reach the generators (the notice always travels over ZeroMQ):
    zmq = raw tensor frames (works anywhere); disk = safetensors in ``weights_dir``
    written atomically, engines reload it; nccl = a broadcast from learner rank 0 to the
    generators over a NCCL group (GPU learners and GPU engines, a GPU each); cuda_ipc =
    the generators share learner rank 0's GPU and copy from its memory (one node,
    cluster.backend=local, generator.engine=hf)."""
    weights_dir: str = ""
    """disk: a directory every generator can read (shared storage on a cluster);
    empty = <run.dir>/weights, which only works when the run directory is shared."""
    weights_port: int = 0
    """nccl: TCP port of the weight group's rendezvous on learner rank 0's host;
    0 = transport.port + 1."""
    bucket_mb: float = 512.0
    """Weight updates travel, and are loaded into the engine, in buckets of about this
    many MiB (a tensor larger than that is a bucket of its own), so an engine never
    holds a second full copy of the model; 0 = the whole model as one bucket (zmq:
    inline in the notice, the pre-bucketing behaviour)."""

    def __post_init__(self) -> None:
        if self.max_message_mb <= 0 or self.max_weights_mb <= 0:
            raise ValueError("transport.max_message_mb and transport.max_weights_mb must be > 0")
        if self.bucket_mb < 0:
            raise ValueError("transport.bucket_mb must be >= 0 (0 = one bucket: the whole model)")


class ClusterConfig(_Section):
    """Where the roles run: local processes, or Ray actors on a cluster (docs/cluster.md)."""

    backend: Literal["local", "ray"] = "local"
    """local = subprocesses on this machine; ray = Ray actors with placement groups
    (needs ``pip install asyncrl[ray]``)."""
    address: str = ""
    """ray: address of a running Ray cluster (``auto``, ``ray://host:10001``, ``host:6379``);
    empty = start a private single-node Ray on loopback for this run."""
    nodes: int = 1
    """Nodes in the cluster (placement plan and ``--dry-run``)."""
    gpus_per_node: int = 0
    """GPUs per node; 0 = a CPU cluster."""
    learner_gpus: int = 0
    """GPUs per learner rank (0 on CPU, else 1: one rank per GPU)."""
    generator_gpus: int = 0
    """GPUs per generator worker (its engine's tensor-parallel size; 0 on CPU)."""
    cpus_per_role: float = 1.0
    """Ray CPUs reserved per learner rank and per generator worker."""
    placement: Literal["pack", "spread"] = "pack"
    """Generator placement group strategy (PACK or SPREAD). Learner ranks are always
    packed: one STRICT_PACK group per node, so the ranks of a node are contiguous."""

    def __post_init__(self) -> None:
        if self.nodes < 1:
            raise ValueError("cluster.nodes must be >= 1")
        if min(self.gpus_per_node, self.learner_gpus, self.generator_gpus) < 0 or self.cpus_per_role < 0:
            raise ValueError("cluster GPU and CPU counts must be >= 0")
        if self.learner_gpus > 1:
            raise ValueError("cluster.learner_gpus must be 0 (CPU) or 1 (one learner rank per GPU)")
        for name in ("learner_gpus", "generator_gpus"):
            if getattr(self, name) > self.gpus_per_node:
                raise ValueError(f"cluster.{name} ({getattr(self, name)}) exceeds cluster.gpus_per_node "
                                 f"({self.gpus_per_node}); set cluster.gpus_per_node to the GPUs of one node")


class DebugConfig(_Section):
    """Knobs for tests and experiments; the defaults change nothing."""

    learner_step_delay_s: float = 0.0
    """Sleep this long in every learner step (simulates a slow learner)."""
    generator_batch_delay_s: float = 0.0
    """Sleep this long before every generation batch (simulates slow generators)."""
    checkpoint_marker_delay_s: float = 0.0
    """Sleep between writing a checkpoint's shards and its completeness marker (lets a
    test kill the learner mid-checkpoint)."""
    nan_loss_steps: list[int] = []
    """Learner steps whose loss is made NaN (tests the non-finite step guard)."""
    record_batches: bool = False
    """Write every rollout batch the learner trains on to ``<run.dir>/batches/step_N.safetensors``
    (benchmarks/peers.py replays them to time the learner alone)."""


class ToolSpec(_Section):
    """One tool the model may call, written ``START input END``."""

    name: str
    """A tool of the generator's tool pool (asyncrl.tools: python, calculator)."""
    start: str
    """The opening delimiter, e.g. ``<calc>`` (with the built-in character tokenizer: one
    character of its vocabulary, e.g. ``(``)."""
    end: str
    """The closing delimiter: a model turn stops right after it. With the hf or sglang engine
    it must be one token of the tokenizer (a stop token id); vllm also takes longer ones."""


class EnvConfig(_Section):
    """The environment episodes run in (asyncrl/envs): ``single_turn`` (one answer scored by
    the task's verifier: every built-in task), ``tools`` (the model calls tools, their
    output is appended as context, and it samples on) or ``calc_tool`` (the calculator
    demo's environment, asyncrl/envs/calc.py: ``[expr]`` calls, ``=value`` observations;
    uses the tool pool settings below, not ``tools``). The token budget of an episode is
    generator.max_tokens (eval.max_tokens for evaluation): every response token, model and
    observation."""

    type: Literal["single_turn", "tools", "calc_tool"] = "single_turn"
    max_turns: int = 4
    """tools: the most model turns in one episode (single_turn: always 1)."""
    max_turn_tokens: int = 0
    """The most tokens of one model turn; 0 = what is left of the episode's budget."""
    tools: list[ToolSpec] = []
    """tools: the callable tools and their delimiters."""
    output_template: str = "{output}"
    """tools: how a tool's output is appended, ``{output}`` replaced by it (e.g. ``<output>{output}</output>``)."""
    tool_processes: int = 2
    """tools: processes of the tool pool (tools run there, off the decode loop)."""
    tool_timeout_s: float = 5.0
    """tools: per-call time limit; a call over it returns an error text as its output."""
    max_output_chars: int = 1000
    """tools: a tool's output is cut to this many characters."""

    def __post_init__(self) -> None:
        if self.max_turns < 1 or self.max_turn_tokens < 0:
            raise ValueError("env.max_turns must be >= 1 and env.max_turn_tokens >= 0 (0 = the episode's budget)")
        if self.type == "single_turn" and self.tools:
            raise ValueError("env.tools is set but env.type=single_turn never calls tools; set env.type=tools")
        if self.type == "tools" and not self.tools:
            raise ValueError("env.type=tools needs at least one tool, e.g. "
                             "env.tools=[{name: calculator, start: '<calc>', end: '</calc>'}]")
        for t in self.tools:
            if not (t.name and t.start and t.end):
                raise ValueError(f"env.tools: {t.name or '?'} needs a name and non-empty start and end delimiters")
        if "{output}" not in self.output_template:
            raise ValueError(f"env.output_template {self.output_template!r} must contain {{output}}")
        if self.tool_processes < 1 or self.tool_timeout_s <= 0 or self.max_output_chars < 1:
            raise ValueError("env.tool_processes and env.max_output_chars must be >= 1, env.tool_timeout_s > 0")


class Config(_Section):
    run: RunConfig = msgspec.field(default_factory=RunConfig)
    model: ModelConfig = msgspec.field(default_factory=ModelConfig)
    task: TaskConfig = msgspec.field(default_factory=TaskConfig)
    data: DataConfig = msgspec.field(default_factory=DataConfig)
    eval: EvalConfig = msgspec.field(default_factory=EvalConfig)
    generator: GeneratorConfig = msgspec.field(default_factory=GeneratorConfig)
    env: EnvConfig = msgspec.field(default_factory=EnvConfig)
    learner: LearnerConfig = msgspec.field(default_factory=LearnerConfig)
    algo: AlgoConfig = msgspec.field(default_factory=GRPOConfig)
    transport: TransportConfig = msgspec.field(default_factory=TransportConfig)
    cluster: ClusterConfig = msgspec.field(default_factory=ClusterConfig)
    debug: DebugConfig = msgspec.field(default_factory=DebugConfig)

    def __post_init__(self) -> None:
        lc = self.learner
        mini = lc.prompts_per_step // lc.ppo_mini_batches
        if lc.prompts_per_step % (lc.ppo_mini_batches * lc.world_size):
            raise ValueError(
                f"learner.prompts_per_step ({lc.prompts_per_step}) must be divisible by "
                f"learner.ppo_mini_batches * learner.world_size ({lc.ppo_mini_batches * lc.world_size}) "
                "so every rank gets whole prompt groups in every mini-batch"
            )
        if mini < 1:
            raise ValueError("learner.ppo_mini_batches must be <= learner.prompts_per_step")
        _check_cluster(self)


def _check_cluster(cfg: Config) -> None:
    """Settings that must agree across roles: caught here, before anything starts."""
    cl, tc = cfg.cluster, cfg.transport
    if cfg.learner.borrow_threads and cl.backend != "local":
        raise ValueError("learner.borrow_threads lends a generator's idle cores to the learner on one host: it "
                         "needs cluster.backend=local; set learner.borrow_threads=0")
    if tc.weights == "nccl":
        if cfg.generator.engine == "hf" or cl.generator_gpus < 1 or cl.learner_gpus < 1:
            raise ValueError(
                "transport.weights=nccl broadcasts GPU tensors: it needs GPU learners (cluster.learner_gpus=1) "
                "and GPU engines (generator.engine=vllm or sglang with cluster.generator_gpus >= 1); "
                "on CPU use transport.weights=zmq"
            )
        if cfg.generator.engine == "sglang" and cfg.generator.sglang.url:
            raise ValueError("transport.weights=nccl cannot reach an external SGLang server "
                             "(generator.sglang.url); use transport.weights=disk")
        # Which GPU a role gets: Ray gives every bundle whole GPUs of its own (never shared),
        # the local backend pins no engine: vllm and sglang start on GPU 0, learner rank 0's.
        if cl.backend == "local":
            raise ValueError(
                "transport.weights=nccl with cluster.backend=local: the generators' engines would share GPU 0 with "
                "learner rank 0, and NCCL refuses two ranks on one GPU; on one GPU use transport.weights=cuda_ipc "
                "(with generator.engine=hf), on several use cluster.backend=ray (a GPU of its own for every role)"
            )
    if tc.weights == "cuda_ipc":
        _check_cuda_ipc(cfg)
    if tc.weights == "disk" and not tc.weights_dir and (cl.nodes > 1 or cl.address):
        raise ValueError(
            "transport.weights=disk on a multi-node cluster needs transport.weights_dir: a directory on "
            "storage every node can read (e.g. transport.weights_dir=/shared/run/weights)"
        )
    if cfg.learner.mesh == "hybrid":
        per_node = cl.gpus_per_node // cl.learner_gpus if cl.learner_gpus else 0
        if per_node < 1 or cfg.learner.world_size % per_node:
            raise ValueError(
                f"learner.mesh=hybrid shards within a node: learner.world_size ({cfg.learner.world_size}) must be "
                "a multiple of the learner ranks per node (cluster.gpus_per_node // cluster.learner_gpus, "
                f"here {per_node}); use learner.mesh=shard on CPU"
            )


def _check_cuda_ipc(cfg: Config) -> None:
    cl = cfg.cluster
    if cl.learner_gpus != 1 or cl.generator_gpus != 1:
        raise ValueError(
            "transport.weights=cuda_ipc shares learner rank 0's GPU memory with the generators: it needs a GPU "
            f"learner and GPU engines on that GPU (cluster.learner_gpus=1 and cluster.generator_gpus=1, got "
            f"{cl.learner_gpus} and {cl.generator_gpus}, with cluster.gpus_per_node >= 1); on CPU use "
            "transport.weights=zmq"
        )
    if cl.backend != "local" or cl.nodes != 1:
        raise ValueError(
            "transport.weights=cuda_ipc needs learner rank 0 and the generators on one GPU of one node: use "
            "cluster.backend=local with cluster.nodes=1 (Ray gives every role GPUs of its own); across GPUs "
            "use transport.weights=nccl"
        )
    if cfg.generator.engine != "hf":
        raise ValueError(
            f"transport.weights=cuda_ipc feeds an in-process PyTorch engine: use generator.engine=hf (got "
            f"{cfg.generator.engine}), or transport.weights=nccl with a GPU per engine"
        )


# ---------------------------------------------------------------- loading


def resolve_config_path(name: str) -> Path:
    """A path to a YAML file, or the name of a config shipped in asyncrl/configs."""
    p = Path(name)
    if p.suffix in (".yaml", ".yml") or p.exists():
        if not p.exists():
            raise ConfigError(f"config file {name} does not exist")
        return p
    shipped = CONFIG_DIR / f"{name}.yaml"
    if shipped.exists():
        return shipped
    known = sorted(f.stem for f in CONFIG_DIR.glob("*.yaml"))
    raise ConfigError(f"no config named {name!r}: give a YAML path or one of {known}")


def engine_tp_size(cfg: Config) -> int:
    """A vLLM engine's tensor-parallel size: ``generator.vllm.tensor_parallel_size``, or
    ``cluster.generator_gpus`` (at least 1) when that is 0."""
    return cfg.generator.vllm.tensor_parallel_size or max(cfg.cluster.generator_gpus, 1)


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads ``3e-4`` as a string; accept it as a float like YAML 1.2 does."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d[\d_]*)?(?:\.\d*)?[eE][-+]?\d+$|^[-+]?\d[\d_]*\.\d*$|^[-+]?\.\d+$"),
    list("-+0123456789."),
)


def _yaml_load(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


def _parse_value(text: str) -> Any:
    try:
        return _yaml_load(text)
    except yaml.YAMLError:
        return text


def apply_override(tree: dict, dotted: str) -> None:
    if "=" not in dotted:
        raise ConfigError(f"override {dotted!r} must look like a.b.c=value")
    key, _, value = dotted.partition("=")
    parts = key.strip().split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {key}: {part} is a value, not a section")
        node = child
    node[parts[-1]] = _parse_value(value)


def _struct_for_path(path: list[str]) -> type | None:
    """The Struct type found at a dotted path in Config (None if unknown)."""
    tp: Any = Config
    for part in path:
        if part.isdigit() and getattr(tp, "__origin__", None) is list:  # an item of a list of sections (env.tools)
            tp = tp.__args__[0]
            continue
        fields = {f.name: f.type for f in msgspec.structs.fields(tp)} if isinstance(tp, type) else {}
        if part not in fields:
            return None
        tp = fields[part]
    return tp if isinstance(tp, type) and issubclass(tp, msgspec.Struct) else None


def _explain(err: msgspec.ValidationError, tree: dict) -> str:
    msg = str(err)
    m = re.search(r"- at `\$\.?([^`]*)`", msg)
    where = m.group(1).replace("[", ".").replace("]", "") if m else ""
    head = msg.split(" - at ")[0]
    unknown = re.search(r"unknown field `([^`]+)`", head)
    if unknown:
        key = unknown.group(1)
        path = [p for p in where.split(".") if p]
        section = _struct_for_path(path)
        if section is None and path and path[-1] == "algo":
            algo = tree.get("algo", {}) if isinstance(tree.get("algo"), dict) else {}
            section = next((t for t in AlgoConfig.__args__ if t.__struct_config__.tag == algo.get("type", "grpo")), None)
        valid = [f.name for f in msgspec.structs.fields(section)] if section else []
        full = ".".join(path + [key])
        hint = difflib.get_close_matches(key, valid, n=1)
        fix = f"did you mean {'.'.join(path + [hint[0]])}?" if hint else f"valid keys here: {', '.join(valid)}"
        return f"config error: unknown key {full}; {fix}"
    if "Invalid value" in head and "type" in where.split(".")[-1:]:
        tags = [t.__struct_config__.tag for t in AlgoConfig.__args__]
        return f"config error: {where}: {head}; write one of: {', '.join(tags)}"
    expected = re.match(r"Expected `([^`]+)`, got `([^`]+)`", head)
    if expected:
        return (
            f"config error: {where} expects {expected.group(1)}, got {expected.group(2)}; "
            f"write e.g. {where}=<{expected.group(1)}>"
        )
    return f"config error at {where or 'top level'}: {head}"


def load_config(name: str, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load a YAML config (path or shipped name), apply dotted overrides, validate."""
    path = resolve_config_path(name)
    tree = _yaml_load(path.read_text()) or {}
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    for ov in overrides:
        apply_override(tree, ov)
    try:
        return msgspec.convert(tree, Config)
    except msgspec.ValidationError as err:
        raise ConfigError(_explain(err, tree)) from None


def advisories(cfg: Config) -> list[str]:
    """Settings that are valid but measured to go wrong (launch logs them as warnings)."""
    out = []
    lc, algo = cfg.learner, cfg.algo
    if algo.__struct_config__.tag == "lpreg" and lc.ppo_mini_batches > 1 and lc.lr > 1e-5:
        out.append(
            f"algo.type=lpreg with learner.ppo_mini_batches={lc.ppo_mini_batches} at learner.lr={lc.lr:g}: on the "
            f"quickstart task this collapsed accuracy at lr 1e-4 (the clip range [{1 - algo.clip_low:g}, "
            f"{1 + algo.clip_high:g}] alone does it, and beta={algo.beta:g} does with a tight clip) and was fine at "
            "1e-5; the paper's settings assume lr 1e-6 (README, Algorithm comparison)")
    return out


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(msgspec.to_builtins(cfg), sort_keys=False)


def from_yaml_file(path: str | Path) -> Config:
    """Read a resolved config written by :func:`to_yaml` (roles start from it)."""
    return msgspec.convert(yaml.safe_load(Path(path).read_text()), Config)
