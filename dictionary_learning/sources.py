"""Where a run's model and text come from, by name: a HF hub id or a local folder for the
model; ``stdlib``, a local file or folder, or a HF dataset name for the text.

Both open eagerly (the model is loaded, the first document read), so a wrong name, a
missing file or an unreachable hub fails at once with a message that says what to do:
:class:`SourceError` (a ``ValueError``), which the command line prints as one line.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from itertools import chain
from pathlib import Path


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


def load_model(name_or_path: str, device: str = "cpu", dtype: str | None = None):
    """An nnsight ``LanguageModel`` from a hub id or a local folder (``save_pretrained``
    layout), loaded now so that a bad name fails here, with a clear message."""
    import warnings

    import torch
    from nnsight import LanguageModel

    path = Path(name_or_path).expanduser()
    if not path.exists() and _looks_local(name_or_path):
        raise SourceError(f"no model folder at {name_or_path}: pass a hub id such as "
                          "EleutherAI/pythia-70m-deduped or an existing local folder")
    kwargs = {"device_map": device, "dispatch": True}
    if dtype is not None:
        kwargs["dtype"] = getattr(torch, dtype)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*LanguageModel is deprecated.*")
            model = LanguageModel(str(path) if path.exists() else name_or_path, **kwargs)
    except OSError as e:  # transformers raises OSError for unreachable or unknown repos
        if path.exists():
            raise SourceError(f"could not load a model from {path}: {e}") from e
        raise hub_unreachable(f"model {name_or_path!r}", e) from e
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

    if spec == "stdlib":
        texts = stdlib_texts()
    elif Path(spec).expanduser().exists():
        texts = local_texts(Path(spec).expanduser(), text_field=text_field)
    elif _looks_local(spec):
        raise SourceError(f"no data file or folder at {spec}: check the path (supported: .jsonl, "
                       ".jsonl.zst, .txt, a folder of them, 'stdlib', or a HF dataset name)")
    else:
        texts = hf_dataset_to_generator(spec, split=split, streaming=streaming,
                                        text_field=text_field)
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
