"""Builders shared by the command-line tests: a tiny local model folder, held-out text as a
.jsonl file, and dictionary folders in the layouts people have on disk. All offline."""

from __future__ import annotations

import json
from itertools import islice
from pathlib import Path

import torch

from dictionary_learning.tiny import stdlib_texts, tiny_causal_lm, train_tokenizer

D_MODEL = 64  # width of every hidden state of the tiny model (embed, attention, mlp, layer)


_BUILT: dict[str, Path] = {}


def shared_model_folder(tmp_path_factory) -> Path:
    """One :func:`build_model_folder` per test session, shared by the test modules."""
    if "model" not in _BUILT:
        _BUILT["model"] = build_model_folder(tmp_path_factory.mktemp("tiny_model") / "model")
    return _BUILT["model"]


def build_model_folder(folder: Path) -> Path:
    """A tiny Pythia-architecture model and its tokenizer, saved with save_pretrained."""
    texts = list(islice(stdlib_texts(), 300))
    tokenizer = train_tokenizer(texts, vocab_size=512)
    model = tiny_causal_lm("pythia", vocab_size=len(tokenizer), d_model=D_MODEL, n_layers=2,
                           d_mlp=4 * D_MODEL)
    assert sum(p.numel() for p in model.parameters()) < 500_000
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def write_jsonl(path: Path, start: int = 300, n: int = 200) -> list[str]:
    """Documents ``start .. start + n`` of the standard library's docstrings (the model's
    tokenizer saw only the first 300) as a Pile-style .jsonl; returns them."""
    texts = list(islice(stdlib_texts(), start, start + n))
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return texts


def save_dictionary(folder: Path, dictionary, config: dict | None) -> Path:
    """``folder/ae.pt`` (+ ``config.json`` unless ``config`` is None)."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(dictionary.state_dict(), folder / "ae.pt")
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config))
    return folder


def nested_config(model_dir: Path, submodule: str, dict_size: int, ctx_len: int = 32) -> dict:
    """What training writes (saving.py): trainer and buffer sections."""
    return {"trainer": {"dict_class": "AutoEncoder", "activation_dim": D_MODEL,
                        "dict_size": dict_size, "lm_name": str(model_dir),
                        "submodule_name": submodule, "layer": int(submodule.split(".")[2])},
            "buffer": {"io": "out", "ctx_len": ctx_len, "d_submodule": D_MODEL},
            "run": {"finished": True}}


FLAT_CONFIG = {"dictionary_size": 128, "activation_dim": D_MODEL, "lr": 1e-3,
               "l1_penalty": 1e-3}


def snapshot(folder: Path) -> dict:
    """Every file and folder under ``folder``: bytes and permission bits (to show that a
    refused command left it as it was)."""
    import stat

    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None,
                                         stat.S_IMODE(p.stat().st_mode))
            for p in [folder, *sorted(folder.rglob("*"))]}
