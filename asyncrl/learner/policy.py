"""The policy as the learner sees it: per-token quantities from a causal LM, computed
through the chunked-logit kernels so [tokens, vocab] logits are never materialised."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from asyncrl.kernels import IGNORE_INDEX, token_logprobs, token_proxy_logprobs


class Policy(nn.Module):
    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm  # a transformers *ForCausalLM: .model (decoder) and .lm_head

    def forward(
        self, input_ids: Tensor, targets: Tensor, *, temperature: float, with_entropy: bool = False,
        kappa: float | None = None,
    ) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """input_ids, targets [B, L] (targets = next token, IGNORE_INDEX where not scored).

        Returns (logprobs, entropy or None, proxy log-probs or None), each [B, L] float32,
        zero (proxy: -inf) at ignored positions. Right padding needs no attention mask:
        causal attention never lets a real token see the padding after it.
        """
        hidden = self.lm.model(input_ids=input_ids).last_hidden_state  # (B, L, D)
        mask = targets != IGNORE_INDEX
        h, y = hidden[mask], targets[mask]  # (N, D), (N,)
        weight = self.lm.lm_head.weight  # unsharded here: we run inside the FSDP root's forward
        lp, ent = token_logprobs(h, weight, y, temperature=temperature, with_entropy=with_entropy)
        zeros = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
        lp_full = zeros.masked_scatter(mask, lp)
        ent_full = zeros.masked_scatter(mask, ent) if with_entropy else None
        proxy_full = None
        if kappa is not None:
            with torch.no_grad():
                proxy = token_proxy_logprobs(h.detach(), weight.detach(), y, kappa=kappa, temperature=temperature)
            proxy_full = torch.full_like(zeros, float("-inf")).masked_scatter(mask, proxy)
        return lp_full, ent_full, proxy_full
