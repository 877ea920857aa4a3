"""The quick demo's path and the demo's reproducibility: ``demo.sh --quick`` runs the
``demo-quick`` preset on its own demo model (a separate cache folder), the commands printed
after training parse as the CLI's own, and a first (cold) run, whose process finds no cached
model, trains exactly what a later (warm) run trains on the cached one."""

import json
import os
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from dictionary_learning import demo_lm
from dictionary_learning.cli import build_parser
from dictionary_learning.cli.next_steps import next_commands, python_command
from dictionary_learning.train_run import PRESETS, TrainRun

REPO = Path(__file__).resolve().parents[1]


def test_quick_preset_is_a_smaller_demo_with_its_own_cache_folder():
    quick, full = PRESETS["demo-quick"], PRESETS["demo"]
    assert quick["model"] == "demo-quick" and full["model"] == "demo"
    assert quick["save_dir"] != full["save_dir"] and quick["steps"] < full["steps"]
    small, big = demo_lm.demo_config("demo-quick"), demo_lm.demo_config("demo")
    assert big == demo_lm.DEMO_LM_CONFIG and demo_lm.demo_config("pythia") is None
    assert demo_lm.demo_lm_path(small) != demo_lm.demo_lm_path(big)
    assert small.d_model * small.n_layers < big.d_model * big.n_layers
    assert small.steps * small.batch_size < big.steps * big.batch_size
    TrainRun(**quick)  # a valid run


def test_demo_script_runs_the_quick_preset(tmp_path):
    """demo.sh with a stand-in environment whose python prints its arguments."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    fake = venv / "bin" / "python"
    fake.write_text("#!/bin/sh\necho \"$@\"\n")
    fake.chmod(0o755)
    stamp = subprocess.run("cat pyproject.toml requirements.txt | cksum | cut -d' ' -f1",
                           shell=True, cwd=REPO, capture_output=True, text=True, check=True)
    (venv / f".dictionary_learning-{stamp.stdout.strip()}").touch()  # setup_env: up to date
    env = {**os.environ, "DL_VENV": str(venv)}

    def demo(*args):
        done = subprocess.run(["bash", "scripts/demo.sh", *args], cwd=REPO, env=env,
                              capture_output=True, text=True, check=True)
        return done.stdout.split()

    assert demo("--quick", "--steps", "5") == ["-m", "dictionary_learning", "train", "--preset",
                                               "demo-quick", "--overwrite", "--steps", "5"]
    assert demo() == ["-m", "dictionary_learning", "train", "--preset", "demo", "--overwrite"]


@pytest.mark.parametrize("preset", ["demo", "demo-quick"])
def test_next_commands_name_the_run_and_parse(preset, tmp_path, monkeypatch):
    run = TrainRun(**PRESETS[preset])
    folders = [Path(run.save_dir)]
    python = tmp_path / ".venv" / "bin" / "python"
    monkeypatch.chdir(tmp_path)
    commands = next_commands(run, folders, executable=str(python))
    assert [c.split()[:4] for c in commands] == [
        [".venv/bin/python", "-m", "dictionary_learning", name]
        for name in ("evaluate", "analyze", "viewer")]
    parser = build_parser()
    evaluate, analyze, viewer = (parser.parse_args(shlex.split(c)[3:]) for c in commands)
    assert evaluate.dict_dirs == [run.save_dir] and evaluate.data == "stdlib"
    assert analyze.dict_dir == run.save_dir and analyze.data == "stdlib"
    assert viewer.run_dir == analyze.out == f"{run.save_dir}-analysis"
    # Outside the working folder, the interpreter is named by its absolute path.
    assert python_command("/opt/env/bin/python", cwd=tmp_path) == "/opt/env/bin/python"


TINY = demo_lm.DemoLMConfig(n_layers=2, d_model=32, n_heads=2, d_mlp=64, vocab_size=2048,
                            ctx_len=64, batch_size=8, steps=20, warmup_steps=3, lr=3e-3)

DRIVER = """
import sys
from dictionary_learning import demo_lm
from dictionary_learning.cli import main

demo_lm.DEMO_LM_CONFIG = demo_lm.DemoLMConfig(**{config})
sys.exit(main(["train", "--preset", "demo", "--save-dir", sys.argv[1], "--steps", "160",
               "--batch-size", "512", "--n-ctxs", "40", "--resample-steps", "60",
               "--save-steps", "60", "--eval-texts", "20", "--eval-loss-texts", "5",
               "--no-progress"]))
"""


def test_first_run_equals_later_runs(tmp_path):
    """Two train processes, the first building the demo model (cold), the second loading
    it (warm), train byte-identical dictionaries. The runs read ~80k activations, well
    past the docstring (number 570) where a process that had read the stdlib's docstrings
    once before sees a different list than a fresh one."""
    driver = tmp_path / "driver.py"
    driver.write_text(textwrap.dedent(DRIVER).format(config=repr(TINY.__dict__)))
    env = {**os.environ, "DL_CACHE_DIR": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"}
    outputs = []
    for name in ("cold", "warm"):
        done = subprocess.run([sys.executable, str(driver), str(tmp_path / name)],
                              cwd=tmp_path, env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-2000:]
        outputs.append(tmp_path / name)
    assert len(list((tmp_path / "cache").iterdir())) == 1  # built once, by the cold run
    cold, warm = outputs
    lines = (cold / "metrics.jsonl").read_text().splitlines()
    assert len(lines) >= 20 and json.loads(lines[-1])["step"] == 160
    assert (cold / "metrics.jsonl").read_text() == (warm / "metrics.jsonl").read_text()
    assert json.loads((cold / "eval.json").read_text()) == \
        json.loads((warm / "eval.json").read_text())
    a, b = (torch.load(d / "ae.pt", map_location="cpu") for d in (cold, warm))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
