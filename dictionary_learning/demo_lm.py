"""A small language model trained here, once, for the offline demo.

Dictionaries trained on a random-weight model learn features that mean little. With no
model hub, :func:`demo_language_model` makes a model with real structure instead: a
byte-level BPE tokenizer and a small Pythia-architecture LM (GPTNeoX, rotary on a quarter
of each head, parallel residual) trained for a fixed number of steps on the standard
library's docstrings, packed into full windows. The result is cached::

    <cache root>/demo-lm-v2-<hash of the DemoLMConfig>/
        config.json, model.safetensors, generation_config.json   (save_pretrained)
        tokenizer.json, tokenizer_config.json                    (save_pretrained)
        training.json   config, steps, tokens seen, wall time, loss curve, train and
                        held-out loss, unigram baselines, sha256 of every other file

Cache root: ``$DL_CACHE_DIR``, else ``$XDG_CACHE_HOME/dictionary_learning``, else
``~/.cache/dictionary_learning``. A build happens in a temporary folder next to the target
and is renamed into place, so an interrupted build leaves no cache; a cache folder whose
files do not match their recorded hashes is rebuilt, with a warning.

The number of steps is fixed (not a time budget), so a build is deterministic given the
seed, the code and the number of CPU threads (float sums can round differently across
thread counts; a build after unrelated code changes was seen to differ in its last digits,
perhaps through memory alignment).
:func:`demo_language_model` builds in a fresh Python process and then loads the model back
from the cache, exactly as every later call does. Reading the standard library's docstrings
imports modules, and which docstrings a module shows depends on what the process imported
before (a package gains its imported submodules as attributes); a build inside the calling
process would leave it reading a different text than a process that found the model cached,
so a first demo run would differ from every later one.

Named demo models (``--model demo``, ``--model demo-quick``): :data:`DEMO_LM_CONFIG`, and
:data:`QUICK_DEMO_LM_CONFIG`, a smaller model built in well under a minute for the quick demo.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from .files import write_json
from .tiny import stdlib_texts, train_tokenizer
from .tokens import TokenPacker

logger = logging.getLogger(__name__)

FORMAT_VERSION = "v2"  # v2: built in a fresh process (v1 read a text that depended on its caller)
RECORD_NAME = "training.json"


@dataclass(frozen=True)
class DemoLMConfig:
    """Everything that determines the demo model; its hash names the cache folder."""

    n_layers: int = 3
    d_model: int = 256
    n_heads: int = 4
    d_mlp: int = 1024
    vocab_size: int = 4096
    ctx_len: int = 128
    batch_size: int = 32  # windows of ctx_len tokens per step
    steps: int = 120  # ~3 min on 2 quiet CPU cores (~2.7k tokens/s)
    lr: float = 2e-3  # peak; linear warm-up, then cosine decay to min_lr_frac * lr
    warmup_steps: int = 12
    min_lr_frac: float = 0.1
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    n_docs: int | None = None  # the first n_docs stdlib docstrings (None: all of them)
    held_out_every: int = 20  # every 20th docstring is held out (never trained on)

    def __post_init__(self):
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} is not a multiple of n_heads={self.n_heads}")
        if self.vocab_size <= 257:
            raise ValueError(f"vocab_size must exceed the 256 bytes + 1 special token, got "
                             f"{self.vocab_size}")
        if min(self.n_layers, self.ctx_len, self.batch_size, self.steps) < 1 or self.lr <= 0:
            raise ValueError("n_layers, ctx_len, batch_size, steps and lr must be positive")
        if self.held_out_every < 2:
            raise ValueError(f"held_out_every must be >= 2, got {self.held_out_every}")

    def short_hash(self) -> str:
        text = json.dumps([FORMAT_VERSION, dataclasses.asdict(self)], sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:10]


DEMO_LM_CONFIG = DemoLMConfig()
QUICK_DEMO_LM_CONFIG = DemoLMConfig(n_layers=2, d_model=128, n_heads=4, d_mlp=512,
                                    vocab_size=2048, batch_size=16, steps=200, lr=3e-3,
                                    warmup_steps=10)


def demo_config(name: str) -> DemoLMConfig | None:
    """The config of a named demo model (``demo``, ``demo-quick``), else None. Read at call
    time, so that a test may replace :data:`DEMO_LM_CONFIG`."""
    return {"demo": DEMO_LM_CONFIG, "demo-quick": QUICK_DEMO_LM_CONFIG}.get(name)


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """``cache_dir``, else ``$DL_CACHE_DIR``, else ``$XDG_CACHE_HOME/dictionary_learning``,
    else ``~/.cache/dictionary_learning``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    if os.environ.get("DL_CACHE_DIR"):
        return Path(os.environ["DL_CACHE_DIR"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(xdg).expanduser() / "dictionary_learning"


def demo_lm_path(config: DemoLMConfig = DEMO_LM_CONFIG,
                 cache_dir: str | Path | None = None) -> Path:
    """Where the model of ``config`` is (or would be) cached."""
    return cache_root(cache_dir) / f"demo-lm-{FORMAT_VERSION}-{config.short_hash()}"


def demo_language_model(cache_dir: str | Path | None = None, device: str = "cpu",
                        progress: bool = True, config: DemoLMConfig = DEMO_LM_CONFIG):
    """The demo model as an nnsight ``LanguageModel``: loaded from the cache (seconds), or
    built and cached first (minutes, once, in a fresh process: see the module docstring),
    then loaded from the cache. A corrupt cache folder is rebuilt."""
    path = demo_lm_path(config, cache_dir)
    if path.exists():
        try:
            return load_demo_lm(path, device, expect=config)
        except CorruptCacheError as e:
            logger.warning("the cached demo model is unusable (%s): rebuilding it", e)
            shutil.rmtree(path)
    logger.info("building the demo language model once (a few minutes); cached at %s", path)
    build_in_fresh_process(path, config, progress=progress)
    return load_demo_lm(path, device, expect=config)


def build_in_fresh_process(out_dir: str | Path, config: DemoLMConfig = DEMO_LM_CONFIG,
                           progress: bool = True) -> None:
    """:func:`build_demo_lm` run by a new Python process (same interpreter, import path,
    torch thread count and log level), so that neither the build nor this process depends
    on what the other imported."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    command = [sys.executable, "-m", __name__, str(out_dir),
               json.dumps(dataclasses.asdict(config)), "--threads", str(torch.get_num_threads()),
               "--log-level", str(logging.getLogger().getEffectiveLevel())]
    if not progress:
        command.append("--no-progress")
    done = subprocess.run(command, env=env, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"building the demo language model into {out_dir} failed (exit "
                           f"status {done.returncode}; its error is printed above)")


class CorruptCacheError(ValueError):
    """A cache folder that is incomplete, altered, or built from another config."""


def _file_hashes(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.iterdir()) if p.is_file() and p.name != RECORD_NAME}


def read_record(path: str | Path) -> dict:
    """The ``training.json`` of a built demo model, checked against its files' hashes."""
    path = Path(path)
    try:
        record = json.loads((path / RECORD_NAME).read_text())
        expected = record["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CorruptCacheError(f"{path / RECORD_NAME} is missing or unreadable ({e})") from e
    found = _file_hashes(path)
    if found != expected:
        bad = sorted(set(found.items()) ^ set(expected.items()))
        raise CorruptCacheError(f"files in {path} differ from those recorded: "
                                f"{sorted({name for name, _ in bad})}")
    return record


def load_demo_lm(path: str | Path, device: str = "cpu", expect: DemoLMConfig | None = None):
    """An nnsight ``LanguageModel`` from a folder written by :func:`build_demo_lm`.

    Raises :class:`CorruptCacheError` (a ``ValueError``) for an incomplete or altered
    folder, or one built from a config other than ``expect``.
    """
    from nnsight import LanguageModel
    from transformers import GPTNeoXForCausalLM, PreTrainedTokenizerFast

    path = Path(path)
    record = read_record(path)
    if expect is not None and record.get("config") != dataclasses.asdict(expect):
        raise CorruptCacheError(f"{path} was built from another config: {record.get('config')}")
    hf_model = GPTNeoXForCausalLM.from_pretrained(path).eval().to(device)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(path)
    tokenizer.padding_side = "left"
    tokenizer.model_input_names = ["input_ids", "attention_mask"]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*LanguageModel is deprecated.*")
        return LanguageModel(hf_model, tokenizer=tokenizer)


def _texts(config: DemoLMConfig) -> tuple[list[str], list[str]]:
    """``(train, held_out)`` docstrings: every ``held_out_every``-th one is held out."""
    texts = list(stdlib_texts())[: config.n_docs]
    held_out = texts[:: config.held_out_every]
    train = [t for i, t in enumerate(texts) if i % config.held_out_every]
    if not held_out or not train:
        raise ValueError(f"n_docs={config.n_docs} leaves no training or held-out text")
    return train, held_out


def _windows(tokenizer, texts: list[str], ctx_len: int) -> torch.Tensor:
    """All of ``texts`` packed into full windows ``[N, ctx_len]`` (EOS between documents)."""
    packer = TokenPacker(tokenizer, ctx_len)
    packer.add(texts)
    batch = packer.windows(packer.n_full_windows)
    if batch is None:
        raise ValueError(f"the text holds fewer than ctx_len={ctx_len} tokens")
    return batch["input_ids"]


def _make_model(config: DemoLMConfig, vocab_size: int):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(config.seed)
    hf_config = GPTNeoXConfig(
        vocab_size=vocab_size, hidden_size=config.d_model, num_hidden_layers=config.n_layers,
        num_attention_heads=config.n_heads, intermediate_size=config.d_mlp,
        max_position_embeddings=max(config.ctx_len, 2048), rotary_pct=0.25,
        use_parallel_residual=True, bos_token_id=0, eos_token_id=0, tie_word_embeddings=False)
    model = GPTNeoXForCausalLM(hf_config)
    assert model.get_input_embeddings().weight.shape == (vocab_size, config.d_model)
    assert len(model.gpt_neox.layers) == config.n_layers
    return model


def lr_at(step: int, config: DemoLMConfig) -> float:
    """Linear warm-up over ``warmup_steps``, then cosine decay to ``min_lr_frac * lr``."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return config.lr * (config.min_lr_frac + (1 - config.min_lr_frac) * cosine)


def _train(model, windows: torch.Tensor, config: DemoLMConfig, progress: bool) -> list[float]:
    """AdamW on shuffled windows for ``config.steps`` steps; returns the loss per step."""
    from tqdm.auto import tqdm

    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=config.lr, betas=(0.9, 0.95))
    generator = torch.Generator().manual_seed(config.seed)
    order, losses = torch.empty(0, dtype=torch.long), []
    model.train()
    bar = tqdm(range(config.steps), desc="demo LM", disable=not progress, unit="step")
    start = time.perf_counter()
    for step in bar:
        while len(order) < config.batch_size:  # a fresh permutation each epoch
            order = torch.cat([order, torch.randperm(len(windows), generator=generator)])
        ids, order = windows[order[: config.batch_size]], order[config.batch_size:]  # [B, T]
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, config)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        tokens_per_s = (step + 1) * ids.numel() / (time.perf_counter() - start)
        bar.set_postfix(loss=f"{losses[-1]:.3f}", tok_s=f"{tokens_per_s:.0f}")
    bar.close()
    return losses


@torch.no_grad()
def _mean_loss(model, windows: torch.Tensor, batch_size: int) -> float:
    """Mean next-token cross-entropy (nats) over every prediction inside ``windows``."""
    model.eval()
    total, n = 0.0, 0
    for ids in windows.split(batch_size):  # [b, T]
        logits = model(input_ids=ids).logits[:, :-1].float()  # [b, T-1, V]
        nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(),
                                                reduction="sum")
        total, n = total + nll.item(), n + ids[:, 1:].numel()
    return total / n


def _unigram_baselines(train: torch.Tensor, held_out: torch.Tensor, vocab: int) -> dict:
    """Entropy of the held-out tokens' own frequencies (the best any unigram model can
    score on that text), and the cross-entropy of add-one-smoothed training frequencies."""
    held_counts = torch.bincount(held_out.flatten(), minlength=vocab).double()
    p = held_counts[held_counts > 0] / held_counts.sum()
    q = torch.bincount(train.flatten(), minlength=vocab).double() + 1
    q /= q.sum()
    return {"heldout_unigram_entropy": float(-(p * p.log()).sum()),
            "unigram_model_heldout_loss": float(-(held_counts * q.log()).sum() / held_counts.sum())}


def _build_into(folder: Path, config: DemoLMConfig, progress: bool) -> dict:
    start, start_cpu = time.perf_counter(), time.process_time()
    train_texts, held_texts = _texts(config)
    tokenizer = train_tokenizer(train_texts, config.vocab_size)
    train_windows = _windows(tokenizer, train_texts, config.ctx_len)  # [N, T]
    held_windows = _windows(tokenizer, held_texts, config.ctx_len)  # [M, T]
    logger.info("demo LM: %d training windows of %d tokens, %d held out", len(train_windows),
                config.ctx_len, len(held_windows))
    model = _make_model(config, len(tokenizer))
    train_start = time.perf_counter()
    losses = _train(model, train_windows, config, progress)
    train_time = time.perf_counter() - train_start
    record = {
        "format": FORMAT_VERSION,
        "config": dataclasses.asdict(config),
        "steps": config.steps,
        "tokens_seen": config.steps * config.batch_size * config.ctx_len,
        "n_train_docs": len(train_texts), "n_heldout_docs": len(held_texts),
        "train_tokens": train_windows.numel(), "heldout_tokens": held_windows.numel(),
        "n_parameters": sum(p.numel() for p in model.parameters()),
        "torch_threads": torch.get_num_threads(),
        "loss_curve": [round(v, 5) for v in losses],
        "final_train_loss": sum(losses[-10:]) / len(losses[-10:]),
        "heldout_loss": _mean_loss(model, held_windows, config.batch_size),
        **_unigram_baselines(train_windows, held_windows, len(tokenizer)),
    }
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    record["train_seconds"] = round(train_time, 2)
    record["train_tokens_per_second"] = round(record["tokens_seen"] / train_time, 1)
    record["wall_seconds"] = round(time.perf_counter() - start, 2)
    # CPU time of all threads: on a busy machine, cpu_seconds / torch_threads estimates the
    # wall time the same build needs on idle cores.
    record["cpu_seconds"] = round(time.process_time() - start_cpu, 2)
    record["files"] = _file_hashes(folder)
    write_json(folder / RECORD_NAME, record)
    return record


def build_demo_lm(out_dir: str | Path, config: DemoLMConfig = DEMO_LM_CONFIG,
                  progress: bool = True) -> dict:
    """Train the demo tokenizer and model of ``config`` and save them to ``out_dir``.

    Built in a temporary folder beside ``out_dir`` and renamed into place only when
    complete. Returns the training record (also written as ``training.json``).
    """
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} already exists: remove it to rebuild")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.", suffix=".tmp"))
    try:
        record = _build_into(tmp, config, progress)
        try:
            os.rename(tmp, out_dir)
        except OSError:
            if not out_dir.exists():
                raise
            logger.info("another process built %s meanwhile: keeping its copy", out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("demo LM built in %.0f s: held-out loss %.3f nats vs unigram entropy %.3f",
                record["wall_seconds"], record["heldout_loss"], record["heldout_unigram_entropy"])
    return record


def _main(argv: list[str] | None = None) -> None:
    """``python -m dictionary_learning.demo_lm OUT_DIR CONFIG_JSON``: what
    :func:`build_in_fresh_process` runs."""
    import argparse

    p = argparse.ArgumentParser(description=_main.__doc__)
    p.add_argument("out_dir")
    p.add_argument("config", help="DemoLMConfig fields as a JSON object")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--log-level", type=int, default=logging.WARNING)
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(levelname)s:%(name)s:%(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    build_demo_lm(args.out_dir, DemoLMConfig(**json.loads(args.config)),
                  progress=not args.no_progress)


if __name__ == "__main__":
    _main()
