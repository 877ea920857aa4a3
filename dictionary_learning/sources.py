"""Where a run's model and text come from, by name: a HF hub id or a local folder for the
model; ``stdlib``, a local file or folder, or a HF dataset name for the text.

Both open eagerly (the model is loaded, the first document read), so a wrong name, a
missing file or an unreachable hub fails at once with a message that says what to do:
:class:`SourceError` (a ``ValueError``), which the command line prints as one line. A bad
local text file fails with the ``ValueError``/``TypeError`` of :mod:`.data`, which names
the file and line; a model folder without weights, or with corrupt ones, is a
``SourceError`` naming the folder.

:func:`check_device` and :func:`torch_dtype` parse ``--device`` and ``--dtype`` values, so
that every command rejects a bad one the same way before anything loads.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from itertools import chain
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


class SourceError(ValueError):
    """A model or text source that cannot be opened; the message says what to do."""


def hub_unreachable(what: str, error: BaseException) -> SourceError:
    """The error for a hub id that could not be fetched (offline, or a wrong id)."""
    return SourceError(f"could not fetch {what} from the Hugging Face hub ({type(error).__name__}: "
                       f"{str(error).splitlines()[0] if str(error) else 'no details'}). Check the "
                       "name and your network, or pass a local path instead")


def _looks_local(spec: str) -> bool:
    """A path rather than a hub id (hub ids are ``name`` or ``org/name``)."""
    return spec.startswith((".", "/", "~")) or spec.count("/") > 1 or spec.endswith(
        (".jsonl", ".zst", ".txt", ".json", ".pt", ".safetensors"))


DEVICE_HELP = "use cpu, cuda, cuda:N or mps"

# dtype names accepted for a model, with short aliases; all floating point.
DTYPES = {"float32": "float32", "fp32": "float32", "float16": "float16", "fp16": "float16",
          "half": "float16", "bfloat16": "bfloat16", "bf16": "bfloat16"}

# Weight files ``from_pretrained`` looks for in a local folder (single file or sharded index).
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


def check_device(name: str) -> torch.device:
    """``name`` as a ``torch.device``, checked against this machine.

    Checked up front so that a typo or a GPU that is not there fails with one line saying
    what to pass, not with a CUDA initialisation traceback once a model is half loaded.
    ``ValueError`` for a malformed name, a device type other than cpu/cuda/mps, or a
    device this machine lacks.
    """
    import torch

    if isinstance(name, torch.device):
        device = name
    else:
        try:
            device = torch.device(str(name).strip().lower())
        except RuntimeError:
            raise ValueError(f"unknown device {name!r}: {DEVICE_HELP}") from None
    if device.type == "cpu":
        return device
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device} asked for, but this machine has no CUDA device: "
                             "use --device cpu")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ValueError(f"device {device} asked for, but this machine has {count} CUDA "
                             f"device{'s' if count != 1 else ''} (cuda:0 to cuda:{count - 1}): "
                             "pick one of those or use --device cpu")
        return device
    if device.type == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError(f"device {device} asked for, but MPS is not available on this "
                             "machine: use --device cpu")
        if device.index not in (None, 0):
            raise ValueError(f"device {device} asked for, but there is only one MPS device: "
                             "use --device mps")
        return device
    raise ValueError(f"unsupported device {name!r}: {DEVICE_HELP}")


def torch_dtype(name: str) -> torch.dtype:
    """The floating-point ``torch.dtype`` called ``name`` (``float32``, ``float16``,
    ``bfloat16``, or ``fp32``/``fp16``/``bf16``).

    ``getattr(torch, name)`` would accept ``int8`` or any torch attribute and fail much
    later; this raises ``ValueError`` listing the accepted names. A ``torch.dtype`` is
    checked the same way.
    """
    import torch

    accepted = ", ".join(dict.fromkeys(DTYPES.values()))
    if isinstance(name, torch.dtype):
        dtype = name
    else:
        key = str(name).strip().lower().removeprefix("torch.")
        if key not in DTYPES:
            raise ValueError(f"unknown dtype {name!r}: use one of {accepted} "
                             "(or fp32, fp16, bf16)")
        dtype = getattr(torch, DTYPES[key])
    if not dtype.is_floating_point or dtype not in (torch.float32, torch.float16,
                                                    torch.bfloat16):
        raise ValueError(f"unsupported dtype {name!r}: use one of {accepted}")
    return dtype


def _check_model_folder(path: Path) -> None:
    """Fail with one clear line for a folder that cannot hold a ``save_pretrained`` model.

    transformers reports a missing weights file through the text-generation pipeline as a
    ``ValueError`` that embeds several full tracebacks; checking the folder first gives a
    message that stands alone.
    """
    if not path.is_dir():
        raise SourceError(f"{path} is a file, not a model folder: pass the folder that "
                          "save_pretrained wrote (with config.json and the weights)")
    if not (path / "config.json").is_file():
        raise SourceError(f"{path} is not a model folder: it has no config.json. Pass the "
                          "folder that save_pretrained wrote, or a hub id")
    if not any((path / name).is_file() for name in WEIGHT_FILES):
        raise SourceError(f"model folder {path} has a config.json but no weights: expected one "
                          f"of {', '.join(WEIGHT_FILES)}. Copy the weights there or save the "
                          "model again with save_pretrained")


def _summary(error: BaseException) -> str:
    """One line for an error whose message may hold whole tracebacks (transformers'
    pipeline quotes each failed attempt): the last ``SomeError: ...`` line, else the first."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    causes = [line for line in lines if re.match(r"^[A-Za-z_.]*(Error|Exception): ", line)]
    if causes:
        return causes[-1]
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


def load_model(name_or_path: str, device: str = "cpu", dtype: str | None = None,
               device_map: str | None = None):
    """An nnsight ``LanguageModel`` from a hub id or a local folder (``save_pretrained``
    layout), loaded now so that a bad name fails here, with a clear message.

    ``device`` goes through :func:`check_device` and ``dtype`` (``None``: the model's own)
    through :func:`torch_dtype`. ``device_map`` (``"auto"``, ``"balanced"``, ...) spreads a
    model too large for one device over the available ones through accelerate, instead of
    putting it on ``device``. Every failure to open the model is a :class:`SourceError`
    whose message is one line naming the model.
    """
    import warnings

    from nnsight import LanguageModel
    from safetensors import SafetensorError

    path = Path(name_or_path).expanduser()
    if not path.exists() and _looks_local(name_or_path):
        raise SourceError(f"no model folder at {name_or_path}: pass a hub id such as "
                          "EleutherAI/pythia-70m-deduped or an existing local folder")
    kwargs = {"device_map": device_map or str(check_device(device)), "dispatch": True}
    if dtype is not None:
        kwargs["dtype"] = torch_dtype(dtype)
    if path.exists():
        _check_model_folder(path)
    else:
        from .hub_access import HubUnreachable, require_hub
        try:
            require_hub(f"model {name_or_path!r}")
        except HubUnreachable as e:
            raise SourceError(str(e)) from None
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*LanguageModel is deprecated.*")
            model = LanguageModel(str(path) if path.exists() else name_or_path, **kwargs)
    except OSError as e:  # transformers raises OSError for unreachable or unknown repos
        if path.exists():
            raise SourceError(f"could not load a model from {path} ({_summary(e)}); check the "
                              "folder's files") from e
        raise hub_unreachable(f"model {name_or_path!r}", e) from e
    except ValueError as e:  # unknown model_type, or the pipeline's "Could not load model"
        where = path if path.exists() else repr(name_or_path)
        raise SourceError(f"could not load a model from {where} ({_summary(e)}); check that "
                          "it is a causal language model saved with save_pretrained") from e
    except SafetensorError as e:  # a corrupt or cut-short weights file
        raise SourceError(f"could not read the weights in {path} ({_summary(e)}): the file is "
                          "corrupt or incomplete; copy or save it again") from e
    tokenizer = model.tokenizer
    # token_type_ids break GPTNeoX's forward; no causal LM here needs them.
    tokenizer.model_input_names = ["input_ids", "attention_mask"]
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model


def open_texts(spec: str, split: str = "train", text_field: str = "text",
               streaming: bool = True) -> Iterator[str]:
    """Documents from ``spec``: ``stdlib`` (the standard library's docstrings, offline), a
    local ``.jsonl``/``.jsonl.zst``/``.txt`` file or a folder of them, or a HF dataset name.

    The first document is read now, so a missing file, an unreachable hub or a wrong
    column fails here rather than deep inside a buffer.
    """
    from .data import hf_dataset_to_generator, local_texts
    from .tiny import stdlib_texts

    local = spec == "stdlib" or Path(spec).expanduser().exists()
    if spec == "stdlib":
        texts = stdlib_texts()
    elif local:
        texts = local_texts(Path(spec).expanduser(), text_field=text_field)
    elif _looks_local(spec):
        raise SourceError(f"no data file or folder at {spec}: check the path (supported: .jsonl, "
                       ".jsonl.zst, .txt, a folder of them, 'stdlib', or a HF dataset name)")
    else:
        from .hub_access import HubUnreachable, require_hub
        try:
            require_hub(f"dataset {spec!r}")
        except HubUnreachable as e:
            raise SourceError(str(e)) from None
        texts = hf_dataset_to_generator(spec, split=split, streaming=streaming,
                                        text_field=text_field)
    if local:  # local files raise their own errors naming the file (see data.py)
        first = next(texts, None)
        if first is None:
            raise SourceError(f"{spec} holds no text")
        return chain([first], texts)
    try:
        first = next(texts)
    except StopIteration:
        raise SourceError(f"{spec} holds no text") from None
    except (OSError, ConnectionError) as e:
        raise hub_unreachable(f"dataset {spec!r}", e) from e
    except Exception as e:  # datasets wraps network failures in its own classes
        if type(e).__module__.split(".")[0] in ("datasets", "huggingface_hub", "requests",
                                                 "httpx", "urllib3"):
            raise hub_unreachable(f"dataset {spec!r}", e) from e
        raise
    return chain([first], texts)
