"""The policy as the learner sees it: per-token quantities from a causal LM, computed
through the chunked-logit kernels so [tokens, vocab] logits are never materialised."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from asyncrl.generator.hf import DECODE_ATTENTION
from asyncrl.kernels import IGNORE_INDEX, token_logprobs, token_proxy_logprobs
from asyncrl.learner.attention import SDPA_VARLEN
from asyncrl.learner.packing import Packed, pack, unpack
from asyncrl.learner.shared_prompts import pack_shared


class Policy(nn.Module):
    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm  # a transformers *ForCausalLM: .model (decoder) and .lm_head
        # the same sdpa, plus packed rows' spans (also for a model an hf engine switched to
        # its decode-step sdpa: asyncrl.warmstart evaluates the model it trains)
        if lm.config._attn_implementation in ("sdpa", DECODE_ATTENTION):
            lm.set_attn_implementation(SDPA_VARLEN)

    def forward(
        self, input_ids: Tensor, targets: Tensor, *, temperature: float, with_entropy: bool = False,
        kappa: float | None = None, pack_capacity: int | None = None, share_prompts: bool = False,
    ) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """input_ids, targets [B, L] (targets = next token, IGNORE_INDEX where not scored).

        Returns (logprobs, entropy or None, proxy log-probs or None), each [B, L] float32,
        zero (proxy: -inf) at ignored positions. Right padding needs no attention mask:
        causal attention never lets a real token see the padding after it.
        ``pack_capacity`` (not None): the decoder runs on the samples packed into rows of
        that many tokens (0 = all in one row; ``asyncrl.learner.packing``); the results
        come back in the same [B, L] layout. ``share_prompts`` (with packing, where
        :attr:`shares_prompts`): a group's samples share one copy of their prompt in
        the packed rows (``asyncrl.learner.shared_prompts``).
        """
        shape, mask = targets.shape, targets != IGNORE_INDEX

        def scatter(v: Tensor, fill: float) -> Tensor:  # values of the scored positions -> (B, L)
            return torch.full(shape, fill, dtype=v.dtype, device=v.device).masked_scatter(mask, v)

        if pack_capacity is None:
            hidden = self.lm.model(input_ids=input_ids, use_cache=False).last_hidden_state  # (B, L, D)
            h, y, place = hidden[mask], targets[mask], scatter  # (N, D), (N,)
        elif share_prompts and self.shares_prompts:
            packed = pack_shared(input_ids, targets, pad_id=0, capacity=pack_capacity)
            hidden = self.lm.model(input_ids=packed.input_ids, position_ids=packed.position_ids, use_cache=False,
                                   attention_mask={"full_attention": None},
                                   prompt_spans=packed.attention).last_hidden_state  # (R, C, D)
            h = hidden.reshape(-1, hidden.shape[-1]).index_select(0, packed.slots[mask])  # shared slots repeat
            y, place = targets[mask], scatter
        else:
            packed = pack(input_ids, targets, pad_id=0, capacity=pack_capacity)
            hidden = self.lm.model(input_ids=packed.input_ids, position_ids=packed.position_ids, use_cache=False,
                                   **self._packed_attention(packed)).last_hidden_state  # (R, C, D)
            packed_mask = packed.targets != IGNORE_INDEX
            h, y = hidden[packed_mask], packed.targets[packed_mask]

            def place(v: Tensor, fill: float) -> Tensor:
                return unpack(v, packed, shape, fill)
        weight = self.lm.lm_head.weight  # unsharded here: we run inside the FSDP root's forward
        lp, ent = token_logprobs(h, weight, y, temperature=temperature, with_entropy=with_entropy)
        lp_full = place(lp, 0.0)
        ent_full = place(ent, 0.0) if with_entropy else None
        proxy_full = None
        if kappa is not None:
            with torch.no_grad():
                proxy = token_proxy_logprobs(h.detach(), weight.detach(), y, kappa=kappa, temperature=temperature)
            proxy_full = place(proxy, float("-inf"))
        return lp_full, ent_full, proxy_full

    @property
    def shares_prompts(self) -> bool:
        """Whether packed rows can share prompts: only ``SDPA_VARLEN`` spans express a
        context, and only on full-attention layers (a context is not a window)."""
        config = self.lm.config
        layer_types = set(getattr(config, "layer_types", None) or ["full_attention"])
        return config._attn_implementation == SDPA_VARLEN and layer_types == {"full_attention"}

    def _packed_attention(self, packed: Packed) -> dict:
        """The decoder's extra arguments for packed rows: the spans for SDPA_VARLEN, and
        no mask to build (a dict of prepared masks skips that). Other implementations,
        and sliding-window layers (a span is not a window), get transformers' block-
        diagonal masks, derived from the restarting position ids."""
        if not self.shares_prompts:  # the same condition: SDPA_VARLEN on full-attention layers
            return {}
        return {"attention_mask": {"full_attention": None}, "cu_seq_lens_q": packed.cu_seq_lens}
