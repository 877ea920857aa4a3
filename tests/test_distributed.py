"""Training on two gloo processes against one process on the same rows. Data parallel: each
rank trains on half of every global batch, and the dictionaries (relu with resampling and
normalisation, topk, batchtopk, jumprelu) and the logged losses equal single-process
training on the whole batches. Dictionary parallel: each rank trains half of the sweep on
the gathered batches, equal to the one-process sweep. A run on a cache's shards, killed and
resumed, ends like an uninterrupted one; a rank that dies makes the other stop with an
error, not hang."""

import json
import socket
import time

import pytest
import torch
import torch.multiprocessing as mp

import distributed_workers as workers
from dictionary_learning import train_dictionaries


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(fn, *args, world=2, timeout=180):
    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=fn, args=(r, world, port, *args)) for r in range(world)]
    for p in procs:
        p.start()
    deadline = time.time() + timeout
    for p in procs:
        p.join(max(1, deadline - time.time()))
    codes = [p.exitcode for p in procs]
    for p in procs:
        if p.is_alive():
            p.kill()
    return codes


def metrics(folder):
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def test_data_parallel_equals_one_process_on_the_same_rows(tmp_path):
    assert spawn(workers.data_parallel, str(tmp_path)) == [0, 0]
    single = train_dictionaries(iter(workers.global_batches()), workers.configs(), steps=20,
                                save_dir=tmp_path / "single", log_steps=1, progress=False)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for i, reference in enumerate(single):
        for key, value in reference.state_dict().items():
            for r in range(2):  # every rank holds the same dictionary
                torch.testing.assert_close(ranks[r][i][key], value, rtol=1e-5, atol=1e-6,
                                           msg=f"trainer {i} {key} rank {r}")
        ours = metrics(tmp_path / "run" / f"trainer_{i}")
        theirs = metrics(tmp_path / "single" / f"trainer_{i}")
        assert len(ours) == len(theirs) == 20
        for a, b in zip(ours, theirs):
            assert a["activations"] == b["activations"]
            for name in ("loss", "mse", "l0", "frac_variance_explained"):
                assert a[name] == pytest.approx(b[name], rel=1e-5, abs=1e-6), (i, name, a)
    # The resampling and the BatchTopK threshold really ran.
    assert torch.load(tmp_path / "rank0.pt")[2]["threshold"] > 0


def test_dictionary_parallel_sweep_equals_the_one_process_sweep(tmp_path):
    assert spawn(workers.dictionary_parallel, str(tmp_path)) == [0, 0]
    single = train_dictionaries(iter(workers.global_batches()), workers.configs(), steps=20,
                                progress=False)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert sorted(ranks[0]) == [0, 2] and sorted(ranks[1]) == [1, 3]
    for r, held in enumerate(ranks):
        for i, state in held.items():
            for key, value in single[i].state_dict().items():
                assert torch.equal(state[key], value), (i, key)
    # Each rank wrote its own dictionaries' folders.
    for i in range(4):
        assert (tmp_path / "run" / f"trainer_{i}" / "ae.pt").is_file()


def test_killed_distributed_run_on_a_cache_resumes_like_an_uninterrupted_one(
        models, texts, tmp_path):
    from dictionary_learning.cache import write_cache

    write_cache(tmp_path / "cache", models["pythia"], texts[:60], "gpt_neox.layers.1.mlp",
                tokens=3000, ctx_len=32, shard_rows=250, progress=False)
    whole, part = str(tmp_path / "whole"), str(tmp_path / "part")
    cache = str(tmp_path / "cache")
    assert spawn(workers.cached_run, cache, whole, 0, False) == [0, 0]
    assert spawn(workers.cached_run, cache, part, 13, False) == [0, 0]  # stops at step 13
    states = sorted(p.name for p in (tmp_path / "part" / "checkpoints").glob("stream_*"))
    assert states == ["stream_state_10.rank0of2.pt", "stream_state_10.rank1of2.pt"]
    assert spawn(workers.cached_run, cache, part, 0, True) == [0, 0]
    for i in range(2):
        a = torch.load(tmp_path / "whole" / f"trainer_{i}" / "ae.pt")
        b = torch.load(tmp_path / "part" / f"trainer_{i}" / "ae.pt")
        assert all(torch.equal(a[k], b[k]) for k in a), i
    # One process cannot continue what two started.
    from dictionary_learning.training import resume_step
    with pytest.raises(ValueError, match="checkpointed by 2 processes and this run has 1"):
        resume_step(part, 2, stream_state=True, world=1)


def test_a_dead_rank_stops_the_other_with_an_error(tmp_path):
    start = time.time()
    codes = spawn(workers.dies_or_waits, str(tmp_path), timeout=120)
    assert codes[1] == 3 and codes[0] == 0  # rank 0 caught its error and reported it
    outcome = json.loads((tmp_path / "rank0.json").read_text())
    assert outcome["error"] is not None and outcome["seconds"] < 60
    assert "another process of the distributed run stopped" in outcome["error"]
    assert time.time() - start < 90


def test_cache_written_by_two_processes_holds_the_rows_of_one(tmp_path, tmp_path_factory):
    """Each process collects every other document into its own shards; the merged manifest
    serves the rows (and statistics) one process collects from all of them (one document
    per forward, so no padding differs)."""
    from cli_helpers import shared_model_folder, write_jsonl
    from dictionary_learning.cache import Cache, CachedActivations
    from dictionary_learning.cache.run import CacheRun, run_cache

    model_dir = shared_model_folder(tmp_path_factory)
    data = tmp_path / "docs.jsonl"
    write_jsonl(data, start=300, n=45)
    both = tmp_path / "both"
    assert spawn(workers.cache_part, str(model_dir), str(data), str(both)) == [0, 0]
    one = tmp_path / "one"
    run_cache(CacheRun(model=str(model_dir), data=str(data), submodule=("1.mlp",), ctx_len=32,
                       refresh_batch_size=1, skip_texts=5, shard_mb=0.1, out=str(one)),
              progress=False, announce=lambda line: None)
    a, b = Cache(both), Cache(one)
    assert a.n_tokens == b.n_tokens and len(a.manifest["parts"]) == 2
    assert {s["file"][:10] for s in a.shards} == {"shard_0of2", "shard_1of2"}
    key = "gpt_neox.layers.1.mlp.output"
    rows = [torch.cat(list(CachedActivations(c, 500, shuffle=False))) for c in (a, b)]
    from test_cache import sorted_rows

    assert torch.equal(sorted_rows(rows[0]), sorted_rows(rows[1]))
    for name in ("count", "mean_norm"):
        assert a.stats(key)[name] == pytest.approx(b.stats(key)[name], rel=1e-12)
    torch.testing.assert_close(torch.tensor(a.stats(key)["var"]),
                               torch.tensor(b.stats(key)["var"]), rtol=1e-9, atol=1e-12)


def test_torchrun_trains_a_sweep_and_one_process_cannot_resume_it(tmp_path, tmp_path_factory,
                                                                  capsys):
    """The command as a user launches it: torchrun, two processes, then the checks."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from cli_helpers import shared_model_folder, write_jsonl
    from dictionary_learning.cli import main

    model_dir = shared_model_folder(tmp_path_factory)
    data = tmp_path / "docs.jsonl"
    write_jsonl(data, start=300, n=120)
    args = ["--model", str(model_dir), "--data", str(data), "--submodule", "1.mlp",
            "--arch", "relu,topk", "--expansion", "4", "--batch-size", "128", "--ctx-len",
            "32", "--n-ctxs", "40", "--refresh-batch-size", "8", "--warmup-steps", "5",
            "--eval-texts", "30", "--eval-loss-texts", "8", "--steps", "8", "--save-steps",
            "4", "--save-dir", str(tmp_path / "run"), "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node",
                           "2", "--master-port", str(free_port()), "-m", "dictionary_learning",
                           "train", *args], capture_output=True, text=True, env=env,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("Evaluation on held-out text") == 1  # rank 0 reports
    assert "on 2 processes (data parallel)" in done.stdout
    states = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert states == ["stream_state_8.rank0of2.pt", "stream_state_8.rank1of2.pt"]
    assert main(["train", "--resume", "--save-dir", str(tmp_path / "run"), "--steps", "12",
                 "--no-progress"]) == 2
    assert "checkpointed by 2 processes and this run has 1" in capsys.readouterr().err


def test_device_map_auto_trains_on_cpu(tmp_path, tmp_path_factory):
    from cli_helpers import shared_model_folder, write_jsonl
    from dictionary_learning.cli import main

    model_dir = shared_model_folder(tmp_path_factory)
    data = tmp_path / "docs.jsonl"
    write_jsonl(data, start=300, n=80)
    assert main(["train", "--model", str(model_dir), "--data", str(data), "--device-map",
                 "auto", "--batch-size", "64", "--ctx-len", "32", "--n-ctxs", "20",
                 "--eval-texts", "10", "--eval-loss-texts", "4", "--steps", "3",
                 "--save-dir", str(tmp_path / "run"), "--no-progress"]) == 0
    args = json.loads((tmp_path / "run" / "train_args.json").read_text())
    assert args["device_map"] == "auto"


def test_distributed_benchmark_reports_its_figures():
    from dictionary_learning.measure.distributed_benchmark import (distributed_benchmark,
                                                                   format_distributed)

    r = distributed_benchmark(d=16, m=64, batch=64, steps=3)
    assert r["world"] == 2 and r["step_distributed_s"] > 0 and r["allreduce_s"] > 0
    # (at this toy size the all-reduce can outlast the step: only the arithmetic is checked)
    assert r["communication_share"] == pytest.approx(r["allreduce_s"] / r["step_distributed_s"])
    assert r["scaling"] == pytest.approx(r["step_one_process_s"] / r["step_distributed_s"])
    assert "% of a step" in format_distributed(r)


def test_ranks_whose_text_ends_at_different_steps_stop_together(tmp_path):
    assert spawn(workers.uneven, str(tmp_path)) == [0, 0]
    for i in range(2):
        run = json.loads((tmp_path / "run" / f"trainer_{i}" / "config.json").read_text())["run"]
        assert run["steps_done"] == 6 and run["finished"]
        assert run["activations_trained"] == 5 * 64 + 32 + 7


def test_dictionary_parallel_one_dictionary_per_layer(tmp_path):
    """Several submodules per forward ({name: batch} dicts) shard the same way."""
    assert spawn(workers.dictionary_parallel_layers, str(tmp_path)) == [0, 0]
    single = train_dictionaries(iter(workers.layer_batches()), workers.layer_configs(),
                                steps=12, progress=False)
    held = {**torch.load(tmp_path / "rank0.pt"), **torch.load(tmp_path / "rank1.pt")}
    assert sorted(held) == [0, 1, 2]
    for i, state in held.items():
        for key, value in single[i].state_dict().items():
            assert torch.equal(state[key], value), (i, key)
