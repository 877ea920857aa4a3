"""Defaults that follow the run: evaluate, analyze and histograms on a run folder read the
text the run trained on (its train_args.json) and say so; histograms land beside the
dictionary, not in the working folder; a data file that the held-out split empties is
refused naming --eval-texts; an unset warm-up follows the run's length."""

import json
import re
from pathlib import Path

import pytest

from dictionary_learning.cli import main
from dictionary_learning.train_run import TrainRun, trainer_configs
from dictionary_learning.trainer import resolve_schedules

from cli_helpers import shared_model_folder, snapshot, write_jsonl

SMALL = ["--submodule", "1.mlp", "--expansion", "2", "--batch-size", "64", "--ctx-len", "32",
         "--n-ctxs", "20", "--refresh-batch-size", "8", "--eval-texts", "20",
         "--eval-loss-texts", "4", "--no-progress"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return shared_model_folder(tmp_path_factory)


@pytest.fixture(scope="module")
def run_dir(model_dir, tmp_path_factory):
    """A finished 3-step run on a local .jsonl file (not the evaluate default's Pile)."""
    root = tmp_path_factory.mktemp("run")
    data = root / "docs.jsonl"
    write_jsonl(data, n=120)
    assert main(["train", "--model", str(model_dir), "--data", str(data), "--save-dir",
                 str(root / "run"), "--steps", "3", *SMALL]) == 0
    return root / "run", data


def test_evaluate_reads_the_runs_text_and_says_so(run_dir, tmp_path, capsys):
    run, data = run_dir
    capsys.readouterr()
    out = tmp_path / "eval.json"
    assert main(["evaluate", str(run), "--n-tokens", "256", "--no-loss", "--json",
                 str(out)]) == 0
    err = capsys.readouterr().err
    assert f"using --data {data} from {run / 'train_args.json'}" in err
    assert "first 20 documents were held out" in err
    assert json.loads(out.read_text())[0]["data"] == str(data)
    # Given explicitly, --data wins and nothing is said.
    assert main(["evaluate", str(run), "--n-tokens", "256", "--no-loss", "--data",
                 "stdlib", "--json", str(out)]) == 0
    assert "using --data" not in capsys.readouterr().err
    assert json.loads(out.read_text())[0]["data"] == "stdlib"


def test_dictionaries_trained_on_different_text_need_data(run_dir, model_dir, tmp_path, capsys):
    run, _ = run_dir
    other = tmp_path / "other.jsonl"
    write_jsonl(other, start=420, n=120)
    assert main(["train", "--model", str(model_dir), "--data", str(other), "--save-dir",
                 str(tmp_path / "run2"), "--steps", "2", *SMALL]) == 0
    capsys.readouterr()
    assert main(["evaluate", str(run), str(tmp_path / "run2"), "--no-loss"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and "trained on different text" in err[-1]
    assert "pass --data" in err[-1]


def test_histograms_go_beside_the_dictionary(run_dir, tmp_path, monkeypatch, capsys):
    run, data = run_dir
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    before = (run / "feature_frequencies.png").read_bytes()
    assert main(["histograms", str(run), "--n-tokens", "256"]) == 0
    assert list(work.iterdir()) == []  # nothing in the working folder
    png = run / "frequency_histogram.png"
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert (run / "feature_frequencies.png").read_bytes() == before  # train's is kept
    assert f"using --data {data}" in capsys.readouterr().err
    # --out still chooses the folder.
    assert main(["histograms", str(run), "--n-tokens", "256", "--out", str(tmp_path / "h")]) == 0
    assert [p.name for p in (tmp_path / "h").iterdir()] == ["run.png"]


def test_analyze_reads_the_runs_text(run_dir, tmp_path, capsys):
    run, data = run_dir
    capsys.readouterr()
    assert main(["analyze", str(run), "--n-tokens", "512", "--out", str(tmp_path / "a"),
                 "--k", "2", "--k-random", "1"]) == 0
    assert f"using --data {data}" in capsys.readouterr().err
    metadata = json.loads((tmp_path / "a" / "metadata.json").read_text())
    assert str(data) in json.dumps(metadata)


def test_too_few_documents_for_eval_texts_names_the_flag(model_dir, tmp_path, capsys):
    data = tmp_path / "few.jsonl"
    write_jsonl(data, n=12)
    save = tmp_path / "run"
    assert main(["train", "--model", str(model_dir), "--data", str(data), "--save-dir",
                 str(save), "--steps", "3", *SMALL]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and "Traceback" not in "\n".join(err)
    assert "has only 12 document(s)" in err[-1] and "--eval-texts 20" in err[-1]
    assert "give a smaller --eval-texts (e.g. 2)" in err[-1]
    assert not save.exists() or snapshot(save) == {}


def test_train_into_a_finished_run_names_overwrite_and_resume(run_dir, model_dir, capsys):
    run, data = run_dir
    before = snapshot(run)
    capsys.readouterr()
    assert main(["train", "--model", str(model_dir), "--data", str(data), "--save-dir",
                 str(run), "--steps", "3", *SMALL]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len([line for line in err if line.startswith("error: ")]) == 1
    assert "--resume" in err[-1] and "--overwrite" in err[-1]
    assert snapshot(run) == before


@pytest.mark.parametrize("steps, expected", [(30, 3), (500, 50), (20_000, 1000), (None, 1000)])
def test_an_unset_warmup_follows_the_run(steps, expected):
    run = TrainRun(steps=steps)
    assert run.warmup_steps is None
    (config,) = trainer_configs(run, 64, 64)
    assert resolve_schedules(config, run.total_steps).warmup_steps == expected
    # An explicit value is kept.
    (config,) = trainer_configs(TrainRun(steps=steps, warmup_steps=7), 64, 64)
    assert resolve_schedules(config, run.total_steps).warmup_steps == 7


def test_an_unset_learning_rate_is_each_architectures_own():
    run = TrainRun(steps=500, arch=("relu", "topk", "batchtopk", "matryoshka", "jumprelu",
                                    "gated"))
    resolved = [resolve_schedules(c, 500) for c in trainer_configs(run, 64, 64)]
    assert [(c.lr, c.decay_start) for c in resolved] == \
        [(1.5e-3, 400)] + [(2e-3, 400)] * 3 + [(1e-3, None)] * 2
    given = trainer_configs(TrainRun(steps=500, arch=("topk",), lr=(1e-3, 3e-3),
                                     decay_start=500), 64, 64)
    assert [(c.lr, c.decay_start) for c in given] == [(1e-3, 500), (3e-3, 500)]
    with pytest.raises(ValueError, match=re.escape("--decay-start 501 is after the run's "
                                                   "500 steps")):
        TrainRun(steps=500, decay_start=501)


def test_runs_that_would_train_nothing_are_refused():
    for kwargs, message in [(dict(steps=0), "--steps must be positive, got 0"),
                            (dict(tokens=100, batch_size=1024),
                             "--tokens 100 is less than one batch (--batch-size 1024)")]:
        with pytest.raises(ValueError, match=re.escape(message)):
            TrainRun(**kwargs)
