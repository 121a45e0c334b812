"""asyncrl.kernels against a float64 dense oracle (PyTorch twin, CPU).

Errors are measured as max|x - ref| / max|ref| per tensor (forward values and
gradients); float32 inputs must be within 1e-5 of the float64 oracle. The same
cases run on the Triton kernels under TRITON_INTERPRET=1 in
test_kernels_triton_interp.py, which loads the oracle from this file.
"""

import math

import pytest
import torch

from asyncrl.kernels import IGNORE_INDEX, token_logprobs, token_proxy_logprobs, torch_chunked

FP32_TOL = 1e-5


# ----------------------------------------------------------------------------- oracle
def dense_oracle(hidden, weight, targets, temperature=1.0):
    """Explicit float64 logits -> (logprobs, entropy); ignored rows give 0."""
    z = hidden.double() @ weight.double().T  # (N, V)
    logp = torch.log_softmax(z / temperature, dim=-1)
    valid = targets != IGNORE_INDEX
    lp = logp.gather(1, targets.clamp(min=0)[:, None]).squeeze(1)
    ent = -(logp.exp() * logp).sum(-1)
    return torch.where(valid, lp, 0.0), torch.where(valid, ent, 0.0)


def dense_proxy_oracle(hidden, weight, targets, kappa, temperature=1.0):
    """Min-p proxy built explicitly: keep z >= max z + ln kappa, renormalise z/T over it."""
    z = hidden.double() @ weight.double().T
    m = z.amax(-1, keepdim=True)
    thr = m + (math.log(kappa) if kappa > 0 else -math.inf)
    keep = z >= thr
    q = torch.log_softmax((z / temperature).masked_fill(~keep, -math.inf), dim=-1)
    out = q.gather(1, targets.clamp(min=0)[:, None]).squeeze(1)
    return torch.where(targets != IGNORE_INDEX, out, 0.0)


def rel_err(x, ref):
    x, ref = x.double(), ref.double()
    return ((x - ref).abs().max() / ref.abs().max().clamp(min=1e-30)).item()


def make_case(n=37, d=48, v=1001, *, negative=False, scale=0.3, n_ignore=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g)
    w = torch.randn(v, d, generator=g) * scale
    if negative:  # every logit < 0: h > 0, w < 0
        h, w = h.abs(), -w.abs()
    t = torch.randint(0, v, (n,), generator=g)
    t[torch.randperm(n, generator=g)[:n_ignore]] = IGNORE_INDEX
    return h, w, t


def check_against_oracle(impl, h, w, t, *, temperature=1.0, with_entropy=True, seed=1):
    """Forward values and gradients (through logprob and entropy) vs the oracle."""
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(len(t), generator=g), torch.randn(len(t), generator=g)

    h1, w1 = h.clone().requires_grad_(), w.clone().requires_grad_()
    lp, ent = token_logprobs(h1, w1, t, temperature=temperature, with_entropy=with_entropy, impl=impl)
    assert lp.dtype == torch.float32 and lp.shape == t.shape
    loss = (a * lp).sum() + ((b * ent).sum() if with_entropy else 0.0)
    loss.backward()

    h2, w2 = h.double().requires_grad_(), w.double().requires_grad_()
    lp_ref, ent_ref = dense_oracle(h2, w2, t, temperature)
    ((a.double() * lp_ref).sum() + ((b.double() * ent_ref).sum() if with_entropy else 0.0)).backward()

    ignored = t == IGNORE_INDEX
    assert (lp[ignored] == 0).all()
    errs = {"logprobs": rel_err(lp, lp_ref), "dX": rel_err(h1.grad, h2.grad), "dW": rel_err(w1.grad, w2.grad)}
    if with_entropy:
        assert ent.dtype == torch.float32 and (ent[ignored] == 0).all()
        errs["entropy"] = rel_err(ent, ent_ref)
    else:
        assert ent is None
    bad = {k: e for k, e in errs.items() if not e <= FP32_TOL}
    assert not bad, f"relative error above {FP32_TOL}: {bad}"
    return errs


def check_proxy(impl, h, w, t, *, kappa, temperature=1.0):
    out = token_proxy_logprobs(h, w, t, kappa=kappa, temperature=temperature, impl=impl)
    ref = dense_proxy_oracle(h, w, t, kappa, temperature)
    assert out.dtype == torch.float32
    filtered = torch.isinf(ref)
    assert torch.equal(torch.isinf(out), filtered), "different tokens filtered than the oracle"
    if (~filtered).any():
        assert rel_err(out[~filtered], ref[~filtered]) <= FP32_TOL
    return out, ref


# ----------------------------------------------------------------------------- cases
# Shared with the interpreter module: (name, kwargs for make_case, temperature, chunk override)
LOGPROB_CASES = [
    ("ragged", {}, 1.0),
    ("temperature", {}, 0.7),
    ("hot", {"scale": 1.5}, 1.6),
    ("all_negative", {"negative": True}, 1.0),
    ("no_ignore", {"n_ignore": 0, "n": 16, "v": 300}, 1.0),
]


@pytest.fixture(params=[None, 128], ids=["one_chunk", "chunk128"])
def twin_chunk(request, monkeypatch):
    monkeypatch.setattr(torch_chunked, "CHUNK_OVERRIDE", request.param)
    return request.param


@pytest.mark.parametrize("name,case,temperature", LOGPROB_CASES, ids=[c[0] for c in LOGPROB_CASES])
def test_twin_logprobs_entropy_and_grads(twin_chunk, name, case, temperature):
    check_against_oracle("torch", *make_case(**case), temperature=temperature)


def test_twin_without_entropy(twin_chunk):
    check_against_oracle("torch", *make_case(), with_entropy=False)


def test_twin_all_negative_logits_really_negative():
    h, w, _ = make_case(negative=True)
    assert (h @ w.T).max() < 0


def test_twin_entropy_only_gradient(twin_chunk):
    """Gradient flows through the entropy output alone (entropy bonus)."""
    h, w, t = make_case()
    h1 = h.clone().requires_grad_()
    _, ent = token_logprobs(h1, w, t, with_entropy=True, temperature=0.9, impl="torch")
    ent.sum().backward()
    h2 = h.double().requires_grad_()
    dense_oracle(h2, w, t, 0.9)[1].sum().backward()
    assert rel_err(h1.grad, h2.grad) <= FP32_TOL


def test_twin_bf16_inputs_float32_outputs():
    h, w, t = make_case()
    hb, wb = h.bfloat16().requires_grad_(), w.bfloat16().requires_grad_()
    lp, ent = token_logprobs(hb, wb, t, with_entropy=True, impl="torch")
    assert lp.dtype == ent.dtype == torch.float32
    (lp.sum() + ent.sum()).backward()
    assert hb.grad.dtype == wb.grad.dtype == torch.bfloat16
    lp_ref, _ = dense_oracle(hb.detach(), wb.detach(), t)  # oracle on the bf16-rounded inputs
    assert rel_err(lp, lp_ref) <= FP32_TOL


def test_twin_tied_embeddings():
    """One parameter used as embedding and lm_head receives both gradients."""
    g = torch.Generator().manual_seed(3)
    v, d, n = 300, 32, 20
    w = (torch.randn(v, d, generator=g) * 0.3)
    ids = torch.randint(0, v, (n,), generator=g)
    t = torch.randint(0, v, (n,), generator=g)

    w1 = w.clone().requires_grad_()
    hid = torch.tanh(w1[ids] * 2.0)
    token_logprobs(hid, w1, t, impl="torch")[0].sum().backward()
    w2 = w.double().requires_grad_()
    dense_oracle(torch.tanh(w2[ids] * 2.0), w2, t)[0].sum().backward()
    assert rel_err(w1.grad, w2.grad) <= FP32_TOL


def test_twin_ignore_rows_have_no_gradient():
    h, w, t = make_case(n_ignore=5)
    h1 = h.clone().requires_grad_()
    lp, ent = token_logprobs(h1, w, t, with_entropy=True, impl="torch")
    (lp.sum() + ent.sum()).backward()
    assert (h1.grad[t == IGNORE_INDEX] == 0).all()


PROXY_CASES = [("kappa0", 0.0, 1.0), ("kappa0.05", 0.05, 1.0), ("kappa0.2_T", 0.2, 0.8),
               ("kappa1", 1.0, 1.0), ("kappa1_T", 1.0, 1.3)]


def proxy_case(kappa, seed=0):
    h, w, t = make_case(scale=0.5, seed=seed)
    z = h @ w.T
    t[::4] = z.argmax(-1)[::4]  # some targets are the argmax, so kappa=1 keeps them
    t[1] = IGNORE_INDEX
    return h, w, t


@pytest.mark.parametrize("name,kappa,temperature", PROXY_CASES, ids=[c[0] for c in PROXY_CASES])
def test_twin_proxy(twin_chunk, name, kappa, temperature):
    h, w, t = proxy_case(kappa)
    out, ref = check_proxy("torch", h, w, t, kappa=kappa, temperature=temperature)
    assert out[1] == 0
    if kappa == 0:  # keeps everything: plain log-softmax at T
        lp, _ = token_logprobs(h, w, t, temperature=temperature, impl="torch")
        assert rel_err(out, lp) <= FP32_TOL
    if kappa == 1:  # only the argmax: log 1 = 0 where the target is the argmax
        assert (out[::4][t[::4] != IGNORE_INDEX] == 0).all()
    if 0 < kappa < 1:
        assert torch.isinf(ref).any() and (~torch.isinf(ref)).sum() > 5, "case should filter some, keep some"


def test_proxy_all_negative(twin_chunk):
    h, w, t = make_case(negative=True)
    check_proxy("torch", h, w, t, kappa=0.1)


def test_dispatch_and_validation(monkeypatch):
    h, w, t = make_case(n=4, v=10)
    assert token_logprobs(h, w, t)[1] is None  # CPU -> torch twin
    with pytest.raises(ValueError, match="impl must be one of"):
        token_logprobs(h, w, t, impl="cuda")
    with pytest.raises(ValueError, match="weight"):
        token_logprobs(h, w[:, :3], t)
    with pytest.raises(ValueError, match="kappa"):
        token_proxy_logprobs(h, w, t, kappa=2.0)
    monkeypatch.setenv("ASYNCRL_KERNELS_IMPL", "bogus")
    with pytest.raises(ValueError, match="bogus"):
        token_logprobs(h, w, t)


# ----------------------------------------------------------------------------- chunk size at real sizes
@pytest.mark.parametrize("n", [1, 100, 4096, 16384, 16385, 20000, 100_000, 1_000_000])
@pytest.mark.parametrize("vocab", [21, 1000, 32_000, 151_936, 262_144])
def test_default_chunk_bounds(n, vocab):
    """What default_chunk promises at any size, real ones included (a micro-batch of
    20,000 tokens over Qwen's 151,936-token vocabulary): at least one column, at most
    the vocabulary, a multiple of 256 unless it is the whole vocabulary, never below
    1024 columns (efficient matmuls) and an [N, chunk] float32 buffer within
    max(16 MiB, N x 4 KiB)."""
    chunk = torch_chunked.default_chunk(n, vocab)
    assert 1 <= chunk <= vocab
    assert chunk == vocab or chunk % 256 == 0
    assert chunk >= min(1024, vocab) and chunk <= 32768
    assert n * chunk * 4 <= max(16 * 2**20, n * 1024 * 4)


def test_kernels_at_20000_tokens_with_the_default_chunk():
    """The kernels run with the chunk default_chunk picks for 20,000 tokens (rows past
    16,384 used to round the chunk down to nothing): log-probs, entropy, gradients and
    the proxy of a sample of rows against the float64 oracle. V = 2,304 gives ragged
    chunks (1,024, 1,024, 256)."""
    assert torch_chunked.CHUNK_OVERRIDE is None
    n, v = 20_000, 2_304
    chunk = torch_chunked.default_chunk(n, v)
    assert 1 <= chunk < v  # several chunks
    h, w, t = make_case(n=n, d=8, v=v, scale=1.0, n_ignore=50, seed=4)
    rows = torch.randperm(n, generator=torch.Generator().manual_seed(0))[:400]
    a = torch.zeros(n)
    a[rows] = torch.randn(len(rows), generator=torch.Generator().manual_seed(1))

    h1, w1 = h.clone().requires_grad_(), w.clone().requires_grad_()
    lp, ent = token_logprobs(h1, w1, t, temperature=0.8, with_entropy=True, impl="torch")
    ((a * lp).sum() + (a * ent).sum()).backward()
    h2, w2 = h[rows].double().requires_grad_(), w.double().requires_grad_()
    lp_ref, ent_ref = dense_oracle(h2, w2, t[rows], 0.8)
    ((a[rows].double() * lp_ref).sum() + (a[rows].double() * ent_ref).sum()).backward()
    for name, got, ref in (("logprobs", lp[rows], lp_ref), ("entropy", ent[rows], ent_ref),
                           ("dX", h1.grad[rows], h2.grad), ("dW", w1.grad, w2.grad)):
        assert rel_err(got, ref) <= FP32_TOL, name
    scored = (a != 0) & (t != IGNORE_INDEX)
    assert torch.equal(h1.grad.abs().sum(-1) != 0, scored)  # no gradient on the other rows

    proxy = token_proxy_logprobs(h, w, t, kappa=0.05, temperature=0.8, impl="torch")
    ref = dense_proxy_oracle(h[rows], w, t[rows], 0.05, 0.8)
    got = proxy[rows]
    assert torch.equal(torch.isinf(got), torch.isinf(ref))
    kept = ~torch.isinf(ref)
    assert kept.any() and rel_err(got[kept], ref[kept]) <= FP32_TOL
