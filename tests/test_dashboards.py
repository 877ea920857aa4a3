"""Training dashboards: the curves PNG holds exactly the numbers of metrics.jsonl, a
half-written last line is tolerated, and W&B's offline mode records the logged history."""

import glob
import json
import struct
import sys
import time
import types

import pytest

from dictionary_learning.dashboards import (WandbLogger, metric_series, plot_training_curves,
                                            read_metrics, training_curves_figure)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_log(path, steps=(1, 10, 20, 30), truncated_tail=None):
    """A metrics.jsonl like the training loop's: step, activations, loss terms, l0, fve, lr."""
    with open(path, "w") as f:
        for s in steps:
            f.write(json.dumps({"step": s, "activations": 512 * s, "mse": 10.0 / s,
                                "l1": 0.5 + s, "loss": 10.0 / s + 0.001 * (0.5 + s),
                                "l0": 100 - s, "frac_variance_explained": 1 - 1 / s,
                                "lr": 1e-3 * min(1, s / 10)}) + "\n")
        if truncated_tail is not None:
            f.write(truncated_tail)
    return path


def png_size(path):
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    width, height = struct.unpack(">II", data[16:24])  # the IHDR chunk comes first
    return width, height


def test_series_match_the_log_by_hand(tmp_path):
    series = metric_series(read_metrics(write_log(tmp_path / "m.jsonl")))
    # Loss terms in first-seen order, then l0, frac_variance_explained, lr; no axes.
    assert list(series) == ["mse", "l1", "loss", "l0", "frac_variance_explained", "lr"]
    assert series["mse"] == ([1, 10, 20, 30], [10.0, 1.0, 0.5, 10 / 30])
    assert series["l0"] == ([1, 10, 20, 30], [99.0, 90.0, 80.0, 70.0])
    assert series["lr"] == ([1, 10, 20, 30], [1e-4, 1e-3, 1e-3, 1e-3])


def test_png_plots_exactly_the_logged_numbers(tmp_path):
    log = write_log(tmp_path / "m.jsonl")
    out = plot_training_curves(log, tmp_path / "plots" / "curves.png", title="run A")
    assert out == tmp_path / "plots" / "curves.png"
    width, height = png_size(out)
    assert 600 <= width <= 3000 and 300 <= height <= 2000
    assert not list(out.parent.glob(".*.tmp"))  # written atomically, no leftovers

    fig = training_curves_figure(metric_series(read_metrics(log)), title="run A")
    panels = {ax.get_title(): ax for ax in fig.axes}
    assert set(panels) == {"mse", "l1", "loss", "l0", "frac_variance_explained", "lr"}
    records = [json.loads(line) for line in log.read_text().splitlines()]
    for name, ax in panels.items():
        (line,) = ax.get_lines()
        assert list(line.get_xdata()) == [r["step"] for r in records]
        assert list(line.get_ydata()) == [r[name] for r in records]
    assert panels["mse"].get_yscale() == "linear"  # 10 .. 0.33 spans under two decades
    assert fig._suptitle.get_text() == "run A"


def test_log_axis_for_values_spanning_decades(tmp_path):
    log = tmp_path / "m.jsonl"
    log.write_text("".join(json.dumps({"step": s, "mse": 10.0 ** -s, "lr": 1e-3}) + "\n"
                           for s in range(5)))
    axes = {ax.get_title(): ax for ax in
            training_curves_figure(metric_series(read_metrics(log))).axes}
    assert axes["mse"].get_yscale() == "log" and axes["lr"].get_yscale() == "linear"


@pytest.mark.parametrize("tail", ['{"step": 40, "activ', '{"step": 40', "\n\n"])
def test_incomplete_last_line_is_ignored(tmp_path, tail):
    log = write_log(tmp_path / "m.jsonl", truncated_tail=tail)
    assert [r["step"] for r in read_metrics(log)] == [1, 10, 20, 30]
    assert png_size(plot_training_curves(log, tmp_path / "c.png"))[0] > 0


def test_corrupt_middle_line_is_an_error(tmp_path):
    log = tmp_path / "m.jsonl"
    log.write_text('{"step": 1, "mse": 1.0}\nnot json\n{"step": 2, "mse": 0.5}\n')
    with pytest.raises(ValueError, match="line 2"):
        read_metrics(log)


def test_empty_log_gives_a_placeholder_png(tmp_path):
    (tmp_path / "m.jsonl").write_text("")
    out = plot_training_curves(tmp_path / "m.jsonl", tmp_path / "c.png")
    assert png_size(out)[0] > 0
    with pytest.raises(FileNotFoundError):
        plot_training_curves(tmp_path / "missing.jsonl", tmp_path / "d.png")


# ---------------------------------------------------------------------------------------
# Weights & Biases


def wandb_records(path):
    """Raw records of a ``.wandb`` file: wandb's LevelDB-style log (a 7-byte file header
    ``<4sHB`` = ':W&B', 0xBEE1, version; then 32 KiB blocks of chunks with a 7-byte header
    ``<IHB`` = crc32, length, type; types FULL=1 FIRST=2 MIDDLE=3 LAST=4)."""
    data = open(path, "rb").read()
    ident, magic, _ = struct.unpack("<4sHB", data[:7])
    assert (ident, magic) == (b":W&B", 0xBEE1)
    pos, chunks = 7, []
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # too little room left in the block for a header
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if length == 0 and kind == 0:
            break
        chunks.append(data[pos + 7:pos + 7 + length])
        pos += 7 + length
        if kind in (1, 4):
            yield b"".join(chunks)
            chunks = []


def offline_history(run_dir, timeout=30.0):
    """``(run record, history rows)`` of an offline run, once its ``exit`` record is on
    disk: wandb-core may still be writing the file for a moment after ``finish()``."""
    from wandb.proto import wandb_internal_pb2

    (path,) = glob.glob(str(run_dir / "run-*.wandb"))
    deadline = time.monotonic() + timeout
    while True:
        records = []
        for raw in wandb_records(path):
            records.append(wandb_internal_pb2.Record())
            records[-1].ParseFromString(raw)
        kinds = [r.WhichOneof("record_type") for r in records]
        if "exit" in kinds or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert "exit" in kinds, f"the offline run was not closed within {timeout} s: {kinds}"
    rows = [{item.key or "/".join(item.nested_key): json.loads(item.value_json)
             for item in r.history.item} for r, kind in zip(records, kinds) if kind == "history"]
    (run,) = [r.run for r, kind in zip(records, kinds) if kind == "run"]
    return run, rows


def test_wandb_offline_run_records_the_logged_history(tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="wandb is in the [test] extras")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    log = read_metrics(write_log(tmp_path / "m.jsonl"))
    with WandbLogger("dl-test", run_name="demo", config={"lr": 1e-3},
                     dir=tmp_path / "wb") as logger:
        for record in log:
            logger.log(record["step"], record, trainer_index=0)
            logger.log(record["step"], {"mse": 2 * record["mse"]}, trainer_index=1)
    with pytest.raises(RuntimeError, match="finished"):
        logger.log(99, {"mse": 1.0})

    (run_dir,) = (tmp_path / "wb" / "wandb").glob("offline-run-*")
    run, rows = offline_history(run_dir)
    assert run.project == "dl-test" and run.display_name == "demo"
    assert [row["_step"] for row in rows] == [r["step"] for r in log]
    for row, record in zip(rows, log):
        for name in ("mse", "l1", "loss", "l0", "frac_variance_explained", "lr"):
            assert row[f"trainer_0/{name}"] == pytest.approx(record[name], rel=1e-12)
        assert row["trainer_1/mse"] == pytest.approx(2 * record["mse"], rel=1e-12)
        assert "trainer_0/step" not in row and "trainer_0/activations" not in row


def test_wandb_missing_gives_an_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # makes `import wandb` fail
    with pytest.raises(ImportError, match="pip install wandb"):
        WandbLogger("dl-test")


def test_wandb_arguments_reach_init(monkeypatch, tmp_path):
    """With a stand-in module: mode=None leaves wandb to read WANDB_MODE; bad modes fail."""
    calls = []
    run = types.SimpleNamespace(log=lambda data, step: calls.append(("log", data, step)),
                                finish=lambda: calls.append(("finish",)))
    fake = types.SimpleNamespace(init=lambda **kw: calls.append(("init", kw)) or run)
    monkeypatch.setitem(sys.modules, "wandb", fake)
    logger = WandbLogger("p", config={"a": 1}, dir=tmp_path / "d")
    assert calls[0] == ("init", {"project": "p", "name": None, "config": {"a": 1},
                                 "dir": str(tmp_path / "d")})
    logger.log(5, {"step": 5, "mse": 0.25}, trainer_index=2)
    logger.finish()
    logger.finish()
    assert calls[1:] == [("log", {"trainer_2/mse": 0.25}, 5), ("finish",)]
    with pytest.raises(ValueError, match="mode"):
        WandbLogger("p", mode="offlien")


def fve_log(path, steps=200):
    """An FVE curve like a real run's: -60 at the first step, then rising to ~0.86."""
    with open(path, "w") as f:
        for s in range(1, steps + 1):
            fve = -60.0 / s ** 2 + 0.86 * (1 - 1 / (1 + s / 10))
            f.write(json.dumps({"step": s, "frac_variance_explained": fve,
                                "lr": 1e-3 * min(1, s / 50)}) + "\n")
    return read_metrics(path)


def test_fve_panel_shows_the_trained_range(tmp_path):
    records = fve_log(tmp_path / "m.jsonl")
    fig = training_curves_figure(metric_series(records))
    panels = {ax.get_title(): ax for ax in fig.axes}
    fve = panels["frac_variance_explained"]
    values = [r["frac_variance_explained"] for r in records]
    lo, hi = fve.get_ylim()
    later = values[len(values) // 5:]
    assert lo <= min(later) and max(later) <= hi  # everything after the first fifth in view
    assert hi - lo < 0.2 * (max(values) - min(values))  # the first steps' -60 is not
    assert lo > -1 and hi < 1
    (line,) = fve.get_lines()  # every point is still plotted, only the axis is clipped
    assert list(line.get_ydata()) == values
    off = [r["step"] for r in records if not lo <= r["frac_variance_explained"] <= hi]
    notes = [t.get_text() for t in fve.texts]
    assert notes == [f"off the axis: {len(off)} point(s), the last at step {off[-1]}"]
    lr_lo, lr_hi = panels["lr"].get_ylim()  # lr is never clipped: its warm-up is the point
    assert lr_lo <= 1e-3 / 50 and lr_hi >= 1e-3 and not panels["lr"].texts


def test_a_curve_without_outliers_keeps_its_full_range(tmp_path):
    log = tmp_path / "m.jsonl"
    log.write_text("".join(json.dumps({"step": s, "l0": 90 - s, "mse": 5 + (s % 7),
                                       "frac_variance_explained": 0.5 + s / 100}) + "\n"
                           for s in range(1, 40)))
    fig = training_curves_figure(metric_series(read_metrics(log)))
    for ax in fig.axes:
        values = list(ax.get_lines()[0].get_ydata())
        lo, hi = ax.get_ylim()
        assert lo <= min(values) and max(values) <= hi, ax.get_title()
        assert not ax.texts


def _overlaps(a, b):
    return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1


@pytest.mark.parametrize("n_tokens", [8159, None])
def test_dead_feature_label_names_the_tokens_and_clears_the_bars(n_tokens):
    import torch

    from dictionary_learning.frequency_plots import frequency_histogram_figure

    # Most features fire at a similar rate: the tallest bars sit at the left, under the label.
    freqs = torch.cat([torch.full((1800,), 1e-4), torch.logspace(-3, -0.5, 200),
                       torch.zeros(48)])
    fig = frequency_histogram_figure(freqs, title="t", n_tokens=n_tokens)
    (ax,) = fig.axes
    (label,) = ax.texts
    over = " in 8,159 tokens" if n_tokens else ""
    assert label.get_text() == f"48 of 2,048 features dead (never fired{over}; not shown)"
    renderer = fig.canvas.get_renderer()
    box = label.get_window_extent(renderer=renderer)
    bars = [p for p in ax.patches if p.get_height() > 0]
    assert max(p.get_height() for p in bars) >= 1800
    for bar in bars:
        assert not _overlaps(box, bar.get_window_extent(renderer=renderer))
    assert box.y0 > max(bar.get_window_extent(renderer=renderer).y1 for bar in bars)


def test_grid_labels_clear_the_bars():
    import torch

    from dictionary_learning.frequency_plots import frequency_grid_figure

    freqs = torch.cat([torch.full((900,), 1e-4), torch.zeros(100)])
    fig = frequency_grid_figure({"a": freqs, "b": freqs.flip(0)})
    renderer = fig.canvas.get_renderer()
    assert len(fig.axes) == 2
    for ax in fig.axes:
        (label,) = ax.texts
        assert label.get_text() == "100 of 1000 dead"
        box = label.get_window_extent(renderer=renderer)
        tops = [p.get_window_extent(renderer=renderer).y1 for p in ax.patches
                if p.get_height() > 0]
        assert max(p.get_height() for p in ax.patches) == 900 and box.y0 > max(tops)
