"""Old mats_sae_training ``.pt`` files (SAELens's predecessor).

``torch.save({"cfg": <LanguageModelSAERunnerConfig>, "state_dict": {W_enc [d, m], b_enc [m],
W_dec [m, d], b_dec [d]}})``. The config object is rebuilt as an inert stub (allow-listed
under that one class name, ``common.MATS_CONFIG_CLASS``) and returned as plain data; a pickle
naming any other class is refused. The math is SAELens's standard SAE with ``b_dec``
subtracted first: ``f = relu((x - b_dec) @ W_enc + b_enc)``, ``x_hat = f @ W_dec + b_dec``,
which is our ``AutoEncoder``.
"""

from __future__ import annotations

from pathlib import Path

from ..architectures import AutoEncoder
from .common import MatsConfigStub, load_into, plain, require_tensors

NAME = "mats_sae_training"


def recognise(obj) -> bool:
    return isinstance(obj, dict) and set(obj) == {"cfg", "state_dict"}


def convert(obj: dict, path: Path, **kwargs):
    """``(AutoEncoder, config)``; ``config = {"format", "cfg": <the config's fields>,
    "hook_name", "model_name"}``."""
    if kwargs:
        raise TypeError(f"mats_sae_training files take no options, got {sorted(kwargs)}")
    cfg, sd = obj["cfg"], obj["state_dict"]
    if not isinstance(cfg, (MatsConfigStub, dict)):
        raise ValueError(f"{path}: 'cfg' should be a LanguageModelSAERunnerConfig, not "
                         f"{type(cfg).__name__}")
    if not isinstance(sd, dict):
        raise ValueError(f"{path}: 'state_dict' should be a dict of tensors")
    require_tensors(sd, {"W_enc": (None, None)}, path)
    d, m = sd["W_enc"].shape
    require_tensors(sd, {"b_enc": (m,), "W_dec": (m, d), "b_dec": (d,)}, path)
    unexpected = sorted(set(sd) - {"W_enc", "b_enc", "W_dec", "b_dec"})
    if unexpected:
        raise ValueError(f"{path}: unexpected keys {unexpected} in its state_dict")
    fields = plain(cfg)
    ae = load_into(AutoEncoder, {"bias": sd["b_dec"], "encoder.weight": sd["W_enc"].T,
                                 "encoder.bias": sd["b_enc"], "decoder.weight": sd["W_dec"].T},
                   path)
    return ae, {"format": NAME, "cfg": fields, "model_name": fields.get("model_name"),
                "hook_name": fields.get("hook_point", fields.get("hook_name"))}
