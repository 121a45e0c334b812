"""Environment (observation) tokens of multi-turn trajectories receive zero gradient and
are never selected, for every registered algorithm (issue 18).

The rollout batch comes from ``build_batch`` over groups decoded by the real codec:
responses that alternate model turns and tool output. The environment tokens are made
the most selectable tokens there are: at their positions the predicted token has the
lowest probability (it survives Lp-Reg's min-p filter, so it would be regularised), the
distribution the highest entropy (80/20), the log-prob the farthest below the mean, so
the largest covariance in negative-advantage samples (KL-Cov, Clip-Cov); the
advantages and importance weights handed to the loss are not zeroed there (the mask
alone must keep them out). Two models:

- free float64 logits per position (a "leaky" forward that computes log-probs, entropy
  and the proxy at every position, environment ones included), through the learner's
  ``run_minibatch``: (a) no environment position is selected, (b) the gradient of the
  loss w.r.t. the logits at every environment position is exactly 0, (c) arbitrary
  values at environment positions (logits, pi_old, proxy, weights, advantages) leave
  the selection, the loss and the gradient bit-identical. The same run with the
  environment tokens in the mask (what a ``build_batch`` that made them targets would
  give) selects them and puts gradient on them: the construction can fail.
- the tiny Qwen3 through ``Policy`` (padded and packed): the gradient w.r.t. the final
  hidden state (hence the logits) at environment positions is 0, and the parameter
  gradient equals that of a batch built by hand with the environment tokens in
  ``input_ids`` only; changing the environment token ids changes it (they are context).
"""

from __future__ import annotations

import msgspec
import numpy as np
import pytest
import torch

from asyncrl.algos import build_algorithm
from asyncrl.algos.config import (
    ClipCovConfig, ClipHigherConfig, DrGRPOConfig, EightyTwentyConfig, EntropyBonusConfig, GRPOConfig, GSPOConfig,
    KLCovConfig, LpRegConfig,
)
from asyncrl.algos.lpreg import minp_proxy_logprobs
from asyncrl.algos.minibatch import MiniBatch, run_minibatch
from asyncrl.algos.registry import REGISTRY
from asyncrl.algos.selection import local_all_gather
from asyncrl.kernels import IGNORE_INDEX
from asyncrl.learner.batch import Batch, build_batch
from asyncrl.learner.hub import Group
from asyncrl.wire.codec import SampleArrays, decode_checked, encode, trajectory_arrays, trajectory_frames
from asyncrl.wire.schema import SampleMeta, TrajectoryGroup
from testkit import make_tiny_model

V, TEMPERATURE = 13, 1.0
KAPPA = 0.002  # ln = -6.2: the environment token at -6 below the max survives the min-p filter

# (config class, overrides): settings under which each algorithm selects (or weights) tokens
CASES = [
    (GRPOConfig, {}),
    (GRPOConfig, {"agg": "seq-mean-token-mean"}),
    (ClipHigherConfig, {}),
    (DrGRPOConfig, {}),
    (LpRegConfig, {"rho": 0.3, "rho_pos": 0.3, "kappa": KAPPA}),
    (GSPOConfig, {"clip_low": 0.05, "clip_high": 0.08}),
    (EntropyBonusConfig, {"coef": 0.05}),
    (EightyTwentyConfig, {"top_frac": 0.3}),
    (EightyTwentyConfig, {"top_frac": 0.3, "normaliser": "all"}),
    (KLCovConfig, {"ratio": 0.2, "coef": 0.7}),
    (ClipCovConfig, {"ratio": 0.3, "cov_lb": -1e3, "cov_ub": 1e3}),
]
IDS = [c.__name__.removesuffix("Config") + "".join(f"-{v}" for k, v in o.items() if k in ("agg", "normaliser"))
       for c, o in CASES]

# (prompt, response runs: (is_model, tokens), reward) per sample; two groups of three
GROUPS = [
    ([3, 4, 5], [
        ([(1, [6, 7]), (0, [8, 9, 10]), (1, [11, 12])], 1.0),
        ([(1, [7]), (0, [9, 9]), (1, [6, 8, 2]), (0, [12])], 0.0),  # ends in an observation
        ([(1, [5, 6, 7, 8])], 0.0),  # single-turn
    ]),
    ([9, 2], [
        ([(1, [3, 3]), (0, [4, 5, 6, 7]), (1, [8])], 0.0),
        ([(1, [10, 11, 12]), (0, [2, 3]), (1, [4, 5]), (0, [6]), (1, [7])], 1.0),
        ([(1, [12]), (0, [11, 10]), (1, [9, 8])], 1.0),
    ]),
]


def config(case):
    cls, overrides = case
    return msgspec.convert({"type": cls.__struct_config__.tag, **overrides}, cls)


def test_every_registered_algorithm_is_covered():
    assert {c for c, _ in CASES} == set(REGISTRY)


def groups() -> list[Group]:
    """The GROUPS through the wire codec (encode, decode_checked, trajectory_arrays)."""
    out = []
    for gid, (prompt, samples) in enumerate(GROUPS):
        arrays, metas = [], []
        for i, (runs, reward) in enumerate(samples):
            ids = [t for _, toks in runs for t in toks]
            mask = np.array([m for m, toks in runs for _ in toks], np.uint8)
            lp = np.where(mask == 1, -0.1 - 0.05 * np.arange(len(ids)), 0.0).astype(np.float32)
            ver = np.where(mask == 1, gid + i, -1).astype(np.int32)
            arrays.append(SampleArrays(np.array(ids, np.int32), lp, ver, mask))
            metas.append(SampleMeta(len(ids), reward, "stop"))
        msg = TrajectoryGroup(group_id=gid, worker_id=0, data_source="tools", prompt_ids=prompt, samples=metas)
        got, frames = decode_checked(encode(msg, trajectory_frames(arrays)))
        out.append(Group(got, trajectory_arrays(got, frames)))
    return out


def layout():
    """From GROUPS directly, independent of build_batch: (next token at every position
    that predicts one [S, L] (0 elsewhere), model-token positions, environment-token
    positions, bool [S, L] each)."""
    rows = [(prompt, runs) for prompt, samples in GROUPS for runs, _ in samples]
    L = max(len(p) + sum(len(t) for _, t in runs) - 1 for p, runs in rows)
    nxt = torch.zeros((len(rows), L), dtype=torch.long)
    model, env = torch.zeros((len(rows), L), dtype=torch.bool), torch.zeros((len(rows), L), dtype=torch.bool)
    for i, (prompt, runs) in enumerate(rows):
        t = len(prompt) - 1  # the last prompt position predicts the first response token
        for is_model, toks in runs:
            for tok in toks:
                nxt[i, t] = tok
                (model if is_model else env)[i, t] = True
                t += 1
    return nxt, model, env


def test_build_batch_matches_the_layout():
    batch = build_batch(groups(), pad_id=0, scale_advantages=False)
    nxt, model, env = layout()
    assert torch.equal(batch.mask, model) and int(env.sum()) == 15 and int(model.sum()) == 24
    assert torch.equal(batch.targets, torch.where(model, nxt, IGNORE_INDEX))
    assert torch.equal(batch.behaviour_logprobs[env], torch.zeros(15)) and batch.versions[env].eq(-1).all()
    # every environment token is in input_ids (context), one position after the one that
    # predicts it, except a response's very last token (it predicts nothing)
    inside = 0
    for i, t in env.nonzero().tolist():
        if t + 1 < batch.input_ids.shape[1] and batch.input_ids[i, t + 1] != 0:
            assert batch.input_ids[i, t + 1] == nxt[i, t]
            inside += 1
    assert inside == 14  # the one observation that ends a response is not an input


# ------------------------------------------------------------------ free logits, every algorithm


class Leaky:
    """Free float64 logits [S, L, V] whose log-probs, entropy and proxy are computed at
    every position (environment ones too): only the mask can keep them out."""

    def __init__(self, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.nxt, self.model, self.env = layout()
        S, L = self.nxt.shape
        z = torch.randn(S, L, V, generator=g, dtype=torch.float64)
        z.scatter_add_(-1, self.nxt[..., None], torch.full((S, L, 1), 3.0, dtype=torch.float64))  # moderate lp
        # environment positions: flat (the highest entropy), one token filtered by min-p, and
        # the observed token at -6: the lowest probability, still inside the filter
        flat = torch.zeros(V, dtype=torch.float64)
        flat[0] = -30.0  # token 0 is never observed
        z[self.env] = flat
        z[self.env, self.nxt[self.env]] = -6.0
        self.z = z
        self.z_old = z + 0.05 * torch.randn(S, L, V, generator=g, dtype=torch.float64)
        self.w = torch.empty(S, L, dtype=torch.float64).uniform_(0.5, 2.0, generator=g)

    def logprobs(self, z: torch.Tensor, rows: slice = slice(None)) -> tuple[torch.Tensor, torch.Tensor]:
        """(log-prob of the next token, entropy) at every position of ``rows``."""
        logp = torch.log_softmax(z / TEMPERATURE, -1)
        return logp.gather(-1, self.nxt[rows][..., None])[..., 0], -(logp.exp() * logp).sum(-1)


def run_leaky(case, mask: torch.Tensor, perturb: bool = False, seed: int = 0, fused: bool = False):
    """(selected codes or None, total loss, grad w.r.t. the logits) from run_minibatch.
    ``fused``: the one-step path (no pi_old pass), importance weights formed inside from
    the batch's behaviour log-probs (0.0 at observations) with learner.off_policy=tis."""
    algo = build_algorithm(config(case))
    p = Leaky(seed)
    batch = build_batch(groups(), pad_id=0, scale_advantages=True)
    adv = batch.advantages[:, None].expand(mask.shape).to(torch.float64).clone()  # not masked: the mask must do it
    z, z_old, w = p.z.clone(), p.z_old.clone(), p.w.clone()
    if perturb:  # anything at all at environment positions
        g = torch.Generator().manual_seed(99)
        n = int(p.env.sum())
        z[p.env] = 40 * torch.randn(n, V, generator=g, dtype=torch.float64)
        z_old[p.env] = 40 * torch.randn(n, V, generator=g, dtype=torch.float64)
        w[p.env] = torch.rand(n, generator=g, dtype=torch.float64) * 100
        adv[p.env] = 50 * torch.randn(n, generator=g, dtype=torch.float64)
    old, _ = p.logprobs(z_old)
    proxy = minp_proxy_logprobs(z_old, p.nxt, KAPPA, TEMPERATURE) if algo.needs_proxy else None
    if perturb and proxy is not None:
        proxy[p.env] = 0.0  # every environment token "below its proxy"
    z = z.requires_grad_(True)

    def forward(rows: slice):
        lp, ent = p.logprobs(z[rows], rows)
        return lp, ent if algo.needs_entropy else None

    if fused:
        behaviour = batch.behaviour_logprobs.to(torch.float64)
        mini = MiniBatch(None, adv, mask, behaviour_logprobs=behaviour, off_policy="tis", is_cap=2.0)
    else:
        mini = MiniBatch(old, adv, mask, proxy_logprobs=proxy, is_weights=w, seed=7)
    metrics, selected = run_minibatch(algo, mini, forward, micro_batch_size=2, all_gather=local_all_gather, rank=0,
                                      max_len=16.0)
    return selected, metrics["loss/total"].detach(), z.grad, p


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_environment_tokens_are_never_selected_and_get_no_gradient(case):
    batch = build_batch(groups(), pad_id=0, scale_advantages=True)
    selected, loss, grad, p = run_leaky(case, batch.mask)
    assert torch.equal(batch.mask, p.model)
    algo = build_algorithm(config(case))
    if algo.needs_selection:
        assert (selected != 0).any(), "nothing selected: the case needs a selection"
        assert not (selected[p.env] != 0).any(), "an environment token was selected"
        if isinstance(config(case), LpRegConfig):
            assert ((selected == 1) | (selected == 2)).any(), "Lp-Reg regularised nothing"
    assert grad[p.env].abs().max() == 0.0, "gradient on an environment position"
    assert grad[~p.model].abs().max() == 0.0  # nor on the prompt or padding
    assert grad[p.model].abs().sum(-1).gt(0).sum() >= 5  # the model tokens are trained

    # the environment positions are the most selectable ones: with them in the mask (as if
    # build_batch had made them targets) they are selected and receive gradient
    lp, ent = p.logprobs(p.z)
    assert lp[p.env].max() < lp[p.model].min() and ent[p.env].min() > ent[p.model].max()
    leaked, _, leaked_grad, _ = run_leaky(case, batch.mask | p.env)
    if algo.needs_selection:
        assert (leaked[p.env] != 0).any()
    assert leaked_grad[p.env].abs().max() > 1e-6

    # and whatever they hold changes nothing, bit for bit
    again, loss2, grad2, _ = run_leaky(case, batch.mask, perturb=True)
    assert (again is None) == (selected is None) and (again is None or torch.equal(again, selected))
    assert torch.equal(loss2, loss) and torch.equal(grad2, grad)


FUSED = [(c, i) for c, i in zip(CASES, IDS) if not build_algorithm(config(c)).needs_selection]


@pytest.mark.parametrize("case", [c for c, _ in FUSED], ids=[i for _, i in FUSED])
def test_one_step_path_weights_no_environment_token(case):
    """pi_old = the training forward, pi_old / pi_behaviour taken inside run_minibatch:
    an observation's behaviour log-prob 0.0 would give it a weight exp(lp) there."""
    batch = build_batch(groups(), pad_id=0, scale_advantages=True)
    _, loss, grad, p = run_leaky(case, batch.mask, fused=True)
    assert grad[~p.model].abs().max() == 0.0 and grad[p.model].abs().sum() > 0
    _, loss2, grad2, _ = run_leaky(case, batch.mask, perturb=True, fused=True)
    assert torch.equal(loss2, loss) and torch.equal(grad2, grad)
    _, _, leaked, _ = run_leaky(case, batch.mask | p.env, fused=True)
    assert leaked[p.env].abs().max() > 1e-6


def test_broken_build_batch_is_caught(monkeypatch):
    """The check above, with build_batch's environment masking removed: it fails."""
    import asyncrl.learner.batch as batch_module

    monkeypatch.setattr(SampleArrays, "model_mask", lambda self: np.ones(len(self.token_ids), bool))
    leaky = batch_module.build_batch(groups(), pad_id=0, scale_advantages=True)
    _, _, grad, p = run_leaky(CASES[0], leaky.mask)
    assert grad[p.env].abs().max() > 0  # the assertion of the test above would fire


# ------------------------------------------------------------------ the tiny Qwen3 through Policy


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    from asyncrl.learner.policy import Policy
    from asyncrl.models import load_model

    d = make_tiny_model(tmp_path_factory.mktemp("env_tokens") / "model", initializer_range=0.3)
    return Policy(load_model(str(d), "float32"))


def by_hand() -> Batch:
    """The batch the contract describes, without build_batch: every token in input_ids,
    targets only where the model sampled, junk behaviour values at observations."""
    nxt, model, env = layout()
    S, L = nxt.shape
    ids = torch.zeros((S, L), dtype=torch.long)
    i = 0
    for prompt, samples in GROUPS:
        for runs, _ in samples:
            seq = prompt + [t for _, toks in runs for t in toks]
            ids[i, : len(seq) - 1] = torch.tensor(seq[:-1])
            i += 1
    ref = build_batch(groups(), pad_id=0, scale_advantages=True)  # advantages and rewards only
    junk = torch.where(env, -3.0, ref.behaviour_logprobs)
    return Batch(ids, torch.where(model, nxt, IGNORE_INDEX), junk, torch.where(env, 77, ref.versions),
                 ref.advantages, ref.rewards)


def policy_step(policy, case, batch: Batch, pack: int | None):
    """run_minibatch on the real Policy: (param grads, final-hidden grads [S, L, D], codes)."""
    algo = build_algorithm(config(case))
    policy.zero_grad(set_to_none=True)
    kappa = config(case).kappa if algo.needs_proxy else None
    with torch.no_grad():
        old, _, proxy = policy(batch.input_ids, batch.targets, temperature=TEMPERATURE, kappa=kappa,
                               pack_capacity=pack)
    hidden = []

    def keep(mod, args, out) -> None:  # the training forward's final hidden state, with its grad
        if out.last_hidden_state.requires_grad:
            out.last_hidden_state.retain_grad()
            hidden.append(out.last_hidden_state)

    hook = policy.lm.model.register_forward_hook(keep)
    try:
        def forward(rows: slice):
            lp, ent, _ = policy(batch.input_ids[rows], batch.targets[rows], temperature=TEMPERATURE,
                                with_entropy=algo.needs_entropy, pack_capacity=pack)
            return lp, ent

        mask = batch.mask
        adv = batch.advantages[:, None].expand(mask.shape) * mask
        mini = MiniBatch(old, adv, mask, proxy_logprobs=proxy, seed=3)
        _, selected = run_minibatch(algo, mini, forward, micro_batch_size=len(mask), all_gather=local_all_gather,
                                    rank=0, max_len=16.0)
    finally:
        hook.remove()
    grads = {n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None}
    return grads, (hidden[0].grad if pack is None else None), selected


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_real_policy_trains_on_model_tokens_with_environment_context(policy, case):
    batch = build_batch(groups(), pad_id=0, scale_advantages=True)
    nxt, model, env = layout()
    grads, hidden_grad, selected = policy_step(policy, case, batch, pack=None)
    assert selected is None or not (selected[env] != 0).any()
    # logits at position t are a function of the final hidden state at t alone
    assert hidden_grad[env].abs().max() == 0.0 and hidden_grad[model].abs().sum() > 0
    assert sum(float(g.abs().sum()) for g in grads.values()) > 0

    ref_grads, _, ref_selected = policy_step(policy, case, by_hand(), pack=None)
    assert grads.keys() == ref_grads.keys()
    assert all(torch.equal(grads[n], ref_grads[n]) for n in grads), "not the batch the contract describes"
    assert (selected is None and ref_selected is None) or torch.equal(selected, ref_selected)

    packed, _, _ = policy_step(policy, case, batch, pack=0)
    for n in grads:
        torch.testing.assert_close(packed[n], grads[n], rtol=1e-4, atol=1e-6)

    other = by_hand()  # other observations: the context changed, the targets did not
    shifted = other.input_ids.clone()
    seen = torch.zeros_like(env)
    seen[:, 1:] = env[:, :-1]  # the input position of each environment token
    shifted[seen] = (shifted[seen] + 5) % 19 + 2
    other.input_ids = shifted
    moved, _, _ = policy_step(policy, case, other, pack=None)
    assert max(float((moved[n] - grads[n]).abs().max()) for n in grads) > 1e-7
