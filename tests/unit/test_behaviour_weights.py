"""Off-policy correction weights pi_old / pi_behaviour: truncated for tis, tokens above
the cap dropped for decoupled, none for none; padding always 0."""

import math

import torch

from asyncrl.learner.train import behaviour_weights


def test_weights_per_mode():
    old = torch.tensor([[math.log(0.5), math.log(0.9), math.log(0.6), 0.0]])
    behaviour = torch.tensor([[math.log(0.5), math.log(0.1), math.log(0.3), -5.0]])
    mask = torch.tensor([[True, True, True, False]])
    w = torch.tensor([1.0, 9.0, 2.0])  # exact ratios of the valid tokens
    tis = behaviour_weights(old, behaviour, mask, "tis", cap=5.0)
    dec = behaviour_weights(old, behaviour, mask, "decoupled", cap=5.0)
    torch.testing.assert_close(tis[0, :3], torch.minimum(w, torch.tensor(5.0)))
    torch.testing.assert_close(dec[0, :3], torch.where(w <= 5.0, w, torch.tensor(0.0)))
    assert tis[0, 3] == 0 and dec[0, 3] == 0
    assert behaviour_weights(old, behaviour, mask, "none", cap=5.0) is None


def test_dropped_weights_are_zero_not_nan():
    """A log-ratio above ~88 (float32 exp overflows) or a behaviour log-prob of -inf
    gives w = inf: decoupled drops the token (0), tis truncates it (cap); never NaN."""
    old = torch.tensor([[-0.1, -0.2, -0.3, -0.4]])
    behaviour = torch.tensor([[-0.1, -100.0, float("-inf"), -0.4]])
    mask = torch.tensor([[True, True, True, True]])
    dec = behaviour_weights(old, behaviour, mask, "decoupled", cap=5.0)
    tis = behaviour_weights(old, behaviour, mask, "tis", cap=5.0)
    assert torch.isfinite(dec).all() and torch.isfinite(tis).all()
    torch.testing.assert_close(dec, torch.tensor([[1.0, 0.0, 0.0, 1.0]]))
    torch.testing.assert_close(tis, torch.tensor([[1.0, 5.0, 5.0, 1.0]]))
