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
