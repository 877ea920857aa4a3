"""Google DeepMind's Gemma Scope (Gemma 2) and Gemma Scope 2 (Gemma 3) JumpReLU SAEs.

One folder per SAE, named by its site (as in the Hub repos, e.g. ``google/gemma-scope-2b-pt-res``
``layer_20/width_16k/average_l0_71``, ``google/gemma-scope-2-4b-pt`` ``resid_post/
layer_17_width_16k_l0_medium``):

- Gemma Scope: ``params.npz`` with ``W_enc [d, m]``, ``W_dec [m, d]``, ``b_enc [m]``,
  ``b_dec [d]``, ``threshold [m]`` (float32);
- Gemma Scope 2: ``params.safetensors`` with ``w_enc``, ``w_dec``, ``b_enc``, ``b_dec``,
  ``threshold`` (same shapes), optionally ``affine_skip_connection [d, d_out]`` (affine skip
  transcoders), and a ``config.json`` (``architecture: "jump_relu"``, ``model_name``,
  ``hf_hook_point_in``/``hf_hook_point_out``, ``affine_connection``).

Both compute (Gemma Scope's tutorial; SAELens's ``jumprelu`` with ``apply_b_dec_to_input =
False``): ``pre = x @ W_enc + b_enc``, ``f = relu(pre) * (pre > threshold)``,
``x_hat = f @ W_dec + b_dec`` (``b_dec`` is not subtracted first): our
``JumpReluAutoEncoder``, unchanged. Transcoders without the affine connection (``hf_hook_point_out``
differs from the input's) compute the same formula from one site to the other and load the same
way; the affine skip transcoders and the cross-layer transcoders (``w_dec [m, layers, d]``)
have no class here and are refused clearly.

The weights are those of the HF model's modules. (SAELens rescales the *embedding* SAEs by
``sqrt(d_model)`` because TransformerLens's ``hook_embed`` includes Gemma's embedding scale;
here they apply, as published, to the output of ``embed_tokens``.)
"""

from __future__ import annotations

import re
import zipfile
from pathlib import Path

import torch

from ..architectures import JumpReluAutoEncoder
from .common import load_into, read_json, read_safetensors, require_tensors

NAME = "gemma_scope"
NPZ_NAME, SAFETENSORS_NAME, CONFIG_NAME = "params.npz", "params.safetensors", "config.json"
KEYS = ("W_enc", "W_dec", "b_enc", "b_dec", "threshold")


def _weights_file(path: Path) -> Path | None:
    if path.name in (NPZ_NAME, SAFETENSORS_NAME) and path.is_file():
        return path
    for name in (SAFETENSORS_NAME, NPZ_NAME):
        if (path / name).is_file():
            return path / name
    return None


def detect(path: str | Path) -> bool:
    return _weights_file(Path(path)) is not None


def read_npz(path: Path) -> dict[str, torch.Tensor]:
    """The arrays of a ``.npz`` file as tensors, without unpickling anything."""
    import numpy as np

    try:
        with np.load(path, allow_pickle=False) as data:
            return {name: torch.from_numpy(data[name].copy()) for name in data.files}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        raise ValueError(f"{path} could not be read (truncated, or not a numpy .npz file "
                         f"of plain arrays?): {type(e).__name__}: {e}") from e


def _site(folder: Path) -> dict:
    """Layer, width and L0 as the Hub folder names say them (``None`` where they do not)."""
    text = folder.as_posix()
    layer = re.search(r"layer_(\d+)", text)
    width = re.search(r"width_(\d+[km]?)", text)
    l0 = re.search(r"(?:average_l0_|_l0_)(\w+)$", text)
    return {"layer": int(layer.group(1)) if layer else None,
            "width": width.group(1) if width else None,
            "l0": l0.group(1) if l0 else None}


def load(path: str | Path):
    """``(JumpReluAutoEncoder, config)``; ``config = {"format": "gemma_scope", "release":
    "gemma_scope" | "gemma_scope_2", "cfg": <config.json or {}>, "layer", "width", "l0",
    "hook_in", "hook_out"}``."""
    weights = _weights_file(Path(path))
    if weights is None:
        raise FileNotFoundError(f"no {NPZ_NAME} or {SAFETENSORS_NAME} at {path}")
    folder = weights.parent
    raw = read_npz(weights) if weights.suffix == ".npz" else read_safetensors(weights)
    cfg = read_json(folder / CONFIG_NAME) if (folder / CONFIG_NAME).is_file() else {}
    if cfg.get("architecture", "jump_relu") != "jump_relu":
        raise ValueError(f"{folder / CONFIG_NAME}: architecture {cfg['architecture']!r} is not "
                         "Gemma Scope's jump_relu")
    by_lower = {name.lower(): name for name in raw}
    if "affine_skip_connection" in by_lower or cfg.get("affine_connection"):
        raise ValueError(f"{weights}: an affine skip transcoder (affine_skip_connection) is "
                         "not supported: no JumpReLU transcoder with a skip connection here")
    missing = [k for k in KEYS if k.lower() not in by_lower]
    if missing:
        raise ValueError(f"{weights}: missing keys {missing} (has {sorted(raw)}): not a Gemma "
                         "Scope JumpReLU SAE")
    w = {k: raw[by_lower[k.lower()]] for k in KEYS}
    unexpected = sorted(set(by_lower) - {k.lower() for k in KEYS})
    if unexpected:
        raise ValueError(f"{weights}: unexpected keys {unexpected}")
    if w["W_dec"].ndim == 3:
        raise ValueError(f"{weights}: w_dec has shape {tuple(w['W_dec'].shape)}: a cross-layer "
                         "transcoder, not supported")
    require_tensors(w, {"W_enc": (None, None)}, weights)
    d, m = w["W_enc"].shape
    require_tensors(w, {"W_dec": (m, None), "b_enc": (m,), "threshold": (m,)}, weights)
    d_out = w["W_dec"].shape[1]
    require_tensors(w, {"b_dec": (d_out,)}, weights)
    if d_out != d:
        raise ValueError(f"{weights}: a transcoder from width {d} to {d_out}: not supported "
                         "(only equal widths)")
    ae = load_into(JumpReluAutoEncoder, w, weights)
    config = {"format": NAME, "release": "gemma_scope_2" if weights.suffix == ".safetensors"
              else "gemma_scope", "cfg": cfg, **_site(folder),
              "model_name": cfg.get("model_name"), "hook_in": cfg.get("hf_hook_point_in"),
              "hook_out": cfg.get("hf_hook_point_out", cfg.get("hf_hook_point_in"))}
    return ae, config
