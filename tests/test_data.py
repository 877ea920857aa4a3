"""Text sources: every format gives back exactly the documents written, in order; bad input
fails with an error that names the problem."""

import json
import logging
from itertools import islice

import pytest
import zstandard

from dictionary_learning.data import (hf_dataset_to_generator, jsonl_to_generator, local_texts,
                                      text_file_to_generator, zst_to_generator)

DOCS = ["The first document.", "Second, with unicode: café ☕ — ok", "multi\nline\ttext", "last"]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def write_zst(path, rows, frames=1):
    """Pile-style shard; ``frames > 1`` concatenates independently compressed frames."""
    lines = [json.dumps(r) + "\n" for r in rows]
    step = -(-len(lines) // frames)
    cctx = zstandard.ZstdCompressor()
    path.write_bytes(b"".join(cctx.compress("".join(lines[i:i + step]).encode())
                              for i in range(0, len(lines), step)))
    return path


def pile_rows(docs):
    return [{"text": t, "meta": {"pile_set_name": "Test"}} for t in docs]


@pytest.mark.parametrize("frames", [1, 2])
def test_zst_round_trip(tmp_path, frames):
    path = write_zst(tmp_path / "shard.jsonl.zst", pile_rows(DOCS), frames=frames)
    assert list(zst_to_generator(path)) == DOCS
    assert list(local_texts(path)) == DOCS


def test_zst_streams_large_file(tmp_path):
    """Many rows, bigger than any single read; islice reads only the head."""
    docs = [f"document {i} " + "x" * (i % 97) for i in range(20_000)]
    path = write_zst(tmp_path / "big.jsonl.zst", pile_rows(docs))
    assert list(islice(zst_to_generator(path), 3)) == docs[:3]
    assert list(zst_to_generator(path)) == docs


def test_jsonl_custom_field_and_skips_empty(tmp_path):
    rows = [{"body": t, "id": i} for i, t in enumerate(DOCS)]
    rows.insert(1, {"body": "", "id": -1})
    path = tmp_path / "a.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n", encoding="utf-8")
    assert list(jsonl_to_generator(path, text_field="body")) == DOCS
    assert list(local_texts(path, text_field="body")) == DOCS


def test_text_file_one_document_per_nonempty_line(tmp_path):
    path = tmp_path / "a.txt"
    path.write_bytes("alpha beta\r\n\n   \n  indented stays  \ngamma".encode())
    expected = ["alpha beta", "  indented stays  ", "gamma"]
    assert list(text_file_to_generator(path)) == expected
    assert list(local_texts(path)) == expected


def test_folder_reads_supported_files_sorted_recursively(tmp_path, caplog):
    write_jsonl(tmp_path / "b.jsonl", pile_rows(["b1", "b2"]))
    write_zst(tmp_path / "a.jsonl.zst", pile_rows(["a1"]))
    (tmp_path / "c.txt").write_text("c1\nc2\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "d.txt").write_text("d1\n")
    (tmp_path / "README.md").write_text("not a corpus\n")
    with caplog.at_level(logging.INFO, logger="dictionary_learning.data"):
        texts = list(local_texts(tmp_path))
    assert texts == ["a1", "b1", "b2", "c1", "c2", "d1"]
    assert "4 text files" in caplog.text


# The "json" builder on a local file runs offline. cache_dir keeps the arrow cache in tmp_path
# and checks that load_kwargs reach load_dataset.
@pytest.mark.parametrize("streaming", [True, False])
def test_hf_json_builder_offline(tmp_path, monkeypatch, streaming):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    rows = pile_rows(DOCS[:2]) + [{"text": "", "meta": {}}] + pile_rows(DOCS[2:])
    path = write_jsonl(tmp_path / "data.jsonl", rows)
    assert list(hf_dataset_to_generator("json", data_files=str(path), streaming=streaming,
                                        cache_dir=str(tmp_path / "cache"))) == DOCS


def test_hf_missing_column_lists_available(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    path = write_jsonl(tmp_path / "data.jsonl", [{"body": "x", "id": 1}])
    for streaming in (True, False):
        with pytest.raises(ValueError, match=r"no column 'text'.*'body'"):
            next(hf_dataset_to_generator("json", data_files=str(path), streaming=streaming,
                                         cache_dir=str(tmp_path / "cache")))


def test_hf_non_string_text(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    path = write_jsonl(tmp_path / "data.jsonl", [{"text": 1}, {"text": 2}])
    with pytest.raises(TypeError, match=r"row 0: text must be a string, got int"):
        list(hf_dataset_to_generator("json", data_files=str(path),
                                     cache_dir=str(tmp_path / "cache")))


def test_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        local_texts(tmp_path / "nope.jsonl")


def test_unsupported_suffix_lists_supported(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text("text\nhello\n")
    with pytest.raises(ValueError, match=r"data\.csv.*\.jsonl\.zst, \.jsonl, \.txt"):
        local_texts(path)


def test_folder_without_supported_files(tmp_path):
    (tmp_path / "data.csv").write_text("text\n")
    with pytest.raises(ValueError, match="no .* files under"):
        local_texts(tmp_path)


@pytest.mark.parametrize("fmt", ["jsonl", "zst"])
def test_missing_text_field_lists_fields(tmp_path, fmt):
    rows = [{"text": "ok"}, {"content": "x", "meta": {}}]
    path = (write_jsonl(tmp_path / "a.jsonl", rows) if fmt == "jsonl"
            else write_zst(tmp_path / "a.jsonl.zst", rows))
    with pytest.raises(ValueError, match=r"line 2: no field 'text'.*\['content', 'meta'\]"):
        list(local_texts(path))


@pytest.mark.parametrize("fmt", ["jsonl", "zst"])
def test_non_string_text_names_file_and_line(tmp_path, fmt):
    rows = [{"text": "ok"}, {"text": "fine"}, {"text": ["a", "list"]}]
    path = (write_jsonl(tmp_path / "a.jsonl", rows) if fmt == "jsonl"
            else write_zst(tmp_path / "a.jsonl.zst", rows))
    with pytest.raises(TypeError, match=rf"{path.name}, line 3: text must be a string, got list"):
        list(local_texts(path))


def test_bad_json_and_non_object_rows(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": oops}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl, line 2: not valid JSON"):
        list(jsonl_to_generator(bad))
    arr = tmp_path / "arr.jsonl"
    arr.write_text('["not", "an", "object"]\n')
    with pytest.raises(TypeError, match=r"arr\.jsonl, line 1: expected a JSON object, got list"):
        list(jsonl_to_generator(arr))


def test_hf_missing_column_checked_per_row_when_schema_unknown(monkeypatch):
    """Some streaming datasets report no column names; the first row is checked instead."""
    import datasets

    def rows():
        yield {"body": "x", "id": 1}

    def fake_load_dataset(name, **kwargs):
        return datasets.IterableDataset.from_generator(rows)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    assert datasets.IterableDataset.from_generator(rows).column_names is None
    with pytest.raises(ValueError, match=r"row 0: no column 'text'.*\['body', 'id'\]"):
        next(hf_dataset_to_generator("some/hub-dataset"))


# Damaged files: each fails with one error naming the file (and the line, where there is one)
# and saying what to do, never a raw ZstdError, UnicodeDecodeError or silently fewer documents.

def test_zst_of_garbage_bytes_is_not_a_zstandard_file(tmp_path):
    path = tmp_path / "garbage.jsonl.zst"
    path.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(ValueError, match=rf"{path.name} is not a zstandard file .*\.jsonl"):
        list(zst_to_generator(path))
    plain = write_jsonl(tmp_path / "plain.jsonl.zst", pile_rows(DOCS))  # not compressed
    with pytest.raises(ValueError, match=r"plain\.jsonl\.zst is not a zstandard file"):
        list(local_texts(plain))


@pytest.mark.parametrize("frames", [1, 3])
def test_truncated_zst_names_file_after_yielding_what_is_whole(tmp_path, frames):
    docs = [f"document {i}: " + "words " * (i % 50) for i in range(3000)]
    whole = write_zst(tmp_path / "whole.jsonl.zst", pile_rows(docs), frames=frames)
    path = tmp_path / "cut.jsonl.zst"
    path.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    got = []
    with pytest.raises(ValueError, match=rf"{path.name} is truncated.*incomplete.*again"):
        for text in zst_to_generator(path):
            got.append(text)
    assert got == docs[:len(got)] and 0 < len(got) < len(docs)  # the whole blocks before the cut
    tiny = tmp_path / "tiny.jsonl.zst"  # cut inside the first frame's header
    tiny.write_bytes(whole.read_bytes()[:6])
    with pytest.raises(ValueError, match="tiny.jsonl.zst is truncated"):
        list(local_texts(tiny))


def test_zst_with_junk_after_a_frame_is_corrupt(tmp_path):
    path = write_zst(tmp_path / "a.jsonl.zst", pile_rows(DOCS))
    size = path.stat().st_size
    path.write_bytes(path.read_bytes() + b"not zstandard at all")
    with pytest.raises(ValueError, match=rf"a\.jsonl\.zst is corrupt: .*frame at byte {size}"):
        list(zst_to_generator(path))


@pytest.mark.parametrize("fmt", ["jsonl", "txt", "zst"])
def test_non_utf8_names_file_and_line(tmp_path, fmt):
    good = [json.dumps({"text": "ok"}).encode(), json.dumps({"text": "fine"}).encode()]
    bad = '{"text": "café à la crème"}'.encode("latin-1")
    data = b"\n".join([*good, bad, *good]) + b"\n"
    if fmt == "zst":
        path = tmp_path / "latin.jsonl.zst"
        path.write_bytes(zstandard.ZstdCompressor().compress(data))
    else:
        path = tmp_path / f"latin.{fmt}"
        path.write_bytes(data)
    with pytest.raises(ValueError, match=rf"{path.name}, line 3: not UTF-8 text "
                       r"\(byte 0xe9 .*convert the file to UTF-8"):
        list(local_texts(path))


def test_line_numbers_count_cr_line_endings_and_bom_is_dropped(tmp_path):
    path = tmp_path / "mac.txt"
    path.write_bytes(b"\xef\xbb\xbffirst\rsecond\r\nthird\rbad \xf5 byte\n")
    with pytest.raises(ValueError, match=r"mac\.txt, line 4: not UTF-8 .*position 5 "):
        list(text_file_to_generator(path))
    path.write_bytes(b"\xef\xbb\xbffirst\rsecond\r\n\r\nthird\r")
    assert list(text_file_to_generator(path)) == ["first", "second", "third"]
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + json.dumps({"text": "x"}).encode() + b"\r\n")
    assert list(jsonl_to_generator(bom)) == ["x"]
