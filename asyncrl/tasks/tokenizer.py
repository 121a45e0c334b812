"""A character-level tokenizer for the built-in tasks, saved in Hugging Face format
(``tokenizer.json``) so transformers, vLLM and SGLang load it like any other."""

from __future__ import annotations

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

PAD, EOS = "<pad>", "<eos>"
CHARS = "0123456789+-*=;#() "


def build_char_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {PAD: 0, EOS: 1} | {c: i + 2 for i, c in enumerate(CHARS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=PAD))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, eos_token=EOS)
