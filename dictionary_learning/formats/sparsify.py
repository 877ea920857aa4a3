"""EleutherAI sparsify folders: one per hookpoint, ``cfg.json`` + ``sae.safetensors``.

Weights: ``encoder.weight [m, d]``, ``encoder.bias [m]``, ``W_dec [m, d]``, ``b_dec [d]``
(often bf16). sparsify computes ``pre = relu(encoder(x - b_dec))`` (no ``- b_dec`` for
transcoders, ``transcode``), keeps each token's ``k`` largest, ``x_hat = top @ W_dec + b_dec``
(``+ x @ W_skip.T`` with ``skip_connection``). Plain SAEs become our ``AutoEncoderTopK``;
transcoders our ``Transcoder``; SAEs with a skip connection ``SkipSAE`` below, a
``Transcoder`` that subtracts ``b_dec`` before encoding as sparsify does (folding it into
the encoder bias instead is the same in float32 but rounds differently in bf16, by up to
~1.5 in the features of a tiny test SAE: ``x - b_dec`` and ``encoder(x)`` round apart).
Weights are upcast to float32, which represents bf16 exactly; ``dtype=torch.bfloat16``
computes in sparsify's order. The ``groupmax`` activation has no class here and is refused
clearly.

A folder holding hookpoint folders (a sparsify run or a downloaded repo) is accepted when it
holds exactly one, or with ``hookpoint="layers.3.mlp"`` naming the one to load.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..architectures import AutoEncoderTopK, Transcoder
from ..base import check_width
from ..registry import register
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
    """``(AutoEncoderTopK or Transcoder, config)``; ``config = {"format": "sparsify",
    "cfg": <cfg.json>, "hookpoint": <folder name>, "dtype": <dtype of the file>}``."""
    folder = _hookpoint_folder(Path(path), hookpoint)
    cfg = read_json(folder / CFG_NAME)
    where = folder / WEIGHTS_NAME
    activation = cfg.get("activation", "topk")
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
    require_tensors(w, {"W_dec": (m, None)}, where)
    d_out = w["W_dec"].shape[1]
    shapes = {"encoder.bias": (m,), "W_dec": (m, d_out), "b_dec": (d_out,)}
    if cfg.get("skip_connection"):
        shapes["W_skip"] = (d_out, d)
    require_tensors(w, shapes, where)
    unexpected = sorted(set(w) - set(shapes) - {"encoder.weight"})
    if unexpected:
        raise ValueError(f"{where}: unexpected keys {unexpected} for cfg.json's "
                         f"skip_connection={bool(cfg.get('skip_connection'))}")
    config = {"format": NAME, "cfg": cfg, "hookpoint": folder.name,
              "dtype": str(w["encoder.weight"].dtype).removeprefix("torch.")}
    if cfg.get("transcode") or cfg.get("skip_connection"):
        return _transcoder(w, k, bool(cfg.get("transcode")), where), config
    if d_out != d:
        raise ValueError(f"{where}: W_dec has {d_out} columns but the input has {d}: only "
                         "a transcoder (transcode: true) maps between widths")
    ae = load_into(AutoEncoderTopK, {
        "encoder.weight": w["encoder.weight"], "encoder.bias": w["encoder.bias"],
        "decoder.weight": w["W_dec"].T, "b_dec": w["b_dec"],
        "k": torch.tensor(k, dtype=torch.int), "threshold": torch.tensor(-1.0)}, where)
    return ae, config


@register
class SkipSAE(Transcoder):
    """sparsify's SAE with a skip connection: ``f = relu(encoder(x - b_dec))``, then each
    token's ``k`` largest; ``forward(x) = f @ W_dec + b_dec + x @ W_skip.T``. Stored as
    :class:`Transcoder` (``b_dec [d]`` serves both sides). Inference only."""

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        check_width(x, self.activation_dim, f"{type(self).__name__}.encode")
        return super().encode(x - self.b_dec)


def _transcoder(w: dict, k: int, transcode: bool, where: Path):
    """A ``Transcoder`` (``transcode``), else a ``SkipSAE`` (an SAE with a skip connection,
    which subtracts ``b_dec`` before encoding)."""
    enc = w["encoder.weight"]
    if not transcode and w["b_dec"].shape[0] != enc.shape[1]:
        raise ValueError(f"{where}: b_dec has {w['b_dec'].shape[0]} entries but the input "
                         f"has {enc.shape[1]}: only a transcoder maps between widths")
    skip = w.get("W_skip", torch.zeros(w["W_dec"].shape[1], enc.shape[1]))
    return load_into(Transcoder if transcode else SkipSAE, {
        "encoder.weight": enc, "encoder.bias": w["encoder.bias"], "W_dec": w["W_dec"],
        "b_dec": w["b_dec"], "W_skip": skip, "k": torch.tensor(k, dtype=torch.int)}, where)
