"""EleutherAI sparsify folders: one per hookpoint, ``cfg.json`` + ``sae.safetensors``.

Weights: ``encoder.weight [m, d]``, ``encoder.bias [m]``, ``W_dec [m, d]``, ``b_dec [d]``
(often bf16). sparsify computes ``pre = relu(encoder(x - b_dec))``, keeps each token's ``k``
largest, ``x_hat = top @ W_dec + b_dec``: our ``AutoEncoderTopK`` (weights upcast to float32,
which represents bf16 exactly). Transcoders (``transcode``, ``W_skip``) and the ``groupmax``
activation have no class here and are refused clearly.

A folder holding hookpoint folders (a sparsify run or a downloaded repo) is accepted when it
holds exactly one, or with ``hookpoint="layers.3.mlp"`` naming the one to load.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..architectures import AutoEncoderTopK
from .common import load_into, read_json, read_safetensors, require_tensors

NAME = "sparsify"
CFG_NAME, WEIGHTS_NAME = "cfg.json", "sae.safetensors"


def _is_hookpoint(folder: Path) -> bool:
    return (folder / CFG_NAME).is_file() and (folder / WEIGHTS_NAME).is_file()


def hookpoints(folder: Path) -> list[str]:
    """Names of the hookpoint folders directly inside ``folder``."""
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and _is_hookpoint(p))


def detect(path: str | Path) -> bool:
    path = Path(path)
    folder = path.parent if path.name == WEIGHTS_NAME else path
    return _is_hookpoint(folder) or (not (folder / CFG_NAME).exists() and bool(hookpoints(folder)))


def _hookpoint_folder(path: Path, hookpoint: str | None) -> Path:
    folder = path.parent if path.name == WEIGHTS_NAME else path
    if hookpoint is not None:
        folder = folder / hookpoint
        if not _is_hookpoint(folder):
            raise FileNotFoundError(f"no sparsify hookpoint {hookpoint!r} in {folder.parent}: "
                                    f"expected {CFG_NAME} and {WEIGHTS_NAME} in {folder}; "
                                    f"found {hookpoints(folder.parent)}")
        return folder
    if _is_hookpoint(folder):
        return folder
    found = hookpoints(folder)
    if len(found) != 1:
        raise ValueError(f"{folder} holds {len(found)} sparsify hookpoints ({', '.join(found)}): "
                         "pass hookpoint=... or the hookpoint's folder")
    return folder / found[0]


def load(path: str | Path, hookpoint: str | None = None):
    """``(AutoEncoderTopK, config)``; ``config = {"format": "sparsify", "cfg": <cfg.json>,
    "hookpoint": <folder name>, "dtype": <dtype of the file>}``."""
    folder = _hookpoint_folder(Path(path), hookpoint)
    cfg = read_json(folder / CFG_NAME)
    where = folder / WEIGHTS_NAME
    activation = cfg.get("activation", "topk")
    if cfg.get("transcode") or cfg.get("skip_connection"):
        raise ValueError(f"{folder}: sparsify transcoders (transcode / skip_connection, "
                         "W_skip) are not supported: no dictionary class here computes them")
    if activation != "topk":
        raise ValueError(f"{folder}: sparsify activation {activation!r} is not supported "
                         "(only topk)")
    k = cfg.get("k")
    w = read_safetensors(where)
    require_tensors(w, {"encoder.weight": (None, None)}, where)
    m, d = w["encoder.weight"].shape
    if isinstance(k, bool) or not isinstance(k, int) or not 0 < k <= m:
        raise ValueError(f"{folder / CFG_NAME}: k must be an integer in [1, {m}], got {k!r}")
    if "d_in" in cfg and cfg["d_in"] != d:
        raise ValueError(f"{where}: {CFG_NAME} says d_in={cfg['d_in']} but encoder.weight "
                         f"has shape {(m, d)}")
    if cfg.get("num_latents") and cfg["num_latents"] != m:
        raise ValueError(f"{where}: {CFG_NAME} says num_latents={cfg['num_latents']} but "
                         f"encoder.weight has shape {(m, d)}")
    shapes = {"encoder.bias": (m,), "W_dec": (m, d), "b_dec": (d,)}
    require_tensors(w, shapes, where)
    unexpected = sorted(set(w) - set(shapes) - {"encoder.weight"})
    if unexpected:
        raise ValueError(f"{where}: unexpected keys {unexpected} (a transcoder's W_skip? "
                         "not supported)")
    ae = load_into(AutoEncoderTopK, {
        "encoder.weight": w["encoder.weight"], "encoder.bias": w["encoder.bias"],
        "decoder.weight": w["W_dec"].T, "b_dec": w["b_dec"],
        "k": torch.tensor(k, dtype=torch.int), "threshold": torch.tensor(-1.0)}, where)
    return ae, {"format": NAME, "cfg": cfg, "hookpoint": folder.name,
                "dtype": str(w["encoder.weight"].dtype).removeprefix("torch.")}
