"""``demo``: train and evaluate a dictionary offline (superseded by ``train --preset demo``)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from .common import format_pairs


def demo(args: argparse.Namespace) -> int:
    """Train and evaluate one dictionary offline on a locally built model."""
    from ..buffer import ActivationBuffer
    from ..evaluation import evaluate, feature_frequency_histogram
    from ..tiny import stdlib_texts, tiny_language_model
    from ..training import trainSAE

    start = time.perf_counter()
    torch.manual_seed(args.seed)
    print("Building a small Pythia-architecture model (random weights) and its tokenizer ...")
    model = tiny_language_model("pythia", d_model=args.d_model, n_layers=2,
                                d_mlp=4 * args.d_model, seed=args.seed)
    texts = list(stdlib_texts())
    held_out, train = texts[::10], [t for i, t in enumerate(texts) if i % 10]
    submodule = model.gpt_neox.layers[1].mlp
    buffer = ActivationBuffer(train, model, submodule, n_ctxs=args.n_ctxs, ctx_len=args.ctx_len,
                              refresh_batch_size=32, out_batch_size=args.batch_size)
    d = buffer.d_submodule
    save_dir = Path(args.save_dir)
    print(f"Training a {d} -> {args.expansion * d} dictionary on {buffer.submodule_name} "
          f"({len(train)} training documents, {len(held_out)} held out)")
    ae = trainSAE(buffer, d, args.expansion * d, lr=args.lr, sparsity_penalty=args.l1,
                  steps=args.steps, warmup_steps=min(100, max(1, (args.steps or 200) // 10)),
                  resample_steps=args.resample_steps, save_dir=save_dir,
                  save_steps=args.save_steps)

    eval_buffer = ActivationBuffer(held_out, model, submodule, n_ctxs=args.n_ctxs,
                                   ctx_len=args.ctx_len, refresh_batch_size=32,
                                   out_batch_size=args.batch_size, progress=False)
    metrics = evaluate(ae, eval_buffer, n_batches=args.eval_batches,
                       texts=held_out[: args.eval_texts])
    histogram = feature_frequency_histogram(metrics.pop("feature_frequencies"),
                                            save_dir / "feature_frequencies.png",
                                            title=f"{buffer.submodule_name}, {d}->{ae.dict_size}")
    print("\nEvaluation on held-out text")
    print(format_pairs([(k, v)
                  for k, v in metrics.items()]))
    print("\nWrote")
    print(format_pairs([("dictionary", str(save_dir / "ae.pt")),
                  ("config", str(save_dir / "config.json")),
                  ("training log", str(save_dir / "metrics.jsonl")),
                  ("histogram", str(histogram))]))
    print(f"\nDone in {time.perf_counter() - start:.0f} s")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="train and evaluate a dictionary offline on a small local "
                       "model and the standard library's docstrings")
    p.add_argument("--save-dir", default="runs/demo", help="output folder (default: %(default)s)")
    p.add_argument("--steps", type=int, default=None,
                   help="training steps (default: until the training text runs out)")
    p.add_argument("--d-model", type=int, default=64, help="model width (default: %(default)s)")
    p.add_argument("--expansion", type=int, default=16, help="dict_size / d (default: 16)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--l1", type=float, default=1e-3, help="sparsity penalty (default: 1e-3)")
    p.add_argument("--ctx-len", type=int, default=64)
    p.add_argument("--n-ctxs", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--resample-steps", type=int, default=None)
    p.add_argument("--save-steps", type=int, default=100)
    p.add_argument("--eval-batches", type=int, default=20)
    p.add_argument("--eval-texts", type=int, default=128,
                   help="held-out texts for the loss-recovered metric (default: 128)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=demo)
