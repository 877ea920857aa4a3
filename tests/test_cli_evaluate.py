"""``evaluate`` on a tiny local model: results equal an independent computation, every
folder layout evaluates (nested, flat published, none), a tree gives one row per
dictionary, and each user error is one line with exit code 2."""

import json
import math
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from cli_helpers import (D_MODEL, FLAT_CONFIG, nested_config, save_dictionary,
                         shared_model_folder, snapshot, write_jsonl)
from dictionary_learning import (ActivationBuffer, AutoEncoder, loss_recovered,
                                 reconstruction_metrics)
from dictionary_learning.assess import published_submodule, read_target
from dictionary_learning.cli import main
from dictionary_learning.sources import load_model

REPO = Path(__file__).resolve().parents[1]
SMALL = ["--n-tokens", "600", "--n-loss-texts", "8", "--batch-size", "8"]


@pytest.fixture(scope="session")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli_evaluate")
    model_dir = shared_model_folder(tmp_path_factory)
    texts = write_jsonl(root / "heldout.jsonl")
    torch.manual_seed(1)
    ae = AutoEncoder(D_MODEL, 128)
    nested = save_dictionary(root / "runs/run/trainer_0", ae,
                             nested_config(model_dir, "gpt_neox.layers.1.mlp", 128))
    return {"root": root, "model": model_dir, "data": root / "heldout.jsonl", "texts": texts,
            "ae": ae, "nested": nested}


def reference(env, dictionary, submodule, n_tokens=600, n_loss_texts=8, ctx_len=32,
              batch_size=8, seed=0):
    """The metrics computed directly: our own model load, buffer and metric calls."""
    from nnsight import LanguageModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(env["model"])
    tokenizer.model_input_names = ["input_ids", "attention_mask"]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*LanguageModel is deprecated.*")
        model = LanguageModel(AutoModelForCausalLM.from_pretrained(env["model"]).eval(),
                              tokenizer=tokenizer)
    torch.manual_seed(seed)
    buffer = ActivationBuffer(iter(env["texts"]), model, submodule,
                              n_ctxs=math.ceil(n_tokens / ctx_len), ctx_len=ctx_len,
                              refresh_batch_size=batch_size, out_batch_size=n_tokens,
                              progress=False)
    rows = next(buffer)
    assert rows.shape == (n_tokens, D_MODEL)
    metrics = reconstruction_metrics(dictionary, rows)
    loss = loss_recovered(buffer.text_batch(n_loss_texts), model, submodule, dictionary,
                          ctx_len=ctx_len, batch_size=batch_size)
    return metrics, loss


def run_json(capsys, *args):
    code = main(["evaluate", *map(str, args), "--json", "-"])
    out = capsys.readouterr().out
    assert code == 0
    return json.loads(out)


def test_nested_config_matches_direct_computation(env, capsys, tmp_path):
    out = tmp_path / "results.json"
    code = main(["evaluate", str(env["nested"]), "--data", str(env["data"]), *SMALL,
                 "--json", str(out)])
    table = capsys.readouterr().out
    assert code == 0
    [result] = json.loads(out.read_text())
    assert (result["model"], result["submodule"], result["ctx_len"]) == (
        str(env["model"]), "gpt_neox.layers.1.mlp", 32)  # all from config.json
    metrics, loss = reference(env, env["ae"], "gpt_neox.layers.1.mlp")
    for key in ("mse", "l1", "l0", "frac_variance_explained", "frac_alive", "cossim"):
        assert result[key] == pytest.approx(metrics[key], rel=1e-6, abs=1e-9), key
    for key in ("loss_clean", "loss_patched", "loss_zero"):
        assert result[key] == pytest.approx(loss[key], rel=1e-6), key
    assert result["n_tokens"] == 600 and result["n_loss_tokens"] == loss["n_tokens"]
    header, rule, line = table.strip().splitlines()
    assert header.split()[:3] == ["dictionary", "submodule", "MSE"] and "% alive" in header
    assert line.startswith("trainer_0") and f"{metrics['mse']:.4g}" in line


def test_identity_dictionary_recovers_everything(env, capsys, tmp_path):
    """A known answer: the identity reconstructs exactly, so the patched loss is the
    clean loss and the recovered fraction is 1 (a folder with no config.json at all)."""
    folder = tmp_path / "identity"
    folder.mkdir()
    torch.save({}, folder / "ae.pt")
    [r] = run_json(capsys, folder, "--dict-class", "IdentityDict", "--activation-dim", D_MODEL,
                   "--model", env["model"], "--submodule", "gpt_neox.layers.0", "--data",
                   env["data"], *SMALL)
    assert r["dict_class"] == "IdentityDict" and r["mse"] == 0 and r["frac_variance_explained"] == 1
    assert r["loss_patched"] == pytest.approx(r["loss_clean"], abs=1e-6)
    assert r["frac_recovered"] == pytest.approx(1.0, abs=1e-4)
    assert r["loss_zero"] != pytest.approx(r["loss_clean"], abs=1e-4)


def test_tree_with_published_flat_and_no_config(env, capsys, tmp_path, monkeypatch):
    import dictionary_learning.cli.evaluate as command

    loads = []
    monkeypatch.setattr(command, "load_model",
                        lambda name, **kw: loads.append(name) or load_model(name, **kw))
    tree = tmp_path / "dictionaries" / "pythia-70m-deduped"
    layout = {"embed": "gpt_neox.embed_in", "attn_out_layer1": "gpt_neox.layers.1.attention",
              "mlp_out_layer0": "gpt_neox.layers.0.mlp", "resid_out_layer1": "gpt_neox.layers.1"}
    for i, component in enumerate(layout):
        torch.manual_seed(i)
        config = None if component == "resid_out_layer1" else FLAT_CONFIG
        save_dictionary(tree / component / "10_32768", AutoEncoder(D_MODEL, 128), config)
        assert published_submodule(component) == layout[component]
    # a hub id is what the published layout implies; the tiny model stands in for it
    assert read_target(tree / "embed" / "10_32768").model == "EleutherAI/pythia-70m-deduped"
    results = run_json(capsys, tmp_path / "dictionaries", "--model", env["model"], "--data",
                       env["data"], "--n-tokens", "200", "--n-loss-texts", "4", "--batch-size",
                       "8", "--ctx-len", "32")
    assert [r["dictionary"] for r in results] == [f"{c}/10_32768" for c in sorted(layout)]
    assert loads == [str(env["model"])]  # one model load for the four dictionaries
    for r in results:
        component = r["dictionary"].split("/")[0]
        assert r["submodule"] == layout[component] and r["n_tokens"] == 200
        assert r["target_from"] == f"published layout ({component})"
        assert math.isfinite(r["loss_patched"]) and 0 <= r["frac_alive"] <= 1
    # the same tree as a table: one row per dictionary
    assert main(["evaluate", str(tree), "--model", str(env["model"]), "--data",
                 str(env["data"]), "--n-tokens", "100", "--no-loss", "--ctx-len", "32"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 + len(layout) and "% loss rec." not in lines[0]


def test_no_config_with_widths_on_the_command_line(env, capsys, tmp_path):
    folder = save_dictionary(tmp_path / "bare", env["ae"], None)
    common = ["--model", env["model"], "--submodule", "1.mlp", "--data",
              env["data"], "--ctx-len", "32", *SMALL]  # the short name of the layer-1 MLP
    [r] = run_json(capsys, folder, "--activation-dim", D_MODEL, "--dict-size", 128, *common)
    assert r["submodule"] == "gpt_neox.layers.1.mlp"
    metrics, _ = reference(env, env["ae"], "gpt_neox.layers.1.mlp")
    assert r["mse"] == pytest.approx(metrics["mse"], rel=1e-6)
    assert main(["evaluate", str(folder), "--dict-size", "256", *map(str, common)]) == 2
    assert "dict_size is 128 in the weights, not 256" in capsys.readouterr().err


def bad_folder(tmp_path):
    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "ae.pt").write_bytes(b"not a torch file")
    (folder / "config.json").write_text(json.dumps({"trainer": {"dict_class": "AutoEncoder"}}))
    return folder


ERRORS = {
    "missing folder": (lambda env, t: [t / "nope"], "no dictionary folder or file at"),
    "empty tree": (lambda env, t: [t], "no dictionary found under"),
    "unreadable weights": (lambda env, t: [bad_folder(t), "--model", env["model"],
                                           "--submodule", "gpt_neox.layers.1.mlp"],
                           "broken/ae.pt"),  # loading.py words the reason (truncated, pickle)
    "unknown submodule": (lambda env, t: [env["nested"], "--submodule", "gpt_neox.layers.1.mlpp"],
                          "no submodule 'gpt_neox.layers.1.mlpp'; nearest names: "
                          "gpt_neox.layers.1.mlp"),
    "width mismatch": (lambda env, t: [save_dictionary(t / "narrow", AutoEncoder(32, 64), None),
                                       "--model", env["model"], "--submodule",
                                       "gpt_neox.layers.1.mlp"],
                       "expects activations of width 32, but gpt_neox.layers.1.mlp (out) has "
                       "width 64"),
    "missing data file": (lambda env, t: [env["nested"], "--data", t / "missing.jsonl"],
                          "no data file or folder at"),
    "skip past the end": (lambda env, t: [env["nested"], "--skip-texts", "100000"],
                          "has no documents left after skipping the first 100000"),
    "no model known": (lambda env, t: [save_dictionary(t / "bare", env["ae"], None)],
                       "cannot tell which model and submodule"),
    "offline model hub id": (lambda env, t: [env["nested"], "--model",
                                             "EleutherAI/pythia-70m-deduped"],
                             "could not fetch model 'EleutherAI/pythia-70m-deduped'"),
    "offline dataset": (lambda env, t: [env["nested"], "--data", "monology/pile-uncopyrighted"],
                        "could not fetch dataset 'monology/pile-uncopyrighted'"),
}


@pytest.mark.parametrize("case", ERRORS)
def test_user_errors_are_one_line(env, capsys, tmp_path, case, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    make_args, message = ERRORS[case]
    args = [str(a) for a in make_args(env, tmp_path)]
    if "--data" not in args:
        args += ["--data", str(env["data"])]
    code = main(["evaluate", *args, *SMALL, "--no-loss"])
    err = capsys.readouterr().err
    assert code == 2
    [line] = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert message in line and "Traceback" not in err


def test_script_exit_code(env, tmp_path):
    """The thin script: a user error exits 2 with one line on stderr."""
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "evaluate.py"),
                           str(env["nested"]), "--data", str(tmp_path / "missing.jsonl")],
                          capture_output=True, text=True, timeout=120,
                          env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin",
                               "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"error: no data file or folder at {tmp_path / 'missing.jsonl'}: check the path "
        "(supported: .jsonl, .jsonl.zst, .txt, a folder of them, 'stdlib', or a HF dataset name)"]


def test_stretcher_reads_input_output_pairs(env, capsys, tmp_path):
    """io=in_to_out serves (input, output) pairs; the row count is still --n-tokens."""
    from dictionary_learning import MLPStretcher

    torch.manual_seed(0)
    folder = save_dictionary(tmp_path / "stretcher", MLPStretcher(D_MODEL, 96), None)
    [r] = run_json(capsys, folder, "--model", env["model"], "--submodule", "1.mlp", "--io",
                   "in_to_out", "--data", env["data"], "--ctx-len", "32", *SMALL)
    assert (r["dict_class"], r["io"], r["n_tokens"]) == ("MLPStretcher", "in_to_out", 600)
    assert math.isfinite(r["mse"]) and math.isfinite(r["loss_patched"])
    narrow = save_dictionary(tmp_path / "narrow", MLPStretcher(32, 96), None)
    assert main(["evaluate", str(narrow), "--model", str(env["model"]), "--submodule", "1.mlp",
                 "--io", "in_to_out", "--data", str(env["data"]), *SMALL]) == 2
    assert "width 32, but gpt_neox.layers.1.mlp (in_to_out) has width 64" in capsys.readouterr().err


def test_load_options_reach_the_format_reader(env, capsys, tmp_path):
    """A SAELens folder normalised with expected_average_only_in needs its scaling factor:
    refused without it, and with a factor of 1 it computes what the exported dictionary
    does, so its row equals the original's."""
    from dictionary_learning.formats import save_saelens

    folder = tmp_path / "saelens"
    save_saelens(env["ae"], folder, model_name=str(env["model"]),
                 hook_name="gpt_neox.layers.1.mlp")
    cfg = json.loads((folder / "cfg.json").read_text())
    cfg["normalize_activations"] = "expected_average_only_in"
    (folder / "cfg.json").write_text(json.dumps(cfg))
    target = ["--model", env["model"], "--submodule", "1.mlp", "--ctx-len", 32, "--data",
              env["data"], *SMALL]
    assert main(["evaluate", str(folder), *map(str, target)]) == 2
    assert "norm_scaling_factor" in capsys.readouterr().err
    [ours] = run_json(capsys, env["nested"], "--data", env["data"], *SMALL)
    [theirs] = run_json(capsys, folder, *target, "--load-option", "norm_scaling_factor=1")
    for key in ("mse", "l0", "frac_variance_explained", "loss_patched"):
        assert theirs[key] == pytest.approx(ours[key], rel=1e-5, abs=1e-7), key
    assert main(["evaluate", str(folder), "--load-option", "oops", *map(str, target)]) == 2
    assert "KEY=VALUE" in capsys.readouterr().err


# -- refusals before any work leave the output folder as it was ----------------------------
def results_folder(tmp_path: Path) -> Path:
    out = tmp_path / "results"
    out.mkdir()
    (out / "results.json").write_text('[{"dictionary": "old"}]\n')
    (out / ".results.json.a1B2c3D4.tmp").write_text("left by a killed run")
    (out / "notes.txt").write_text("keep me")
    return out


REFUSALS = {  # flags -> what the one error line says
    "n-tokens 0": (["--n-tokens", "0"], "--n-tokens must be at least 1, got 0"),
    "batch-size -1": (["--batch-size", "-1"], "--batch-size must be at least 1, got -1"),
    "ctx-len 0": (["--ctx-len", "0"], "--ctx-len must be at least 1"),
    "skip-texts -1": (["--skip-texts", "-1"], "--skip-texts must be at least 0"),
    "activation-dim 0": (["--activation-dim", "0"], "--activation-dim must be at least 1"),
    "dict-size 0": (["--dict-size", "0"], "--dict-size must be at least 1"),
    "n-loss-texts 0": (["--n-loss-texts", "0"], "--n-loss-texts must be at least 1"),
    "seed too large": (["--seed", str(2 ** 64)], "--seed 18446744073709551616 is out of range"),
    "unknown class": (["--dict-class", "Nope"], "unknown dictionary class 'Nope'"),
    "bad load option": (["--load-option", "oops"], "--load-option takes KEY=VALUE"),
    "n-tokens beyond memory": (["--n-tokens", str(10 ** 13)], "more than this machine's"),
    "json is a folder": (["--json", "{out}"], "is a folder: pass a file path"),
    "json under a file": (["--json", "{out}/notes.txt/r.json"], "is a file, not a folder"),
    "missing data": (["--data", "{out}/missing.jsonl"], "no data file or folder at"),
    "unknown device": (["--device", "tpu"], "unknown device 'tpu'"),
    "absent device": (["--device", "cuda:7"], "use --device cpu"),
}


@pytest.mark.parametrize("case", REFUSALS)
def test_refusals_come_before_any_work(env, capsys, tmp_path, case, monkeypatch):
    import dictionary_learning.assess as assess
    import dictionary_learning.cli.evaluate as command

    def opened(*args, **kwargs):
        raise AssertionError("a model or dictionary was opened before the refusal")

    monkeypatch.setattr(command, "load_model", opened)
    monkeypatch.setattr(assess, "load_dictionary", opened)
    out = results_folder(tmp_path)
    before = snapshot(out)
    flags, message = REFUSALS[case]
    flags = [f.format(out=out) for f in flags]
    json_flag = [] if "--json" in flags else ["--json", str(out / "results.json")]
    code = main(["evaluate", str(env["nested"]), "--data", str(env["data"]), *SMALL,
                 *json_flag, *flags])
    err = capsys.readouterr().err
    assert code == 2
    [line] = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert message in line and "Traceback" not in err
    assert snapshot(out) == before


def test_a_failure_during_work_leaves_the_json_as_it_was(env, capsys, tmp_path):
    """The width check fails after the model is open: results.json is not touched."""
    out = results_folder(tmp_path)
    narrow = save_dictionary(tmp_path / "narrow", AutoEncoder(32, 64), None)
    before = snapshot(out)
    code = main(["evaluate", str(env["nested"]), str(narrow), "--model", str(env["model"]),
                 "--submodule", "gpt_neox.layers.1.mlp", "--data", str(env["data"]), *SMALL,
                 "--no-loss", "--json", str(out / "results.json")])
    assert code == 2 and "width mismatch" in capsys.readouterr().err
    assert snapshot(out) == before
