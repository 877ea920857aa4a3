"""``evaluate``, ``histograms`` and ``analyze`` reading an activation cache instead of running
the model: the metrics equal the in-memory buffer's on the same text (same rows as a
multiset), the top and random contexts equal the live path's on the same texts (contexts
rebuilt from the cache's positions, across shard boundaries), no model is opened for
activation-only metrics, and a cache of another submodule, io or width is one error naming
what differs."""

import json
from itertools import islice

import pytest
import torch

from cli_helpers import D_MODEL, nested_config, save_dictionary, shared_model_folder
from dictionary_learning import ActivationBuffer, AutoEncoder, loss_recovered
from dictionary_learning.analysis_run import analyze
from dictionary_learning.assess import assess, from_cache, read_target
from dictionary_learning.cache import CacheError, write_cache
from dictionary_learning.cache.contexts import (CacheRows, contexts, fitting_keys, open_cache,
                                                resolve_name)
from dictionary_learning.cli import main
from dictionary_learning.evaluation import reconstruction_metrics
from dictionary_learning.sources import load_model
from dictionary_learning.tiny import stdlib_texts
from dictionary_learning.tokens import TokenPacker

SUBMODULE = "gpt_neox.layers.1.mlp"
CTX_LEN, BATCH = 32, 8        # the cache is written BATCH texts per forward, as analyze reads
SHARD_ROWS = 300              # not a multiple of anything: contexts span shard boundaries
METRICS = ("mse", "l1", "l0", "frac_variance_explained", "cossim", "l2_ratio", "frac_alive")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """The shared tiny model (folder and loaded), 48 held-out documents (also as .jsonl),
    their cache (layer-1 MLP output, several shards), and a dictionary folder reading it."""
    root = tmp_path_factory.mktemp("cache_analysis")
    folder = shared_model_folder(tmp_path_factory)
    model = load_model(str(folder))
    texts = list(islice(stdlib_texts(), 300, 348))
    (root / "data.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    manifest = write_cache(root / "cache", model, texts, SUBMODULE, tokens=None,
                           ctx_len=CTX_LEN, refresh_batch_size=BATCH, shard_rows=SHARD_ROWS,
                           info={"model": str(folder), "data": str(root / "data.jsonl")},
                           progress=False)
    assert len(manifest["shards"]) >= 3 and manifest["text_exhausted"]
    torch.manual_seed(0)
    ae = AutoEncoder(D_MODEL, 128)
    with torch.no_grad():  # sparse-ish features: this random model's MLP outputs are ~0.1
        ae.encoder.weight.mul_(10)
        ae.encoder.bias.fill_(-0.3)
    dict_dir = save_dictionary(root / "dict", ae, nested_config(folder, SUBMODULE, 128,
                                                                ctx_len=CTX_LEN))
    return {"root": root, "folder": folder, "model": model, "texts": texts, "ae": ae,
            "cache": root / "cache", "dict": dict_dir, "n_rows": manifest["tokens"],
            "data": root / "data.jsonl"}


@pytest.fixture(scope="module")
def buffer_rows(env):
    """Every real token's activation of the texts, by the in-memory path: one buffer over
    the same texts, all rows served in one shuffled batch."""
    torch.manual_seed(0)
    buffer = ActivationBuffer(iter(env["texts"]), env["model"], SUBMODULE, ctx_len=CTX_LEN,
                              n_ctxs=len(env["texts"]), refresh_batch_size=BATCH,
                              out_batch_size=10 ** 6, progress=False)
    [rows] = list(buffer)
    assert rows.shape == (env["n_rows"], D_MODEL)
    return rows


def no_model(name):
    raise AssertionError(f"the model {name} was opened for activation-only metrics")


def assert_same_metrics(got: dict, want: dict) -> None:
    for key in METRICS:
        assert got[key] == pytest.approx(want[key], rel=1e-6, abs=1e-9), key
    assert got["n_tokens"] == want["n_tokens"]
    torch.testing.assert_close(got["feature_frequencies"], want["feature_frequencies"],
                               rtol=0, atol=0)


# -- evaluate ---------------------------------------------------------------------------------
def test_metrics_from_the_cache_equal_the_buffer_on_the_same_text(env, buffer_rows):
    """All rows of the cache (streamed, in order) vs the buffer's rows (shuffled, in memory):
    the same multiset, so the float64-accumulated metrics agree; assess never opens the
    model with loss=False."""
    ae, cache = env["ae"], open_cache(env["cache"])
    want = reconstruction_metrics(ae, buffer_rows)
    keys = fitting_keys(cache, SUBMODULE, "out", ae)
    rows = CacheRows(cache, keys, batch_rows=100)
    assert_same_metrics(reconstruction_metrics(ae, rows), want)
    assert_same_metrics(reconstruction_metrics(ae, rows), want)      # iterable again
    [(path, target, metrics, info)] = assess(
        [env["dict"]], no_model, lambda: iter([]), cache=env["cache"], loss=False,
        n_tokens=10 ** 6)
    assert (target.submodule, target.io, info["dict_size"]) == (SUBMODULE, "out", 128)
    assert_same_metrics(metrics, want)


def test_n_tokens_takes_the_first_rows_in_text_order(env):
    """--n-tokens N reads the cache's first N rows: the buffer's collection (each forward's
    rows in text order, unstored) cut at N, across shard boundaries."""
    ae, n = env["ae"], SHARD_ROWS + 77
    buffer = ActivationBuffer(iter(env["texts"]), env["model"], SUBMODULE, ctx_len=CTX_LEN,
                              refresh_batch_size=BATCH, progress=False)
    collected = torch.cat([c.rows[0] for c in buffer.collected()])[:n]
    target = read_target(env["dict"])
    held = from_cache(env["cache"], target, [f"{SUBMODULE}.output"], n_tokens=n)
    assert len(held.batches) == n and held.loss_texts == [] and held.widths == (64, 64)
    assert_same_metrics(reconstruction_metrics(ae, held.batches),
                        reconstruction_metrics(ae, collected))


def test_an_in_to_out_cache_serves_pairs_and_either_side(env, tmp_path):
    """A stretcher reads (input, output) pairs; a dictionary of the input alone reads the
    input side of the same cache: both equal the buffer's rows of that io."""
    from dictionary_learning import MLPStretcher

    texts = env["texts"][:16]
    write_cache(tmp_path / "pairs", env["model"], texts, SUBMODULE, tokens=None, io="in_to_out",
                ctx_len=CTX_LEN, refresh_batch_size=BATCH, shard_rows=SHARD_ROWS,
                progress=False)
    cache = open_cache(tmp_path / "pairs")
    torch.manual_seed(0)
    for dictionary, io in ((MLPStretcher(D_MODEL, 96), "in_to_out"), (env["ae"], "in")):
        buffer = ActivationBuffer(iter(texts), env["model"], SUBMODULE, io=io, ctx_len=CTX_LEN,
                                  n_ctxs=len(texts), refresh_batch_size=BATCH,
                                  out_batch_size=10 ** 6, progress=False)
        [rows] = list(buffer)
        keys = fitting_keys(cache, SUBMODULE, io, dictionary)
        assert len(keys) == (2 if io == "in_to_out" else 1)
        assert_same_metrics(reconstruction_metrics(dictionary, CacheRows(cache, keys)),
                            reconstruction_metrics(dictionary, [rows]))


def test_cli_activations_only_opens_no_model(env, buffer_rows, capsys, monkeypatch, tmp_path):
    import dictionary_learning.cli.evaluate as command

    monkeypatch.setattr(command, "load_model", no_model)
    code = main(["evaluate", str(env["dict"]), "--cache", str(env["cache"]), "--no-loss",
                 "--n-tokens", str(10 ** 6), "--json", "-"])
    out, err = capsys.readouterr()
    assert code == 0, err
    [r] = json.loads(out)
    want = reconstruction_metrics(env["ae"], buffer_rows)
    for key in METRICS:
        assert r[key] == pytest.approx(want[key], rel=1e-6, abs=1e-9), key
    assert r["n_tokens"] == env["n_rows"] and r["cache"] == str(env["cache"])
    assert r["data"] is None and "frac_recovered" not in r
    assert "loss recovered skipped (--no-loss): no model was opened" in err
    # histograms reads the same rows: one PNG, still no model
    code = main(["histograms", str(env["dict"]), "--cache", str(env["cache"]), "--out",
                 str(tmp_path / "h")])
    assert code == 0 and (tmp_path / "h" / "dict.png").stat().st_size > 0


def test_cli_loss_runs_the_model_on_the_cache_text(env, capsys):
    """Without --no-loss the model opens for the loss metrics only, on the first
    --n-loss-texts documents of the cache's own text (its --data default); it also
    resolves a short --submodule the cache does not record."""
    code = main(["evaluate", str(env["dict"]), "--cache", str(env["cache"]), "--n-tokens",
                 "500", "--n-loss-texts", "6", "--batch-size", "4", "--submodule", "1.mlp",
                 "--json", "-"])
    out, err = capsys.readouterr()
    assert code == 0, err
    [r] = json.loads(out)
    assert (r["data"], r["n_tokens"], r["submodule"]) == (str(env["data"]), 500, SUBMODULE)
    want = loss_recovered(env["texts"][:6], env["model"], SUBMODULE, env["ae"],
                          ctx_len=CTX_LEN, batch_size=4)
    for key in ("loss_clean", "loss_patched", "loss_zero"):
        assert r[key] == pytest.approx(want[key], rel=1e-6), key
    assert r["n_loss_tokens"] == want["n_tokens"]


# -- analyze ----------------------------------------------------------------------------------
def test_contexts_are_rebuilt_across_shards(env, tmp_path):
    """Unpacked: each context is one document's tokens (truncated); packed: the packer's
    windows. Both caches cut shards inside contexts."""
    cache = open_cache(env["cache"])
    tok = env["model"].tokenizer
    want = [tok(t, truncation=True, max_length=CTX_LEN)["input_ids"] for t in env["texts"]]
    got = [torch.cat([t["token_ids"][a:b] for t, a, b in c]).tolist()
           for c in contexts(cache, [])]
    assert got == want and any(len(c) > 1 for c in contexts(cache, []))
    packed = write_cache(tmp_path / "packed", env["model"], env["texts"][:8], SUBMODULE,
                         tokens=None, ctx_len=16, refresh_batch_size=16, pack=True,
                         shard_rows=250, progress=False)
    assert len(packed["shards"]) > 2
    packer = TokenPacker(tok, 16)
    packer.add(env["texts"][:8])
    windows = [packer.carry[i:i + 16] for i in range(0, len(packer.carry), 16)]
    got = [torch.cat([t["token_ids"][a:b] for t, a, b in c]).tolist()
           for c in contexts(tmp_path / "packed", [])]
    assert got == windows and packed["tokens"] == len(packer.carry)


def assert_same_analysis(got, want):
    assert (got.n_tokens, got.n_contexts) == (want.n_tokens, want.n_contexts)
    for name in ("top", "random"):
        a, b = getattr(got, name), getattr(want, name)
        assert torch.equal(a.tokens, b.tokens), name
        torch.testing.assert_close(a.acts, b.acts, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(a.scores, b.scores, rtol=1e-6, atol=1e-7)
    for stat in ("count", "counts", "exponent"):
        assert torch.equal(getattr(got.stats, stat), getattr(want.stats, stat)), stat
    torch.testing.assert_close(got.stats.max, want.stats.max, rtol=1e-6, atol=1e-7)
    assert list(got.ablation) == list(want.ablation) and got.ablation
    for i, (effect, n) in want.ablation.items():
        assert got.ablation[i][1] == n
        torch.testing.assert_close(got.ablation[i][0], effect, rtol=1e-5, atol=1e-6)


def test_analysis_from_the_cache_equals_the_live_path(env):
    """The same texts, BATCH documents a forward pass both ways: the rebuilt batches are
    the live ones, so statistics, top and random contexts and ablations agree."""
    options = dict(batch_size=BATCH, n_tokens=None, k_top=4, k_random=2, before=6, after=3,
                   n_ablation=2, progress=False, seed=3)
    live = analyze(env["model"], SUBMODULE, env["ae"], env["texts"], ctx_len=CTX_LEN, **options)
    cached = analyze(env["model"], SUBMODULE, env["ae"], cache=env["cache"], **options)
    assert live.n_tokens == env["n_rows"] and int((live.stats.count > 0).sum()) > 20
    assert_same_analysis(cached, live)
    assert cached.info["cache"] == str(env["cache"]) and cached.info["ctx_len"] == CTX_LEN
    # --n-tokens stops after the batch that reaches it, as on text
    live = analyze(env["model"], SUBMODULE, env["ae"], env["texts"], ctx_len=CTX_LEN,
                   **{**options, "n_tokens": 400})
    cached = analyze(env["model"], SUBMODULE, env["ae"], cache=env["cache"],
                     **{**options, "n_tokens": 400})
    assert 400 <= live.n_tokens < env["n_rows"]
    assert_same_analysis(cached, live)


def test_cli_analyze_from_the_cache(env, capsys, tmp_path):
    """A run folder from the cache (a short --submodule the cache does not record is
    resolved by the model); contradicting the cache's text or contexts is refused."""
    out = tmp_path / "run"
    code = main(["analyze", str(env["dict"]), "--cache", str(env["cache"]), "--out", str(out),
                 "--batch-size", str(BATCH), "--k", "3", "--k-random", "2",
                 "--ablation-features", "1", "--submodule", "1.mlp"])
    assert code == 0, capsys.readouterr().err
    meta = json.loads((out / "metadata.json").read_text())
    contexts_json = json.loads((out / "contexts.json").read_text())
    assert (meta["cache"], meta["n_tokens"], meta["ctx_len"], meta["submodule"]) == (
        str(env["cache"]), env["n_rows"], CTX_LEN, SUBMODULE)
    corpus = "\n".join(env["texts"])
    for examples in contexts_json["top"].values():
        for e in examples:
            assert "".join(contexts_json["vocab"][t] for t in e["tokens"]) in corpus
    code = main(["analyze", str(env["dict"]), "--cache", str(env["cache"]), "--out",
                 str(tmp_path / "r2"), "--ctx-len", "64", "--data", "stdlib"])
    err = capsys.readouterr().err
    assert code == 2 and not (tmp_path / "r2").exists()
    assert "--data stdlib (the cache has" in err and "--ctx-len 64 (the cache has 32)" in err


# -- a cache that does not fit ----------------------------------------------------------------
MISMATCHES = {  # dictionary (class, width, submodule, io) -> what the one error says
    "submodule": ((64, "gpt_neox.layers.0.mlp", "out"),
                  ["submodule: the cache holds gpt_neox.layers.1.mlp, the dictionary reads "
                   "gpt_neox.layers.0.mlp"]),
    "width": ((32, SUBMODULE, "out"),
              ["width: the cache's rows are 64 wide, the dictionary takes 32"]),
    "io": ((64, SUBMODULE, "in"), ["io: the cache holds out, the dictionary reads in"]),
    "submodule and width": ((32, "gpt_neox.layers.0.mlp", "out"),
                            ["submodule: the cache holds", "width: the cache's rows are 64"]),
}


@pytest.fixture(scope="module")
def misfits(env):
    """A dictionary folder per MISMATCHES case."""
    folders = {}
    for case, ((width, submodule, io), _) in MISMATCHES.items():
        config = nested_config(env["folder"], submodule, 128)
        config["trainer"]["activation_dim"] = width
        config["buffer"].update(io=io, d_submodule=width)
        folders[case] = save_dictionary(env["root"] / "misfit" / case.replace(" ", "_"),
                                        AutoEncoder(width, 128), config)
    return folders


@pytest.mark.parametrize("command", ["evaluate", "analyze"])
@pytest.mark.parametrize("case", MISMATCHES)
def test_a_cache_that_does_not_fit_is_one_error(env, misfits, capsys, monkeypatch, tmp_path,
                                                case, command):
    import dictionary_learning.cli.evaluate as evaluate_command
    import dictionary_learning.train_run as train_run

    monkeypatch.setattr(evaluate_command, "load_model", no_model)  # refused before any model
    monkeypatch.setattr(train_run, "open_model", no_model)
    args = {"evaluate": ["--no-loss"], "analyze": ["--out", str(tmp_path / "run")]}[command]
    code = main([command, str(misfits[case]), "--cache", str(env["cache"]), *args])
    err = capsys.readouterr().err
    [line] = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert code == 2 and "Traceback" not in err and not (tmp_path / "run").exists()
    assert f"the cache {env['cache']} does not match {misfits[case]}" in line
    for part in MISMATCHES[case][1]:
        assert part in line
    assert line.count("; ") == len(MISMATCHES[case][1]) - 1  # every difference, once


def test_fitting_keys_resolves_names_the_cache_records(env):
    cache = open_cache(env["cache"])
    assert resolve_name(SUBMODULE, cache.manifest) == SUBMODULE
    assert resolve_name("1.mlp", cache.manifest, env["model"]) == SUBMODULE
    with pytest.raises(CacheError, match="'1.mlp' is a short name this cache does not "
                                         "record: give the dotted path"):
        fitting_keys(cache, resolve_name("1.mlp", cache.manifest), "out")
    with pytest.raises(CacheError, match="io: the cache holds out, the dictionary reads "
                                         "in_to_out"):
        fitting_keys(cache, SUBMODULE, "in_to_out")
    with pytest.raises(TypeError, match="either texts or cache"):
        analyze(env["model"], SUBMODULE, env["ae"], env["texts"], cache=env["cache"])
    assert len(CacheRows(cache, [f"{SUBMODULE}.output"], n_rows=10 ** 9)) == env["n_rows"]
