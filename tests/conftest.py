"""Shared fixtures: tiny models of three architectures and local text, all built offline."""

import os
from itertools import islice

import pytest
import torch

from dictionary_learning.tiny import stdlib_texts, tiny_language_model

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def texts():
    """A few hundred real English documents from the standard library's docstrings."""
    return list(islice(stdlib_texts(), 400))


@pytest.fixture(scope="session")
def models():
    """``{arch: LanguageModel}`` for pythia (GPTNeoX), gpt2 and llama, tiny and random."""
    built = {arch: tiny_language_model(arch) for arch in ("pythia", "gpt2", "llama")}
    for model in built.values():
        n_params = sum(p.numel() for p in model._module.parameters())
        assert n_params < 500_000, f"test model is not tiny: {n_params} parameters"
    return built


@pytest.fixture
def failing_buffer(models, texts):
    """``make(fail_after=None)``: a live ActivationBuffer on the tiny Pythia's layer-1 MLP
    over 300 texts, whose text stream raises ``RuntimeError("killed")`` at text
    ``fail_after`` (a run stopped mid-read; the same seed and sizes every call)."""
    from dictionary_learning.buffer import ActivationBuffer

    def make(fail_after=None):
        def stream():
            for i, t in enumerate(texts[:300]):
                if i == fail_after:
                    raise RuntimeError("killed")
                yield t
        return ActivationBuffer(stream(), models["pythia"], "gpt_neox.layers.1.mlp",
                                n_ctxs=8, ctx_len=32, refresh_batch_size=4,
                                out_batch_size=48, progress=False, seed=5)
    return make


def planted_dictionary_data(d: int = 32, m: int = 64, n: int = 100_000, k: int = 3,
                            seed: int = 0):
    """Activations built as sparse non-negative combinations of ``m`` known unit directions.

    Every token uses ``k`` of them with magnitudes in [0.5, 1.5). Returns ``(X [n, d],
    D [m, d])``.
    """
    g = torch.Generator().manual_seed(seed)
    D = torch.randn(m, d, generator=g)
    D /= D.norm(dim=-1, keepdim=True)
    idx = torch.rand(n, m, generator=g).argsort(dim=-1)[:, :k]
    f = torch.zeros(n, m)
    f.scatter_(1, idx, torch.rand(n, k, generator=g) + 0.5)
    return f @ D, D


def dictionary_kwargs(name: str, dict_size: int) -> dict:
    """Constructor arguments beyond ``(activation_dim, dict_size)`` that a registered class
    needs, for building small test dictionaries of any class."""
    if name in ("AutoEncoderTopK", "BatchTopKSAE"):
        return {"k": 4}
    if name == "MatryoshkaBatchTopKSAE":
        quarter = dict_size // 4
        return {"k": 4, "group_sizes": [quarter, quarter, dict_size - 2 * quarter]}
    return {}
