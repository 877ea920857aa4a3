"""The activation cache against independent references: its rows are the buffer's rows (as
multisets, bit for bit) and its tokens the tokenizer's; its statistics are the float64
statistics of those rows; a write stopped at any point and resumed gives the bytes of one
left alone; the reader serves every row once per epoch, resumes exactly, and training from
it equals training on the same batches held in memory; damage is one error naming the shard.
"""

import itertools
import json
import zlib

import pytest
import torch

from dictionary_learning import TrainerConfig, train_dictionaries
from dictionary_learning.buffer import ActivationBuffer
from dictionary_learning.cache import Cache, CacheError, CachedActivations, write_cache
from dictionary_learning.cache import writer as writer_module
from dictionary_learning.tokens import tokenize_batch

L0, L1 = "gpt_neox.layers.0.mlp", "gpt_neox.layers.1.mlp"
CTX = 32


def cache(model, texts, folder, submodule=L1, **kwargs):
    kwargs = {"tokens": None, "io": "out", "ctx_len": CTX, "refresh_batch_size": 8,
              "shard_rows": 500, "progress": False, **kwargs}
    return write_cache(folder, model, texts, submodule, **kwargs)


def all_rows(folder) -> dict[str, torch.Tensor]:
    c = Cache(folder)
    shards = [c.shard(i) for i in range(len(c.shards))]
    return {k: torch.cat([s[k] for s in shards]) for k in shards[0]}


def buffer_rows(model, texts, submodule, io, pack):
    """Every row an ActivationBuffer collects from ``texts`` (one fill, one batch)."""
    buffer = ActivationBuffer(texts, model, submodule, io=io, n_ctxs=2000,
                              ctx_len=CTX, refresh_batch_size=8, out_batch_size=10**7,
                              pack=pack, progress=False, seed=0)
    batch = next(buffer)
    return batch if isinstance(batch, dict) else {submodule: batch}


def sorted_rows(x: torch.Tensor) -> torch.Tensor:
    """The rows in lexicographic order: two multisets of rows are equal when these are."""
    order = torch.arange(len(x))
    for col in reversed(range(x.shape[1])):
        order = order[torch.argsort(x[order, col].float(), stable=True)]
    return x[order]


@pytest.mark.parametrize("io, pack, several", [
    ("out", False, False), ("in", False, False), ("in_to_out", False, False),
    ("out", True, False), ("in_to_out", True, True), ("out", False, True)])
def test_cache_rows_are_the_buffers_rows(models, texts, tmp_path, io, pack, several):
    model, docs = models["pythia"], texts[:40]
    submodule = [L0, L1] if several else L1
    cache(model, docs, tmp_path, submodule, io=io, pack=pack)
    stored = all_rows(tmp_path)
    served = buffer_rows(model, docs, submodule, io, pack)
    for name, batch in served.items():
        parts = batch if isinstance(batch, tuple) else (batch,)
        kinds = {"out": ["output"], "in": ["input"], "in_to_out": ["input", "output"]}[io]
        for kind, rows in zip(kinds, parts):
            ours = stored[f"{name}.{kind}"]
            assert ours.shape == rows.shape and len(ours) > 1000
            assert torch.equal(sorted_rows(ours), sorted_rows(rows)), (name, kind)
    # Row by row, the token ids are the tokenizer's real tokens in text order.
    tokenizer = model.tokenizer
    if pack:
        ids = []
        for t in docs:
            ids += tokenizer(t, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        assert stored["token_ids"].tolist() == ids[:len(stored["token_ids"])]
        assert stored["positions"].tolist()[:2 * CTX] == list(range(CTX)) * 2
    else:
        expected_ids, expected_pos = [], []
        for i in range(0, len(docs), 8):
            batch = tokenize_batch(tokenizer, docs[i:i + 8], CTX)
            keep = batch["attention_mask"].bool()
            expected_ids += batch["input_ids"][keep].tolist()
            expected_pos += batch["position_ids"][keep].tolist()
        assert stored["token_ids"].tolist() == expected_ids
        assert stored["positions"].tolist() == expected_pos


def test_manifest_statistics_are_the_rows_statistics(models, texts, tmp_path):
    manifest = cache(models["pythia"], texts[:30], tmp_path, io="in_to_out", shard_rows=300)
    rows = all_rows(tmp_path)
    assert manifest["complete"] and manifest["tokens"] == len(rows["token_ids"])
    assert [s["rows"] for s in manifest["shards"][:-1]] == [300] * (len(manifest["shards"]) - 1)
    for key in (f"{L1}.input", f"{L1}.output"):
        x = rows[key].double()
        stats = json.loads((tmp_path / "manifest.json").read_text())["stats"][key]
        assert stats["count"] == len(x)
        torch.testing.assert_close(torch.tensor(stats["mean"], dtype=torch.float64), x.mean(0))
        torch.testing.assert_close(torch.tensor(stats["var"], dtype=torch.float64),
                                   x.var(0, unbiased=False))
        assert stats["mean_norm"] == pytest.approx(float(x.norm(dim=-1).mean()), rel=1e-12)


def test_bfloat16_storage_halves_the_bytes(models, texts, tmp_path):
    a = cache(models["pythia"], texts[:20], tmp_path / "f32")
    b = cache(models["pythia"], texts[:20], tmp_path / "bf16", dtype=torch.bfloat16)
    assert b["tokens"] == a["tokens"]
    assert b["bytes_per_token"] - 8 == (a["bytes_per_token"] - 8) // 2  # 8: token id, position
    rows = all_rows(tmp_path / "bf16")[f"{L1}.output"]
    assert rows.dtype == torch.bfloat16
    assert torch.equal(rows, all_rows(tmp_path / "f32")[f"{L1}.output"].to(torch.bfloat16))


def _files(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("pack, stop_at", [(False, 2), (True, 3), (True, 1)])
def test_stopped_write_resumes_to_the_same_bytes(models, texts, tmp_path, monkeypatch, pack,
                                                 stop_at):
    """A write killed after shard ``stop_at``'s file but before its manifest (the worst
    moment), resumed, leaves exactly the files an uninterrupted write leaves."""
    model, docs = models["pythia"], texts[:200]
    kwargs = dict(pack=pack, shard_rows=700, tokens=5000)
    cache(model, docs, tmp_path / "whole", **kwargs)
    real = writer_module.write_manifest
    calls = {"n": 0}

    def dying(folder, manifest, name):
        if manifest["shards"] and len(manifest["shards"]) == stop_at + 1 and calls["n"] == 0:
            calls["n"] = 1
            raise KeyboardInterrupt("killed")
        real(folder, manifest, name)

    monkeypatch.setattr(writer_module, "write_manifest", dying)
    with pytest.raises(KeyboardInterrupt):
        cache(model, docs, tmp_path / "part", **kwargs)
    monkeypatch.setattr(writer_module, "write_manifest", real)
    listed = json.loads((tmp_path / "part" / "manifest.json").read_text())
    assert len(listed["shards"]) == stop_at and not listed["complete"]
    cache(model, docs, tmp_path / "part", resume=True, **kwargs)
    assert _files(tmp_path / "part") == _files(tmp_path / "whole")


def test_a_larger_tokens_extends_a_finished_cache(models, texts, tmp_path):
    model, docs = models["pythia"], texts[:200]
    whole = cache(model, docs, tmp_path / "whole", tokens=4000, shard_rows=1000)
    cache(model, docs, tmp_path / "grown", tokens=2500, shard_rows=1000)
    grown = cache(model, docs, tmp_path / "grown", tokens=4000, shard_rows=1000, resume=True)
    assert grown["tokens"] == whole["tokens"] == 4000
    a, b = all_rows(tmp_path / "whole"), all_rows(tmp_path / "grown")
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_refusals(models, texts, tmp_path):
    model, docs = models["pythia"], texts[:40]
    cache(model, docs, tmp_path, tokens=600)
    with pytest.raises(CacheError, match="already holds a cache: continue it with --resume"):
        cache(model, docs, tmp_path, tokens=600)
    with pytest.raises(CacheError, match=r"other settings \(hooks, io differ\)"):
        cache(model, docs, tmp_path, tokens=900, io="in", resume=True)
    with pytest.raises(CacheError, match="nothing to resume"):
        cache(model, docs, tmp_path / "new", resume=True)
    with pytest.raises(CacheError, match="it is not an activation cache"):
        Cache(tmp_path / "new")
    cache(model, docs, tmp_path, tokens=300, overwrite=True)
    assert Cache(tmp_path).n_tokens == 300


@pytest.mark.parametrize("damage, message", [
    ("truncate", r"shard shard_00001.safetensors of the cache .* is truncated"),
    ("flip", r"shard shard_00001.safetensors of the cache .* is damaged \(CRC-32"),
    ("delete", r"shard shard_00001.safetensors of the cache .* is missing")])
def test_a_damaged_shard_is_one_error_naming_it(models, texts, tmp_path, damage, message):
    cache(models["pythia"], texts[:20], tmp_path, shard_rows=300)
    path = tmp_path / "shard_00001.safetensors"
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        path.write_bytes(data[:-100])
    elif damage == "flip":
        data[-7] ^= 0xFF
        path.write_bytes(bytes(data))
    else:
        path.unlink()
    reader = CachedActivations(tmp_path, 64, shuffle=False, window=300, prefetch=False)
    with pytest.raises(CacheError, match=message):
        list(reader)


def test_reader_serves_each_row_once_per_epoch(models, texts, tmp_path):
    cache(models["pythia"], texts[:30], tmp_path, shard_rows=300)
    rows = all_rows(tmp_path)[f"{L1}.output"]
    for epochs, world in ((1, 1), (2, 1), (1, 2)):
        served = []
        for rank in range(world):
            reader = CachedActivations(tmp_path, 100, window=700, epochs=epochs, seed=3,
                                       rank=rank, world_size=world)
            served += list(reader)
        got = torch.cat(served)
        assert len(got) == epochs * len(rows)
        expected = torch.cat([rows] * epochs)
        assert torch.equal(sorted_rows(got), sorted_rows(expected))
    a = torch.cat(list(CachedActivations(tmp_path, 100, window=700, seed=3)))
    b = torch.cat(list(CachedActivations(tmp_path, 100, window=700, seed=4)))
    assert not torch.equal(a, b) and not torch.equal(a, rows)
    plain = torch.cat(list(CachedActivations(tmp_path, 100, shuffle=False)))
    assert torch.equal(plain, rows)


def test_reader_serves_the_shapes_the_buffer_serves(models, texts, tmp_path):
    cache(models["pythia"], texts[:10], tmp_path, [L0, L1], io="in_to_out", tokens=800)
    both = next(CachedActivations(tmp_path, 64))
    assert set(both) == {L0, L1} and [t.shape for t in both[L0]] == [(64, 64), (64, 64)]
    one = next(CachedActivations(tmp_path, 64, submodule=L1))
    assert isinstance(one, tuple) and one[0].shape == (64, 64)
    with pytest.raises(ValueError, match="not \\['nope'\\]"):
        CachedActivations(tmp_path, 64, submodule="nope")


def test_reader_state_serves_exactly_the_remaining_batches(models, texts, tmp_path):
    cache(models["pythia"], texts[:30], tmp_path, shard_rows=300)
    make = lambda: CachedActivations(tmp_path, 90, window=500, epochs=2, seed=1)  # noqa: E731
    for stop in (3, 11, 20):
        original = make()
        for _ in range(stop):
            next(original)
        state = original.state_dict()
        assert state["unread"].dtype == torch.long  # indices, not activations
        expected = list(original)
        restored = make()
        restored.load_state_dict(state)
        served = list(restored)
        assert len(served) == len(expected) > 0
        assert all(torch.equal(a, b) for a, b in zip(served, expected))


def config(arch):
    kwargs = {"AutoEncoderTopK": {"k": 8}, "BatchTopKSAE": {"k": 8, "threshold_start_step": 4},
              "JumpReluAutoEncoder": {}}.get(arch, {})
    return TrainerConfig(64, 256, dict_class=arch, dict_kwargs=kwargs, lr=3e-3,
                         warmup_steps=4, dead_feature_tokens=200, seed=0)


ARCHS = ["AutoEncoder", "AutoEncoderTopK", "BatchTopKSAE", "JumpReluAutoEncoder"]


def test_training_from_a_cache_equals_training_on_the_same_batches(models, texts, tmp_path):
    cache(models["pythia"], texts[:30], tmp_path, shard_rows=300)
    configs = [config(a) for a in ARCHS]
    batches = list(CachedActivations(tmp_path, 96, window=600, seed=2))
    from_cache = train_dictionaries(CachedActivations(tmp_path, 96, window=600, seed=2),
                                    configs, steps=15, progress=False)
    from_memory = train_dictionaries(iter(batches), configs, steps=15, progress=False)
    for a, b in zip(from_cache, from_memory):
        for key, value in a.state_dict().items():
            assert torch.equal(value, b.state_dict()[key]), key


def test_normalisation_uses_the_caches_mean_norm(models, texts, tmp_path):
    cache(models["pythia"], texts[:20], tmp_path)
    reader = CachedActivations(tmp_path, 64)
    from dictionary_learning.trainer import Trainer

    trainer = Trainer(TrainerConfig(64, 128, normalize_activations=True), "cpu", 4)
    trainer.data_mean_norm = reader.mean_norm()
    x = next(reader)
    trainer.start(x, x)
    assert trainer.activation_scale == pytest.approx(8 / reader.mean_norm())
    assert reader.mean_norm() == Cache(tmp_path).stats(f"{L1}.output")["mean_norm"]


def test_stopped_run_on_a_cache_resumes_bit_identical(models, texts, tmp_path):
    cache(models["pythia"], texts[:40], tmp_path / "cache", shard_rows=300)
    configs = [config(a) for a in ARCHS]
    make = lambda: CachedActivations(tmp_path / "cache", 64, window=400, epochs=3,  # noqa
                                     seed=7)
    expected = train_dictionaries(make(), configs, steps=30, progress=False)

    class Dying:
        def __init__(self, source, after):
            self.source, self.after, self.n = source, after, 0
            self.state_dict, self.load_state_dict = source.state_dict, source.load_state_dict
            self.config = source.config

        def __iter__(self):
            for batch in self.source:
                self.n += 1
                if self.n > self.after:
                    raise RuntimeError("killed")
                yield batch

    run = tmp_path / "run"
    with pytest.raises(RuntimeError, match="killed"):
        train_dictionaries(Dying(make(), 17), configs, steps=30, save_dir=run, save_steps=5,
                           progress=False)
    stream_states = list((run / "checkpoints").glob("stream_state_*.pt"))
    assert [p.name for p in stream_states] == ["stream_state_15.pt"]
    assert stream_states[0].stat().st_size < 100_000  # row indices, not activations
    resumed = train_dictionaries(make(), configs, steps=30, save_dir=run, save_steps=5,
                                 progress=False, resume=True)
    for a, b in zip(resumed, expected):
        for key, value in a.state_dict().items():
            assert torch.equal(value, b.state_dict()[key]), key


def test_crc_in_manifest_is_the_files(models, texts, tmp_path):
    manifest = cache(models["pythia"], texts[:40], tmp_path, tokens=700, shard_rows=300)
    for entry in manifest["shards"]:
        data = (tmp_path / entry["file"]).read_bytes()
        assert entry["bytes"] == len(data) and entry["crc32"] == f"{zlib.crc32(data):08x}"
    assert [e["rows"] for e in manifest["shards"]] == [300, 300, 100]
    assert not list(itertools.chain(tmp_path.glob(".*.tmp")))
