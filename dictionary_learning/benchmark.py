"""Measurements behind ``scripts/benchmark.py``: each stage against its own limit, in one run.

- buffer: real tokens/s served by ``ActivationBuffer`` against a plain HF forward with a
  PyTorch hook that stops the pass right after the same submodule (same texts, same batch
  size, tokenisation included in both); with packing, against the same padded limit.
- train step: tokens/s and GFLOP/s of ``Trainer.step`` (10·B·d·m FLOPs for a dense
  dictionary) against the measured rate of the same five matrix products alone.
- end to end: buffer + training tokens/s, and peak resident memory sampled during runs of
  N and 2N steps (it must not grow with the number of steps).
- sweeps: 4 dictionaries from one stream against one collection + 4 single steps; one
  forward pass for dictionaries on every layer against one buffer per layer.

Timings alternate between the contenders and report medians; machines are shared and noisy.
"""

from __future__ import annotations

import logging
import statistics
import threading
import time
from dataclasses import asdict, dataclass
from itertools import islice

import torch

from .buffer import ActivationBuffer
from .submodules import hidden_states
from .tiny import stdlib_texts, train_tokenizer
from .tokens import tokenize_batch
from .training import Trainer, TrainerConfig, train_dictionaries

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
    """Seconds and real tokens served by an ActivationBuffer draining ``texts``."""
    start = time.perf_counter()
    buffer = ActivationBuffer(texts, model, path, ctx_len=w.ctx_len,
                              refresh_batch_size=w.refresh_batch_size,
                              n_ctxs=max(1, len(texts)), out_batch_size=w.train_batch,
                              device=w.device, progress=False, **kwargs)
    n = 0
    for batch in buffer:
        n += (batch[0] if isinstance(batch, tuple) else batch).shape[0]
    _sync(w.device)
    return time.perf_counter() - start, n


def bench_buffer(model, texts: list[str], w: Workload) -> dict:
    path = f"gpt_neox.layers.{w.layer}.mlp"
    runs = {"limit": [], "buffer": []}
    tokens = {}
    for _ in range(w.repeats):  # alternate, so drift on a shared machine hits both alike
        for name, fn in (("limit", plain_hook_limit), ("buffer", buffer_run)):
            seconds, n = fn(model, path, texts, w)
            runs[name].append(seconds)
            tokens[name] = n
    limit_tps = tokens["limit"] / _median(runs["limit"])
    buffer_tps = tokens["buffer"] / _median(runs["buffer"])
    return {
        "real_tokens": tokens["buffer"],
        "limit_tokens_per_s": limit_tps,
        "buffer_tokens_per_s": buffer_tps,
        "buffer_vs_limit": buffer_tps / limit_tps,
        "limit_s": runs["limit"],
        "buffer_s": runs["buffer"],
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


def end_to_end(model, texts, w: Workload, steps: int, configs=None) -> dict:
    path = f"gpt_neox.layers.{w.layer}.mlp"
    configs = configs or [TrainerConfig(w.d_model, w.dict_size, warmup_steps=1)]
    buffer = ActivationBuffer(iter(texts), model, path, ctx_len=w.ctx_len,
                              refresh_batch_size=w.refresh_batch_size,
                              n_ctxs=max(1, 2 * w.train_batch // w.ctx_len),
                              out_batch_size=w.train_batch, device=w.device, progress=False)
    with PeakRSS() as rss:
        start = time.perf_counter()
        train_dictionaries(buffer, configs, steps=steps, device=w.device, progress=False)
        _sync(w.device)
        seconds = time.perf_counter() - start
    return {"steps": steps, "seconds": seconds, "tokens_per_s": steps * w.train_batch / seconds,
            "peak_rss_mb": rss.peak / 2**20}
