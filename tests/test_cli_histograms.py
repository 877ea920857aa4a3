"""``histograms``: one PNG per dictionary (named after its path under the common folder),
or one grid; the frequencies plotted are those ``evaluate`` measures."""

import json

import pytest
import torch

from cli_helpers import (D_MODEL, nested_config, save_dictionary, shared_model_folder,
                         write_jsonl)
from dictionary_learning import AutoEncoder
from dictionary_learning.cli import main
from dictionary_learning.frequency_plots import frequency_grid

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="session")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli_histograms")
    model_dir = shared_model_folder(tmp_path_factory)
    write_jsonl(root / "heldout.jsonl", n=120)
    for i, sub in enumerate(("gpt_neox.layers.0.mlp", "gpt_neox.layers.1.mlp")):
        torch.manual_seed(i)
        save_dictionary(root / "runs" / f"trainer_{i}", AutoEncoder(D_MODEL, 96),
                        nested_config(model_dir, sub, 96))
    return root


def args(tree, out, *extra):
    return ["histograms", str(tree / "runs"), "--data", str(tree / "heldout.jsonl"),
            "--n-tokens", "300", "--batch-size", "8", "--out", str(out), *extra]


def test_one_png_per_dictionary(tree, tmp_path, capsys):
    out = tmp_path / "histograms"
    assert main(args(tree, out)) == 0
    table = capsys.readouterr().out
    files = sorted(out.iterdir())
    assert [f.name for f in files] == ["trainer_0.png", "trainer_1.png"]
    for f in files:
        data = f.read_bytes()
        assert data[:8] == PNG and len(data) > 5000, f
        assert str(f) in table
    # the % alive printed is evaluate's, on the same tokens
    assert main(["evaluate", str(tree / "runs/trainer_1"), "--data",
                 str(tree / "heldout.jsonl"), "--n-tokens", "300", "--batch-size", "8",
                 "--no-loss", "--json", "-"]) == 0
    [result] = json.loads(capsys.readouterr().out)
    row = next(line for line in table.splitlines() if line.startswith("trainer_1"))
    assert f"{100 * result['frac_alive']:.4g}" in row and f"{result['l0']:.4g}" in row


def test_grid_is_one_file(tree, tmp_path, capsys):
    out = tmp_path / "grid"
    assert main(args(tree, out, "--grid")) == 0
    [f] = list(out.iterdir())
    assert f.name == "feature_frequencies_grid.png" and f.read_bytes()[:8] == PNG


def test_grid_checks_its_input(tmp_path):
    with pytest.raises(ValueError, match="fractions in"):
        frequency_grid({"a": torch.tensor([0.5, 1.5])}, tmp_path / "g.png")
    with pytest.raises(ValueError, match="no frequencies"):
        frequency_grid({}, tmp_path / "g.png")
    # all-dead panels still draw (nothing to take the log of)
    assert frequency_grid({"dead": torch.zeros(8), "alive": torch.full((8,), 0.01)},
                          tmp_path / "g.png").read_bytes()[:8] == PNG


def test_missing_folder_is_one_line(tmp_path, capsys):
    assert main(["histograms", str(tmp_path / "nope"), "--data", "stdlib"]) == 2
    assert capsys.readouterr().err.startswith("error: no dictionary folder or file at")
