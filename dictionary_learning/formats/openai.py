"""OpenAI sparse_autoencoder / Transformer Debugger ``.pt`` files (GPT-2 small SAEs).

A pickled dict: ``encoder.weight [m, d]``, ``decoder.weight [d, m]``, ``pre_bias [d]``,
``latent_bias [m]``, ``activation`` ("ReLU" | "TopK"), ``activation_state_dict`` (``{}`` or
``{"k", "postact_fn"}``) and statistics buffers (``stats_last_nonzero``,
``latents_activation_frequency``, ``latents_mean_square``), tolerated and returned in the
config.

- ReLU (v1, v4): ``latents = relu(encoder(x - pre_bias) + latent_bias)``,
  ``recon = decoder(latents) + pre_bias``: our ``AutoEncoder`` with ``bias = pre_bias``.
- TopK (v5): the input is layer-normalised per token first and ``recon`` is mapped back
  (``recon * std + mu``): ``TokenNormalizedSAE`` with ``normalization="layer_norm"``. Top-k
  then ReLU (theirs) equals ReLU then top-k (ours).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from ..architectures import AutoEncoder, TokenNormalizedSAE
from .common import load_into, plain, require_tensors

logger = logging.getLogger(__name__)
NAME = "openai"
STATS = ("stats_last_nonzero", "latents_activation_frequency", "latents_mean_square")


def recognise(obj) -> bool:
    """Whether an unpickled object is an OpenAI SAE state dict."""
    return isinstance(obj, dict) and "pre_bias" in obj and "latent_bias" in obj


def convert(sd: dict, path: Path, **kwargs):
    """``(dictionary, config)`` from the unpickled dict of ``path``."""
    if kwargs:
        raise TypeError(f"OpenAI files take no options, got {sorted(kwargs)}")
    require_tensors(sd, {"encoder.weight": (None, None)}, path)
    m, d = sd["encoder.weight"].shape
    require_tensors(sd, {"decoder.weight": (d, m), "pre_bias": (d,), "latent_bias": (m,)},
                    path)
    activation = sd.get("activation", "ReLU")
    act_state = sd.get("activation_state_dict", {}) or {}
    config = {"format": NAME, "activation": activation, "activation_state_dict": plain(act_state),
              "activation_dim": d, "dict_size": m}
    config.update({name: plain(sd[name]) for name in STATS if name in sd})
    unknown = set(sd) - {"encoder.weight", "decoder.weight", "pre_bias", "latent_bias",
                         "activation", "activation_state_dict", *STATS}
    if unknown:  # Transformer Debugger loads with strict=False: extra entries are ignored
        logger.warning("%s: ignoring unknown entries %s", path, sorted(unknown))
        config["ignored_keys"] = sorted(unknown)
    if activation == "ReLU":
        ae = load_into(AutoEncoder, {
            "bias": sd["pre_bias"], "encoder.weight": sd["encoder.weight"],
            "encoder.bias": sd["latent_bias"], "decoder.weight": sd["decoder.weight"]}, path)
        return ae, config
    if activation != "TopK":
        raise ValueError(f"{path}: unknown activation {activation!r} (known: ReLU, TopK)")
    k, postact = act_state.get("k"), act_state.get("postact_fn", "ReLU")
    if isinstance(k, torch.Tensor) and k.numel() == 1 and not k.is_floating_point():
        k = int(k)
    if not isinstance(k, int) or not 0 < k <= m:
        raise ValueError(f"{path}: activation_state_dict needs an integer k in [1, {m}], "
                         f"got {k!r}")
    if postact != "ReLU":
        raise ValueError(f"{path}: TopK with postact_fn {postact!r} is not supported (only "
                         "ReLU, as in the released files)")
    config["k"] = k
    ae = load_into(TokenNormalizedSAE, {
        "W_enc": sd["encoder.weight"].T, "b_enc": sd["latent_bias"],
        "W_dec": sd["decoder.weight"].T, "b_dec": sd["pre_bias"],
        "threshold": torch.zeros(m), "k": torch.tensor(k, dtype=torch.int),
        "normalization_id": torch.tensor(0)}, path)
    return ae, config
