"""Llama Scope SAEs and transcoders (OpenMOSS ``lm_saes``; Hub repos
``fnlp/Llama3_1-8B-Base-LX{R,A,M,TC}-{8,32}x``), one folder per site:
``hyperparams.json`` + ``checkpoints/final.safetensors``.

Weights (``nn.Linear`` layout, bf16): ``encoder.weight [m, d]``, ``encoder.bias [m]``,
``decoder.weight [d, m]``, ``decoder.bias [d]``. ``hyperparams.json``: ``d_model``, ``d_sae``,
``act_fn`` (``jumprelu``) with the scalar ``jump_relu_threshold`` ``t``, ``norm_activation``
(``dataset-wise``) with ``dataset_average_activation_norm {"in", "out"}``,
``apply_decoder_bias_to_pre_encoder``, ``sparsity_include_decoder_norm``, ``hook_point_in``,
``hook_point_out``.

Trained on inputs scaled to an average norm of ``sqrt(d)``: ``s_in = sqrt(d) / in``,
``s_out = sqrt(d) / out``. ``lm_saes`` loads them for inference (``from_pretrained``) by
folding the scales into the weights (``encoder.bias / s_in``, ``decoder.bias / s_out``,
``decoder.weight * s_in / s_out``), then, with ``sparsity_include_decoder_norm``, making the
decoder columns unit norm (``n_i = ||decoder[:, i]||``: encoder row and bias times ``n_i``);
then ``pre = x @ encoder.weight.T + encoder.bias`` on raw activations,
``f = pre * (pre > t)``, ``y = f @ decoder.weight.T + decoder.bias``. That is what is
computed here (``JumpReluAutoEncoder``, every threshold ``t``; the folds in float64).
SAELens loads the SAEs (R, A, M; ``in == out``) with features ``s_in`` times these and the
same reconstruction when the decoder columns are unit norm; it ignores
``sparsity_include_decoder_norm``.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from ..architectures import JumpReluAutoEncoder
from .common import load_into, read_json, read_safetensors, require_tensors

NAME = "llama_scope"
HYPERPARAMS_NAME = "hyperparams.json"
WEIGHTS_NAMES = ("checkpoints/final.safetensors", "sae_weights.safetensors")


def _folder(path: Path) -> Path:
    if path.is_file() and path.suffix == ".safetensors":
        return path.parent.parent if path.parent.name == "checkpoints" else path.parent
    return path


def _weights(folder: Path) -> Path | None:
    return next((folder / n for n in WEIGHTS_NAMES if (folder / n).is_file()), None)


def detect(path: str | Path) -> bool:
    folder = _folder(Path(path))
    return (folder / HYPERPARAMS_NAME).is_file() and _weights(folder) is not None


def _scales(hp: dict, d: int, where: Path) -> tuple[float, float]:
    norm = hp.get("norm_activation", "dataset-wise")
    if norm in ("none", "inference"):  # already folded by whoever saved it
        return 1.0, 1.0
    if norm != "dataset-wise":
        raise ValueError(f"{where}: norm_activation {norm!r} is not supported (dataset-wise "
                         "is what the released SAEs use)")
    averages = hp.get("dataset_average_activation_norm") or {}
    try:
        s_in = math.sqrt(d) / float(averages["in"])
        s_out = math.sqrt(d) / float(averages.get("out", averages["in"]))
    except (KeyError, TypeError, ValueError, ZeroDivisionError) as e:
        raise ValueError(f"{where}: dataset-wise normalisation needs positive "
                         "dataset_average_activation_norm {\"in\", \"out\"}, got "
                         f"{averages!r}") from e
    if not (s_in > 0 and s_out > 0):
        raise ValueError(f"{where}: dataset_average_activation_norm must be positive, got "
                         f"{averages!r}")
    return s_in, s_out


def load(path: str | Path):
    """``(JumpReluAutoEncoder, config)``; ``config = {"format": "llama_scope", "cfg":
    <hyperparams.json>, "hook_in", "hook_out", "input_scale", "output_scale"}``."""
    folder = _folder(Path(path))
    where = folder / HYPERPARAMS_NAME
    hp = read_json(where)
    weights = _weights(folder)
    if weights is None:
        raise FileNotFoundError(f"no {' or '.join(WEIGHTS_NAMES)} in {folder}")
    act = hp.get("act_fn", "jumprelu")
    if act != "jumprelu":
        raise ValueError(f"{where}: act_fn {act!r} is not supported (the released Llama "
                         "Scope SAEs are jumprelu)")
    if hp.get("apply_decoder_bias_to_pre_encoder", False) or hp.get("use_glu_encoder", False):
        raise ValueError(f"{where}: apply_decoder_bias_to_pre_encoder / use_glu_encoder are "
                         "not supported (false in every released Llama Scope SAE)")
    t = float(hp.get("jump_relu_threshold", 0.0))
    if not t >= 0:
        raise ValueError(f"{where}: jump_relu_threshold must be >= 0, got {t}")
    w = read_safetensors(weights)
    require_tensors(w, {"encoder.weight": (None, None)}, weights)
    m, d = w["encoder.weight"].shape
    require_tensors(w, {"encoder.bias": (m,), "decoder.weight": (d, m), "decoder.bias": (d,)},
                    weights)
    unexpected = sorted(set(w) - {"encoder.weight", "encoder.bias", "decoder.weight",
                                  "decoder.bias"})
    if unexpected:
        raise ValueError(f"{weights}: unexpected keys {unexpected}")
    for key, width in (("d_model", d), ("d_sae", m)):
        if key in hp and hp[key] != width:
            raise ValueError(f"{weights}: {HYPERPARAMS_NAME} says {key}={hp[key]} but "
                             f"encoder.weight has shape {(m, d)}")
    s_in, s_out = _scales(hp, d, where)
    enc, b_enc = w["encoder.weight"].double(), w["encoder.bias"].double() / s_in
    dec, b_dec = w["decoder.weight"].double() * (s_in / s_out), w["decoder.bias"].double() / s_out
    if hp.get("sparsity_include_decoder_norm", True):
        n = dec.norm(dim=0)
        enc, b_enc, dec = enc * n[:, None], b_enc * n, dec / n
    ae = load_into(JumpReluAutoEncoder, {
        "W_enc": enc.T, "b_enc": b_enc, "W_dec": dec.T, "b_dec": b_dec,
        "threshold": torch.full((m,), t, dtype=torch.float64)}, weights)
    config = {"format": NAME, "cfg": hp, "hook_in": hp.get("hook_point_in"),
              "hook_out": hp.get("hook_point_out", hp.get("hook_point_in")),
              "input_scale": s_in, "output_scale": s_out,
              "dtype": str(w["encoder.weight"].dtype).removeprefix("torch.")}
    return ae, config
