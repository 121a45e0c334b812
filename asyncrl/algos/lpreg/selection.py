"""Lp-Reg's global token selection (docs/lpreg.md 3.2 with the scope of 5.2).

Among valid tokens with ``A < 0`` in the whole optimisation mini-batch (all
micro-batches, all ranks) take the ``k = floor(rho * N_neg)`` with the lowest
current log-prob, ties to the earlier token (none when ``rho * N_neg < 1``: k is
never rounded up); of those keep only tokens with
``lp < lp_proxy`` strictly, so filtered tokens (``-inf`` proxy) never qualify. The
same rule with ``rho_pos`` for ``A > 0``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from asyncrl.algos.base import AllGather, SelectInputs
from asyncrl.algos.selection import global_lowest

# int8 codes returned by select(); the loss regularises REG_NEG and REG_POS.
NONE = 0
REG_NEG = 1  # screened, negative advantage, lp < lp_proxy: regularised
REG_POS = 2  # screened, positive advantage, lp < lp_proxy: regularised
SCREENED_NEG = 3  # among the k lowest but lp >= lp_proxy or filtered: plain clipped PG
SCREENED_POS = 4


def is_regularised(codes: Tensor) -> Tensor:
    """Bool mask of tokens that get the Lp-Reg term."""
    return (codes == REG_NEG) | (codes == REG_POS)


def lpreg_select(x: SelectInputs, all_gather: AllGather, *, rho: float, rho_pos: float) -> Tensor:
    """int8 codes [N] for this rank's valid tokens (see the module docstring)."""
    if x.proxy_logprobs is None:
        raise ValueError("Lp-Reg selection needs proxy_logprobs (needs_proxy is True)")
    lp = x.logprobs.detach()
    below = lp < x.proxy_logprobs  # -inf proxy: never
    codes = torch.zeros(lp.shape, dtype=torch.int8, device=lp.device)
    screened = global_lowest(lp, x.advantages < 0, rho, all_gather, x.rank, at_least_one=False)
    codes[screened] = SCREENED_NEG
    codes[screened & below] = REG_NEG
    if rho_pos > 0.0:
        screened = global_lowest(lp, x.advantages > 0, rho_pos, all_gather, x.rank, at_least_one=False)
        codes[screened] = SCREENED_POS
        codes[screened & below] = REG_POS
    return codes
