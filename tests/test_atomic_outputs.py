"""Every output file is written atomically (dictionary_learning.files): with the user's
permissions, as strict JSON, and a failed write leaves the old file and no temporary one."""

import ast
import json
import math
import os
import stat
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from dictionary_learning import AutoEncoder, held_out
from dictionary_learning.analysis_run import FILES, analyze, write_run_folder
from dictionary_learning.cli.common import write_json as cli_write_json
from dictionary_learning.evaluation import feature_frequency_histogram
from dictionary_learning.files import WriteError
from dictionary_learning.formats import save_saelens
from dictionary_learning.frequency_plots import frequency_grid
from dictionary_learning.viewer.synthetic import write_synthetic_run

PACKAGE = Path(held_out.__file__).resolve().parent
SUBMODULE = "gpt_neox.layers.1.mlp"
RUN = SimpleNamespace(io="out", ctx_len=16, eval_loss_texts=0, batch_size=64, dtype="float32")


def strict_loads(text: str):
    """``json.loads`` that refuses NaN and infinities (as JavaScript's JSON.parse does)."""
    def refuse(name):
        raise ValueError(f"non-strict JSON constant {name}")
    return json.loads(text, parse_constant=refuse)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def no_temp_files(folder: Path) -> bool:
    return not [p for p in folder.rglob("*") if p.name.endswith(".tmp")]


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


@pytest.fixture(scope="module")
def analysis(models, texts):
    """A small real analysis of the tiny pythia model (about a second)."""
    torch.manual_seed(0)
    ae = AutoEncoder(64, 32)
    with torch.no_grad():
        ae.encoder.weight.mul_(10)
    return analyze(models["pythia"], SUBMODULE, ae, texts[:40], ctx_len=16, batch_size=4,
                   n_tokens=200, k_top=2, k_random=1, n_ablation=0, progress=False)


def eval_json(models, texts, folder: Path, monkeypatch, extra: dict | None = None) -> Path:
    """Run the train run's held-out evaluation into ``folder``; ``extra`` metrics are added
    to what :func:`held_out.score` measures."""
    real = held_out.score
    monkeypatch.setattr(held_out, "score", lambda *a, **k: {**real(*a, **k), **(extra or {})})
    torch.manual_seed(0)
    held_out.evaluate_held_out([AutoEncoder(64, 32)], [folder], texts[:20], models["pythia"],
                               SUBMODULE, RUN, progress=False)
    return folder / held_out.EVAL_NAME


# -- permissions ---------------------------------------------------------------------------
def test_outputs_are_readable_by_others_under_umask_022(models, texts, analysis, tmp_path,
                                                        monkeypatch, umask_022):
    folder = tmp_path / "trainer_0"
    folder.mkdir()
    eval_json(models, texts, folder, monkeypatch)
    written = [folder / held_out.EVAL_NAME, folder / held_out.HISTOGRAM_NAME,
               feature_frequency_histogram(torch.rand(16), tmp_path / "hist.png"),
               frequency_grid({"a": torch.rand(16)}, tmp_path / "grid.png")]
    written += write_run_folder(analysis, tmp_path / "run", models["pythia"].tokenizer)
    cli_write_json([{"mse": 1.0}], tmp_path / "results.json")
    written.append(tmp_path / "results.json")
    written.append(save_saelens(AutoEncoder(8, 16), tmp_path / "saelens") / "cfg.json")
    run = write_synthetic_run(tmp_path / "synthetic", n_features=8)
    written += [run / name for name in FILES]
    assert {p.name: oct(mode(p)) for p in written} == {p.name: oct(0o644) for p in written}
    assert no_temp_files(tmp_path)


def test_atomic_write_follows_the_umask_without_changing_it(tmp_path, monkeypatch):
    from dictionary_learning import files

    seen = []
    real_umask = os.umask
    monkeypatch.setattr(files.os, "umask", lambda m: seen.append(m) or real_umask(m))
    old = real_umask(0o027)
    try:
        files.atomic_write(tmp_path / "a.txt", lambda tmp: Path(tmp).write_text("x"))
        assert oct(mode(tmp_path / "a.txt")) == oct(0o640)
        real_umask(0o002)
        files.write_json(tmp_path / "b.json", {"x": 1})
        assert oct(mode(tmp_path / "b.json")) == oct(0o664)
    finally:
        real_umask(old)
    # Read from /proc on Linux: never set (another thread creating a file in that instant
    # would get the wrong permissions).
    assert seen == [] or not Path("/proc/self/status").exists()


# -- strict JSON ---------------------------------------------------------------------------
def test_nan_metrics_are_null_in_eval_json(models, texts, tmp_path, monkeypatch):
    path = eval_json(models, texts, tmp_path, monkeypatch,
                     {"frac_recovered": float("nan"), "loss_zero": float("inf")})
    metrics = strict_loads(path.read_text())
    assert metrics["frac_recovered"] is None and metrics["loss_zero"] is None
    assert math.isfinite(metrics["mse"]) and metrics["n_eval_texts"] == 20


def test_analysis_and_cli_json_are_strict(models, analysis, tmp_path, capsys):
    paths = write_run_folder(analysis, tmp_path / "run", models["pythia"].tokenizer,
                             {"note": float("nan")})
    documents = {p.name: strict_loads(p.read_text("utf-8")) for p in paths}
    assert documents["metadata.json"]["note"] is None
    cli_write_json([{"fve": float("-inf")}], tmp_path / "r.json")
    assert strict_loads((tmp_path / "r.json").read_text()) == [{"fve": None}]
    cli_write_json([{"fve": float("nan")}], "-")
    assert strict_loads(capsys.readouterr().out) == [{"fve": None}]


# -- failed writes -------------------------------------------------------------------------
def disk_full(self, fname, *args, **kwargs):
    """``Figure.savefig`` that writes a little, then fails as a full disk does."""
    Path(fname).write_bytes(b"partial")
    raise OSError(28, "No space left on device")


def test_failed_png_write_keeps_the_old_file(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    path = feature_frequency_histogram(torch.rand(16), tmp_path / "feature_frequencies.png")
    grid = frequency_grid({"a": torch.rand(16)}, tmp_path / "grid.png")
    before = {p: p.read_bytes() for p in (path, grid)}
    monkeypatch.setattr(Figure, "savefig", disk_full)
    with pytest.raises(WriteError, match="feature_frequencies.png.*disk is full"):
        feature_frequency_histogram(torch.rand(16), path)
    with pytest.raises(WriteError, match="grid.png"):
        frequency_grid({"b": torch.rand(16)}, grid)
    assert {p: p.read_bytes() for p in (path, grid)} == before
    assert no_temp_files(tmp_path)


def test_failed_json_writes_keep_the_old_files(models, texts, analysis, tmp_path, monkeypatch):
    folder = tmp_path / "trainer_0"
    folder.mkdir()
    eval_path = eval_json(models, texts, folder, monkeypatch)
    run = tmp_path / "run"
    write_run_folder(analysis, run, models["pythia"].tokenizer)
    old = {p: p.read_bytes() for p in [eval_path, *sorted(run.iterdir())]}

    def no_space(self, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_text", no_space)
    with pytest.raises(WriteError, match=f"{held_out.EVAL_NAME}.*disk is full"):
        eval_json(models, texts, folder, monkeypatch)
    with pytest.raises(WriteError, match="metadata.json"):
        write_run_folder(analysis, run, models["pythia"].tokenizer)
    with pytest.raises(WriteError, match="results.json"):
        cli_write_json([], tmp_path / "results.json")
    monkeypatch.undo()
    assert {p: p.read_bytes() for p in old} == old
    assert no_temp_files(tmp_path) and not (tmp_path / "results.json").exists()


def test_run_folder_clears_temps_a_killed_run_left(models, analysis, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    stale = run / ".contexts.json.a1B2c3D4.tmp"
    stale.write_text("half a file")
    keep = run / "notes.tmp"  # not a name atomic_write makes
    keep.write_text("mine")
    write_run_folder(analysis, run, models["pythia"].tokenizer)
    assert not stale.exists() and keep.read_text() == "mine"
    assert sorted(p.name for p in run.iterdir()) == sorted([*FILES, "notes.tmp"])


# -- one writer --------------------------------------------------------------------------
def test_writers_use_files_not_saving():
    """The modules that write outputs take atomic_write from files.py; dashboards no longer
    imports saving (which imports dashboards): no import cycle."""
    for name in ("dashboards.py", "analysis_run.py", "held_out.py", "frequency_plots.py",
                 "evaluation.py", "demo_lm.py", "formats/saelens_export.py",
                 "viewer/synthetic.py", "cli/common.py"):
        tree = ast.parse((PACKAGE / name).read_text())
        imported = {(node.module or "").split(".")[-1] for node in ast.walk(tree)
                    if isinstance(node, ast.ImportFrom)}
        if name != "analysis_run.py":  # analysis_run still takes versions() from saving
            assert "saving" not in imported, name
        source = (PACKAGE / name).read_text()
        assert ".write_text(" not in source, name
        assert "savefig(path" not in source, name
