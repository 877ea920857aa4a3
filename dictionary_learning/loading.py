"""Reading dictionaries from disk, whatever tool wrote them, and refusing damaged ones.

``load_dictionary(path)`` recognises the format and returns ``(dictionary, config)``: our own
folders (``ae.pt`` state_dict plus an optional ``config.json``, as saprmarks/dictionary_learning
writes them), SAELens and sparsify folders, mats_sae_training and OpenAI ``.pt`` files (the
converters live in ``formats/``). Pickles are read with :func:`read_pickle`
(``torch.load(weights_only=True)``; use it for every ``torch.load``): a pickle that would run
code is refused, never executed.

What is refused, each with one ``ValueError`` naming the file:

- weights holding NaN or inf, in any format (``check_finite=False`` loads them anyway); a
  finite weight above ``1e30`` in absolute value (it overflows in use) is logged as a warning;
- for our folders, an ``ae.pt`` whose SHA-256 differs from the one ``config.json`` records
  under ``"sha256": {"ae.pt": "<hex>"}``: a logged warning, or a ``ValueError`` with
  ``strict=True``; a config without ``"sha256"`` (older folders, upstream's) is not checked;
- a ``config.json`` that is not UTF-8, not JSON, or JSON but not an object.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import torch

from . import architectures  # noqa: F401 - registers every dictionary class
from . import formats
from .files import file_sha256
from .formats.common import load_into, read_json, read_pickle
from .registry import get_dictionary_class

__all__ = ["load_dictionary", "read_config", "read_pickle", "read_state_dict",
           "check_finite_tensors", "CONFIG_NAME", "WEIGHTS_NAME", "CHECKSUMS_KEY"]

logger = logging.getLogger(__name__)

WEIGHTS_NAME = "ae.pt"
CONFIG_NAME = "config.json"
CHECKSUMS_KEY = "sha256"  # config.json: {"sha256": {"ae.pt": "<hex SHA-256 of its bytes>"}}
# A finite weight above this (in absolute value) overflows once multiplied in use.
HUGE_WEIGHT = 1e30


def _weights_path(path: str | os.PathLike) -> Path:
    path = Path(path)
    if path.is_dir():
        path = path / WEIGHTS_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no dictionary weights at {path}: expected an {WEIGHTS_NAME} file "
                                "or a folder containing one")
    return path


def read_state_dict(path: str | os.PathLike, check_finite: bool = True
                    ) -> dict[str, torch.Tensor]:
    """The state_dict in an ``ae.pt`` file (or the folder holding one), on CPU.

    With ``check_finite`` (the default) a tensor holding NaN or inf is a ``ValueError`` naming
    its key and the file (see :func:`check_finite_tensors`)."""
    path = _weights_path(path)
    state_dict = _check_state_dict(read_pickle(path), path)
    if check_finite:
        check_finite_tensors(state_dict, path)
    return state_dict


def _check_state_dict(state_dict, path: Path) -> dict[str, torch.Tensor]:
    if not isinstance(state_dict, dict) or not all(
            isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise ValueError(f"{path} does not hold a state_dict of tensors")
    return state_dict


def read_config(folder: str | os.PathLike) -> dict:
    """``config.json`` beside the weights, or ``{}`` when there is none.

    A file that is not UTF-8, not JSON, or JSON but not an object (``[]``, ``true``, ``3``)
    is a ``ValueError`` naming it."""
    path = Path(folder) / CONFIG_NAME
    if not path.is_file():
        return {}
    return read_json(path)


_CHECKPOINT_WEIGHTS = re.compile(r"^ae_(\d+)\.pt$")


def _earlier_checkpoints(source: Path) -> str:
    """Advice naming the checkpoints beside (or below) the weights file ``source``."""
    folder = source.parent if _CHECKPOINT_WEIGHTS.match(source.name) else \
        source.parent / "checkpoints"
    current = _CHECKPOINT_WEIGHTS.match(source.name)
    steps = sorted(int(m.group(1)) for p in (folder.iterdir() if folder.is_dir() else ())
                   if (m := _CHECKPOINT_WEIGHTS.match(p.name)))
    if current:
        steps = [s for s in steps if s < int(current.group(1))]
    if not steps:
        return "load an earlier checkpoint (checkpoints/ae_STEP.pt) if the run kept one"
    return (f"load an earlier checkpoint ({folder / 'ae_STEP.pt'}; steps there: "
            f"{', '.join(map(str, steps[-5:]))})")


def check_finite_tensors(tensors: dict[str, torch.Tensor], source: Path,
                         advice: str | None = None, warn_huge: bool = True) -> None:
    """Raise a ``ValueError`` naming the key and ``source`` if a floating tensor holds NaN or
    inf; log a warning for finite values above ``HUGE_WEIGHT`` in absolute value.

    ``advice`` ends the error (default: name the run's earlier checkpoints); ``warn_huge``
    turns the warning off."""
    for key, t in tensors.items():
        if not isinstance(t, torch.Tensor) or t.is_meta or t.numel() == 0 or not (
                t.is_floating_point() or t.is_complex()):
            continue
        finite = torch.isfinite(t)
        if not bool(finite.all()):
            bad = int(finite.numel() - finite.sum())
            raise ValueError(
                f"{source}: tensor {key} holds {bad} non-finite value{'s' * (bad != 1)} "
                f"(NaN or inf) of {t.numel()}: the file is damaged or the run diverged; "
                f"{advice or _earlier_checkpoints(Path(source))}, or pass check_finite=False "
                "to load it anyway")
        if not warn_huge:
            continue
        peak = float(t.detach().abs().max())
        if peak > HUGE_WEIGHT:
            logger.warning("%s: tensor %s has values up to %.3g in absolute value: finite, "
                           "but it overflows to inf in use (the run probably diverged); "
                           "load an earlier checkpoint", source, key, peak)


def _tensors_of(dictionary) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of a dictionary, under its state_dict name."""
    if not isinstance(dictionary, torch.nn.Module):
        return {}
    return {**dict(dictionary.named_buffers()), **dict(dictionary.named_parameters())}


def _verify_checksum(weights: Path, config: dict, strict: bool) -> None:
    """Compare ``weights``' SHA-256 with the one ``config.json`` records for its name, if any:
    a mismatch is a logged warning, or with ``strict`` a ``ValueError``."""
    if CHECKSUMS_KEY not in config:
        return
    config_path = weights.parent / CONFIG_NAME
    recorded = config[CHECKSUMS_KEY]
    if not isinstance(recorded, dict):
        message = (f"{config_path}: {CHECKSUMS_KEY!r} should map file names to hex SHA-256 "
                   f"digests, not be a {type(recorded).__name__}: {weights} is not checked; "
                   "the config is damaged")
        if strict:
            raise ValueError(message)
        logger.warning(message)
        return
    expected = recorded.get(weights.name)
    if expected is None:
        return
    actual = file_sha256(weights)
    if not isinstance(expected, str) or expected.strip().lower() != actual:
        message = (f"{weights} changed since it was written (SHA-256 differs from "
                   f"{CONFIG_NAME}): {config_path} records {expected!r}, the file has "
                   f"{actual}; the file was damaged (disk, copy, partial download) or "
                   "replaced: fetch or copy it again, or load an earlier checkpoint")
        if strict:
            raise ValueError(message + " (strict=True)")
        logger.warning(message + "; pass strict=True to refuse it")


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


# The key set each of those classes loads (BatchTopKSAE shares AutoEncoderTopK's).
_KEYS_OF_CLASS = {name: keys for keys, name in _CLASS_BY_KEYS.items()}
_KEYS_OF_CLASS["BatchTopKSAE"] = _KEYS_OF_CLASS["AutoEncoderTopK"]


def _class_name(config: dict, state_dict: dict) -> str:
    """The class named by the config (nested ``trainer.dict_class`` or flat ``dict_class``),
    else the one whose published keys the state_dict has. A config naming a class whose
    published keys differ from the file's, when the keys are another class's (upstream's
    ``StandardTrainer(dict_class=AutoEncoderNew)`` writes ``"dict_class": "AutoEncoder"``),
    gives the class of the keys, with a logged warning."""
    trainer = config.get("trainer", config)
    keys = frozenset(state_dict)
    if "dict_class" in trainer:
        named = trainer["dict_class"]
        by_keys = _CLASS_BY_KEYS.get(keys)
        if by_keys is not None and named in _KEYS_OF_CLASS and keys != _KEYS_OF_CLASS[named]:
            logger.warning("config.json names %s, but the weights have the keys of %s "
                           "(%s): loading as %s", named, by_keys, ", ".join(sorted(keys)),
                           by_keys)
            return by_keys
        return named
    if keys in _CLASS_BY_KEYS:
        name = _CLASS_BY_KEYS[keys]
        if name == "AutoEncoderTopK":
            logger.warning("no config.json names the class of these TopK-layout weights: "
                           "loading as AutoEncoderTopK (a BatchTopKSAE has the same keys; add "
                           "a config.json with trainer.dict_class to choose)")
        return name
    raise ValueError(f"cannot tell which dictionary class has keys {sorted(keys)}; "
                     "add a config.json naming trainer.dict_class")


OWN_TRAINER_CLASS = "Trainer"  # what this package writes as trainer.trainer_class


def _written_upstream(config: dict) -> bool:
    """Whether ``config.json`` is upstream's: its trainer section names one of upstream's
    trainer classes (``StandardTrainer``, ``StandardTrainerAprilUpdate``, ...), not ours."""
    trainer = config.get("trainer", config)
    return trainer.get("trainer_class", OWN_TRAINER_CLASS) != OWN_TRAINER_CLASS


def _normalize_decoder_as_upstream(ae, weights: Path) -> None:
    """Upstream's ``AutoEncoder.from_pretrained`` (and so its ``load_dictionary``) rescales
    a decoder whose columns are not unit norm (``StandardTrainerAprilUpdate`` leaves them
    free) to unit norm, multiplying each feature's encoder row and bias by its norm: the
    reconstruction is unchanged and the features are those upstream computes. Done
    likewise here for upstream's folders (``normalize_decoder``: ``None`` = only those,
    ``True`` = any ``AutoEncoder``, ``False`` = never)."""
    norms = ae.W_dec.detach().norm(dim=-1)
    if torch.allclose(norms, torch.ones_like(norms)):  # upstream's test, its tolerances
        return
    logger.info("%s: decoder columns are not unit norm (%.3g to %.3g): normalised as "
                "upstream's loader does, the scale folded into the encoder "
                "(normalize_decoder=False keeps them)", weights, float(norms.min()),
                float(norms.max()))
    ae.normalize_decoder()


def _warn_unestimated_threshold(ae, config: dict, weights: Path) -> None:
    """An upstream batch-top-k file whose threshold was never estimated (a run shorter than
    upstream's ``threshold_start_step``): say what it encodes with. (Our folders say it in
    ``config.json``'s ``run.inference``; only untrained ones have -1.)"""
    if not callable(getattr(ae, "inference_state_dict", None)) or float(ae.threshold) >= 0:
        return
    if not _written_upstream(config):
        return
    logger.warning("%s: threshold = -1, never estimated by the run that wrote it: this "
                   "encodes each token's top k=%d (upstream's encode would keep every "
                   "positive pre-activation, far more than k)", weights, int(ae.k))


def load_dictionary(path: str | os.PathLike, device: str | torch.device = "cpu",
                    dtype: torch.dtype | None = None, *, check_finite: bool = True,
                    strict: bool = False, repo_id: str | None = None,
                    revision: str | None = None, release: str | None = None,
                    registry: str | os.PathLike | None = None,
                    cache_dir: str | os.PathLike | None = None, **options):
    """Load any supported dictionary as ``(dictionary, config)``, on ``device``.

    ``path`` is a folder or a file of one of these formats (``formats/`` for the foreign ones):

    - ours / saprmarks: a folder with ``ae.pt`` (+ ``config.json``), or the ``ae.pt`` file;
      ``options`` are widths (e.g. ``activation_dim=512``) checked against the weights,
      ``dict_class`` to choose the class where ``config.json`` names none (or another), and
      ``normalize_decoder`` (``None``: upstream's folders' ``AutoEncoder`` decoders are made
      unit norm, the scale folded into the encoder, as upstream's loader does; ``True``,
      ``False``). A config whose class contradicts the weights' keys gives the keys' class,
      with a warning;
    - SAELens: a folder with ``cfg.json`` + ``sae_weights.safetensors``; option
      ``norm_scaling_factor`` (see ``formats.saelens``);
    - sparsify: a hookpoint folder (``cfg.json`` + ``sae.safetensors``) or a folder of them;
      option ``hookpoint``;
    - Gemma Scope (``params.npz``), Gemma Scope 2 (``params.safetensors``), Llama Scope
      (``hyperparams.json`` + ``checkpoints/final.safetensors``) folders;
    - mats_sae_training, OpenAI and Goodfire ``.pt`` / ``.pth`` files.

    On the Hugging Face Hub (``formats.hub``): ``path`` = ``"hf://org/repo/path/in/repo"``
    (``hf://org/repo@revision/...``), or a path inside ``repo_id`` (at ``revision``), or a
    SAELens sae_id with its ``release`` (looked up in SAELens's registry, or ``registry``).
    The files are fetched into the Hugging Face cache (``cache_dir``; offline with
    ``HF_HUB_OFFLINE=1``), and ``config["source"]`` says where they came from.

    ``check_finite`` (default ``True``): every format's loaded parameters and buffers are
    checked; one holding NaN or inf is a ``ValueError`` naming its key and the file (values
    above ``1e30`` only log a warning); ``False`` loads them anyway.

    ``strict`` (default ``False``): our folders' ``config.json`` may record the SHA-256 of
    the weights (``"sha256": {"ae.pt": "<hex>"}``); a file that differs is a logged warning,
    with ``strict=True`` a ``ValueError``. Neither option reaches the format readers.

    ``config`` is plain data: for our folders the ``config.json`` contents (``{}`` when there
    is none); for the others ``{"format": <name>, ...}`` with the file's own configuration.
    """
    from .formats import hub

    path, options, hub_source = hub.resolve(path, repo_id, revision, release, registry,
                                            cache_dir, options)
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no dictionary at {path}")
    source, advice = path, None
    name = formats.folder_format(path)
    if name is not None:
        dictionary, config = formats.FORMATS[name].load(path, **options)
        advice = "download or export it again"
    elif path.is_dir():
        weights = path / WEIGHTS_NAME
        if not weights.is_file():
            raise FileNotFoundError(
                f"no dictionary weights in {path}: expected {WEIGHTS_NAME} (this project, "
                "saprmarks/dictionary_learning), cfg.json + sae_weights.safetensors (SAELens), "
                "cfg.json + sae.safetensors (sparsify), params.npz / params.safetensors "
                "(Gemma Scope) or hyperparams.json + checkpoints/final.safetensors (Llama "
                "Scope)")
        source = weights
        dictionary, config = _load_own(weights, None, options, strict)
    elif path.suffix == ".safetensors":
        raise ValueError(f"{path}: a safetensors file is read as sae_weights.safetensors "
                         "(SAELens) or sae.safetensors (sparsify), beside its cfg.json")
    else:
        obj = read_pickle(path)
        name = formats.pickle_format(obj)
        if name is not None:
            dictionary, config = formats.FORMATS[name].convert(obj, path, **options)
            advice = "download or export it again"
        else:
            dictionary, config = _load_own(path, obj, options, strict)
    if check_finite:
        check_finite_tensors(_tensors_of(dictionary), source, advice)
    dictionary = dictionary.to(device=device, dtype=dtype)
    if check_finite and dtype is not None:
        check_finite_tensors(_tensors_of(dictionary), source,
                             f"its values do not fit in {dtype}: load it with a wider dtype",
                             warn_huge=False)
    if hub_source is not None:
        config = {**config, "source": hub_source}
    return dictionary, config


def _load_own(weights: Path, obj, widths: dict, strict: bool = False):
    """Our (saprmarks) format: the class is ``widths["dict_class"]`` when given, else the one
    ``config.json`` names (upstream's nested schema or the older flat one), else the one
    whose published keys the state_dict has.
    Widths are read off the tensor shapes; ``widths`` (e.g. ``activation_dim=512``) are
    checked against them, and are needed only for weightless dictionaries (``IdentityDict``).
    ``obj`` is the unpickled file, or ``None`` to read it here, after its SHA-256 is compared
    with the one ``config.json`` records (``"sha256": {"ae.pt": ...}``; a warning, or with
    ``strict`` a ``ValueError``, on a mismatch).
    """
    config = read_config(weights.parent)
    if not isinstance(config.get("trainer", {}), dict):
        raise ValueError(f"{weights.parent / CONFIG_NAME}: \"trainer\" should be a JSON object, "
                         f"not {type(config['trainer']).__name__}; the config is damaged")
    _verify_checksum(weights, config, strict)
    state_dict = _check_state_dict(read_pickle(weights) if obj is None else obj, weights)
    widths = dict(widths)
    forced = widths.pop("dict_class", None)
    normalize = widths.pop("normalize_decoder", None)
    try:
        cls = get_dictionary_class(forced or _class_name(config, state_dict))
    except ValueError as e:
        raise ValueError(f"{weights}: {e}") from e
    dictionary = load_into(cls, state_dict, weights, **widths)
    if normalize is None:  # as the tool that wrote it loads it
        normalize = _written_upstream(config)
    if normalize and cls.__name__ == "AutoEncoder":
        _normalize_decoder_as_upstream(dictionary, weights)
    _warn_unestimated_threshold(dictionary, config, weights)
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
