"""The benchmark script runs end to end (a smoke test: no timing is asserted here; the
figures are measured by running the script, see README)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_benchmark_script_quick_run_reports_every_ratio(tmp_path):
    out = tmp_path / "bench.json"
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "benchmark.py"), "--quick",
                             "--json", str(out)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    results = json.loads(out.read_text())
    assert results["workload"]["d_model"] == 64
    for section, key in [("buffer", "buffer_vs_limit"), ("buffer", "packed_vs_limit"),
                         ("train_step", "step_vs_matmul"), ("topk_step", "topk_speedup"),
                         ("end_to_end", "rss_growth_mb"),
                         ("sweeps", "sweep_vs_parts"), ("sweeps", "train_all_layers_vs_parts")]:
        assert isinstance(results[section][key], float) and results[section][key] == \
            results[section][key]  # a number, not NaN
    assert "buffer / limit" in result.stdout and "step / matmul" in result.stdout
    # Packing serves every real token of the documents plus one separator each; padding
    # truncates to ctx_len, so packing serves at least as many real tokens.
    assert results["buffer"]["real_tokens_packed"] >= results["buffer"]["real_tokens_padded"]


def test_benchmark_guard_section_reports_guard_and_step_per_architecture(tmp_path):
    import math

    out = tmp_path / "guard.json"
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "benchmark.py"), "--quick",
                             "--sections", "guard", "--json", str(out)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    results = json.loads(out.read_text())
    assert "train_step" not in results and "buffer" not in results  # only what was asked
    guard = results["guard"]
    assert guard["k"] == 32 and guard["shape"] == "B=512 d=64 m=512"
    for arch in ("relu", "topk"):
        r = guard[arch]
        for key in ("step_s", "guard_s", "guard_pct_of_step"):
            assert isinstance(r[key], float) and math.isfinite(r[key]) and r[key] > 0, (arch, key)
        assert r["guard_pct_of_step"] == 100.0 * r["guard_s"] / r["step_s"]
        assert r["n"] == results["workload"]["repeats"] * results["workload"]["train_steps"]
    assert "guard / step, ReLU" in result.stdout and "guard / step, TopK k=32" in result.stdout


def test_benchmark_refuses_an_unknown_section():
    import pytest

    from dictionary_learning.measure.benchmark import Workload, run_all

    with pytest.raises(ValueError, match="unknown sections"):
        run_all(Workload(), sections=("guard", "nope"))


def test_keep_freed_memory_takes_effect_on_glibc():
    import platform

    from dictionary_learning.cpu_memory import keep_freed_memory

    result = subprocess.run([sys.executable, "-c", "from dictionary_learning.cpu_memory import "
                             "keep_freed_memory; print(keep_freed_memory())"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    expected = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
    assert result.stdout.strip() == str(expected)
    assert callable(keep_freed_memory)


def test_benchmark_cache_section_reports_write_read_train_and_disk(tmp_path):
    import math

    out = tmp_path / "cache.json"
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "benchmark.py"), "--quick",
                             "--sections", "cache", "--json", str(out)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    results = json.loads(out.read_text())
    assert "buffer" not in results and "train_step" not in results  # only what was asked
    c, w = results["cache"], results["workload"]
    col, read, train = c["collection"], c["read"], c["training"]
    # The same texts, packed the same way: the buffer and the cache hold the same tokens.
    assert col["tokens"] == col["buffer_tokens"] > w["train_batch"]
    assert col["shards"] == math.ceil(col["tokens"] / w["cache_shard_rows"])

    def positive(x):
        return isinstance(x, float) and math.isfinite(x) and x > 0

    assert positive(col["write_vs_buffer"]) and positive(read["copy_bytes_per_s"])
    assert len(col["write_vs_buffer_per_repeat"]) == w["repeats"]
    for name in ("first", "second", "unverified"):
        r = read[name]
        assert r["tokens"] == col["tokens"]  # one pass serves every cached row once
        assert all(positive(r[k]) for k in ("tokens_per_s", "vs_buffer", "vs_copy"))
        assert math.isclose(r["vs_buffer"], r["tokens_per_s"] / col["buffer_tokens_per_s"])
        assert math.isclose(r["bytes_per_s"], r["tokens_per_s"] * 2 * w["d_model"])  # bf16
    assert len(read["seconds"]["copy"]) == read["repeats"] == 5 * w["repeats"]
    assert train["steps"] == w["train_steps"] and positive(train["cache_vs_memory"])
    # Disk: d values of 4 or 2 bytes plus the int32 token id and position, per token.
    d = w["d_model"]
    assert c["disk_bytes_per_token"] == {"float32": 4 * d + 8, "bfloat16": 2 * d + 8}
    assert c["disk_bytes_100m_tokens"] == {"float32": 10**8 * (4 * d + 8),
                                           "bfloat16": 10**8 * (2 * d + 8)}
    # Shards add only their headers to the rows' bytes.
    assert 2 * d + 8 < col["shard_bytes_per_token_bf16"] < 2 * d + 8 + 1
    for label in ("write_cache (bf16) / buffer", "read first pass", "read verify=False",
                  "train from cache / in memory", "100M-token cache, d=64"):
        assert label in result.stdout, label


def test_throughput_section_runs_its_code_path_at_tiny_sizes():
    """The GPU report's code (collection vs hook, steps vs matmul, end to end with the
    data-wait fraction) at tiny sizes on CPU; its figures are measured on a device."""
    import math

    from dictionary_learning.measure.benchmark import Workload
    from dictionary_learning.measure.throughput import Plan, bench_throughput, throughput_rows

    plan = Plan(models=(("tiny", 32, 2, 64),), widths=(64, 128), k=4, batch=64,
                step_repeats=1, e2e_steps=3, store_batches=2, collection_texts=8)
    w = Workload(vocab_size=8192, n_layers=2, refresh_batch_size=4, repeats=1)
    t = bench_throughput(w, plan)
    (entry,) = t["models"]
    assert t["host_syncs"] == dict.fromkeys(("relu", "topk", "batch_topk", "matryoshka"))
    assert entry["d_model"] == 32 and entry["layer"] == 1
    assert entry["collection"]["buffer_vs_limit"] > 0
    assert [s["width"] for s in entry["steps"]] == [64, 128]
    for s in entry["steps"]:
        assert math.isclose(s["relu_step_vs_matmul"], s["relu"]["gflops"] / s["matmul_gflops"])
        assert math.isclose(s["topk_speedup"], s["relu"]["step_s"] / s["topk"]["step_s"])
        assert s["relu"]["peak_device_mb"] is None  # CPU: no device memory to report
    for r in entry["end_to_end"]:
        for name in ("relu", "topk"):
            assert 0 <= r[name]["data_wait_fraction"] <= 1 and r[name]["tokens_per_s"] > 0
            assert r[name]["prefetch"] == 0  # the default on the CPU (2 on CUDA)
    g = entry["prefetch_gain"]
    assert g["width"] == 128 and math.isclose(
        g["gain"], g["with"]["tokens_per_s"] / g["without"]["tokens_per_s"])
    labels = [label for label, _ in throughput_rows(t)]
    assert "[tiny] collection / plain hook" in labels and "[tiny] end to end m=128" in labels
