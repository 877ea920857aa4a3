"""What several commands share: user-facing errors, and printing tables and JSON. Opening a
model or text source by name lives in :mod:`dictionary_learning.sources` (re-exported
here). No training or evaluation logic lives here."""

from __future__ import annotations

import math
from pathlib import Path

from .. import files
from ..files import WriteError
from ..sources import SourceError, load_model, open_texts  # noqa: F401 - shared by commands


class CLIError(Exception):
    """An error the user can fix; the command line prints its message as one line."""

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code


# Exceptions whose message is a complete, actionable sentence: printed as ``error: ...``
# by the command line instead of a traceback. The library raises these for bad input.
USER_ERRORS = (CLIError, ValueError, TypeError, FileNotFoundError, NotADirectoryError,
               PermissionError, KeyError, WriteError)


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
    """``obj`` as strict JSON (a non-finite number as ``null``) to ``path``, written
    atomically (:func:`~dictionary_learning.files.write_json`), or to stdout for
    ``-``/``None``."""
    if path in (None, "-"):
        print(files.json_text(obj))
    else:
        files.write_json(path, obj)
