"""The ``analyze`` command end to end on a local tiny model folder and a local .txt file."""

import json
import subprocess
import sys
from itertools import islice
from pathlib import Path

import pytest
import torch

from dictionary_learning.architectures import AutoEncoder
from dictionary_learning.cli import main
from dictionary_learning.saving import save_json, save_state_dict
from dictionary_learning.tiny import stdlib_texts, tiny_causal_lm, train_tokenizer

from cli_helpers import snapshot

ROOT = Path(__file__).resolve().parents[1]
SUBMODULE = "gpt_neox.layers.1.mlp"
HTML = "<script>alert('x')</script>"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(model folder, dictionary folder, data file): all local, built in a second or two."""
    root = tmp_path_factory.mktemp("analyze")
    texts = list(islice(stdlib_texts(), 300))
    tokenizer = train_tokenizer(texts, vocab_size=400)
    model = tiny_causal_lm("pythia", vocab_size=len(tokenizer))
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    torch.manual_seed(0)
    ae = AutoEncoder(64, 128)
    with torch.no_grad():
        ae.encoder.weight.mul_(10)      # this random model's MLP outputs are ~0.1 in size
        ae.encoder.bias.fill_(-0.3)
    save_state_dict(ae.state_dict(), root / "dict" / "ae.pt")
    save_json({"trainer": {"dict_class": "AutoEncoder", "lm_name": str(root / "model"),
                           "submodule_name": SUBMODULE},
               "buffer": {"io": "out", "ctx_len": 32}}, root / "dict" / "config.json")
    lines = [" ".join(t.split()) for t in texts[100:160]]
    lines[3] = f"Render {HTML} as text, never as a tag."
    (root / "data.txt").write_text("\n".join(lines) + "\n")
    return root / "model", root / "dict", root / "data.txt", lines


def test_analyze_writes_the_run_folder(setup, tmp_path, capsys):
    model_dir, dict_dir, data, lines = setup
    out = tmp_path / "run"
    code = main(["analyze", str(dict_dir), "--data", str(data), "--n-tokens", "1500",
                 "--out", str(out), "--batch-size", "8", "--k", "4", "--k-random", "2",
                 "--ablation-features", "3"])
    printed = capsys.readouterr().out
    assert code == 0
    files = ["metadata.json", "features.json", "histograms.json", "contexts.json", "logits.json"]
    for name in files:
        assert str(out / name) in printed
    meta, features, hist, contexts, logits = (json.loads((out / n).read_text()) for n in files)
    assert meta["format"] == "dictionary_learning.analysis/1"
    assert {"dictionary", "dict_class", "activation_dim", "dict_size", "model", "submodule",
            "io", "ctx_len", "n_tokens", "n_contexts", "k_top", "k_random", "rankings",
            "logit_lens", "ablation_features", "created", "versions"} <= meta.keys()
    assert (meta["model"], meta["submodule"], meta["io"], meta["ctx_len"]) == (
        str(model_dir), SUBMODULE, "out", 32)
    assert meta["dict_size"] == 128 and meta["k_top"] == 4 and meta["k_random"] == 2
    assert meta["n_tokens"] >= 1500 and meta["rankings"] == ["density", "max_activation",
                                                             "mean_activation"]
    assert meta["logit_lens"]["final_norm_applied"] is True
    assert set(meta["rankings"]) <= features.keys()
    assert all(len(v) == 128 for v in features.values())
    assert hist["n_bins"] == 20 and len(hist["upper"]) == len(hist["counts"]) == 128
    n_fired = [round(d * meta["n_tokens"]) for d in features["density"]]
    assert [sum(c) for c in hist["counts"]] == n_fired     # every firing token is binned once
    # Contexts: fired features only, tokens decode to raw text found in the data.
    alive = {str(i) for i, n in enumerate(n_fired) if n > 0}
    assert set(contexts["top"]) == alive and set(contexts["random"]) <= alive
    corpus = "\n".join(lines)
    saw_html = False
    for fid, examples in contexts["top"].items():
        assert 1 <= len(examples) <= 4
        assert [e["max"] for e in examples] == sorted((e["max"] for e in examples), reverse=True)
        assert examples[0]["max"] == pytest.approx(features["max_activation"][int(fid)],
                                                   rel=1e-3)
        for e in examples:
            assert len(e["tokens"]) == len(e["acts"]) and e["acts"][e["pos"]] == e["max"]
            text = "".join(contexts["vocab"][t] for t in e["tokens"])
            assert text in corpus
            saw_html |= "<script>" in text
    assert saw_html, "a context holding the HTML line should keep it as raw text"
    # Logit effects: a lens entry for every feature, ablation for the chosen ones.
    assert set(logits) == {str(i) for i in range(128)}
    assert all(len(v["promoted"]) == len(v["suppressed"]) == 10 for v in logits.values())
    assert len(meta["ablation_features"]) == 3
    density = features["density"]
    chosen = meta["ablation_features"]        # the 3 densest (the first ranking metric)
    assert min(density[i] for i in chosen) >= max(density[i] for i in range(128)
                                                  if i not in chosen)
    for i in meta["ablation_features"]:
        ablation = logits[str(i)]["ablation"]
        assert ablation["n_contexts"] == len(contexts["top"][str(i)])
        assert len(ablation["promoted"]) == 10
    assert sum("ablation" in v for v in logits.values()) == 3


def test_bad_dictionary_folder_and_unknown_submodule_are_user_errors(setup, tmp_path, capsys):
    model_dir, dict_dir, data, _ = setup
    code = main(["analyze", str(tmp_path / "nowhere"), "--data", str(data), "--out",
                 str(tmp_path / "r")])
    assert code == 2 and "error: no dictionary at" in capsys.readouterr().err
    code = main(["analyze", str(dict_dir), "--data", str(data), "--out", str(tmp_path / "r"),
                 "--submodule", "gpt_neox.layers.7.mlp"])
    err = capsys.readouterr().err.splitlines()[-1]     # after the model-loading bar
    assert code == 2 and err.startswith("error:") and "gpt_neox.layers.7.mlp" in err
    code = main(["analyze", str(dict_dir), "--data", str(data), "--out", str(tmp_path / "r"),
                 "--rankings", "density,charisma"])
    assert code == 2 and "charisma" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_script_shim_exits_non_zero_on_a_bad_folder(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "analyze.py"), str(empty),
                           "--out", str(tmp_path / "r")], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error:") and "ae.pt" in proc.stderr


# -- a refusal leaves the output folder as it was ------------------------------------------
def old_run(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    for name in ("metadata.json", "features.json", "histograms.json", "contexts.json",
                 "logits.json"):
        (out / name).write_text('{"from": "an earlier run"}')
    (out / ".contexts.json.a1B2c3D4.tmp").write_text("left by a killed run")
    return out


def sized_dictionary(dict_dir, folder, **trainer):
    """A copy of the test dictionary whose config.json also records ``trainer`` keys."""
    folder.mkdir()
    (folder / "ae.pt").write_bytes((dict_dir / "ae.pt").read_bytes())
    config = json.loads((dict_dir / "config.json").read_text())
    config["trainer"].update(trainer)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


REFUSALS = {  # flags (or a function of (setup, tmp_path) giving the dictionary) -> message
    "k 0": (["--k", "0"], "--k must be at least 1, got 0"),
    "k-random 0": (["--k-random", "0"], "--k-random must be at least 1"),
    "n-tokens 0": (["--n-tokens", "0"], "--n-tokens must be at least 1"),
    "batch-size -2": (["--batch-size", "-2"], "--batch-size must be at least 1"),
    "ctx-len 0": (["--ctx-len", "0"], "--ctx-len must be at least 1"),
    "window-before -1": (["--window-before", "-1"], "--window-before must be at least 0"),
    "window-after -1": (["--window-after", "-1"], "--window-after must be at least 0"),
    "ablation-features -1": (["--ablation-features", "-1"],
                             "--ablation-features must be at least 0"),
    "seed too large": (["--seed", str(2 ** 64)], "--seed 18446744073709551616 is out of range"),
    "unknown ranking": (["--rankings", "density,charisma"], "charisma"),
    "missing data": (["--data", "/nonexistent/data.txt"], "no data file or folder at"),
    "unknown device": (["--device", "tpu"], "unknown device 'tpu'"),
    "absent device": (["--device", "cuda:7"], "use --device cpu"),
    "k beyond memory (config's size)": (
        lambda d, t: [sized_dictionary(d, t / "sized", dict_size=128), "--k", str(10 ** 9)],
        "more than this machine's"),
    "no model named": (lambda d, t: [sized_dictionary(d, t / "anon", lm_name=None)],
                       "does not name its model: pass --model"),
    "a folder of dictionaries": (lambda d, t: [d.parent], "has no weights of its own"),
}


@pytest.mark.parametrize("case", REFUSALS)
def test_refusals_come_before_any_work(setup, tmp_path, capsys, case, monkeypatch):
    import dictionary_learning.loading as loading
    import dictionary_learning.train_run as train_run

    def opened(*args, **kwargs):
        raise AssertionError("a model or dictionary was opened before the refusal")

    monkeypatch.setattr(loading, "load_dictionary", opened)
    monkeypatch.setattr(train_run, "open_model", opened)
    model_dir, dict_dir, data, _ = setup
    out = old_run(tmp_path)
    before = snapshot(out)
    flags, message = REFUSALS[case]
    flags = flags if isinstance(flags, list) else flags(dict_dir, tmp_path)
    if not isinstance(flags[0], str) or not flags[0].startswith("--"):
        target, flags = flags[0], flags[1:]
    else:
        target = dict_dir
    code = main(["analyze", str(target), "--data", str(data), "--out", str(out),
                 *map(str, flags)])
    err = capsys.readouterr().err
    assert code == 2
    [line] = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert message in line and "Traceback" not in err
    assert snapshot(out) == before


def test_later_refusals_leave_the_folder_as_it_was(setup, tmp_path, capsys, monkeypatch):
    """After the dictionary is read (its config does not record its size) and after the
    model is open (an unknown submodule), nothing in the run folder changes either."""
    import dictionary_learning.train_run as train_run

    model_dir, dict_dir, data, _ = setup
    out = old_run(tmp_path)
    before = snapshot(out)
    real_open = train_run.open_model

    def no_model(*args, **kwargs):
        raise AssertionError("the model was opened before the memory check")

    monkeypatch.setattr(train_run, "open_model", no_model)
    common = ["analyze", str(dict_dir), "--data", str(data), "--out", str(out)]
    assert main([*common, "--k", str(10 ** 9)]) == 2
    assert "more than this machine's" in capsys.readouterr().err
    monkeypatch.setattr(train_run, "open_model", real_open)
    assert main([*common, "--submodule", "gpt_neox.layers.7.mlp"]) == 2
    assert "gpt_neox.layers.7.mlp" in capsys.readouterr().err.splitlines()[-1]
    assert snapshot(out) == before


def test_out_is_a_file(setup, tmp_path, capsys):
    _, dict_dir, data, _ = setup
    out = tmp_path / "run"
    out.write_text("not a folder")
    assert main(["analyze", str(dict_dir), "--data", str(data), "--out", str(out)]) == 2
    assert capsys.readouterr().err.startswith(f"error: {out} is a file, not a folder")
    assert out.read_text() == "not a folder"
