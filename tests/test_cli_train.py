"""The train command end to end on a local model folder and local text: outputs, the sweep,
every architecture, held-out evaluation, resuming after a kill, Ctrl-C, and clear errors."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dictionary_learning import load_dictionary
from dictionary_learning.cli import main
from dictionary_learning.saving import checkpoint_steps
from dictionary_learning.tiny import tiny_causal_lm, train_tokenizer

from cli_helpers import snapshot

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--submodule", "1.mlp", "--expansion", "4", "--batch-size", "128", "--ctx-len", "32",
         "--n-ctxs", "40", "--refresh-batch-size", "16", "--warmup-steps", "5",
         "--eval-texts", "30", "--eval-loss-texts", "8", "--no-progress"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, texts):
    folder = tmp_path_factory.mktemp("model")
    tokenizer = train_tokenizer(texts[:200], 512)
    tiny_causal_lm("pythia", vocab_size=len(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def data_file(tmp_path_factory, texts):
    path = tmp_path_factory.mktemp("data") / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def train(model_dir, data_file, save_dir, *extra):
    return main(["train", "--model", str(model_dir), "--data", str(data_file), "--save-dir",
                 str(save_dir), *SMALL, *extra])


def test_sweep_trains_saves_and_evaluates_on_held_out_text(model_dir, data_file, tmp_path,
                                                           capsys, texts):
    assert train(model_dir, data_file, tmp_path, "--l1", "1e-3,3e-3", "--steps", "12") == 0
    out = capsys.readouterr().out
    for i, penalty in enumerate((1e-3, 3e-3)):
        folder = tmp_path / f"trainer_{i}"
        assert f"{folder}" in out and f"l1={penalty:g}" in out
        ae, config = load_dictionary(folder)
        assert (ae.activation_dim, ae.dict_size) == (64, 256)
        assert config["trainer"]["sparsity_penalty"] == penalty
        assert config["run"]["finished"] and config["run"]["steps_done"] == 12
        assert (folder / "feature_frequencies.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        metrics = json.loads((folder / "eval.json").read_text())
        # Held out: the first 30 documents, every real token of them (truncated to 32).
        from dictionary_learning.sources import load_model
        tokenizer = load_model(str(model_dir)).tokenizer
        lengths = [min(32, len(tokenizer(t)["input_ids"])) for t in texts[:30]]
        assert metrics["n_eval_texts"] == 30 and metrics["n_tokens"] == sum(lengths)
        assert f"{metrics['n_tokens']:,} tokens" in out
    args = json.loads((tmp_path / "train_args.json").read_text())
    assert args["sparsity_penalty"] == [1e-3, 3e-3] and args["model"] == str(model_dir)


def test_every_architecture_trains_through_the_command(model_dir, data_file, tmp_path):
    archs = ["relu", "topk", "batchtopk", "jumprelu", "gated", "matryoshka", "new"]
    assert train(model_dir, data_file, tmp_path, "--arch", ",".join(archs), "--k", "8",
                 "--steps", "8") == 0
    expected = ["AutoEncoder", "AutoEncoderTopK", "BatchTopKSAE", "JumpReluAutoEncoder",
                "GatedAutoEncoder", "MatryoshkaBatchTopKSAE", "AutoEncoderNew"]
    for i, name in enumerate(expected):
        ae, _ = load_dictionary(tmp_path / f"trainer_{i}")
        assert type(ae).__name__ == name
        assert json.loads((tmp_path / f"trainer_{i}" / "eval.json").read_text())["l0"] > 0
    assert "k" in load_dictionary(tmp_path / "trainer_1")[1]["trainer"]


def test_stretcher_trains_on_mlp_input_to_output(model_dir, data_file, tmp_path):
    assert train(model_dir, data_file, tmp_path, "--arch", "stretcher", "--io", "in_to_out",
                 "--steps", "6") == 0
    ae, _ = load_dictionary(tmp_path)
    assert type(ae).__name__ == "MLPStretcher" and ae.output_dim == 64


def _start(model_dir, data_file, save_dir, *extra):
    # The same number of threads as this process: the killed part of a run and its
    # in-process resume must round alike.
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads()),
           "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, "-m", "dictionary_learning", "train", "--model", str(model_dir),
         "--data", str(data_file), "--save-dir", str(save_dir), *SMALL, *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _logged_steps(metrics: Path) -> int:
    lines = metrics.read_text().splitlines() if metrics.exists() else []
    return len(lines)  # one line per step: runs of up to 100 steps log every step


# Every trainable architecture in one sweep, with resampling: one kill interrupts them all.
SWEEP = ["--arch", "relu,topk,batchtopk,jumprelu,gated,matryoshka", "--k", "8",
         "--resample-steps", "7", "--steps", "40", "--save-steps", "5"]
_REFERENCES: dict = {}


def _reference(model_dir, data_file, tmp_path_factory, pack):
    """The uninterrupted run, once per session and tokenisation."""
    if pack not in _REFERENCES:
        folder = tmp_path_factory.mktemp("reference")
        assert train(model_dir, data_file, folder, *SWEEP, *pack) == 0
        _REFERENCES[pack] = [torch.load(folder / f"trainer_{i}" / "ae.pt") for i in range(6)]
    return _REFERENCES[pack]


@pytest.mark.parametrize("how, pack", [("kill", ()), ("kill", ("--pack",)),
                                       ("ctrl-c", ("--pack",))])
def test_interrupted_run_resumes_bit_identical(model_dir, data_file, tmp_path,
                                               tmp_path_factory, how, pack):
    """SIGKILL (or Ctrl-C) at a random step of a sweep over every architecture, then
    ``--resume``: every dictionary ends equal (torch.equal) to the uninterrupted run's."""
    expected = _reference(model_dir, data_file, tmp_path_factory, pack)
    at = random.randrange(7, 25)
    proc = _start(model_dir, data_file, tmp_path, *SWEEP, *pack)
    metrics = tmp_path / "trainer_5" / "metrics.jsonl"
    deadline = time.time() + 120
    while _logged_steps(metrics) < at:
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, "the run did not reach the step to stop at"
        time.sleep(0.01)
    if how == "kill":
        proc.kill()
        proc.communicate()
    else:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 130, err
        assert "continue it with: --resume" in err
    done = max(checkpoint_steps(tmp_path / "trainer_0"))
    assert 5 <= done < 40, f"stopped at step {at}"
    load_dictionary(tmp_path / "trainer_0" / "checkpoints" / f"ae_{done}.pt")
    assert main(["train", "--resume", "--save-dir", str(tmp_path), "--no-progress"]) == 0
    assert not list(tmp_path.rglob("*.tmp"))
    for i, reference in enumerate(expected):
        resumed = torch.load(tmp_path / f"trainer_{i}" / "ae.pt")
        for key, tensor in reference.items():
            assert torch.equal(resumed[key], tensor), f"trainer {i} {key} (stopped at {at})"


@pytest.fixture(scope="module")
def finished_run(model_dir, data_file, tmp_path_factory):
    folder = tmp_path_factory.mktemp("finished")
    assert train(model_dir, data_file, folder, "--steps", "4", "--save-steps", "2") == 0
    return folder


@pytest.mark.parametrize("args, message", [
    (["--save-steps", "0"], "--save-steps must be positive, got 0"),
    (["--lr", "nan"], "--lr nan is not a positive finite number"),
    (["--lr", "inf"], "--lr inf is not a positive finite number"),
    (["--lr", "-1"], "--lr -1.0 is not a positive finite number"),
    (["--l1", "nan"], "--sparsity-penalty nan is not a non-negative finite number"),
    (["--arch", "topk", "--k", "1000", "--dict-size", "256"], "--k 1000 is outside 1..256"),
    (["--arch", "topk", "--k", "1000"], "--k 1000 is outside 1..256"),
    (["--arch", "topk", "--k", "0"], "--k must be positive, got 0"),
    (["--arch", "topk", "--k", "-3"], "--k must be positive, got -3"),
    (["--arch", "batchtopk", "--k", "257", "--dict-size", "256"], "--k 257 is outside 1..256"),
    (["--steps", "0"], "--steps must be positive, got 0"),
    (["--steps", "-5"], "--steps must be positive, got -5"),
    (["--dtype", "float64x"], "unknown dtype 'float64x'"),
    (["--device", "cuda:7"], "has no CUDA device: use --device cpu"),
    (["--n-ctxs", "100000000"], "lower n_ctxs"),
    ([], "already holds a run"),
])
def test_refused_flags_leave_a_finished_run_byte_identical(model_dir, data_file, finished_run,
                                                           capsys, args, message):
    before = snapshot(finished_run)
    capsys.readouterr()
    # With --overwrite, so that the checks after the model opens are reached too: the old
    # run is removed only once every check has passed.
    overwrite = ["--overwrite"] if args else []
    assert train(model_dir, data_file, finished_run, "--steps", "4", *overwrite, *args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and message in err[-1], err
    assert "Traceback" not in "\n".join(err)
    assert snapshot(finished_run) == before


class _Payload:
    def __reduce__(self):
        return (os.system, ("echo ran > /dev/null",))


def test_a_refused_trainer_state_leaves_the_run_byte_identical(finished_run, tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    torch.save({"optimizer": _Payload()}, run / "checkpoints" / "trainer_state_4.pt")
    before = snapshot(run)
    assert main(["train", "--resume", "--save-dir", str(run), "--steps", "6",
                 "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: ") and "trainer_state_4.pt: refused to unpickle" in err
    assert snapshot(run) == before


def test_save_dir_that_is_a_file_is_one_line(model_dir, data_file, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert train(model_dir, data_file, tmp_path / "file", "--steps", "2") == 2
    assert "is a file, not a folder" in capsys.readouterr().err


def test_a_full_disk_during_a_checkpoint_is_one_line_and_resumes(model_dir, data_file,
                                                                 tmp_path, capsys,
                                                                 monkeypatch):
    real_save, calls = torch.save, []

    def fills_up(obj, path, *a, **k):
        calls.append(path)
        if "_4.pt" in str(path):  # the second checkpoint
            raise OSError(28, "No space left on device")
        return real_save(obj, path, *a, **k)

    monkeypatch.setattr(torch, "save", fills_up)
    assert train(model_dir, data_file, tmp_path, "--steps", "8", "--save-steps", "2") == 2
    err = [line for line in capsys.readouterr().err.strip().splitlines()
           if not line.startswith("Loading weights")]  # transformers' own progress bar
    assert len(err) == 1 and err[0].startswith("error: cannot write ") and "ae_4.pt" in err[0]
    assert "disk is full" in err[0] and "last complete checkpoint (step 2)" in err[0]
    assert checkpoint_steps(tmp_path) == [2] and not list(tmp_path.rglob("*.tmp"))
    load_dictionary(tmp_path / "checkpoints" / "ae_2.pt")
    monkeypatch.setattr(torch, "save", real_save)  # room again
    assert main(["train", "--resume", "--save-dir", str(tmp_path), "--no-progress"]) == 0
    assert load_dictionary(tmp_path)[1]["run"]["steps_done"] == 8


@pytest.mark.parametrize("args, message", [
    (["--submodule", "gpt_neox.layers.1.mpl"], "nearest names: gpt_neox.layers.1.mlp"),
    (["--submodule", "7.mlp"], "the model has 2 layers"),
    (["--data", "missing/docs.jsonl"], "no data file or folder at missing/docs.jsonl"),
    (["--arch", "sparsest"], "architecture 'sparsest' is unknown"),
    (["--arch", "TokenNormalizedSAE"], "loads files of other tools but cannot be trained"),
    (["--l1", "1e-3,x"], None),
])
def test_bad_input_is_one_clear_line(model_dir, data_file, tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) if message is None else _no_raise():
        code = train(model_dir, data_file, tmp_path, "--steps", "2", *args)
        assert code == 2
    err = capsys.readouterr().err
    if message is None:
        assert "comma-separated float values" in err
    else:
        assert err.strip().splitlines()[-1].startswith("error: ") and message in err
        assert "Traceback" not in err


def test_hub_model_offline_and_resume_mistakes(tmp_path, capsys, model_dir, data_file):
    assert main(["train", "--model", "EleutherAI/pythia-70m-deduped", "--data", "stdlib",
                 "--no-progress"]) == 2
    assert "could not fetch model 'EleutherAI/pythia-70m-deduped'" in capsys.readouterr().err
    assert main(["train", "--resume", "--save-dir", str(tmp_path)]) == 2
    assert "no train_args.json" in capsys.readouterr().err
    assert train(model_dir, data_file, tmp_path, "--steps", "2") == 0
    capsys.readouterr()
    assert main(["train", "--resume", "--save-dir", str(tmp_path), "--lr", "1"]) == 2
    assert "cannot change --lr" in capsys.readouterr().err
    assert main(["train", "--resume", "--save-dir", str(tmp_path)]) == 2
    assert "nothing to resume in" in capsys.readouterr().err


class _no_raise:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_demo_preset_runs_offline(tmp_path, monkeypatch, capsys):
    """The README's main command, on a demo model made tiny for the test."""
    from dictionary_learning import demo_lm

    tiny = demo_lm.DemoLMConfig(n_layers=2, d_model=32, n_heads=2, d_mlp=64, vocab_size=300,
                                ctx_len=32, batch_size=4, steps=3, n_docs=200)
    monkeypatch.setattr(demo_lm, "DEMO_LM_CONFIG", tiny)
    monkeypatch.setenv("DL_CACHE_DIR", str(tmp_path / "cache"))
    assert main(["train", "--preset", "demo", "--save-dir", str(tmp_path / "run"), "--steps",
                 "4", "--n-ctxs", "20", "--eval-texts", "20", "--eval-loss-texts", "5",
                 "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "Evaluation on held-out text (20 documents" in out
    ae, config = load_dictionary(tmp_path / "run")
    assert ae.dict_size == 8 * 32 and config["trainer"]["submodule_name"] == \
        "gpt_neox.layers.1.mlp"
    assert config["trainer"]["lm_name"] == str(demo_lm.demo_lm_path(tiny))
    for name in ("training_curves.png", "feature_frequencies.png"):
        assert (tmp_path / "run" / name).read_bytes()[:4] == b"\x89PNG"
    # The closing list names what the folder holds (no checkpoints/ before the first save).
    [wrote] = [line for line in out.splitlines() if line.startswith("Wrote, per dictionary: ")]
    listed = wrote.split(": ", 1)[1].split(", ")
    assert listed == sorted(p.name + "/" * p.is_dir() for p in (tmp_path / "run").iterdir())
    assert "ae.pt" in listed and "eval.json" in listed and "checkpoints/" not in listed


def test_short_runs_estimate_the_batch_topk_threshold_within_the_run():
    from dictionary_learning.train_run import TrainRun, trainer_configs
    from dictionary_learning.trainer import resolve_schedules

    def kwargs(steps):  # what each trainer of the run trains with (its config.json records)
        run = TrainRun(arch=("batchtopk", "matryoshka", "topk"), steps=steps, k=(8,))
        return [resolve_schedules(c, run.total_steps).dict_kwargs
                for c in trainer_configs(run, 64, 64)]

    batch, matryoshka, topk = kwargs(500)
    assert batch["threshold_start_step"] == 125 == matryoshka["threshold_start_step"]
    # The running average's horizon 1 / (1 - beta) is a tenth of the steps that remain.
    assert 1 / (1 - batch["threshold_beta"]) == pytest.approx(375 / 10)
    assert "threshold_beta" not in topk
    long_run = kwargs(100_000)[0]
    assert (long_run["threshold_start_step"], long_run["threshold_beta"]) == (1000, 0.999)
