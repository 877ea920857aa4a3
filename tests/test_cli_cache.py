"""The cache command and train --cache end to end on a local model folder and local text:
what is written and printed, a killed cache run resumed to the same bytes, training a sweep
from a cache (and resuming it), and the refusals."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dictionary_learning import load_dictionary
from dictionary_learning.cache import Cache
from dictionary_learning.cli import main

from cli_helpers import shared_model_folder, write_jsonl

ROOT = Path(__file__).resolve().parents[1]
COLLECT = ["--submodule", "1.mlp", "--ctx-len", "32", "--refresh-batch-size", "8",
           "--skip-texts", "30", "--no-progress"]
TRAIN = ["--expansion", "4", "--batch-size", "128", "--n-ctxs", "40", "--warmup-steps", "5",
         "--eval-texts", "30", "--eval-loss-texts", "8", "--no-progress"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return shared_model_folder(tmp_path_factory)


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "docs.jsonl"
    write_jsonl(path, start=300, n=200)
    return path


def collect(model_dir, data_file, out, *extra):
    return main(["cache", "--model", str(model_dir), "--data", str(data_file), "--out",
                 str(out), *COLLECT, *extra])


@pytest.fixture(scope="module")
def cache_dir(model_dir, data_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("cache") / "c"
    assert collect(model_dir, data_file, out, "--tokens", "4000", "--shard-mb", "0.25") == 0
    return out


def test_cache_writes_shards_and_a_manifest(cache_dir, model_dir, data_file, capsys):
    manifest = json.loads((cache_dir / "manifest.json").read_text())
    assert manifest["complete"] and manifest["tokens"] == 4000
    assert manifest["model"] == str(model_dir) and manifest["data"] == str(data_file)
    assert manifest["submodules"] == ["gpt_neox.layers.1.mlp"] and manifest["skip_texts"] == 30
    assert manifest["bytes_per_token"] == 64 * 4 + 8
    rows = (2**18) // manifest["bytes_per_token"]
    assert [s["rows"] for s in manifest["shards"]] == [rows] * (4000 // rows) + [4000 % rows]
    assert Cache(cache_dir).n_tokens == 4000
    assert oct((cache_dir / "shard_00000.safetensors").stat().st_mode & 0o777) != "0o600"


def test_printed_lines(model_dir, data_file, tmp_path, capsys):
    assert collect(model_dir, data_file, tmp_path, "--tokens", "1000") == 0
    out = capsys.readouterr().out
    assert "Expected disk use: 257.8 KiB (1,000 tokens x 264 bytes)" in out
    assert "Wrote 1,000 tokens of gpt_neox.layers.1.mlp (out, float32) in 1 shards" in out
    assert f"train --cache {tmp_path}" in out
    assert collect(model_dir, data_file, tmp_path, "--tokens", "1000") == 2
    assert "already holds a cache: continue it with --resume" in capsys.readouterr().err


def test_killed_cache_run_resumes_to_the_same_bytes(model_dir, data_file, tmp_path):
    args = ["--tokens", "5000", "--shard-mb", "0.02", "--refresh-batch-size", "2"]
    assert collect(model_dir, data_file, tmp_path / "whole", *args) == 0
    part = tmp_path / "part"
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads()),
           "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "dictionary_learning", "cache", "--model",
                             str(model_dir), "--data", str(data_file), "--out", str(part),
                             *COLLECT, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env)
    deadline = time.time() + 120
    while True:
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, "the cache run did not write its third shard"
        try:
            listed = json.loads((part / "manifest.json").read_text())["shards"]
        except (FileNotFoundError, json.JSONDecodeError):
            listed = []
        if len(listed) >= 3:
            break
        time.sleep(0.005)
    proc.kill()
    proc.communicate()
    done = json.loads((part / "manifest.json").read_text())
    assert not done["complete"] and done["tokens"] < 5000
    assert collect(model_dir, data_file, part, *args, "--resume") == 0
    files = lambda d: {p.name: p.read_bytes() for p in sorted(d.iterdir())}  # noqa: E731
    assert files(part) == files(tmp_path / "whole")


def test_train_from_a_cache(cache_dir, model_dir, tmp_path, capsys):
    code = main(["train", "--cache", str(cache_dir), "--save-dir", str(tmp_path), *TRAIN,
                 "--l1", "1e-3,3e-3", "--steps", "12", "--save-steps", "6"])
    assert code == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "Evaluation on held-out text (30 documents never trained on" in out
    for i in range(2):
        ae, config = load_dictionary(tmp_path / f"trainer_{i}")
        assert config["buffer"]["cache"] == str(cache_dir)
        assert config["trainer"]["lm_name"] == str(model_dir)
    args = json.loads((tmp_path / "train_args.json").read_text())
    assert args["cache"] == str(cache_dir) and args["model"] == str(model_dir)
    # 6 steps, then resumed to 12: the weights of the 12-step run.
    short = tmp_path / "short"
    assert main(["train", "--cache", str(cache_dir), "--save-dir", str(short), *TRAIN,
                 "--l1", "1e-3,3e-3", "--steps", "6", "--save-steps", "6"]) == 0
    assert main(["train", "--resume", "--save-dir", str(short), "--steps", "12",
                 "--no-progress"]) == 0
    for i in range(2):
        reference = torch.load(tmp_path / f"trainer_{i}" / "ae.pt")
        resumed = torch.load(short / f"trainer_{i}" / "ae.pt")
        assert all(torch.equal(resumed[k], v) for k, v in reference.items())


@pytest.mark.parametrize("extra, message", [
    (["--io", "in"], "--io in (the cache has out): omit these options with --cache"),
    (["--eval-texts", "50"], "left out only the first 30 documents, so --eval-texts 50"),
    (["--submodule", "0.mlp"], "holds gpt_neox.layers.1.mlp, not gpt_neox.layers.0.mlp"),
])
def test_train_refuses_what_the_cache_cannot_give(cache_dir, tmp_path, capsys, extra, message):
    args = ["train", "--cache", str(cache_dir), "--save-dir", str(tmp_path), *TRAIN,
            "--steps", "4", *extra]
    assert main(args) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "train_args.json").exists()


def test_a_folder_without_a_cache(tmp_path, capsys):
    assert main(["train", "--cache", str(tmp_path / "none"), "--save-dir", str(tmp_path),
                 "--steps", "4"]) == 2
    assert "does not exist: it is not an activation cache" in capsys.readouterr().err
