"""A character-level tokenizer for the built-in tasks, saved in Hugging Face format
(``tokenizer.json``) so transformers, vLLM and SGLang load it like any other."""

from __future__ import annotations

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

PAD, EOS = "<pad>", "<eos>"
CHARS = "0123456789+-*=;#() "
# Printable ASCII (space and newline as the only whitespace): what the reasoning-gym
# bases read, so one vocabulary covers compact prompts, answer tags and full questions.
ASCII = "".join(chr(c) for c in range(32, 127)) + "\n"
# Chat messages render to the bare user contents (no role markers, nothing for the generation
# prompt), so a veRL-layout row tokenizes to the same ids as the raw prompt.
CHAT_TEMPLATE = "{% for message in messages %}{% if message['role'] == 'user' %}{{ message['content'] }}{% endif %}{% endfor %}"


def build_char_tokenizer(chars: str = CHARS) -> PreTrainedTokenizerFast:
    """One token per character of ``chars`` after <pad> and <eos>; any other character reads as <pad>."""
    vocab = {PAD: 0, EOS: 1} | {c: i + 2 for i, c in enumerate(dict.fromkeys(chars))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=PAD))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    out = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, eos_token=EOS)
    out.chat_template = CHAT_TEMPLATE
    return out
