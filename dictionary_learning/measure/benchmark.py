"""Measurements behind ``scripts/benchmark.py``: each stage against its own limit, in one run.

- buffer: real tokens/s served by ``ActivationBuffer`` against a plain HF forward with a
  PyTorch hook that stops the pass right after the same submodule (same texts, same batch
  size, tokenisation included in both); with packing, against the same padded limit.
- train step: tokens/s and GFLOP/s of ``Trainer.step`` (10·B·d·m FLOPs for a dense
  dictionary) against the measured rate of the same five matrix products alone.
- end to end: buffer + training tokens/s, and peak resident memory sampled during runs of
  N and 2N steps (it must not grow with the number of steps).
- TopK step: the sparse TopK training step against the dense ReLU step.
- guard: the non-finite guard of ``Trainer.step`` (``nonfinite_part``: one reduction and
  one host sync) against the whole step it is part of, for the ReLU and TopK dictionaries.
- sweeps: 4 dictionaries from one stream against one collection + 4 single steps; one
  forward pass for dictionaries on every layer against one buffer per layer.
- cache: on the same texts, ``write_cache`` (bf16 shards) against the packed buffer's
  collection; ``CachedActivations`` reading it back (page cache warm; a first pass with its
  CRC-32 checks, a second pass, ``verify=False``) against that collection rate and, in
  bytes served, against a large tensor copy measured in the same run; training from the
  cache against the same steps on the same batches held in memory; disk bytes per token
  (fp32 and bf16) from the manifests.

Timings alternate between the contenders and report medians; machines are shared and noisy.
"""

from __future__ import annotations

import logging
import math
import os
import statistics
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from itertools import islice

import torch

from ..buffer import ActivationBuffer
from ..cache import Cache, CachedActivations, write_cache
from ..cpu_memory import keep_freed_memory
from ..submodules import hidden_states
from ..tiny import stdlib_texts, train_tokenizer
from ..tokens import tokenize_batch
from ..trainer import Trainer, TrainerConfig, nonfinite_part
from ..training import train_dictionaries

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Workload:
    """Default: a random-weight model with exactly Pythia-70m's architecture."""

    d_model: int = 512
    n_layers: int = 6
    n_heads: int = 8
    d_mlp: int = 2048
    vocab_size: int = 50304
    layer: int = 1
    ctx_len: int = 128
    dict_size: int = 8192
    train_batch: int = 4096
    refresh_batch_size: int = 64
    n_texts: int = 512
    repeats: int = 3
    train_steps: int = 5
    device: str = "cpu"
    dtype: str = "float32"
    keep_freed_memory: bool = True
    """Tune glibc malloc as the command-line entry points do (see
    ``dictionary_learning/cpu_memory.py``)."""
    cache_texts: int = 256
    """Texts the cache section collects (packed: ~21k tokens of the standard library's)."""
    cache_shard_rows: int = 4096
    """Rows per shard of the cache section's cache (4 MiB at d=512 in bf16)."""
    throughput_plan: str = "auto"
    """Sizes of the throughput section: "full" (Pythia-70m and d 2048 models, widths 8192 /
    32768 / 131072), "small" (the same code at CPU sizes), "auto" (full on CUDA)."""


def build_model(w: Workload):
    """A random-weight GPTNeoX LM of the workload's shape, wrapped for nnsight, with a BPE
    tokenizer trained on local text (ids fit any vocabulary of at least 8k)."""
    import warnings

    from nnsight import LanguageModel
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    tokenizer = train_tokenizer(list(islice(stdlib_texts(), 3000)), vocab_size=8000)
    config = GPTNeoXConfig(vocab_size=w.vocab_size, hidden_size=w.d_model,
                           num_hidden_layers=w.n_layers, num_attention_heads=w.n_heads,
                           intermediate_size=w.d_mlp, rotary_pct=0.25,
                           use_parallel_residual=True, max_position_embeddings=2048)
    torch.manual_seed(0)
    hf = GPTNeoXForCausalLM(config).eval().to(device=w.device, dtype=getattr(torch, w.dtype))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*LanguageModel is deprecated.*")
        return LanguageModel(hf, tokenizer=tokenizer)


def _median(xs):
    return statistics.median(xs)


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


# -- buffer -----------------------------------------------------------------------------------


class _Stop(Exception):
    pass


def plain_hook_limit(model, path: str, texts: list[str], w: Workload) -> tuple[float, int]:
    """Seconds and real tokens for the texts through the plain HF model, stopped by a forward
    hook right after ``path``: the cost of the model's forward up to the submodule."""
    hf = model._module
    module = hf.get_submodule(path)

    def stop(mod, args, output):
        hidden_states(output, path)
        raise _Stop

    handle = module.register_forward_hook(stop)
    n_tokens = 0
    start = time.perf_counter()
    try:
        with torch.inference_mode():
            for i in range(0, len(texts), w.refresh_batch_size):
                batch = tokenize_batch(model.tokenizer, texts[i:i + w.refresh_batch_size],
                                       w.ctx_len)
                batch = {k: v.to(w.device) for k, v in batch.items()}
                try:
                    hf(**batch)
                except _Stop:
                    pass
                n_tokens += int(batch["attention_mask"].sum())
        _sync(w.device)
    finally:
        handle.remove()
    return time.perf_counter() - start, n_tokens


def buffer_run(model, path: str, texts: list[str], w: Workload, **kwargs) -> tuple[float, int]:
    """Seconds and real tokens served by an ActivationBuffer draining ``texts`` (built,
    filled once, and served in training batches)."""
    start = time.perf_counter()
    buffer = ActivationBuffer(texts, model, path, d_submodule=w.d_model, ctx_len=w.ctx_len,
                              refresh_batch_size=w.refresh_batch_size,
                              n_ctxs=4 * max(1, len(texts)), out_batch_size=w.train_batch,
                              device=w.device, progress=False, **kwargs)
    n = 0
    for batch in buffer:
        n += (batch[0] if isinstance(batch, tuple) else batch).shape[0]
    _sync(w.device)
    return time.perf_counter() - start, n


def bench_buffer(model, texts: list[str], w: Workload) -> dict:
    """The plain-hook limit, the buffer and the packed buffer on the same texts.

    This machine's speed drifts by tens of percent within minutes, so the contenders are
    interleaved finely: the texts are cut into chunks of ``4 * refresh_batch_size``, and on
    each chunk the three run back to back, in an order that rotates from chunk to chunk.
    A repeat sums each contender's time over all chunks; the reported figures are medians
    over ``w.repeats`` repeats.
    """
    path = f"gpt_neox.layers.{w.layer}.mlp"
    contenders = {"limit": plain_hook_limit, "buffer": buffer_run,
                  "packed": lambda *a: buffer_run(*a, pack=True)}
    names = list(contenders)
    chunk = 4 * w.refresh_batch_size
    chunks = [texts[i:i + chunk] for i in range(0, len(texts), chunk)]
    buffer_run(model, path, chunks[0], w)  # warm-up: first-call costs hit no contender
    totals = {name: [] for name in names}
    tokens = dict.fromkeys(names, 0)
    for r in range(w.repeats):
        seconds = dict.fromkeys(names, 0.0)
        for c, part in enumerate(chunks):
            shift = (r + c) % len(names)
            for name in names[shift:] + names[:shift]:
                t, n = contenders[name](model, path, part, w)
                seconds[name] += t
                if r == 0:
                    tokens[name] += n
        for name in names:
            totals[name].append(seconds[name])
    tps = {name: tokens[name] / _median(totals[name]) for name in names}
    per_repeat = [b / lim for b, lim in zip(totals["buffer"], totals["limit"])]
    return {
        "real_tokens_padded": tokens["buffer"],
        "real_tokens_packed": tokens["packed"],
        "limit_tokens_per_s": tps["limit"],
        "buffer_tokens_per_s": tps["buffer"],
        "packed_tokens_per_s": tps["packed"],
        "buffer_vs_limit": tps["buffer"] / tps["limit"],
        "buffer_vs_limit_per_repeat": [1 / x for x in per_repeat],
        "packed_vs_limit": tps["packed"] / tps["limit"],
        "seconds": totals,
    }


# -- training step ----------------------------------------------------------------------------


def dense_step_flops(batch: int, d: int, m: int) -> float:
    """Encoder forward and weight gradient, decoder forward, weight gradient and feature
    gradient: five products of 2·B·d·m FLOPs each."""
    return 10.0 * batch * d * m


def matmul_seconds(batch: int, d: int, m: int, device: str, repeats: int) -> float:
    """Median time of the five products of a dense step, alone."""
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(batch, d, device=device, generator=g)
    f = torch.randn(batch, m, device=device, generator=g)
    w_enc = torch.randn(m, d, device=device, generator=g)
    w_dec = torch.randn(d, m, device=device, generator=g)
    grad_out = torch.randn(batch, d, device=device, generator=g)

    def products():
        x @ w_enc.T           # encoder forward          [B, m]
        f.T @ x               # encoder weight gradient  [m, d]
        f @ w_dec.T           # decoder forward          [B, d]
        grad_out.T @ f        # decoder weight gradient  [d, m]
        grad_out @ w_dec      # feature gradient         [B, m]
        _sync(device)

    products()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        products()
        times.append(time.perf_counter() - start)
    return _median(times)


def step_seconds(config: TrainerConfig, batch: int, device: str, repeats: int) -> float:
    trainer = Trainer(config, device)
    x = torch.randn(batch, config.activation_dim, device=device)
    trainer.step(0, x, x)
    times = []
    for i in range(repeats):
        _sync(device)
        start = time.perf_counter()
        trainer.step(i + 1, x, x)
        _sync(device)
        times.append(time.perf_counter() - start)
    return _median(times)


def bench_train_step(w: Workload) -> dict:
    d, m, b = w.d_model, w.dict_size, w.train_batch
    config = TrainerConfig(d, m, warmup_steps=1)
    step_t, mm_t = [], []
    for _ in range(w.repeats):
        step_t.append(step_seconds(config, b, w.device, w.train_steps))
        mm_t.append(matmul_seconds(b, d, m, w.device, w.train_steps))
    flops = dense_step_flops(b, d, m)
    step_s, mm_s = _median(step_t), _median(mm_t)
    return {
        "shape": f"B={b} d={d} m={m}",
        "step_s": step_s,
        "step_tokens_per_s": b / step_s,
        "step_gflops": flops / step_s / 1e9,
        "matmul_gflops": flops / mm_s / 1e9,
        "step_vs_matmul": mm_s / step_s,
    }


def bench_topk_step(w: Workload, k: int = 32) -> dict:
    """A TopK training step (sparse decode and sparse gradients) against the dense ReLU
    ``AutoEncoder`` step on the same shapes, alternating."""
    d, m, b = w.d_model, w.dict_size, w.train_batch
    relu = TrainerConfig(d, m, warmup_steps=1)
    topk = TrainerConfig(d, m, warmup_steps=1, dict_class="AutoEncoderTopK",
                         dict_kwargs={"k": k})
    relu_t, topk_t = [], []
    for _ in range(w.repeats):
        relu_t.append(step_seconds(relu, b, w.device, w.train_steps))
        topk_t.append(step_seconds(topk, b, w.device, w.train_steps))
    return {"k": k, "relu_step_s": _median(relu_t), "topk_step_s": _median(topk_t),
            "topk_speedup": _median(relu_t) / _median(topk_t)}


def bench_guard(w: Workload, k: int = 32) -> dict:
    """The non-finite guard against the step that contains it: per architecture, the median
    time of a full ``Trainer.step`` (guard included) and of ``nonfinite_part`` alone on the
    same batch, loss and gradients (those the last step left), alternating step and guard."""
    d, m, b = w.d_model, w.dict_size, w.train_batch
    configs = {"relu": TrainerConfig(d, m, warmup_steps=1),
               "topk": TrainerConfig(d, m, warmup_steps=1, dict_class="AutoEncoderTopK",
                                     dict_kwargs={"k": k})}
    x = torch.randn(b, d, device=w.device, generator=torch.Generator(w.device).manual_seed(0))
    trainers = {name: Trainer(config, w.device) for name, config in configs.items()}
    last = {name: trainer.step(0, x, x) for name, trainer in trainers.items()}  # warm-up
    step_t = {name: [] for name in trainers}
    guard_t = {name: [] for name in trainers}
    step = 1
    for _ in range(w.repeats):
        for name, trainer in trainers.items():
            for _ in range(w.train_steps):
                _sync(w.device)
                start = time.perf_counter()
                last[name] = trainer.step(step, x, x)
                _sync(w.device)
                step_t[name].append(time.perf_counter() - start)
                step += 1
                # The guard as the step calls it: the (scaled) batch, the loss and the
                # gradients that backward() left on the dictionary's parameters.
                xs, result = x * trainer.activation_scale, last[name]
                _sync(w.device)
                start = time.perf_counter()
                what = nonfinite_part(xs, result.target, result.loss,
                                      trainer.dictionary.parameters())
                guard_t[name].append(time.perf_counter() - start)  # its sync included
                if what is not None or result.skipped is not None:
                    raise RuntimeError(f"non-finite {what or result.skipped} on random data")
    out = {"shape": f"B={b} d={d} m={m}", "k": k}
    for name in trainers:
        step_s, guard_s = _median(step_t[name]), _median(guard_t[name])
        out[name] = {"step_s": step_s, "guard_s": guard_s,
                     "guard_pct_of_step": 100.0 * guard_s / step_s,
                     # the fastest of each, less exposed to a shared machine's preemption
                     "step_min_s": min(step_t[name]), "guard_min_s": min(guard_t[name]),
                     "n": len(step_t[name])}
    return out


# -- end to end and memory --------------------------------------------------------------------


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


class PeakRSS:
    """Samples the process's resident memory in a thread while a block runs."""

    def __init__(self, interval: float = 0.05):
        self.interval, self.peak = interval, 0
        self._stop = threading.Event()

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_bytes())
            self._stop.wait(self.interval)

    def __enter__(self):
        self.peak = _rss_bytes()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes())


def _stream(model, texts, w: Workload, paths, n_batches: int):
    """A packed buffer over ``texts`` (cycled), sized for ``n_batches`` training batches."""
    buffer = ActivationBuffer(_cycle(texts), model, paths, ctx_len=w.ctx_len,
                              refresh_batch_size=w.refresh_batch_size, pack=True,
                              n_ctxs=max(1, 2 * w.train_batch // w.ctx_len),
                              out_batch_size=w.train_batch, device=w.device, progress=False)
    return islice(buffer, n_batches), buffer


def _cycle(texts):
    while True:
        yield from texts


def collection_seconds(model, texts, w: Workload, paths, n_batches: int) -> float:
    """Time to collect and serve ``n_batches`` training batches, training nothing."""
    start = time.perf_counter()
    batches, _ = _stream(model, texts, w, paths, n_batches)
    for _ in batches:
        pass
    _sync(w.device)
    return time.perf_counter() - start


def end_to_end(model, texts, w: Workload, steps: int, configs=None, paths=None) -> dict:
    """Buffer + training for ``steps`` steps: wall time, tokens/s, and the resident memory
    after every step (sampled each time the loop asks for the next batch)."""
    paths = paths or f"gpt_neox.layers.{w.layer}.mlp"
    configs = configs or [TrainerConfig(w.d_model, w.dict_size, warmup_steps=1)]
    batches, _ = _stream(model, texts, w, paths, steps + 1)
    rss = []

    def sampled():
        for batch in batches:
            rss.append(_rss_bytes() / 2**20)
            yield batch

    start = time.perf_counter()
    train_dictionaries(sampled(), configs, steps=steps, device=w.device, progress=False)
    _sync(w.device)
    seconds = time.perf_counter() - start
    rss.append(_rss_bytes() / 2**20)  # after the last step (the loop reads no batch past it)
    return {"steps": steps, "seconds": seconds, "tokens_per_s": steps * w.train_batch / seconds,
            "rss_mb_by_step": rss[1:]}  # rss[i]: after step i


def bench_end_to_end(model, texts, w: Workload) -> dict:
    """One dictionary for 4N steps: throughput, and resident memory after step N, 2N and 4N
    (it must not grow with the number of steps)."""
    n = w.train_steps
    with PeakRSS() as peak:
        run = end_to_end(model, texts, w, 4 * n)
    rss = run["rss_mb_by_step"]
    at = {step: rss[step - 1] for step in (n, 2 * n, 4 * n)}
    return {"tokens_per_s": run["tokens_per_s"], "rss_mb_at_step": at,
            "rss_growth_mb": at[4 * n] - at[n], "peak_rss_mb": peak.peak / 2**20}


def bench_sweeps(model, texts, w: Workload, n_dicts: int = 4) -> dict:
    """(a) ``n_dicts`` sparsity penalties from one stream against one collection plus
    ``n_dicts`` single steps per batch; (b) one dictionary per layer from one forward pass
    against one buffer per layer."""
    n = 2 * w.train_steps  # enough steps that each trainer's first step is amortised
    path = f"gpt_neox.layers.{w.layer}.mlp"
    penalties = [10.0 ** (-3 + i / 2) for i in range(n_dicts)]
    configs = [TrainerConfig(w.d_model, w.dict_size, sparsity_penalty=p, warmup_steps=1)
               for p in penalties]
    step_s = step_seconds(configs[0], w.train_batch, w.device, n)
    collect_s = collection_seconds(model, texts, w, path, n)
    sweep_s = end_to_end(model, texts, w, n, configs=configs)["seconds"]
    parts_s = collect_s + n_dicts * n * step_s

    layers = [f"gpt_neox.layers.{i}.mlp" for i in range(w.n_layers)]
    one_pass_s = collection_seconds(model, texts, w, layers, n)
    per_layer_s = [collection_seconds(model, texts, w, p, n) for p in layers]
    layer_configs = [TrainerConfig(w.d_model, w.dict_size, submodule=p, warmup_steps=1)
                     for p in layers]
    all_layers_s = end_to_end(model, texts, w, n, configs=layer_configs, paths=layers)["seconds"]
    return {
        "n_dicts": n_dicts,
        "sweep_s": sweep_s,
        "one_collection_plus_n_steps_s": parts_s,
        "sweep_vs_parts": sweep_s / parts_s,
        "layers": len(layers),
        "collect_all_layers_one_pass_s": one_pass_s,
        "collect_one_buffer_per_layer_s": sum(per_layer_s),
        "collect_deepest_layer_alone_s": per_layer_s[-1],
        "train_all_layers_s": all_layers_s,
        "train_all_layers_vs_parts": all_layers_s / (one_pass_s + len(layers) * n * step_s),
    }


# -- activation cache -------------------------------------------------------------------------

COPY_BYTES = 2**28  # the tensor copy that stands for this machine's memory bandwidth


def _write_seconds(model, path: str, texts: list[str], w: Workload, folder, **kwargs
                   ) -> tuple[float, dict]:
    """Seconds to write the packed collection of ``texts`` into a cache, and its manifest."""
    start = time.perf_counter()
    manifest = write_cache(folder, model, texts, path, ctx_len=w.ctx_len,
                           refresh_batch_size=w.refresh_batch_size, pack=True,
                           overwrite=True, progress=False,
                           **{"tokens": None, "dtype": torch.bfloat16,
                              "shard_rows": w.cache_shard_rows, **kwargs})
    return time.perf_counter() - start, manifest


def _drain_seconds(make) -> tuple[float, int]:
    """Seconds and rows to build a reader with ``make()`` and serve every batch of it."""
    start = time.perf_counter()
    source = make()
    n = 0
    for batch in source:
        n += batch.shape[0]
    _sync(source.device)
    seconds = time.perf_counter() - start
    source.close()
    return seconds, n


def _copy_seconds(src: torch.Tensor, dst: torch.Tensor) -> float:
    _sync(src.device)
    start = time.perf_counter()
    dst.copy_(src)
    _sync(src.device)
    return time.perf_counter() - start


def bench_cache_collection(model, texts, w: Workload, folder) -> tuple[dict, dict]:
    """The packed buffer's collection against ``write_cache`` (bf16) on the same texts,
    alternating; the results and the manifest of the bf16 cache it leaves in ``folder``. A
    first small fp32 write (also the warm-up) gives the fp32 manifest."""
    path = f"gpt_neox.layers.{w.layer}.mlp"
    _, fp32 = _write_seconds(model, path, texts, w, folder, tokens=w.ctx_len,
                             dtype=torch.float32)
    buffer_run(model, path, texts[:w.refresh_batch_size], w, pack=True)  # warm-up
    seconds = {"buffer": [], "write": []}
    tokens = {}
    for r in range(w.repeats):
        for name in (("buffer", "write") if r % 2 == 0 else ("write", "buffer")):
            if name == "buffer":
                t, tokens["buffer"] = buffer_run(model, path, texts, w, pack=True)
            else:
                t, manifest = _write_seconds(model, path, texts, w, folder)
                tokens["write"] = manifest["tokens"]
            seconds[name].append(t)
    buffer_tps = tokens["buffer"] / _median(seconds["buffer"])
    write_tps = tokens["write"] / _median(seconds["write"])
    on_disk = sum(s["bytes"] for s in manifest["shards"])
    return {
        "tokens": tokens["write"], "buffer_tokens": tokens["buffer"],
        "shards": len(manifest["shards"]), "shard_rows": manifest["shard_rows"],
        "buffer_tokens_per_s": buffer_tps, "write_tokens_per_s": write_tps,
        "write_vs_buffer": write_tps / buffer_tps,
        "write_vs_buffer_per_repeat": [b / t for b, t in zip(seconds["buffer"],
                                                             seconds["write"])],
        "bytes_per_token": {"float32": fp32["bytes_per_token"],
                            "bfloat16": manifest["bytes_per_token"]},
        "shard_bytes_per_token_bf16": on_disk / manifest["tokens"],
        "seconds": seconds,
    }, manifest


def bench_cache_read(folder, w: Workload, manifest: dict, repeats: int) -> dict:
    """``CachedActivations`` draining the cache once (default window: the whole cache, up to
    2^18 rows; its construction timed too), page cache warm, against a ``COPY_BYTES``
    tensor copy; per repeat, in a rotating order: a fresh ``Cache`` (verify="first": its
    first pass checks every CRC-32) then a second pass on the same ``Cache`` (checked
    already), a fresh ``verify=False`` one, the copy."""
    src = torch.ones(COPY_BYTES // 4, device=w.device)
    dst = torch.zeros_like(src)
    width = sum(h["width"] for h in manifest["hooks"])
    row_bytes = width * getattr(torch, manifest["dtype"]).itemsize  # served, per token
    seconds = {"first": [], "second": [], "unverified": [], "copy": []}
    served = {}

    def first_and_second(r):
        cache = Cache(folder, verify="first")
        for name in ("first", "second"):
            t, served[name] = _drain_seconds(lambda: CachedActivations(
                cache, w.train_batch, seed=r, device=w.device))
            seconds[name].append(t)

    def unverified(r):
        t, served["unverified"] = _drain_seconds(lambda: CachedActivations(
            Cache(folder, verify=False), w.train_batch, seed=r, device=w.device))
        seconds["unverified"].append(t)

    def copy(r):
        seconds["copy"].append(_copy_seconds(src, dst))

    steps = [first_and_second, unverified, copy]
    for step in steps:  # warm-up
        step(-1)
    for v in seconds.values():
        v.clear()
    for r in range(repeats):
        shift = r % len(steps)
        for step in steps[shift:] + steps[:shift]:
            step(r)
    copy_bps = COPY_BYTES / _median(seconds["copy"])
    out = {"window": min(2**18, manifest["tokens"]), "batch_size": w.train_batch,
           "served_bytes_per_token": row_bytes, "copy_bytes": COPY_BYTES,
           "copy_bytes_per_s": copy_bps, "repeats": repeats, "seconds": seconds}
    for name in ("first", "second", "unverified"):
        tps = served[name] / _median(seconds[name])
        out[name] = {"tokens": served[name], "tokens_per_s": tps,
                     "batches_per_s": tps / w.train_batch,
                     "bytes_per_s": tps * row_bytes,
                     "vs_copy": tps * row_bytes / copy_bps}
    return out


def bench_cache_training(folder, w: Workload, n_tokens: int) -> dict:
    """``train_dictionaries`` for ``train_steps`` steps on ``CachedActivations`` (built inside
    the timing) against the same steps on the same batches already in a list, alternating."""
    steps = w.train_steps
    epochs = math.ceil(steps * w.train_batch / n_tokens) + 1
    config = TrainerConfig(w.d_model, w.dict_size, warmup_steps=1)

    def source():
        return CachedActivations(folder, w.train_batch, epochs=epochs, seed=0,
                                 device=w.device)

    first = source()
    in_memory = list(islice(first, steps))
    first.close()

    def run(name):
        start = time.perf_counter()  # the reader's construction counts
        batches = source() if name == "cache" else iter(in_memory)
        train_dictionaries(batches, [config], steps=steps, device=w.device, progress=False)
        _sync(w.device)
        seconds = time.perf_counter() - start
        if name == "cache":
            batches.close()
        return seconds

    train_dictionaries(iter(in_memory[:1]), [config], steps=1, device=w.device,
                       progress=False)  # warm-up
    seconds = {"cache": [], "memory": []}
    for r in range(w.repeats):
        for name in (("cache", "memory") if r % 2 == 0 else ("memory", "cache")):
            seconds[name].append(run(name))
    tokens = steps * w.train_batch
    tps = {name: tokens / _median(s) for name, s in seconds.items()}
    return {"steps": steps, "epochs": epochs, "cache_tokens_per_s": tps["cache"],
            "memory_tokens_per_s": tps["memory"],
            "cache_vs_memory": tps["cache"] / tps["memory"],
            "cache_vs_memory_per_repeat": [m / c for c, m in zip(seconds["cache"],
                                                                seconds["memory"])],
            "seconds": seconds}


def bench_cache(model, texts, w: Workload, folder=None) -> dict:
    """Writing, reading and training from an activation cache of the workload's layer, each
    against its own limit (``folder``: where the cache goes; a temporary one by default)."""
    with tempfile.TemporaryDirectory(prefix="dl-bench-cache-") as tmp:
        folder = folder or f"{tmp}/cache"
        collection, manifest = bench_cache_collection(model, texts, w, folder)
        read = bench_cache_read(folder, w, manifest, repeats=5 * w.repeats)
        training = bench_cache_training(folder, w, manifest["tokens"])
    for name in ("first", "second", "unverified"):
        read[name]["vs_buffer"] = (read[name]["tokens_per_s"]
                                   / collection["buffer_tokens_per_s"])
    per_token = collection["bytes_per_token"]
    return {"d": w.d_model, "collection": collection, "read": read, "training": training,
            "disk_bytes_per_token": per_token,
            "disk_bytes_100m_tokens": {k: 100_000_000 * v for k, v in per_token.items()}}


SECTIONS = ("buffer", "train_step", "topk_step", "guard", "end_to_end", "sweeps", "cache")
# Not run unless asked for (or on CUDA, by scripts/benchmark.py): it builds models of its own.
EXTRA_SECTIONS = ("throughput",)
MODEL_SECTIONS = ("buffer", "end_to_end", "sweeps", "cache")  # the ones that need the LM


def run_all(w: Workload, sections=SECTIONS) -> dict:
    """Every measurement on the workload, in one process."""
    results = {"workload": asdict(w), "torch_threads": torch.get_num_threads(),
               "load_average_at_start": os.getloadavg()[0],  # other work on a shared machine
               "malloc_keeps_freed_memory": keep_freed_memory() if w.keep_freed_memory
               else False}
    unknown = set(sections) - set(SECTIONS) - set(EXTRA_SECTIONS)
    if unknown:
        raise ValueError(f"unknown sections {sorted(unknown)}: choose from "
                         f"{SECTIONS + EXTRA_SECTIONS}")
    model = texts = None
    if set(sections) & set(MODEL_SECTIONS):
        logger.info("building the model")
        model = build_model(w)
        all_texts = list(islice(stdlib_texts(), max(w.n_texts, w.cache_texts)))
        texts = all_texts[:w.n_texts]
    if "buffer" in sections:
        logger.info("buffer throughput")
        results["buffer"] = bench_buffer(model, texts, w)
    if "train_step" in sections:
        logger.info("training step")
        results["train_step"] = bench_train_step(w)
    if "topk_step" in sections:
        logger.info("TopK step vs dense ReLU step")
        results["topk_step"] = bench_topk_step(w)
    if "guard" in sections:
        logger.info("non-finite guard vs the whole step")
        results["guard"] = bench_guard(w)
    if "end_to_end" in sections:
        logger.info("end to end")
        results["end_to_end"] = bench_end_to_end(model, texts, w)
    if "sweeps" in sections:
        logger.info("sweeps")
        results["sweeps"] = bench_sweeps(model, texts, w)
    if "cache" in sections:
        logger.info("activation cache: write, read, train")
        results["cache"] = bench_cache(model, all_texts[:w.cache_texts], w)
    if "throughput" in sections:
        from .throughput import Plan, bench_throughput, cpu_plan

        logger.info("throughput: collection, steps and end to end at several widths")
        if w.throughput_plan not in ("auto", "full", "small"):
            raise ValueError(f"throughput_plan must be auto, full or small, got "
                             f"{w.throughput_plan!r}")
        plan = {"full": Plan(), "small": cpu_plan()}.get(w.throughput_plan)
        results["throughput"] = bench_throughput(w, plan)
    return results


def format_table(results: dict) -> str:
    """The headline figures of :func:`run_all`, one line each."""
    rows = []
    if "buffer" in results:
        b = results["buffer"]
        rows += [("buffer real tokens/s (padded)", f"{b['buffer_tokens_per_s']:.0f}"),
                 ("plain-hook limit real tokens/s", f"{b['limit_tokens_per_s']:.0f}"),
                 ("buffer / limit", f"{b['buffer_vs_limit']:.3f}  (target >= 0.95)"),
                 ("packed buffer real tokens/s", f"{b['packed_tokens_per_s']:.0f}"),
                 ("packed / padded limit", f"{b['packed_vs_limit']:.3f}  (target >= 1)")]
    if "train_step" in results:
        t = results["train_step"]
        rows += [(f"train step ({t['shape']})", f"{t['step_s']:.3f} s, "
                  f"{t['step_tokens_per_s']:.0f} tokens/s, {t['step_gflops']:.1f} GFLOP/s"),
                 ("matmul rate, same products", f"{t['matmul_gflops']:.1f} GFLOP/s"),
                 ("step / matmul", f"{t['step_vs_matmul']:.3f}  (target >= 0.8 CPU, 0.9 GPU)")]
    if "topk_step" in results:
        t = results["topk_step"]
        rows += [(f"TopK (k={t['k']}) step vs ReLU step", f"{t['topk_step_s']:.3f} s vs "
                  f"{t['relu_step_s']:.3f} s = {t['topk_speedup']:.2f}x faster  (target >= 2)")]
    if "guard" in results:
        g = results["guard"]
        for name, label in (("relu", "ReLU"), ("topk", f"TopK k={g['k']}")):
            r = g[name]
            rows += [(f"guard / step, {label} ({g['shape']})",
                      f"{r['guard_s'] * 1e3:.2f} ms / {r['step_s'] * 1e3:.1f} ms = "
                      f"{r['guard_pct_of_step']:.2f}%  (target < 2%)")]
    if "end_to_end" in results:
        e = results["end_to_end"]
        steps = " / ".join(str(k) for k in e["rss_mb_at_step"])
        mbs = " / ".join(f"{v:.0f}" for v in e["rss_mb_at_step"].values())
        rows += [("end to end tokens/s", f"{e['tokens_per_s']:.0f}"),
                 (f"RSS after step {steps}", f"{mbs} MB (growth {e['rss_growth_mb']:+.0f} MB; "
                  f"peak {e['peak_rss_mb']:.0f} MB)")]
    if "sweeps" in results:
        s = results["sweeps"]
        rows += [(f"sweep of {s['n_dicts']} dictionaries", f"{s['sweep_s']:.1f} s vs "
                  f"{s['one_collection_plus_n_steps_s']:.1f} s for one collection + "
                  f"{s['n_dicts']} steps/batch = {s['sweep_vs_parts']:.3f}  (target <= 1.1)"),
                 (f"collect {s['layers']} layers", f"one pass {s['collect_all_layers_one_pass_s']:.1f}"
                  f" s vs one buffer per layer {s['collect_one_buffer_per_layer_s']:.1f} s "
                  f"(deepest layer alone {s['collect_deepest_layer_alone_s']:.1f} s)"),
                 (f"train {s['layers']} layers", f"{s['train_all_layers_s']:.1f} s = "
                  f"{s['train_all_layers_vs_parts']:.3f} x (one pass + steps)")]
    if "cache" in results:
        rows += _cache_rows(results["cache"])
    if "throughput" in results:
        from .throughput import throughput_rows

        rows += throughput_rows(results["throughput"])
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def _cache_rows(c: dict) -> list[tuple[str, str]]:
    col, read, tr = c["collection"], c["read"], c["training"]
    rows = [("cache: packed buffer tokens/s", f"{col['buffer_tokens_per_s']:.0f} "
             f"({col['tokens']} tokens, {col['shards']} bf16 shards of {col['shard_rows']})"),
            ("write_cache (bf16) / buffer", f"{col['write_tokens_per_s']:.0f} tokens/s = "
             f"{col['write_vs_buffer']:.3f}x  (target >= 0.9)"),
            (f"memory copy (torch, {read['copy_bytes'] // 2**20} MiB)",
             f"{read['copy_bytes_per_s'] / 1e9:.2f} GB/s")]
    for name, label in (("first", "first pass, verify='first' (CRC-32)"),
                        ("second", "second pass (CRC-32 done)"),
                        ("unverified", "verify=False")):
        r = read[name]
        rows += [(f"read {label}", f"{r['tokens_per_s']:.0f} tokens/s = "
                  f"{r['vs_buffer']:.1f}x buffer (target >= 20); "
                  f"{r['bytes_per_s'] / 1e9:.2f} GB/s = {r['vs_copy']:.3f}x copy "
                  f"(target >= 0.5)")]
    rows += [(f"train from cache / in memory ({tr['steps']} steps)",
              f"{tr['cache_tokens_per_s']:.0f} vs {tr['memory_tokens_per_s']:.0f} tokens/s = "
              f"{tr['cache_vs_memory']:.3f}x  (target >= 0.95)")]
    per, big = c["disk_bytes_per_token"], c["disk_bytes_100m_tokens"]
    rows += [(f"disk per token, d={c['d']}", f"fp32 {per['float32']} B, bf16 {per['bfloat16']} B"
              f" (token id + position included)"),
             (f"100M-token cache, d={c['d']}", f"fp32 {big['float32'] / 1e9:.1f} GB "
              f"({big['float32'] / 2**30:.1f} GiB), bf16 {big['bfloat16'] / 1e9:.1f} GB "
              f"({big['bfloat16'] / 2**30:.1f} GiB)")]
    return rows
