"""The ``throughput`` section of ``scripts/benchmark.py``: for a Pythia-70m-shaped model
(layer 1) and a wider one (d 2048), each stage against its own limit, at several widths.

Per model shape:
- collection: the buffer's real tokens/s against a plain forward hook that stops the pass
  after the same submodule (``benchmark.bench_buffer``);
- step: tokens/s of a dense ReLU ``AutoEncoder`` step and a TopK step at each width, the
  ReLU step's GFLOP/s as a fraction of the measured rate of its five matrix products
  alone, the TopK step's speed-up over the ReLU one, and peak device memory
  (``torch.cuda.max_memory_allocated``; on CPU ``None``);
- end to end: ``train_dictionaries`` on a live packed ``ActivationBuffer`` (prefetch on),
  tokens/s and the fraction of wall time the loop waited for activations (its ``stats``),
  for ReLU and TopK at each width. The store is filled before the clock starts, so the
  figure is the steady state: every later refill happens inside the timing.

And, on CUDA, the host synchronisations one step makes, by the line that makes them
(:func:`host_syncs_per_step`), for ReLU, TopK, BatchTopK and Matryoshka.

On CPU the same code runs at the reduced sizes of ``cpu_plan`` (``--quick``).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from itertools import islice

import torch

from ..buffer import ActivationBuffer
from ..tiny import stdlib_texts
from ..trainer import TrainerConfig
from ..training import train_dictionaries

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Plan:
    """What the section measures. ``models`` are (label, d_model, n_heads, d_mlp)."""

    models: tuple = (("pythia-70m layer 1", 512, 8, 2048), ("wide d 2048 layer 1", 2048, 16, 8192))
    widths: tuple = (8192, 32768, 131072)
    k: int = 32
    batch: int = 4096
    step_repeats: int = 5
    e2e_steps: int = 24
    store_batches: int = 8
    """The buffer's store holds this many training batches (refilled at half)."""
    collection_texts: int = 512


def cpu_plan() -> Plan:
    """Small enough for two CPU cores in a minute or so: the same code paths."""
    return Plan(models=(("pythia-shaped d 64", 64, 4, 256), ("wide d 128", 128, 4, 512)),
                widths=(256, 512, 1024), k=8, batch=256, step_repeats=5, e2e_steps=6,
                store_batches=4, collection_texts=32)


def _peak_reset(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def _peak_mb(device: str) -> float | None:
    if torch.device(device).type != "cuda":
        return None
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2**20


def _configs(d: int, m: int, k: int) -> dict[str, TrainerConfig]:
    return {"relu": TrainerConfig(d, m, warmup_steps=1),
            "topk": TrainerConfig(d, m, warmup_steps=1, dict_class="AutoEncoderTopK",
                                  dict_kwargs={"k": k})}


def bench_steps(d: int, plan: Plan, device: str) -> list[dict]:
    """Per width: ReLU and TopK step tokens/s, the ReLU step against the matmul rate, and
    peak device memory of each."""
    from .benchmark import dense_step_flops, matmul_seconds, step_seconds

    rows = []
    for m in plan.widths:
        row = {"width": m}
        flops = dense_step_flops(plan.batch, d, m)
        _peak_reset(device)
        mm_s = matmul_seconds(plan.batch, d, m, device, plan.step_repeats)
        row["matmul_gflops"] = flops / mm_s / 1e9
        for name, config in _configs(d, m, plan.k).items():
            _peak_reset(device)
            seconds = step_seconds(config, plan.batch, device, plan.step_repeats)
            row[name] = {"step_s": seconds, "tokens_per_s": plan.batch / seconds,
                         "peak_device_mb": _peak_mb(device)}
        row["relu"]["gflops"] = flops / row["relu"]["step_s"] / 1e9
        row["relu_step_vs_matmul"] = row["relu"]["gflops"] / row["matmul_gflops"]
        row["topk_speedup"] = row["relu"]["step_s"] / row["topk"]["step_s"]
        rows.append(row)
        logger.info("width %d: %s", m, row)
    return rows


def end_to_end_run(model, path: str, texts: list[str], d: int, m: int, name: str,
                   plan: Plan, device: str, prefetch: int | None = None) -> dict:
    """``train_dictionaries`` for ``plan.e2e_steps`` steps on a live packed buffer whose
    store was filled before the clock started (``prefetch``: the loop's; default: 2 on
    CUDA, 0 on the CPU, :func:`~dictionary_learning.training.default_prefetch`)."""
    ctx_len = 128
    buffer = ActivationBuffer(_cycle(texts), model, path, ctx_len=ctx_len, pack=True,
                              refresh_batch_size=min(64, plan.batch // ctx_len or 1),
                              n_ctxs=max(1, plan.store_batches * plan.batch // ctx_len),
                              out_batch_size=plan.batch, device=device, progress=False,
                              seed=0)
    buffer.refresh()
    config = _configs(d, m, plan.k)[name]
    stats = {}
    _peak_reset(device)
    start = time.perf_counter()
    train_dictionaries(buffer, [config], steps=plan.e2e_steps, device=device, progress=False,
                       stats=stats, prefetch=prefetch)
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return {"tokens_per_s": plan.e2e_steps * plan.batch / seconds, "seconds": seconds,
            "data_wait_fraction": stats["data_wait_fraction"],
            "data_wait_s": stats["data_wait_s"], "prefetch": stats["prefetch"],
            "peak_device_mb": _peak_mb(device)}


def host_syncs_per_step(config: TrainerConfig, batch: int, device: str, steps: int = 3
                        ) -> dict | None:
    """On CUDA, the host synchronisations one ``Trainer.step`` makes (after a first step),
    counted by ``torch.cuda.set_sync_debug_mode("warn")``: per step, and by the line of
    this package that asked for them; ``None`` on other devices."""
    import warnings
    from collections import Counter

    from ..trainer import Trainer

    if torch.device(device).type != "cuda":
        return None
    trainer = Trainer(config, device)
    x = torch.randn(batch, config.activation_dim, device=device)
    trainer.step(0, x, x)
    torch.cuda.synchronize()
    sites: Counter = Counter()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for i in range(steps):
                trainer.step(i + 1, x, x)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for w in caught:
        if "synchroniz" in str(w.message):
            sites[f"{w.filename.rsplit('dictionary_learning/', 1)[-1]}:{w.lineno}"] += 1
    return {"per_step": sum(sites.values()) / steps,
            "sites": {k: v / steps for k, v in sites.most_common()}}


def prefetch_gain(model, path, texts, d: int, plan: Plan, device: str, repeats: int = 3
                  ) -> dict:
    """End-to-end TopK at the middle width with the loop reading ahead (prefetch 2) and
    without (0), alternating, ``repeats`` each: median tokens/s and data-wait fractions."""
    import statistics

    m = plan.widths[len(plan.widths) // 2]
    runs = {0: [], 2: []}
    for r in range(repeats):
        for p in ((0, 2) if r % 2 == 0 else (2, 0)):
            runs[p].append(end_to_end_run(model, path, texts, d, m, "topk", plan, device, p))
    med = {p: {key: statistics.median(x[key] for x in rs)
               for key in ("tokens_per_s", "data_wait_fraction")} for p, rs in runs.items()}
    return {"width": m, "with": med[2], "without": med[0],
            "gain": med[2]["tokens_per_s"] / med[0]["tokens_per_s"]}


def _cycle(texts):
    while True:
        yield from texts


def bench_throughput(w, plan: Plan | None = None) -> dict:
    """The whole section for workload ``w`` (its device, dtype, layer and repeats): one
    entry per model shape of ``plan`` (default: the full plan on CUDA, ``cpu_plan()``
    elsewhere)."""
    from .benchmark import bench_buffer, build_model

    plan = plan or (Plan() if torch.device(w.device).type == "cuda" else cpu_plan())
    texts = list(islice(stdlib_texts(), plan.collection_texts))
    out = {"plan": dataclasses.asdict(plan), "device": str(w.device), "models": []}
    if torch.device(w.device).type == "cuda":
        out["device_name"] = torch.cuda.get_device_name(torch.device(w.device))
    d0, m0 = plan.models[0][1], plan.widths[0]
    out["host_syncs"] = {name: host_syncs_per_step(config, plan.batch, w.device)
                         for name, config in {
        **_configs(d0, m0, plan.k),
        "batch_topk": TrainerConfig(d0, m0, warmup_steps=1, dict_class="BatchTopKSAE",
                                    dict_kwargs={"k": plan.k}),
        "matryoshka": TrainerConfig(d0, m0, warmup_steps=1,
                                    dict_class="MatryoshkaBatchTopKSAE",
                                    dict_kwargs={"k": plan.k, "group_sizes": [
                                        m0 // 4, m0 // 4, m0 - m0 // 2]})}.items()}
    for label, d, heads, d_mlp in plan.models:
        shape = dataclasses.replace(w, d_model=d, n_heads=heads, d_mlp=d_mlp,
                                    n_layers=max(2, w.layer + 1))
        logger.info("throughput: %s", label)
        model = build_model(shape)
        path = f"gpt_neox.layers.{shape.layer}.mlp"
        entry = {"label": label, "d_model": d, "layer": shape.layer}
        collection = bench_buffer(model, texts, dataclasses.replace(
            shape, refresh_batch_size=min(shape.refresh_batch_size, 64)))
        entry["collection"] = {k: collection[k] for k in (
            "limit_tokens_per_s", "buffer_tokens_per_s", "buffer_vs_limit",
            "packed_tokens_per_s", "packed_vs_limit")}
        entry["steps"] = bench_steps(d, plan, w.device)
        entry["end_to_end"] = [
            {"width": m, **{name: end_to_end_run(model, path, texts, d, m, name, plan,
                                                 w.device) for name in ("relu", "topk")}}
            for m in plan.widths]
        entry["prefetch_gain"] = prefetch_gain(model, path, texts, d, plan, w.device)
        out["models"].append(entry)
        del model
        if torch.device(w.device).type == "cuda":
            torch.cuda.empty_cache()
    return out


def _mb(x) -> str:
    return "n/a" if x is None else f"{x:,.0f} MB"


def throughput_rows(t: dict) -> list[tuple[str, str]]:
    """Table rows of :func:`bench_throughput`'s result."""
    rows = [("throughput device", t.get("device_name", t["device"]))]
    for name, syncs in t.get("host_syncs", {}).items():
        if syncs is not None:
            where = ", ".join(f"{k} x{v:g}" for k, v in syncs["sites"].items()) or "none"
            rows.append((f"host syncs per step, {name}", f"{syncs['per_step']:g} ({where})"))
    k = t["plan"]["k"]
    for e in t["models"]:
        c, name = e["collection"], e["label"]
        rows.append((f"[{name}] collection / plain hook",
                     f"{c['buffer_tokens_per_s']:.0f} vs {c['limit_tokens_per_s']:.0f} "
                     f"tokens/s = {c['buffer_vs_limit']:.3f}  (packed "
                     f"{c['packed_vs_limit']:.3f})"))
        for s in e["steps"]:
            rows.append((f"[{name}] step m={s['width']}",
                         f"ReLU {s['relu']['tokens_per_s']:.0f} tokens/s = "
                         f"{s['relu_step_vs_matmul']:.3f} of matmul "
                         f"({s['matmul_gflops']:.0f} GFLOP/s); TopK k={k} "
                         f"{s['topk']['tokens_per_s']:.0f} tokens/s = "
                         f"{s['topk_speedup']:.2f}x ReLU; peak {_mb(s['relu']['peak_device_mb'])}"
                         f" / {_mb(s['topk']['peak_device_mb'])}"))
        g = e.get("prefetch_gain")
        if g:
            rows.append((f"[{name}] prefetch 2 vs 0, TopK m={g['width']}",
                         f"{g['with']['tokens_per_s']:.0f} vs {g['without']['tokens_per_s']:.0f}"
                         f" tokens/s = {g['gain']:.2f}x (wait "
                         f"{100 * g['with']['data_wait_fraction']:.1f}% vs "
                         f"{100 * g['without']['data_wait_fraction']:.1f}%)"))
        for r in e["end_to_end"]:
            rows.append((f"[{name}] end to end m={r['width']}",
                         f"ReLU {r['relu']['tokens_per_s']:.0f} tokens/s (wait "
                         f"{100 * r['relu']['data_wait_fraction']:.1f}%), TopK "
                         f"{r['topk']['tokens_per_s']:.0f} tokens/s (wait "
                         f"{100 * r['topk']['data_wait_fraction']:.1f}%); peak "
                         f"{_mb(r['topk']['peak_device_mb'])}"))
    return rows
