"""Tiny random models and an offline tokenizer for fast CPU tests."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from memtune.config import MemoryConfig

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
_CORPUS = [
    "The capital of France is Paris. The capital of Italy is Rome.",
    "What is the currency of Japan? The yen. Which region is Chile in? South America.",
    "Python is a programming language; a function returns a value and a class defines objects.",
    "0 1 2 3 4 5 6 7 8 9 abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ .,;:!?'\"()-",
]
_SPECIAL = ["<unk>", "<|end|>", "<|user|>", "<|assistant|>", "<|system|>", "<pad>"]


def tiny_tokenizer(vocab_size: int = 320, chat: bool = True) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on a few sentences: encodes any text, offline, in milliseconds."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=_SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(_CORPUS, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", eos_token="<|end|>", pad_token="<pad>", padding_side="left"
    )
    if chat:
        fast.chat_template = CHAT_TEMPLATE
    return fast


# The Llama-3 pattern: the template writes BOS itself, and turns end with a token that is not EOS.
BOS_CHAT_TEMPLATE = "{{ bos_token }}" + CHAT_TEMPLATE


def bos_tokenizer(template: str | None = BOS_CHAT_TEMPLATE) -> PreTrainedTokenizerFast:
    """A tokenizer that prepends BOS `<s>` to plain text, whose EOS `<|endoftext|>` is not the
    `<|end|>` that closes a chat turn (Llama-3, Qwen2.5 base, Gemma). Its ids reach 322: use
    `tiny_model(vocab_size=BOS_VOCAB)`."""
    from tokenizers import processors

    tok = tiny_tokenizer()
    tok.add_special_tokens({"bos_token": "<s>", "eos_token": "<|endoftext|>"})
    tok._tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.bos_token_id)])
    tok.chat_template = template
    return tok


BOS_VOCAB = 324


def tiny_model(
    arch: str = "llama", vocab_size: int = 320, hidden: int = 32, layers: int = 2, seed: int = 0,
    init_range: float = 0.02,
):
    """A random 2-layer Llama or Qwen2 causal LM (float32, eval mode). A larger `init_range`
    gives larger logits, so that a test can see a model learn."""
    torch.manual_seed(seed)
    common = dict(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        pad_token_id=5, eos_token_id=1, bos_token_id=None, tie_word_embeddings=False, initializer_range=init_range,
    )
    if arch == "llama":
        return LlamaForCausalLM(LlamaConfig(**common)).eval()
    if arch == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(**common)).eval()
    raise ValueError(arch)


def tiny_memory_config(**overrides) -> MemoryConfig:
    """A few hundred slots: 16² = 256."""
    kw = dict(layers=[1], n_keys=16, heads=2, knn=4, k_dim=8)
    kw.update(overrides)
    return MemoryConfig(**kw)


def save_tiny_model(path: Path, arch: str = "llama") -> Path:
    """A tiny model folder loadable by `memtune.models.load_model(str(path))`."""
    tiny_model(arch).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def cli_error(args: list[str], capsys, message: str) -> str:
    """Run `memtune ARGS`; assert it fails with a one-line error containing `message`."""
    from memtune.cli import main

    try:
        code = main(args)
    except SystemExit as e:  # argparse's own errors
        code = e.code
    err = capsys.readouterr().err.strip()
    assert code != 0, err
    assert message in err, err
    assert err.count("\n") == 0, err
    return err
