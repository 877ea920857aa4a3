"""Text sources as iterators of strings, the input an ``ActivationBuffer`` consumes.

Formats, one document per item, empty documents skipped everywhere:

- ``.jsonl.zst``: Pile-style, one JSON object per line (``{"text": ..., "meta": ...}``),
  zstandard-compressed; decompressed as a stream, so a 15 GB shard never sits in memory.
- ``.jsonl``: the same, uncompressed.
- ``.txt``: one document per non-empty line (whitespace-only lines are skipped; the line
  ending is stripped). Put a paragraph on one line to keep it as one document.
- any HuggingFace dataset, hub name or builder (``"json"``, ``"text"``) with ``data_files``.

A document that is not a string raises ``TypeError`` naming where it came from.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterable, Iterator
from pathlib import Path

logger = logging.getLogger(__name__)

SUFFIXES = (".jsonl.zst", ".jsonl", ".txt")


def _check_text(text, where: str) -> bool:
    """True for a document worth yielding; raise on a non-string."""
    if not isinstance(text, str):
        raise TypeError(f"{where}: text must be a string, got {type(text).__name__}: "
                        f"{text!r:.80}; fix the row or pick another text_field")
    return bool(text)


def _texts_from_jsonl_lines(lines: Iterable[str], source: str, text_field: str) -> Iterator[str]:
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{source}, line {lineno}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: not valid JSON ({e}); expected one object per line") from e
        if not isinstance(row, dict):
            raise TypeError(f"{where}: expected a JSON object, got {type(row).__name__}")
        if text_field not in row:
            raise ValueError(f"{where}: no field {text_field!r}; available fields: "
                             f"{sorted(row)}. Pass text_field= to choose one")
        if _check_text(row[text_field], where):
            yield row[text_field]


def zst_to_generator(path: str | Path, text_field: str = "text") -> Iterator[str]:
    """Yield ``row[text_field]`` from a zstandard-compressed JSON-lines file, streaming."""
    import zstandard

    with open(path, "rb") as fh:
        # Pile shards may hold several zstd frames; read past the first one.
        with zstandard.ZstdDecompressor().stream_reader(fh, read_across_frames=True) as reader:
            lines = io.TextIOWrapper(reader, encoding="utf-8")
            yield from _texts_from_jsonl_lines(lines, str(path), text_field)


def jsonl_to_generator(path: str | Path, text_field: str = "text") -> Iterator[str]:
    """Yield ``row[text_field]`` from a JSON-lines file."""
    with open(path, encoding="utf-8") as lines:
        yield from _texts_from_jsonl_lines(lines, str(path), text_field)


def text_file_to_generator(path: str | Path) -> Iterator[str]:
    """Yield each non-empty line of a text file, without its line ending."""
    with open(path, encoding="utf-8") as lines:
        for line in lines:
            line = line.rstrip("\r\n")
            if line.strip():
                yield line


def _file_texts(path: Path, text_field: str) -> Iterator[str]:
    name = path.name.lower()
    if name.endswith(".jsonl.zst"):
        return zst_to_generator(path, text_field)
    if name.endswith(".jsonl"):
        return jsonl_to_generator(path, text_field)
    if name.endswith(".txt"):
        return text_file_to_generator(path)
    raise ValueError(f"unsupported file {path}: supported suffixes are {', '.join(SUFFIXES)}")


def local_texts(path: str | Path, text_field: str = "text") -> Iterator[str]:
    """Documents from a local file, or from every supported file under a folder.

    Files are dispatched on suffix (see the module docstring). A folder is searched
    recursively and its files read in sorted path order; other files in it are ignored.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such file or folder: {path}; check the path")
    if path.is_file():
        return _file_texts(path, text_field)
    files = sorted(p for p in path.rglob("*")
                   if p.is_file() and p.name.lower().endswith(SUFFIXES))
    if not files:
        raise ValueError(f"no {', '.join(SUFFIXES)} files under {path}; "
                         "point at a folder that holds some")
    logger.info("reading %d text files under %s", len(files), path)
    return (text for f in files for text in _file_texts(f, text_field))


def hf_dataset_to_generator(name: str, split: str = "train", streaming: bool = True,
                            text_field: str = "text", data_files=None,
                            **load_kwargs) -> Iterator[str]:
    """Yield ``row[text_field]`` from ``datasets.load_dataset(name, split=split, ...)``.

    ``name`` is a hub dataset (``"monology/pile-uncopyrighted"``) or a builder such as
    ``"json"`` or ``"text"`` with local ``data_files``; ``load_kwargs`` go to ``load_dataset``.
    A generator: the dataset is loaded, and its columns checked, on the first ``next()``.
    """
    import datasets

    dataset = datasets.load_dataset(name, split=split, streaming=streaming,
                                    data_files=data_files, **load_kwargs)
    columns = dataset.column_names  # None for some streaming datasets: checked per row then
    if columns is not None and text_field not in columns:
        raise ValueError(f"dataset {name!r} has no column {text_field!r}; available columns: "
                         f"{list(columns)}. Pass text_field= to choose one")
    for i, row in enumerate(dataset):
        if text_field not in row:
            raise ValueError(f"dataset {name!r}, row {i}: no column {text_field!r}; available "
                             f"columns: {list(row)}. Pass text_field= to choose one")
        if _check_text(row[text_field], f"dataset {name!r}, row {i}"):
            yield row[text_field]
