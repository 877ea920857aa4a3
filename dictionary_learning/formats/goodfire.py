"""Goodfire's Llama SAEs (Hub repos ``Goodfire/Llama-3.1-8B-Instruct-SAE-l19``,
``Goodfire/Llama-3.3-70B-Instruct-SAE-l50``): one ``.pth`` / ``.pt`` pickle of a state_dict.

Keys (``nn.Linear`` layout): ``encoder_linear.weight [m, d]``, ``encoder_linear.bias [m]``,
``decoder_linear.weight [d, m]``, ``decoder_linear.bias [d]``. Goodfire's model class computes
``f = relu(encoder_linear(x))`` and ``x_hat = decoder_linear(f)``: nothing is subtracted
before encoding, which is our ``AutoEncoderNew`` with the weights as they are.
"""

from __future__ import annotations

from pathlib import Path

from ..architectures import AutoEncoderNew
from .common import load_into, require_tensors

NAME = "goodfire"
KEYS = frozenset({"encoder_linear.weight", "encoder_linear.bias", "decoder_linear.weight",
                  "decoder_linear.bias"})


def recognise(obj) -> bool:
    return isinstance(obj, dict) and frozenset(obj) == KEYS


def convert(sd: dict, path: Path, **kwargs):
    """``(AutoEncoderNew, config)``; ``config = {"format": "goodfire", "dtype"}``."""
    if kwargs:
        raise TypeError(f"Goodfire files take no options, got {sorted(kwargs)}")
    require_tensors(sd, {"encoder_linear.weight": (None, None)}, path)
    m, d = sd["encoder_linear.weight"].shape
    require_tensors(sd, {"encoder_linear.bias": (m,), "decoder_linear.weight": (d, m),
                         "decoder_linear.bias": (d,)}, path)
    ae = load_into(AutoEncoderNew, {
        "encoder.weight": sd["encoder_linear.weight"], "encoder.bias": sd["encoder_linear.bias"],
        "decoder.weight": sd["decoder_linear.weight"], "decoder.bias": sd["decoder_linear.bias"]},
        path)
    return ae, {"format": NAME, "activation_dim": d, "dict_size": m,
                "dtype": str(sd["encoder_linear.weight"].dtype).removeprefix("torch.")}
