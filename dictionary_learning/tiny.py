"""Small language models and text built on this machine, with no download.

For the offline examples and the tests: a byte-level BPE tokenizer trained in about a
second on local text, and a randomly initialised causal LM of a chosen architecture
(GPTNeoX/Pythia, GPT-2 or Llama) wrapped for nnsight. Random weights give activations
with no meaning; they exercise every code path at the cost of a real model's shapes.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Iterator
from itertools import islice

import torch

ARCHITECTURES = ("pythia", "gpt2", "llama")


def stdlib_texts(min_chars: int = 40) -> Iterator[str]:
    """Docstrings of the Python standard library: real English text already on disk.

    Deterministic order; each docstring is one document.
    """
    import sys

    seen = set()
    names = sorted(set(sys.stdlib_module_names))
    for name in names:
        if name.startswith("_") or name in {"antigravity", "this", "idlelib", "tkinter", "turtle",
                                             "turtledemo", "lib2to3", "ensurepip", "venv"}:
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                module = __import__(name)
            except Exception:  # noqa: BLE001 - any stdlib module may fail to import here
                continue
        for obj in [module, *(v for _, v in sorted(vars(module).items()))]:
            if not (inspect.ismodule(obj) or inspect.isclass(obj) or inspect.isfunction(obj)):
                continue
            with warnings.catch_warnings():  # typing.io & co. warn when touched
                warnings.simplefilter("ignore", DeprecationWarning)
                doc = inspect.getdoc(obj)
            if doc and len(doc) >= min_chars and doc not in seen:
                seen.add(doc)
                yield doc


def train_tokenizer(texts: list[str], vocab_size: int = 512):
    """A byte-level BPE tokenizer trained on ``texts``, wrapped as a HF fast tokenizer.

    Like Pythia's: one special token ``<|endoftext|>`` serving as BOS, EOS and padding,
    left padding, and no ``token_type_ids``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    special = "<|endoftext|>"
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[special],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=special, eos_token=special,
                                 pad_token=special, padding_side="left")
    hf.model_input_names = ["input_ids", "attention_mask"]
    return hf


def tiny_causal_lm(arch: str = "pythia", vocab_size: int = 512, d_model: int = 64,
                   n_layers: int = 2, n_heads: int = 4, d_mlp: int = 256, max_len: int = 256,
                   seed: int = 0):
    """A randomly initialised HF causal LM of the given architecture, in eval mode."""
    from transformers import (GPT2Config, GPT2LMHeadModel, GPTNeoXConfig, GPTNeoXForCausalLM,
                              LlamaConfig, LlamaForCausalLM)

    torch.manual_seed(seed)
    if arch == "pythia":
        config = GPTNeoXConfig(vocab_size=vocab_size, hidden_size=d_model,
                               num_hidden_layers=n_layers, num_attention_heads=n_heads,
                               intermediate_size=d_mlp, max_position_embeddings=max_len,
                               rotary_pct=0.25, use_parallel_residual=True,
                               bos_token_id=0, eos_token_id=0)
        model = GPTNeoXForCausalLM(config)
    elif arch == "gpt2":
        config = GPT2Config(vocab_size=vocab_size, n_embd=d_model, n_layer=n_layers,
                            n_head=n_heads, n_inner=d_mlp, n_positions=max_len,
                            bos_token_id=0, eos_token_id=0)
        model = GPT2LMHeadModel(config)
    elif arch == "llama":
        config = LlamaConfig(vocab_size=vocab_size, hidden_size=d_model,
                             num_hidden_layers=n_layers, num_attention_heads=n_heads,
                             num_key_value_heads=n_heads, intermediate_size=d_mlp,
                             max_position_embeddings=max_len, bos_token_id=0, eos_token_id=0)
        model = LlamaForCausalLM(config)
    else:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {ARCHITECTURES}")
    assert model.config.vocab_size == vocab_size and model.get_input_embeddings().weight.shape \
        == (vocab_size, d_model), "config kwargs were not taken as meant"
    return model.eval()


def tiny_language_model(arch: str = "pythia", n_texts: int = 2000, vocab_size: int = 512,
                        **model_kwargs):
    """An nnsight ``LanguageModel`` around :func:`tiny_causal_lm`, with a tokenizer trained
    on the first ``n_texts`` standard-library docstrings."""
    from nnsight import LanguageModel

    tokenizer = train_tokenizer(list(islice(stdlib_texts(), n_texts)), vocab_size)
    hf_model = tiny_causal_lm(arch, vocab_size=len(tokenizer), **model_kwargs)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*LanguageModel is deprecated.*")
        return LanguageModel(hf_model, tokenizer=tokenizer)
