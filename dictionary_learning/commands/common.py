"""What several commands share: user-facing errors, opening a model and a text source by
name, and printing a table. No training or evaluation logic lives here."""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Iterator
from itertools import chain
from pathlib import Path

logger = logging.getLogger(__name__)


class CLIError(Exception):
    """An error the user can fix; the command line prints its message as one line."""

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code


# Exceptions whose message is a complete, actionable sentence: printed as ``error: ...``
# by the command line instead of a traceback. The library raises these for bad input.
USER_ERRORS = (CLIError, ValueError, TypeError, FileNotFoundError, NotADirectoryError,
               PermissionError, KeyError)


def hub_unreachable(what: str, error: BaseException) -> CLIError:
    """The error for a hub id that could not be fetched (offline, or a wrong id)."""
    return CLIError(f"could not fetch {what} from the Hugging Face hub ({type(error).__name__}: "
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
        raise CLIError(f"no model folder at {name_or_path}: pass a hub id such as "
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
            raise CLIError(f"could not load a model from {path}: {e}") from e
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
    from ..data import hf_dataset_to_generator, local_texts
    from ..tiny import stdlib_texts

    if spec == "stdlib":
        texts = stdlib_texts()
    elif Path(spec).expanduser().exists():
        texts = local_texts(Path(spec).expanduser(), text_field=text_field)
    elif _looks_local(spec):
        raise CLIError(f"no data file or folder at {spec}: check the path (supported: .jsonl, "
                       ".jsonl.zst, .txt, a folder of them, 'stdlib', or a HF dataset name)")
    else:
        texts = hf_dataset_to_generator(spec, split=split, streaming=streaming,
                                        text_field=text_field)
    try:
        first = next(texts)
    except StopIteration:
        raise CLIError(f"{spec} holds no text") from None
    except (OSError, ConnectionError) as e:
        raise hub_unreachable(f"dataset {spec!r}", e) from e
    except Exception as e:  # datasets wraps network failures in its own classes
        if type(e).__module__.split(".")[0] in ("datasets", "huggingface_hub", "requests",
                                                 "httpx", "urllib3"):
            raise hub_unreachable(f"dataset {spec!r}", e) from e
        raise
    return chain([first], texts)


def format_value(value) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    return str(value)


def format_table(rows: list[dict], columns: list[str] | None = None) -> str:
    """A plain-text table, one row per dict, one column per key (in first-seen order)."""
    if not rows:
        return "(no rows)"
    if columns is None:
        columns = list(dict.fromkeys(k for row in rows for k in row))
    cells = [[format_value(row.get(c, "")) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(v.rjust(w) if _numeric(v) else v.ljust(w) for v, w in zip(r, widths))
              for r in cells]
    return "\n".join(lines)


def format_pairs(pairs: list[tuple[str, object]]) -> str:
    """A two-column ``name  value`` listing."""
    width = max(len(k) for k, _ in pairs)
    return "\n".join(f"  {k:<{width}}  {format_value(v)}" for k, v in pairs)


def _numeric(text: str) -> bool:
    try:
        float(text.replace(",", ""))
        return True
    except ValueError:
        return False


def write_json(obj, path: str | Path | None) -> None:
    """``obj`` as JSON to ``path``, or to stdout for ``-``/``None``."""
    text = json.dumps(obj, indent=2, default=str)
    if path in (None, "-"):
        print(text)
    else:
        Path(path).write_text(text + "\n")
