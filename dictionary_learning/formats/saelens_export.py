"""Writing our dictionaries as SAELens folders (``cfg.json`` v6 style +
``sae_weights.safetensors``, optionally ``sparsity.safetensors``), which SAELens's
``load_from_disk`` (checked with sae-lens 6.54.12, ``tests/crosscheck_formats.py``) and
``saelens.load`` read back.

==========================  =========================================================
our class                   SAELens
==========================  =========================================================
AutoEncoder                 standard, apply_b_dec_to_input = true
AutoEncoderNew              standard, apply_b_dec_to_input = false
AutoEncoderTopK             topk (k), apply_b_dec_to_input = true
JumpReluAutoEncoder         jumprelu, apply_b_dec_to_input = false
GatedAutoEncoder            gated, apply_b_dec_to_input = true
TokenNormalizedGatedSAE     gated with its normalize_activations
BatchTopKSAE, Matryoshka    jumprelu with every threshold = the inference threshold
                            (``relu(pre) * (pre > t)`` is their inference for t >= 0)
TokenNormalizedSAE          standard / topk / jumprelu with its normalize_activations
==========================  =========================================================

Other classes (MLPStretcher, IdentityDict, ...) have no SAELens counterpart: ``ValueError``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..files import write_json
from .saelens import CFG_NAME, SPARSITY_NAME, WEIGHTS_NAME


def _linear(sd) -> dict:
    """SAELens's ``W_enc [d, m]``, ``b_enc``, ``W_dec [m, d]`` from ``nn.Linear`` layouts."""
    return {"W_enc": sd["encoder.weight"].T, "b_enc": sd["encoder.bias"],
            "W_dec": sd["decoder.weight"].T}


def _weights(ae) -> tuple[str, bool, dict, dict]:
    """``(architecture, apply_b_dec_to_input, tensors, extra cfg)`` for SAELens."""
    name, sd = type(ae).__name__, ae.state_dict()
    if name == "AutoEncoder":
        return "standard", True, {**_linear(sd), "b_dec": sd["bias"]}, {}
    if name == "AutoEncoderNew":
        return "standard", False, {**_linear(sd), "b_dec": sd["decoder.bias"]}, {}
    if name == "AutoEncoderTopK":
        return "topk", True, {**_linear(sd), "b_dec": sd["b_dec"]}, {"k": int(sd["k"])}
    if name == "JumpReluAutoEncoder":
        return "jumprelu", False, {n: sd[n] for n in ("W_enc", "b_enc", "W_dec", "b_dec",
                                                      "threshold")}, {}
    if name in ("GatedAutoEncoder", "TokenNormalizedGatedSAE"):
        extra = {"normalize_activations": ae.normalization} if "normalization_id" in sd else {}
        return "gated", True, {"W_enc": sd["encoder.weight"].T, "b_gate": sd["gate_bias"],
                               "b_mag": sd["mag_bias"], "r_mag": sd["r_mag"],
                               "W_dec": sd["decoder.weight"].T, "b_dec": sd["decoder_bias"]}, extra
    if name in ("BatchTopKSAE", "MatryoshkaBatchTopKSAE"):
        sd = ae.inference_state_dict()[0]  # the threshold encode uses (a short run's too)
        t = float(sd["threshold"])
        if t < 0:
            raise ValueError(f"{name} has no inference threshold yet (threshold={t}): it "
                             "encodes by per-token top-k, which SAELens's jumprelu cannot express")
        w = ({"W_enc": sd["W_enc"], "b_enc": sd["b_enc"], "W_dec": sd["W_dec"]}
             if "W_enc" in sd else _linear(sd))
        return "jumprelu", True, {**w, "b_dec": sd["b_dec"],
                                  "threshold": torch.full((ae.dict_size,), t)}, {}
    if name == "TokenNormalizedSAE":
        k, jump = int(sd["k"]), bool((sd["threshold"] != 0).any())
        if k and jump:
            raise ValueError("a TokenNormalizedSAE with both top-k and thresholds has no "
                             "SAELens counterpart")
        arch = "topk" if k else "jumprelu" if jump else "standard"
        w = {n: sd[n] for n in ("W_enc", "b_enc", "W_dec", "b_dec")}
        if jump:
            w["threshold"] = sd["threshold"]
        return arch, True, w, {"normalize_activations": ae.normalization, **({"k": k} if k else {})}
    raise ValueError(f"{name} has no SAELens counterpart; exportable classes: AutoEncoder, "
                     "AutoEncoderNew, AutoEncoderTopK, JumpReluAutoEncoder, GatedAutoEncoder, "
                     "BatchTopKSAE, MatryoshkaBatchTopKSAE, TokenNormalizedSAE, "
                     "TokenNormalizedGatedSAE")


def save_saelens(ae, folder: str | Path, model_name: str | None = None,
                 hook_name: str | None = None, log10_feature_density=None,
                 metadata: dict | None = None) -> Path:
    """Write ``ae`` as a SAELens folder and return the folder.

    ``metadata`` entries (e.g. ``context_size``, ``prepend_bos``) join ``model_name`` and
    ``hook_name`` under ``cfg.json``'s ``metadata``; ``log10_feature_density`` (``[m]``) is
    written to ``sparsity.safetensors``.
    """
    from safetensors.torch import save_file

    arch, apply_b_dec, tensors, extra = _weights(ae)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {n: t.detach().to("cpu", torch.float32).contiguous() for n, t in tensors.items()}
    cfg = {"architecture": arch, "d_in": ae.activation_dim, "d_sae": ae.dict_size,
           "dtype": "float32", "device": "cpu", "apply_b_dec_to_input": apply_b_dec,
           "normalize_activations": "none", "reshape_activations": "none", **extra,
           "metadata": {"model_name": model_name, "hook_name": hook_name, **(metadata or {})}}
    save_file(tensors, folder / WEIGHTS_NAME)
    write_json(folder / CFG_NAME, cfg)
    if log10_feature_density is not None:
        density = torch.as_tensor(log10_feature_density, dtype=torch.float32).reshape(-1)
        if density.numel() != ae.dict_size:
            raise ValueError(f"log10_feature_density has {density.numel()} entries, the "
                             f"dictionary {ae.dict_size} features")
        save_file({"sparsity": density.contiguous()}, folder / SPARSITY_NAME)
    return folder
