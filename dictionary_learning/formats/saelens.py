"""SAELens folders: ``cfg.json`` + ``sae_weights.safetensors`` (+ ``sparsity.safetensors``).

SAELens computes, for every architecture (``a = apply_b_dec_to_input``)::

    x' = norm_in(x);  sae_in = x' - a * b_dec
    standard: f = relu(sae_in @ W_enc + b_enc)
    topk:     f = top-k of (sae_in @ W_enc + b_enc), then relu
    jumprelu: pre = sae_in @ W_enc + b_enc;  f = relu(pre) * (pre > threshold)
    gated:    f = [sae_in @ W_enc + b_gate > 0] * relu(sae_in @ (W_enc * exp(r_mag)) + b_mag)
    x_hat = norm_out(f @ W_dec + b_dec)

TopK with ``rescale_acts_by_decoder_norm`` (the default of sae-lens 6's TopK training config)
selects and scales by the decoder norms ``n_i = ||W_dec[i]||``: ``f = topk(pre * n)`` and
``x_hat = (f / n) @ W_dec + b_dec``, which is the plain TopK SAE with ``W_enc[:, i]``,
``b_enc[i]`` multiplied by ``n_i`` and ``W_dec[i]`` divided by it (SAELens's own fold; exact
for final models, whose decoder rows are unit norm already, and for checkpoints, whose are
not). ``batchtopk`` training checkpoints (weights with a scalar ``topk_threshold``) become
what SAELens saves for inference from them: that fold, then jumprelu with every threshold
``topk_threshold``.

Converted to our classes (exact up to float rounding where a bias is folded):
standard -> ``AutoEncoder`` (a) or ``AutoEncoderNew`` (not a); topk -> ``AutoEncoderTopK``
(not a: ``b_dec @ W_enc`` folded into the encoder bias); jumprelu -> ``JumpReluAutoEncoder``
(a: ``-b_dec @ W_enc`` folded into ``b_enc``); gated -> ``GatedAutoEncoder`` (not a: folded into
both biases). ``normalize_activations``: ``layer_norm`` and ``constant_norm_rescale`` (per
token) -> ``TokenNormalizedSAE`` (standard, topk, jumprelu) or ``TokenNormalizedGatedSAE``
(gated); ``covariance_whitening`` is folded into the weights by SAELens at the end of
training, so only a training checkpoint says it, and its statistics are not in the folder:
refused; ``expected_average_only_in`` needs
the dataset-wide factor ``s``, absent from the folder: pass ``norm_scaling_factor=s`` and it is
folded in as SAELens folds it (``W_enc * s``, ``W_dec / s``, ``b_dec / s``); SAELens's own
``load_from_disk`` ignores it, which ``norm_scaling_factor=1.0`` reproduces. Pre-6.0 flat
configs (``activation_fn_str``, ``activation_fn_kwargs``, ``hook_point``/``hook_name``,
``finetuning_scaling_factor`` with the weights' ``scaling_factor``: a per-latent scale of the
features before decoding, folded into ``W_dec``) are read too.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from ..architectures import (AutoEncoder, AutoEncoderNew, AutoEncoderTopK, GatedAutoEncoder,
                             JumpReluAutoEncoder, TokenNormalizedSAE)
from ..architectures.gated import TokenNormalizedGatedSAE
from .common import load_into, read_json, read_safetensors, require_tensors

logger = logging.getLogger(__name__)
NAME = "saelens"
CFG_NAME, WEIGHTS_NAME = "cfg.json", "sae_weights.safetensors"
SPARSITY_NAME = "sparsity.safetensors"
ARCHITECTURES = ("standard", "topk", "jumprelu", "gated", "batchtopk")
NORMALIZATIONS = ("none", "layer_norm", "constant_norm_rescale", "expected_average_only_in")


def detect(path: str | Path) -> bool:
    path = Path(path)
    folder = path.parent if path.name == WEIGHTS_NAME else path
    return (folder / WEIGHTS_NAME).is_file() and (folder / CFG_NAME).is_file()


def _metadata(cfg: dict) -> dict:
    meta = cfg.get("metadata") or cfg.get("meta") or {}
    return {"model_name": meta.get("model_name", cfg.get("model_name")),
            "hook_name": meta.get("hook_name", cfg.get("hook_name", cfg.get("hook_point")))}


def parse_cfg(cfg: dict, path: Path) -> dict:
    """The settings that decide the math: architecture, k, apply_b_dec_to_input,
    normalize_activations, finetuning_scaling_factor (v6 and pre-6.0 configs)."""
    arch = cfg.get("architecture", "standard")
    act = cfg.get("activation_fn_str", cfg.get("activation_fn", "relu"))
    act_kwargs = cfg.get("activation_fn_kwargs") or {}
    k = cfg.get("k", act_kwargs.get("k"))
    if arch == "standard" and act == "topk":  # pre-6.0 spelling of a TopK SAE
        arch = "topk"
    elif arch in ("standard", "jumprelu", "gated") and act not in ("relu", None):
        raise ValueError(f"{path}: activation {act!r} is not supported (relu or topk)")
    if arch not in ARCHITECTURES:
        raise ValueError(f"{path}: unknown or unsupported SAELens architecture {arch!r}; "
                         f"supported: {', '.join(ARCHITECTURES)} (transcoders are not)")
    if arch == "topk" and (isinstance(k, bool) or not isinstance(k, int) or k <= 0):
        raise ValueError(f"{path}: a topk SAE needs a positive integer k, got {k!r}")
    norm = cfg.get("normalize_activations", "none")
    norm = {None: "none", False: "none", True: "expected_average_only_in"}.get(norm, norm)
    if norm == "covariance_whitening":
        raise ValueError(f"{path}: normalize_activations 'covariance_whitening' is a training "
                         "checkpoint's setting (SAELens folds the whitening into the weights "
                         "when training ends) and its statistics are not in the folder: load "
                         "the final model")
    if norm not in NORMALIZATIONS:
        raise ValueError(f"{path}: unknown normalize_activations {norm!r}; known: "
                         f"{', '.join(NORMALIZATIONS)}")
    rescale = bool(cfg.get("rescale_acts_by_decoder_norm", False))
    if rescale and arch not in ("topk", "batchtopk"):
        raise ValueError(f"{path}: rescale_acts_by_decoder_norm is a topk setting, not one of "
                         f"a {arch} SAE: the config is inconsistent")
    return {"architecture": arch, "k": k, "apply_b_dec_to_input":
            bool(cfg.get("apply_b_dec_to_input", True)), "normalize_activations": norm,
            "finetuning_scaling_factor": bool(cfg.get("finetuning_scaling_factor", False)),
            "rescale_acts_by_decoder_norm": rescale}


def _expected_shapes(spec: dict, d: int, m: int) -> dict[str, tuple]:
    shapes = {"W_enc": (d, m), "W_dec": (m, d), "b_dec": (d,)}
    if spec["architecture"] == "gated":
        shapes.update(b_gate=(m,), b_mag=(m,), r_mag=(m,))
    else:
        shapes["b_enc"] = (m,)
    if spec["architecture"] == "jumprelu":
        shapes["threshold"] = (m,)
    if spec["architecture"] == "batchtopk":
        shapes["topk_threshold"] = ()
    if spec["finetuning_scaling_factor"]:
        shapes["finetuning_scaling_factor"] = (m,)
    return shapes


def _scaling_factor(w: dict, spec: dict, path: Path) -> None:
    """Pre-6.0 per-latent decoder scale, as SAELens reads it: stored as ``scaling_factor``
    (ignored when all ones) or ``finetuning_scaling_factor``; used only when cfg.json's
    ``finetuning_scaling_factor`` is true and the weights hold it. Sets ``w`` and ``spec``."""
    if "scaling_factor" in w:
        factor = w.pop("scaling_factor")
        if not torch.equal(factor, torch.ones_like(factor)):
            if not spec["finetuning_scaling_factor"]:
                raise ValueError(f"{path}: holds a scaling_factor but cfg.json's "
                                 "finetuning_scaling_factor is false")
            w["finetuning_scaling_factor"] = factor
    if spec["finetuning_scaling_factor"] and "finetuning_scaling_factor" not in w:
        spec["finetuning_scaling_factor"] = False  # as SAELens: nothing to apply


def read_weights(folder: Path, spec: dict, cfg: dict) -> dict[str, torch.Tensor]:
    """The weights, checked against the config, in float64 (folds lose nothing)."""
    path = folder / WEIGHTS_NAME
    w = read_safetensors(path)
    require_tensors(w, {"W_enc": (None, None)}, path)
    d, m = w["W_enc"].shape
    for key, width in (("d_in", d), ("d_sae", m)):
        if key in cfg and cfg[key] != width:
            raise ValueError(f"{path}: {CFG_NAME} says {key}={cfg[key]} but W_enc has shape "
                             f"{(d, m)}")
    _scaling_factor(w, spec, path)
    shapes = _expected_shapes(spec, d, m)
    require_tensors(w, shapes, path)
    unexpected = sorted(set(w) - set(shapes))
    if unexpected:
        hint = " (a transcoder? not supported)" if "W_skip" in unexpected else ""
        raise ValueError(f"{path}: unexpected keys {unexpected} for a {spec['architecture']} "
                         f"SAE{hint}")
    return {name: t.double() for name, t in w.items()}


def _fold_scaling(w: dict, spec: dict, norm_scaling_factor, path: Path) -> dict:
    """Fold the per-latent decoder scale, the dataset-wide input scale if any, then the
    decoder norms of ``rescale_acts_by_decoder_norm`` (SAELens rescales by the norms of the
    decoder it holds, after its own fold of the input scale)."""
    if spec["finetuning_scaling_factor"]:
        w["W_dec"] = w["W_dec"] * w.pop("finetuning_scaling_factor")[:, None]
    return _fold_decoder_norms(_fold_input_scale(w, spec, norm_scaling_factor, path), spec)


def _fold_decoder_norms(w: dict, spec: dict) -> dict:
    """``f = topk(pre * n)``, ``x_hat = (f / n) @ W_dec + b_dec`` as a plain TopK SAE: the
    encoder's columns and bias times ``n``, the decoder's rows divided by it (``n`` clamped
    at 1e-8 as SAELens does). A batchtopk checkpoint's threshold, on the rescaled
    pre-activations, then applies to the folded ones unchanged."""
    if not spec["rescale_acts_by_decoder_norm"]:
        return w
    n = w["W_dec"].norm(dim=-1).clamp_min(1e-8)
    return {**w, "W_enc": w["W_enc"] * n, "b_enc": w["b_enc"] * n, "W_dec": w["W_dec"] / n[:, None]}


def _fold_input_scale(w: dict, spec: dict, norm_scaling_factor, path: Path) -> dict:
    if spec["normalize_activations"] != "expected_average_only_in":
        if norm_scaling_factor is not None:
            raise ValueError(f"{path}: norm_scaling_factor applies only to "
                             "normalize_activations='expected_average_only_in'")
        return w
    if norm_scaling_factor is None:
        raise ValueError(f"{path}: normalize_activations is 'expected_average_only_in', whose "
                         "scaling factor is not in the folder: pass norm_scaling_factor=... "
                         "(the factor from training; 1.0 computes what SAELens's "
                         "load_from_disk computes, which ignores it)")
    s = float(norm_scaling_factor)
    if not s > 0:
        raise ValueError(f"norm_scaling_factor must be positive, got {norm_scaling_factor}")
    return {**w, "W_enc": w["W_enc"] * s, "W_dec": w["W_dec"] / s, "b_dec": w["b_dec"] / s}


def to_dictionary(w: dict, spec: dict, path: Path):
    """Our dictionary computing what SAELens computes with weights ``w`` (float64)."""
    arch, a = spec["architecture"], spec["apply_b_dec_to_input"]
    W_enc, W_dec, b_dec = w["W_enc"], w["W_dec"], w["b_dec"]
    shift = b_dec @ W_enc  # [m]: what subtracting b_dec before the encoder adds to pre
    m = W_enc.shape[1]
    if arch == "batchtopk":  # as SAELens saves it for inference: jumprelu, one threshold
        arch, w = "jumprelu", {**w, "threshold": w.pop("topk_threshold").expand(m).clone()}
    if spec["normalize_activations"] in ("layer_norm", "constant_norm_rescale"):
        norm_id = ["layer_norm", "constant_norm_rescale"].index(spec["normalize_activations"])
        if arch == "gated":
            z_shift = 0 if a else shift
            return load_into(TokenNormalizedGatedSAE, {
                "decoder_bias": b_dec, "encoder.weight": W_enc.T, "r_mag": w["r_mag"],
                "gate_bias": w["b_gate"] + z_shift,
                "mag_bias": w["b_mag"] + w["r_mag"].exp() * z_shift,
                "decoder.weight": W_dec.T, "normalization_id": torch.tensor(norm_id)}, path)
        threshold = w["threshold"] if arch == "jumprelu" else torch.zeros(m)
        return load_into(TokenNormalizedSAE, {
            "W_enc": W_enc, "b_enc": w["b_enc"] + (0 if a else shift), "W_dec": W_dec,
            "b_dec": b_dec, "threshold": threshold, "normalization_id": torch.tensor(norm_id),
            "k": torch.tensor(spec["k"] if arch == "topk" else 0, dtype=torch.int)}, path)
    if arch == "standard" and a:
        return load_into(AutoEncoder, {"bias": b_dec, "encoder.weight": W_enc.T,
                                       "encoder.bias": w["b_enc"], "decoder.weight": W_dec.T}, path)
    if arch == "standard":
        return load_into(AutoEncoderNew, {"encoder.weight": W_enc.T, "encoder.bias": w["b_enc"],
                                          "decoder.weight": W_dec.T, "decoder.bias": b_dec}, path)
    if arch == "topk":
        return load_into(AutoEncoderTopK, {
            "encoder.weight": W_enc.T, "encoder.bias": w["b_enc"] + (0 if a else shift),
            "decoder.weight": W_dec.T, "b_dec": b_dec,
            "k": torch.tensor(spec["k"], dtype=torch.int), "threshold": torch.tensor(-1.0)}, path)
    if arch == "jumprelu":
        return load_into(JumpReluAutoEncoder, {
            "W_enc": W_enc, "b_enc": w["b_enc"] - (shift if a else 0), "W_dec": W_dec,
            "b_dec": b_dec, "threshold": w["threshold"]}, path)
    # gated: z = (x - b_dec) @ W_enc; without a, x @ W_enc = z + shift.
    z_shift = 0 if a else shift
    return load_into(GatedAutoEncoder, {
        "decoder_bias": b_dec, "encoder.weight": W_enc.T, "r_mag": w["r_mag"],
        "gate_bias": w["b_gate"] + z_shift, "mag_bias": w["b_mag"] + w["r_mag"].exp() * z_shift,
        "decoder.weight": W_dec.T}, path)


def read_sparsity(folder: Path, m: int) -> list[float] | None:
    """``sparsity [m]`` (log10 feature density) from ``sparsity.safetensors``, if present."""
    path = folder / SPARSITY_NAME
    if not path.is_file():
        return None
    tensors = read_safetensors(path)
    require_tensors(tensors, {"sparsity": (m,)}, path)
    return tensors["sparsity"].float().tolist()


def load(path: str | Path, norm_scaling_factor: float | None = None):
    """``(dictionary, config)`` from a SAELens folder (or its ``sae_weights.safetensors``).

    ``config`` = ``{"format": "saelens", "cfg": <cfg.json>, "architecture", "model_name",
    "hook_name", "log10_feature_density": [m] list or None}``.
    """
    path = Path(path)
    folder = path.parent if path.name == WEIGHTS_NAME else path
    cfg = read_json(folder / CFG_NAME)
    spec = parse_cfg(cfg, folder / CFG_NAME)
    w = _fold_scaling(read_weights(folder, spec, cfg), spec, norm_scaling_factor, folder)
    ae = to_dictionary(w, spec, folder / WEIGHTS_NAME)
    if cfg.get("reshape_activations") == "hook_z":
        logger.info("%s: a hook_z SAE: pass attention outputs flattened to [..., n_heads * "
                    "d_head]", folder)
    config = {"format": NAME, "cfg": cfg, "architecture": spec["architecture"],
              **_metadata(cfg), "log10_feature_density": read_sparsity(folder, ae.dict_size)}
    return ae, config
