"""Opening a model or text by name: a damaged model folder, a bad device or dtype, or a
damaged data file fails with one line that names it and says what to do, and the command
line prints that line alone. All offline, no model weights loaded except where said."""

import json

import pytest
import torch

from dictionary_learning.cli import main
from dictionary_learning.sources import (SourceError, check_device, load_model, open_texts,
                                         torch_dtype)
from dictionary_learning.tiny import tiny_causal_lm, train_tokenizer


@pytest.fixture
def model_folder(tmp_path):
    """A tiny model saved with save_pretrained, weights and tokenizer included."""
    folder = tmp_path / "model"
    tokenizer = train_tokenizer(["a few words of text to learn merges from"] * 20, 300)
    tiny_causal_lm("pythia", vocab_size=len(tokenizer), d_model=32, n_layers=2,
                   d_mlp=64).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
    return folder


def test_model_folder_without_weights_is_one_source_error(model_folder):
    (model_folder / "model.safetensors").unlink()
    with pytest.raises(SourceError) as info:
        load_model(str(model_folder))
    message = str(info.value)
    assert str(model_folder) in message and "no weights" in message
    assert "model.safetensors" in message and "pytorch_model.bin" in message
    assert "\n" not in message


def test_folder_without_config_and_corrupt_weights(model_folder, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match=r"empty is not a model folder: it has no config\.json"):
        load_model(str(tmp_path / "empty"))
    (model_folder / "model.safetensors").write_bytes(b"not a safetensors file" * 4)
    with pytest.raises(SourceError, match=rf"weights in {model_folder} .*corrupt") as info:
        load_model(str(model_folder))
    assert "\n" not in str(info.value)


def test_cli_prints_one_error_line_for_a_model_folder_without_weights(model_folder, tmp_path,
                                                                      capsys):
    (model_folder / "model.safetensors").unlink()
    data = tmp_path / "docs.jsonl"
    data.write_text(json.dumps({"text": "some text"}) + "\n")
    code = main(["train", "--model", str(model_folder), "--data", str(data), "--save-dir",
                 str(tmp_path / "out"), "--steps", "2", "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("error: ")
    assert str(model_folder) in err[0] and "model.safetensors" in err[0]


def test_cli_prints_one_error_line_for_a_damaged_data_file(model_folder, tmp_path, capsys):
    data = tmp_path / "shard.jsonl.zst"
    data.write_bytes(b"\x00garbage, not zstandard" * 10)
    code = main(["train", "--model", str(model_folder), "--data", str(data), "--save-dir",
                 str(tmp_path / "out"), "--steps", "2", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    # transformers' "Loading weights" progress bar shares stderr; the error is one line.
    assert [line for line in err.splitlines() if line and "Loading weights" not in line] == [
        f"error: {data} is not a zstandard file (zstd decompressor error: Unknown "
        "frame descriptor): a .jsonl.zst file must be zstandard-compressed JSON "
        "lines; rename a plain JSON-lines file to .jsonl, or fetch the shard again"]


def test_open_texts_reports_local_read_errors_not_the_hub(tmp_path):
    """A damaged local file is its own error, not 'could not fetch from the hub'."""
    path = tmp_path / "latin.txt"
    path.write_bytes("ok\nna\xefve\n".encode("latin-1"))
    texts = open_texts(str(path))
    assert next(texts) == "ok"
    with pytest.raises(ValueError, match=r"latin\.txt, line 2: not UTF-8"):
        next(texts)
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(SourceError, match="empty.txt holds no text"):
        open_texts(str(tmp_path / "empty.txt"))


@pytest.mark.parametrize("name", ["cpu", "CPU", torch.device("cpu")])
def test_check_device_cpu(name):
    assert check_device(name) == torch.device("cpu")


@pytest.mark.parametrize("name", ["gpu0", "cuda:x", "", "meta"])
def test_check_device_rejects_junk(name):
    with pytest.raises(ValueError, match=r"device .*use cpu, cuda, cuda:N or mps"):
        check_device(name)


def test_check_device_cuda_and_mps_must_exist(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"^device cuda:7 asked for, but this machine has no "
                       r"CUDA device: use --device cpu$"):
        check_device("cuda:7")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ValueError, match=r"cuda:7 asked for, but this machine has 2 CUDA "
                       r"devices \(cuda:0 to cuda:1\)"):
        check_device("cuda:7")
    assert check_device("cuda:1") == torch.device("cuda", 1)
    assert check_device("cuda") == torch.device("cuda")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(ValueError, match="MPS is not available.*--device cpu"):
        check_device("mps")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert check_device("mps") == torch.device("mps")


@pytest.mark.parametrize("name, dtype", [
    ("float32", torch.float32), ("fp32", torch.float32), ("float16", torch.float16),
    ("fp16", torch.float16), ("bfloat16", torch.bfloat16), ("bf16", torch.bfloat16),
    ("torch.bfloat16", torch.bfloat16), (torch.float16, torch.float16)])
def test_torch_dtype_accepts_float_names(name, dtype):
    assert torch_dtype(name) is dtype


@pytest.mark.parametrize("name", ["float64x", "int8", "float64", "bool", "Tensor",
                                  torch.int8, torch.float64])
def test_torch_dtype_rejects_others_listing_accepted(name):
    with pytest.raises(ValueError, match=r"dtype .*: use one of float32, float16, bfloat16"):
        torch_dtype(name)


def test_load_model_checks_device_and_dtype_before_loading(model_folder):
    with pytest.raises(ValueError, match="unknown device 'gpu0'"):
        load_model("EleutherAI/pythia-70m-deduped", device="gpu0")  # no hub call made
    with pytest.raises(ValueError, match="unknown dtype 'int8'"):
        load_model(str(model_folder), dtype="int8")
    model = load_model(str(model_folder), dtype="bf16")
    assert next(model._module.parameters()).dtype is torch.bfloat16
