"""The cached demo language model, built at a tiny size: it learns, it is cached atomically
and loaded without retraining, the cache loads as an ordinary model folder, a corrupt cache
is rebuilt (identically, given the seed), and the recorded baselines are right."""

import dataclasses
import json
import logging
import math
import shutil
from collections import Counter

import pytest
import torch

from dictionary_learning import demo_lm
from dictionary_learning.demo_lm import (CorruptCacheError, DemoLMConfig, cache_root,
                                         demo_language_model, demo_lm_path, load_demo_lm,
                                         lr_at, read_record)
from dictionary_learning.tiny import stdlib_texts

TINY = DemoLMConfig(n_layers=1, d_model=32, n_heads=2, d_mlp=64, vocab_size=300, ctx_len=32,
                    batch_size=8, steps=30, warmup_steps=3, lr=3e-3, n_docs=200)
BATCH = ["Return the number of items in a container.", "Open a file", "x"]


class Interrupted(Exception):
    pass


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """``(model, folder)`` of TINY, built once through DL_CACHE_DIR."""
    root = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DL_CACHE_DIR", str(root))
        model = demo_language_model(progress=False, config=TINY)
    folder = demo_lm_path(TINY, root)
    assert sorted(p.name for p in root.iterdir()) == [folder.name]  # no temporary left
    return model, folder


def logits(model, texts=BATCH):
    with model.trace(texts):
        out = model.output.logits.save()
    return out


def test_training_lowers_the_loss_and_is_recorded(built):
    _, folder = built
    record = json.loads((folder / "training.json").read_text())
    curve = record["loss_curve"]
    assert len(curve) == TINY.steps == record["steps"]
    assert curve[0] == pytest.approx(math.log(record["config"]["vocab_size"]), abs=0.3)
    assert sum(curve[-5:]) / 5 < sum(curve[:5]) / 5 - 0.5
    assert record["tokens_seen"] == TINY.steps * TINY.batch_size * TINY.ctx_len
    assert record["config"] == dataclasses.asdict(TINY)
    assert record["heldout_loss"] < math.log(TINY.vocab_size)
    assert record["n_train_docs"] + record["n_heldout_docs"] == TINY.n_docs
    assert record["wall_seconds"] >= record["train_seconds"] > 0


def test_heldout_figures_match_an_independent_computation(built):
    model, folder = built
    record = read_record(folder)
    tok = model.tokenizer
    held = list(stdlib_texts())[: TINY.n_docs][:: TINY.held_out_every]
    ids = [i for doc in held for i in tok(doc, add_special_tokens=False)["input_ids"]
           + [tok.eos_token_id]]
    ids = ids[: len(ids) // TINY.ctx_len * TINY.ctx_len]
    assert record["heldout_tokens"] == len(ids)
    counts = Counter(ids)
    entropy = -sum(c / len(ids) * math.log(c / len(ids)) for c in counts.values())
    assert record["heldout_unigram_entropy"] == pytest.approx(entropy, rel=1e-9)
    windows = torch.tensor(ids).view(-1, TINY.ctx_len)
    with torch.no_grad():  # HF's own shifted cross-entropy, all windows in one batch
        hf_loss = model._module(input_ids=windows, labels=windows).loss.item()
    assert record["heldout_loss"] == pytest.approx(hf_loss, rel=1e-4)


def test_second_call_loads_from_cache_without_training(built, monkeypatch):
    model, folder = built
    before = (folder / "training.json").read_bytes()

    def no_training(*args, **kwargs):
        raise AssertionError("the cached model was rebuilt")

    monkeypatch.setattr(demo_lm, "_train", no_training)
    monkeypatch.setattr(demo_lm, "build_demo_lm", no_training)
    monkeypatch.setenv("DL_CACHE_DIR", str(folder.parent))
    again = demo_language_model(progress=False, config=TINY)
    assert (folder / "training.json").read_bytes() == before
    torch.testing.assert_close(logits(again), logits(model), rtol=0, atol=0)


def test_cache_folder_is_an_ordinary_model_folder(built):
    from dictionary_learning.sources import load_model

    model, folder = built
    loaded = load_model(str(folder))
    assert loaded.tokenizer.padding_side == "left"
    assert loaded.tokenizer.pad_token == loaded.tokenizer.eos_token == loaded.tokenizer.bos_token
    assert model.tokenizer.model_input_names == ["input_ids", "attention_mask"]
    got = logits(loaded)
    assert got.shape[:2] == (len(BATCH), max(len(model.tokenizer(t)["input_ids"]) for t in BATCH))
    torch.testing.assert_close(got, logits(model), rtol=1e-5, atol=1e-5)
    arch = model._module.config
    assert (arch.num_hidden_layers, arch.hidden_size, arch.intermediate_size) == (1, 32, 64)
    assert arch.use_parallel_residual and arch.rope_parameters["partial_rotary_factor"] == 0.25


def test_interrupted_build_leaves_no_cache(tmp_path, monkeypatch):
    def fail_mid_training(step, config):
        if step == 3:
            raise Interrupted
        return config.lr

    monkeypatch.setattr(demo_lm, "lr_at", fail_mid_training)
    with pytest.raises(Interrupted):  # in this process (demo_language_model builds in another)
        demo_lm.build_demo_lm(demo_lm_path(TINY, tmp_path), TINY, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_a_failed_build_in_its_own_process_says_so_and_leaves_no_cache(tmp_path):
    bad = dataclasses.replace(TINY, n_docs=1)  # one docstring: none left to train on
    with pytest.raises(RuntimeError, match="building the demo language model"):
        demo_language_model(cache_dir=tmp_path, progress=False, config=bad)
    assert list(tmp_path.iterdir()) == []


def test_the_build_runs_in_a_fresh_process_and_the_model_is_loaded_back(tmp_path,
                                                                       monkeypatch):
    """Nothing of the build runs here: the model returned is the one read from the cache
    folder (what a later call loads), and the build's tokenizer training never ran in
    this process."""
    def not_here(*args, **kwargs):
        raise AssertionError("the build ran in the calling process")

    monkeypatch.setattr(demo_lm, "build_demo_lm", not_here)
    monkeypatch.setattr(demo_lm, "_build_into", not_here)
    loaded = []
    real_load = demo_lm.load_demo_lm
    monkeypatch.setattr(demo_lm, "load_demo_lm",
                        lambda path, *a, **k: loaded.append(path) or real_load(path, *a, **k))
    model = demo_language_model(cache_dir=tmp_path, progress=False, config=TINY)
    assert loaded == [demo_lm_path(TINY, tmp_path)]
    assert model.tokenizer.padding_side == "left"


def test_corrupt_cache_is_rebuilt_identically(built, tmp_path, caplog):
    _, folder = built
    copy = demo_lm_path(TINY, tmp_path)
    shutil.copytree(folder, copy)
    weights = copy / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # a truncated file
    with pytest.raises(CorruptCacheError, match="model.safetensors"):
        load_demo_lm(copy)
    with caplog.at_level(logging.WARNING, logger="dictionary_learning.demo_lm"):
        demo_language_model(cache_dir=tmp_path, progress=False, config=TINY)
    assert "rebuilding" in caplog.text
    # Same seed, same threads: the rebuilt weights are byte for byte the first build's.
    assert weights.read_bytes() == (folder / "model.safetensors").read_bytes()
    assert read_record(copy)["loss_curve"] == read_record(folder)["loss_curve"]


def test_missing_record_and_other_config_are_corrupt(built, tmp_path):
    _, folder = built
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    with pytest.raises(CorruptCacheError, match="another config"):
        load_demo_lm(copy, expect=dataclasses.replace(TINY, seed=1))
    (copy / "training.json").unlink()
    with pytest.raises(CorruptCacheError, match="training.json"):
        load_demo_lm(copy)


def test_cache_location(monkeypatch, tmp_path):
    monkeypatch.delenv("DL_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "dictionary_learning"
    monkeypatch.setenv("DL_CACHE_DIR", str(tmp_path / "dl"))
    assert cache_root() == tmp_path / "dl"
    assert cache_root(tmp_path / "given") == tmp_path / "given"
    monkeypatch.delenv("DL_CACHE_DIR")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_root() == tmp_path / "home" / ".cache" / "dictionary_learning"
    # The folder name changes with anything that changes the model, and only then.
    assert demo_lm_path(TINY, tmp_path) == demo_lm_path(dataclasses.replace(TINY), tmp_path)
    assert demo_lm_path(TINY, tmp_path) != demo_lm_path(dataclasses.replace(TINY, steps=31),
                                                        tmp_path)
    assert demo_lm_path(TINY, tmp_path).name.startswith(f"demo-lm-{demo_lm.FORMAT_VERSION}-")


def test_learning_rate_schedule():
    cfg = DemoLMConfig(lr=1e-3, warmup_steps=10, steps=110, min_lr_frac=0.1)
    assert lr_at(0, cfg) == pytest.approx(1e-4)
    assert lr_at(9, cfg) == pytest.approx(1e-3)
    assert lr_at(10, cfg) == pytest.approx(1e-3)
    assert lr_at(60, cfg) == pytest.approx(1e-4 + 0.9e-3 * 0.5)  # half way: cos = 0
    assert lr_at(110, cfg) == pytest.approx(1e-4)


@pytest.mark.parametrize("bad", [dict(d_model=30, n_heads=4), dict(vocab_size=257),
                                 dict(steps=0), dict(lr=0.0), dict(held_out_every=1)])
def test_bad_configs_are_refused(bad):
    with pytest.raises(ValueError):
        DemoLMConfig(**bad)
