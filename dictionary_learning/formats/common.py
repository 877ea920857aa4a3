"""Reading untrusted dictionary files safely, with one clear error per problem.

Every reader names the file and what is wrong. Pickles (``.pt``) are read with
``torch.load(weights_only=True)``: only tensors, plain containers, numbers and strings (plus
the one allow-listed stub of ``MATS_CONFIG_CLASS``, which is inert) can come out; anything
else is refused before it can run.
"""

from __future__ import annotations

import json
import pickle
import re
import struct
from pathlib import Path

import torch

MATS_CONFIG_CLASS = "sae_training.config.LanguageModelSAERunnerConfig"


class MatsConfigStub:
    """Stands in for mats_sae_training's config class while unpickling: the pickle can only
    fill its ``__dict__`` (no method of the original class exists here to run)."""


def _safe_globals():
    """Allow-list the stub under the mats config class name (torch >= 2.5)."""
    safe_globals = getattr(torch.serialization, "safe_globals", None)
    if safe_globals is None:
        raise ValueError("reading .pt files that name a config class needs torch >= 2.5 "
                         "(torch.serialization.safe_globals); upgrade torch")
    return safe_globals([(MatsConfigStub, MATS_CONFIG_CLASS)])


# What torch's weights-only unpickler says when a pickle names a class or function it refuses;
# group 1 is the name (torch's advice after it, to allow-list it or to turn weights_only off,
# is dropped: neither is safe for a file of unknown origin).
_GLOBAL_REFUSED = re.compile(r"(?:unsupported GLOBAL|Unsupported global: GLOBAL)\s+([^\s,]+)",
                             re.IGNORECASE)
# Errors that unpickling a corrupted or foreign file raises besides UnpicklingError.
_CORRUPT = (RuntimeError, EOFError, OSError, ValueError, KeyError, IndexError, TypeError,
            AttributeError, UnicodeDecodeError, struct.error)


def read_pickle(path: Path):
    """The object in a ``torch.save`` file, read with ``weights_only=True`` on CPU.

    Every ``torch.load`` in the package goes through here (state_dicts, foreign ``.pt``
    files, trainer states alike): a pickle naming any class or function beyond tensors and
    plain data (a payload, wherever it sits in the structure) is one ``ValueError`` naming
    the file and the refused name, never unpickled; a damaged file is another."""
    try:
        with _safe_globals():
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        refused = _GLOBAL_REFUSED.search(str(e))
        if refused:
            name = refused.group(1).rstrip(".")
            raise ValueError(f"{path}: refused to unpickle it: it names {name}, which is not "
                             "a tensor or plain data, and loading it could run code: it is "
                             "not loaded; ask whoever made it for a state_dict of tensors "
                             "(or a safetensors file)") from e
        reason = re.search(r"WeightsUnpickler error:\s*(.*?)\s*(Check the documentation|$)",
                           str(e), re.DOTALL)
        detail = " ".join((reason.group(1) if reason else str(e)).split())[:200]
        if "weights_only" in detail:  # torch's advice, not a reason
            detail = type(e).__name__
        raise ValueError(f"{path} could not be read (corrupted, or not a torch file?): "
                         f"{detail}") from e
    except _CORRUPT as e:
        raise ValueError(f"{path} could not be read (truncated, or not a torch file?): "
                         f"{type(e).__name__}: {e}") from e


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor in a ``.safetensors`` file, on CPU."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    try:
        return load_file(path, device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise ValueError(f"{path} could not be read (truncated or not a safetensors "
                         f"file?): {e}") from e


def read_json(path: Path) -> dict:
    """The JSON object in a config file (``cfg.json``, ``config.json``), read as UTF-8.

    Anything else is one ``ValueError`` naming the file: bytes that are not UTF-8, text that
    is not JSON, JSON that is not an object (``[]``, ``true``, ``3``, ``"text"``)."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text (byte {e.object[e.start]:#04x} at "
                         f"offset {e.start}): it is damaged or was saved in another "
                         "encoding; save it as UTF-8 JSON") from e
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        kind = "null" if data is None else type(data).__name__
        raise ValueError(f"{path}: expected a JSON object, got {kind}; the file is damaged "
                         "or is not a dictionary's config")
    return data


def require_tensors(tensors: dict, shapes: dict[str, tuple], path: Path) -> None:
    """Raise a ``ValueError`` naming ``path`` unless every named tensor exists with its shape
    (``None`` in a shape means any size)."""
    missing = sorted(set(shapes) - set(tensors))
    if missing:
        raise ValueError(f"{path}: missing keys {missing} (has {sorted(tensors)})")
    for name, shape in shapes.items():
        t = tensors[name]
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{path}: {name} should be a tensor, not {type(t).__name__}")
        if t.ndim != len(shape) or any(s is not None and s != n for s, n in zip(shape, t.shape)):
            raise ValueError(f"{path}: {name} has shape {tuple(t.shape)}, expected "
                             f"{tuple('any' if s is None else s for s in shape)}")


def plain(value):
    """``value`` as plain data (JSON types): tensors become lists, dtypes and devices
    strings, stubs their ``__dict__``; anything else its ``repr``."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [plain(v) for v in value]
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, MatsConfigStub):
        return plain(vars(value))
    return str(value) if isinstance(value, (torch.dtype, torch.device, Path)) else repr(value)


def load_into(cls, state_dict: dict, path: Path, **kwargs):
    """``cls.from_state_dict`` with its errors naming ``path``."""
    try:
        return cls.from_state_dict(state_dict, **kwargs)
    except (ValueError, RuntimeError) as e:
        raise ValueError(f"{path}: {e}") from e
