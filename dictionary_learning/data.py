r"""Text sources as iterators of strings, the input an ``ActivationBuffer`` consumes.

Formats, one document per item, empty documents skipped everywhere:

- ``.jsonl.zst``: Pile-style, one JSON object per line (``{"text": ..., "meta": ...}``),
  zstandard-compressed; decompressed as a stream, so a 15 GB shard never sits in memory.
- ``.jsonl``: the same, uncompressed.
- ``.txt``: one document per non-empty line (whitespace-only lines are skipped; the line
  ending is stripped). Put a paragraph on one line to keep it as one document.
- any HuggingFace dataset, hub name or builder (``"json"``, ``"text"``) with ``data_files``.

Local files are read as bytes and decoded one line at a time, so every problem names the
file and, where there is one, the line:

- a document that is not a string raises ``TypeError``; a file that cannot be read raises
  ``PermissionError`` or ``ValueError``;
- a line that is not UTF-8, a line that is not JSON, or a row without the text field raises
  ``ValueError`` (``FILE, line N: ...``);
- a ``.jsonl.zst`` file that is not zstandard, or is corrupt, raises ``ValueError`` where
  the bad bytes are; one that is truncated (a download or copy cut short) raises
  ``ValueError`` when the stream reaches its end, after the documents before the cut have
  been yielded: the file is streamed, so its end is only known there.

Line endings follow ``open()``'s universal newlines (``\n``, ``\r\n`` or ``\r``); a UTF-8
byte-order mark at the start of a file is dropped.
"""

from __future__ import annotations

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


def _decoded_lines(byte_lines: Iterable[bytes], source: str) -> Iterator[tuple[int, str]]:
    r"""``(line number, text)`` for each line of ``byte_lines``, without its line ending.

    Decoding line by line, rather than letting a text stream decode whole buffers, is what
    lets a bad byte be reported with its line. ``\n`` never occurs inside a multi-byte UTF-8
    sequence, so splitting the bytes first is safe. ``\r`` and ``\r\n`` also end a line, as
    with ``open()``'s universal newlines, so line numbers match what an editor shows.
    """
    lineno = 0
    for raw in byte_lines:
        try:
            text = raw.decode("utf-8-sig" if lineno == 0 else "utf-8")
        except UnicodeDecodeError as e:
            # A lone \r before the bad byte ends a line too.
            line_start = raw.rfind(b"\r", 0, e.start) + 1
            bad_line = lineno + 1 + raw.count(b"\r", 0, e.start)
            raise ValueError(
                f"{source}, line {bad_line}: not UTF-8 text "
                f"(byte 0x{raw[e.start]:02x} at position {e.start - line_start + 1} of the "
                f"line: {e.reason}); convert the file to UTF-8, e.g. "
                "iconv -f latin1 -t utf-8 IN > OUT") from e
        if "\r" not in text:  # the common case, kept fast: a shard has millions of lines
            lineno += 1
            yield lineno, text.rstrip("\n")
            continue
        text = text.rstrip("\n")
        if text.endswith("\r"):
            text = text[:-1]
        for piece in text.split("\r"):
            lineno += 1
            yield lineno, piece


def _texts_from_jsonl_lines(lines: Iterable[tuple[int, str]], source: str,
                            text_field: str) -> Iterator[str]:
    for lineno, line in lines:
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            if not line.strip():
                continue
            raise ValueError(f"{source}, line {lineno}: not valid JSON ({e}); expected one "
                             "object per line") from e
        if not isinstance(row, dict):
            raise TypeError(f"{source}, line {lineno}: expected a JSON object, got "
                            f"{type(row).__name__}")
        try:
            text = row[text_field]
        except KeyError:
            raise ValueError(f"{source}, line {lineno}: no field {text_field!r}; available "
                             f"fields: {sorted(row)}. Pass text_field= to choose one") from None
        if text.__class__ is str:  # the common case, without building the error's location
            if text:
                yield text
        elif _check_text(text, f"{source}, line {lineno}"):
            yield text


# Compressed bytes read per step: zstandard's recommended input size (128 KiB), so memory
# stays bounded by one step's output however large the shard.
_ZST_READ_SIZE = 1 << 17
# How a zstandard file starts: a frame's magic number, or a skippable frame's (any of 16).
_ZST_MAGIC = {b"\x28\xb5\x2f\xfd", *(bytes([0x50 + i, 0x2a, 0x4d, 0x18]) for i in range(16))}


def _zst_chunks(fh, source: str) -> Iterator[bytes]:
    """Decompressed chunks of the zstandard stream in ``fh``, checked for a clean end.

    ``stream_reader`` treats a stream cut inside a frame as a normal end of file, so a
    truncated shard would silently give fewer documents (or none). Each frame is decoded
    here by its own ``decompressobj``, whose ``eof`` says whether the frame was complete:
    input that ends inside a frame raises ``ValueError``. Pile shards may hold several
    frames; each frame's leftover input starts the next one.
    """
    import zstandard

    dctx = zstandard.ZstdDecompressor()
    frame = None  # the decompressor of a frame begun but not yet finished
    frame_start = 0  # where that frame starts in the file
    offset = 0  # compressed bytes read before the current step
    while step := fh.read(_ZST_READ_SIZE):
        data = step
        while data:
            if frame is None:
                frame = dctx.decompressobj()
                frame_start = offset + len(step) - len(data)
            try:
                out = frame.decompress(data)
            except zstandard.ZstdError as e:
                raise _zst_error(source, fh, frame_start, e) from e
            if out:
                yield out
            if frame.eof:
                data, frame = frame.unused_data, None
            else:
                data = b""
        offset += len(step)
    if frame is not None:
        raise ValueError(
            f"{source} is truncated: its zstandard stream ends inside a frame (the one starting "
            f"at byte {frame_start:,}, file size {offset:,} bytes), so the file is incomplete (an "
            "interrupted download or copy?); the documents before the cut were read. Fetch or "
            "copy the file again")


def _zst_error(source: str, fh, frame_start: int, error: Exception) -> ValueError:
    """The error for bytes zstandard rejects: not zstandard at all, or a corrupt frame."""
    if frame_start == 0:
        fh.seek(0)
        if fh.read(4) not in _ZST_MAGIC:
            return ValueError(
                f"{source} is not a zstandard file ({error}): a .jsonl.zst file must be "
                "zstandard-compressed JSON lines; rename a plain JSON-lines file to .jsonl, "
                "or fetch the shard again")
    return ValueError(f"{source} is corrupt: the zstandard frame at byte {frame_start:,} does "
                      f"not decode ({error}); fetch the shard again (`zstd -t FILE` checks it)")


def _split_lines(chunks: Iterable[bytes]) -> Iterator[bytes]:
    r"""The ``\n``-terminated lines of a stream of byte chunks (the last may lack one)."""
    pending: list[bytes] = []  # pieces of a line that spans chunks; joined once, when it ends
    for chunk in chunks:
        lines = chunk.split(b"\n")
        if len(lines) == 1:
            pending.append(chunk)
            continue
        yield b"".join([*pending, lines[0]])
        yield from lines[1:-1]
        pending = [lines[-1]] if lines[-1] else []
    if pending:
        yield b"".join(pending)


def _open_bytes(path: str | Path):
    """``open(path, "rb")``; an unreadable file is a ``PermissionError``/``ValueError`` that
    says what to do rather than a bare ``OSError``."""
    try:
        return open(path, "rb")
    except FileNotFoundError as e:
        raise FileNotFoundError(f"no such file: {path}; check the path") from e
    except PermissionError as e:
        raise PermissionError(f"cannot read {path}: permission denied; check its "
                              "permissions") from e
    except OSError as e:  # a folder, a broken mount, ...
        raise ValueError(f"cannot read {path}: {e.strerror or e}; pass a readable file") from e


def _read_error(source: str, error: OSError) -> ValueError:
    """An ``OSError`` while reading (a disk or network-filesystem failure) as an error that
    names the file."""
    return ValueError(f"cannot read {source}: {error.strerror or error}; check the disk or "
                      "copy the file again")


def zst_to_generator(path: str | Path, text_field: str = "text") -> Iterator[str]:
    """Yield ``row[text_field]`` from a zstandard-compressed JSON-lines file, streaming.

    A truncated file raises ``ValueError`` once the documents before the cut are yielded.
    """
    source = str(path)
    with _open_bytes(path) as fh:
        lines = _decoded_lines(_split_lines(_zst_chunks(fh, source)), source)
        try:
            yield from _texts_from_jsonl_lines(lines, source, text_field)
        except OSError as e:
            raise _read_error(source, e) from e


def jsonl_to_generator(path: str | Path, text_field: str = "text") -> Iterator[str]:
    """Yield ``row[text_field]`` from a JSON-lines file."""
    source = str(path)
    with _open_bytes(path) as fh:
        try:
            yield from _texts_from_jsonl_lines(_decoded_lines(fh, source), source, text_field)
        except OSError as e:
            raise _read_error(source, e) from e


def text_file_to_generator(path: str | Path) -> Iterator[str]:
    """Yield each non-empty line of a text file, without its line ending."""
    source = str(path)
    with _open_bytes(path) as fh:
        try:
            for _, line in _decoded_lines(fh, source):
                if line.strip():
                    yield line
        except OSError as e:
            raise _read_error(source, e) from e


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
