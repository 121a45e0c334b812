"""The learner's shortcuts in run_minibatch change nothing: fused old log-probs
(old_logprobs=None) and reused current log-probs for selection give the same
gradient and selection as the explicit passes."""

import torch

from asyncrl.algos import build_algorithm
from asyncrl.algos.config import GRPOConfig, LpRegConfig
from asyncrl.algos.minibatch import MiniBatch, run_minibatch


def _setup(seed=0, B=6, T=9):
    g = torch.Generator().manual_seed(seed)
    theta = torch.randn(B, T, generator=g, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(B, T, generator=g) > 0.2
    adv = torch.randn(B, generator=g, dtype=torch.float64)[:, None].expand(B, T) * mask
    proxy = torch.where(torch.rand(B, T, generator=g) > 0.3, -torch.rand(B, T, generator=g, dtype=torch.float64) * 0.5,
                        torch.tensor(float("-inf"), dtype=torch.float64))

    def forward(rows):
        return torch.nn.functional.logsigmoid(theta[rows]), None

    return theta, mask, adv, proxy, forward


def _grad(algo, mb, forward, theta, **kw):
    theta.grad = None
    _, sel = run_minibatch(algo, mb, forward, micro_batch_size=2, all_gather=lambda t: t, rank=0, **kw)
    return theta.grad.clone(), sel


def test_fused_old_logprobs_equal_explicit_on_policy():
    theta, mask, adv, _, forward = _setup()
    algo = build_algorithm(GRPOConfig())
    old = forward(slice(None))[0].detach()
    g_explicit, _ = _grad(algo, MiniBatch(old, adv, mask), forward, theta)
    g_fused, _ = _grad(algo, MiniBatch(None, adv, mask), forward, theta)
    assert g_explicit.abs().sum() > 0
    torch.testing.assert_close(g_fused, g_explicit, rtol=0, atol=1e-12)


def test_reused_current_logprobs_equal_selection_pass():
    theta, mask, adv, proxy, forward = _setup(1)
    algo = build_algorithm(LpRegConfig(rho=0.5, kappa=0.1))
    old = forward(slice(None))[0].detach()
    mb = MiniBatch(old, adv, mask, proxy_logprobs=proxy)
    g_pass, sel_pass = _grad(algo, mb, forward, theta)
    g_reuse, sel_reuse = _grad(algo, mb, forward, theta, current=(old, None))
    assert (sel_pass > 0).any()
    assert torch.equal(sel_pass, sel_reuse)
    torch.testing.assert_close(g_reuse, g_pass, rtol=0, atol=1e-12)


def test_fused_path_applies_behaviour_weights():
    """On the fused path (old_logprobs None) the importance weight pi_old / pi_behaviour
    is taken from the training forward itself: the same gradient as the explicit pass
    with precomputed weights, for tis and decoupled, and not the unweighted one."""
    from asyncrl.algos.offpolicy import behaviour_weights

    theta, mask, adv, _, forward = _setup(3)
    algo = build_algorithm(GRPOConfig())
    old = forward(slice(None))[0].detach()
    g = torch.Generator().manual_seed(1)
    behaviour = old + 0.5 * torch.randn(old.shape, generator=g, dtype=torch.float64)  # another engine's numerics
    g_plain, _ = _grad(algo, MiniBatch(None, adv, mask), forward, theta)
    for mode in ("tis", "decoupled"):
        w = behaviour_weights(old, behaviour, mask, mode, 1.5)
        assert ((w > 0) & (w != 1)).any() and (mode == "tis" or ((w == 0) & mask).any())
        g_explicit, _ = _grad(algo, MiniBatch(old, adv, mask, is_weights=w), forward, theta)
        g_fused, _ = _grad(algo, MiniBatch(None, adv, mask, behaviour_logprobs=behaviour, off_policy=mode,
                                           is_cap=1.5), forward, theta)
        torch.testing.assert_close(g_fused, g_explicit, rtol=0, atol=1e-12)
        assert not torch.allclose(g_fused, g_plain)
