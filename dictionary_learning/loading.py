"""Reading dictionaries from disk, whatever tool wrote them.

``load_dictionary(path)`` recognises the format and returns ``(dictionary, config)``: our own
folders (``ae.pt`` state_dict plus an optional ``config.json``, as saprmarks/dictionary_learning
writes them), SAELens and sparsify folders, mats_sae_training and OpenAI ``.pt`` files (the
converters live in ``formats/``). Pickles are read with ``torch.load(weights_only=True)``: a
pickle that would run code is refused, never executed.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch

from . import architectures  # noqa: F401 - registers every dictionary class
from . import formats
from .formats.common import load_into, read_pickle
from .registry import get_dictionary_class

logger = logging.getLogger(__name__)

WEIGHTS_NAME = "ae.pt"
CONFIG_NAME = "config.json"


def _weights_path(path: str | os.PathLike) -> Path:
    path = Path(path)
    if path.is_dir():
        path = path / WEIGHTS_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no dictionary weights at {path}: expected an {WEIGHTS_NAME} file "
                                "or a folder containing one")
    return path


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The state_dict in an ``ae.pt`` file (or the folder holding one), on CPU."""
    path = _weights_path(path)
    return _check_state_dict(read_pickle(path), path)


def _check_state_dict(state_dict, path: Path) -> dict[str, torch.Tensor]:
    if not isinstance(state_dict, dict) or not all(
            isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise ValueError(f"{path} does not hold a state_dict of tensors")
    return state_dict


def read_config(folder: str | os.PathLike) -> dict:
    """``config.json`` beside the weights, or ``{}`` when there is none."""
    path = Path(folder) / CONFIG_NAME
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e


# The published key set of each class, for files without a config.json. TopK and
# BatchTopK files have the same keys: without a config they load as AutoEncoderTopK (per-token
# top-k, which a BatchTopK dictionary was trained to approximate), with a logged warning.
_CLASS_BY_KEYS = {
    frozenset({"bias", "encoder.weight", "encoder.bias", "decoder.weight"}): "AutoEncoder",
    frozenset({"in_bias", "out_bias", "encoder.weight", "encoder.bias", "decoder.weight"}):
        "MLPStretcher",
    frozenset({"encoder.weight", "encoder.bias", "decoder.weight", "b_dec", "k", "threshold"}):
        "AutoEncoderTopK",
    frozenset({"W_enc", "b_enc", "W_dec", "b_dec", "k", "threshold", "group_sizes"}):
        "MatryoshkaBatchTopKSAE",
    frozenset({"W_enc", "b_enc", "W_dec", "b_dec", "threshold"}): "JumpReluAutoEncoder",
    frozenset({"decoder_bias", "encoder.weight", "r_mag", "gate_bias", "mag_bias",
               "decoder.weight"}): "GatedAutoEncoder",
    frozenset({"encoder.weight", "encoder.bias", "decoder.weight", "decoder.bias"}):
        "AutoEncoderNew",
}


def _class_name(config: dict, state_dict: dict) -> str:
    """The class named by the config (nested ``trainer.dict_class`` or flat ``dict_class``),
    else the one whose published keys the state_dict has."""
    trainer = config.get("trainer", config)
    if "dict_class" in trainer:
        return trainer["dict_class"]
    keys = frozenset(state_dict)
    if keys in _CLASS_BY_KEYS:
        name = _CLASS_BY_KEYS[keys]
        if name == "AutoEncoderTopK":
            logger.warning("no config.json names the class of these TopK-layout weights: "
                           "loading as AutoEncoderTopK (a BatchTopKSAE has the same keys; add "
                           "a config.json with trainer.dict_class to choose)")
        return name
    raise ValueError(f"cannot tell which dictionary class has keys {sorted(keys)}; "
                     "add a config.json naming trainer.dict_class")


def load_dictionary(path: str | os.PathLike, device: str | torch.device = "cpu",
                    dtype: torch.dtype | None = None, **options):
    """Load any supported dictionary as ``(dictionary, config)``, on ``device``.

    ``path`` is a folder or a file of one of these formats (``formats/`` for the foreign ones):

    - ours / saprmarks: a folder with ``ae.pt`` (+ ``config.json``), or the ``ae.pt`` file;
      ``options`` are widths (e.g. ``activation_dim=512``) checked against the weights, and
      ``dict_class`` to choose the class where ``config.json`` names none (or another);
    - SAELens: a folder with ``cfg.json`` + ``sae_weights.safetensors``; option
      ``norm_scaling_factor`` (see ``formats.saelens``);
    - sparsify: a hookpoint folder (``cfg.json`` + ``sae.safetensors``) or a folder of them;
      option ``hookpoint``;
    - mats_sae_training and OpenAI ``.pt`` files.

    ``config`` is plain data: for our folders the ``config.json`` contents (``{}`` when there
    is none); for the others ``{"format": <name>, ...}`` with the file's own configuration.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no dictionary at {path}")
    name = formats.folder_format(path)
    if name is not None:
        dictionary, config = formats.FORMATS[name].load(path, **options)
    elif path.is_dir():
        weights = path / WEIGHTS_NAME
        if not weights.is_file():
            raise FileNotFoundError(
                f"no dictionary weights in {path}: expected {WEIGHTS_NAME} (this project, "
                "saprmarks/dictionary_learning), cfg.json + sae_weights.safetensors (SAELens) "
                "or cfg.json + sae.safetensors (sparsify)")
        dictionary, config = _load_own(weights, read_pickle(weights), options)
    elif path.suffix == ".safetensors":
        raise ValueError(f"{path}: a safetensors file is read as sae_weights.safetensors "
                         "(SAELens) or sae.safetensors (sparsify), beside its cfg.json")
    else:
        obj = read_pickle(path)
        name = formats.pickle_format(obj)
        if name is not None:
            dictionary, config = formats.FORMATS[name].convert(obj, path, **options)
        else:
            dictionary, config = _load_own(path, obj, options)
    return dictionary.to(device=device, dtype=dtype), config


def _load_own(weights: Path, obj, widths: dict):
    """Our (saprmarks) format: the class is ``widths["dict_class"]`` when given, else the one
    ``config.json`` names (upstream's nested schema or the older flat one), else the one
    whose published keys the state_dict has.
    Widths are read off the tensor shapes; ``widths`` (e.g. ``activation_dim=512``) are
    checked against them, and are needed only for weightless dictionaries (``IdentityDict``).
    """
    state_dict = _check_state_dict(obj, weights)
    config = read_config(weights.parent)
    widths = dict(widths)
    forced = widths.pop("dict_class", None)
    try:
        cls = get_dictionary_class(forced or _class_name(config, state_dict))
    except ValueError as e:
        raise ValueError(f"{weights}: {e}") from e
    dictionary = load_into(cls, state_dict, weights, **widths)
    for name, value in widths.items():
        if getattr(dictionary, name, value) != value:
            raise ValueError(f"{weights}: {name} is {getattr(dictionary, name)} in the weights, "
                             f"not {value} as given")
    trainer = config.get("trainer", config)
    for name in ("activation_dim", "dict_size"):
        if name in trainer and trainer[name] != getattr(dictionary, name):
            raise ValueError(f"{weights}: config.json says {name}={trainer[name]} but the "
                             f"weights have {getattr(dictionary, name)}")
    return dictionary, config
