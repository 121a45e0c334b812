"""The dense min-p proxy against a float64 reference that builds the renormalised
distribution explicitly (docs/lpreg.md section 2)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from asyncrl.algos.lpreg import minp_proxy_logprobs


def reference(logits, targets, kappa, temperature):
    """Keep p_v >= kappa * p_max under softmax(z) at T = 1, renormalise softmax(z / T)
    over the kept tokens, read the target's log-prob (-inf if dropped)."""
    out = np.empty(targets.shape)
    for i in np.ndindex(targets.shape):
        z = logits[i].astype(np.float64)
        p = np.exp(z - z.max())
        p /= p.sum()
        keep = p >= kappa * p.max()
        q = np.where(keep, np.exp((z - z.max()) / temperature), 0.0)
        q /= q.sum()
        y = targets[i]
        out[i] = math.log(q[y]) if keep[y] else -math.inf
    return out


def make(seed, shape, V, offset=0.0, spread=3.0):
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, spread, size=(*shape, V)) + offset
    targets = rng.integers(0, V, size=shape)
    # also target the arg-max and a surely-kept token half the time
    top = logits.argmax(-1)
    targets = np.where(rng.uniform(size=shape) < 0.5, top, targets)
    return logits, targets


@pytest.mark.parametrize("V", [7, 1009, 4099])  # primes: no chunk size divides V
@pytest.mark.parametrize("kappa", [0.0, 0.02, 0.3, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 0.6, 1.7])
def test_matches_reference(V, kappa, temperature):
    logits, targets = make(V, (3, 5), V)
    got = minp_proxy_logprobs(torch.tensor(logits), torch.tensor(targets), kappa, temperature).numpy()
    np.testing.assert_allclose(got, reference(logits, targets, kappa, temperature), rtol=1e-10, atol=1e-12)


def test_all_negative_logits_float32():
    logits, targets = make(1, (4, 6), 513, offset=-80.0)
    assert (logits < 0).all()
    got = minp_proxy_logprobs(torch.tensor(logits, dtype=torch.float32), torch.tensor(targets), 0.02, 0.6)
    assert got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), reference(logits.astype(np.float32), targets, 0.02, 0.6),
                               rtol=1e-5, atol=1e-5)


def test_kappa_extremes():
    logits, targets = make(2, (8,), 50)
    z, y = torch.tensor(logits), torch.tensor(targets)
    # kappa = 0: the proxy is the policy itself at temperature T
    full = torch.log_softmax(z / 0.6, -1).gather(-1, y[:, None])[:, 0]
    torch.testing.assert_close(minp_proxy_logprobs(z, y, 0.0, 0.6), full, rtol=0, atol=1e-12)
    # kappa = 1: only the arg-max survives, with all the mass
    got = minp_proxy_logprobs(z, y, 1.0, 0.6)
    is_top = y == z.argmax(-1)
    assert (got[is_top] == 0).all() and torch.isinf(got[~is_top]).all()


def test_filtered_is_minus_inf_and_kept_is_above_policy():
    logits, targets = make(3, (200,), 300)
    z, y = torch.tensor(logits), torch.tensor(targets)
    got = minp_proxy_logprobs(z, y, 0.02, 1.0)
    lp = torch.log_softmax(z, -1).gather(-1, y[:, None])[:, 0]
    kept = torch.isfinite(got)
    assert (~kept).any() and kept.any()
    assert (got[kept] >= lp[kept]).all()  # renormalising only adds mass
    assert (got[~kept] == -math.inf).all()


@pytest.mark.parametrize("chunk", [64, 500])  # neither divides V = 1009
@pytest.mark.parametrize("kappa", [0.0, 0.02, 1.0])
def test_chunked_kernel_agrees_with_dense(chunk, kappa):
    """The learner's chunked kernel has the semantics of this dense reference."""
    from asyncrl.kernels import torch_chunked

    g = torch.Generator().manual_seed(chunk)
    hidden = torch.randn(24, 16, generator=g) * 2
    weight = torch.randn(1009, 16, generator=g)
    targets = torch.randint(0, 1009, (24,), generator=g)
    targets[::2] = (hidden @ weight.T).argmax(-1)[::2]
    dense = minp_proxy_logprobs(hidden @ weight.T, targets, kappa, 0.7)
    got = torch_chunked.proxy_logprobs(hidden, weight, targets, kappa, 0.7, chunk=chunk)
    assert torch.equal(torch.isinf(got), torch.isinf(dense))
    fin = torch.isfinite(dense)
    torch.testing.assert_close(got[fin], dense[fin], rtol=1e-5, atol=1e-5)
