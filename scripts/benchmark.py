"""Measure the toolkit against its limits, in one run: buffer vs a plain forward hook,
training step vs the matmul rate, TopK vs ReLU step, the non-finite guard vs the step,
end to end with peak memory, sweeps, and the activation cache (writing vs the buffer,
reading vs the buffer and a memory copy, training from it vs from memory, disk per token).

    python scripts/benchmark.py                   # Pythia-70m-shaped random model, CPU
    python scripts/benchmark.py --quick           # small sizes, a smoke test
    python scripts/benchmark.py --device cuda --json out.json  # + the throughput section
    python scripts/benchmark.py --quick --sections throughput   # its code path, CPU sizes
    python scripts/benchmark.py --sections guard --json /tmp/guard.json
    python scripts/benchmark.py --sections cache --cache-texts 512   # a larger cache
    python scripts/benchmark.py --distributed    # data parallel: 2 gloo processes vs one

Prints a table and writes the full results as JSON (medians over alternating repeats) to
runs/benchmark.json unless --json says where (never into the checkout by default).
"""

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout too

from dictionary_learning.measure.benchmark import (EXTRA_SECTIONS, SECTIONS, Workload,  # noqa: E402
                                                   format_table, run_all)

QUICK = dict(d_model=64, n_layers=2, n_heads=4, d_mlp=256, vocab_size=8192, dict_size=512,
             train_batch=512, refresh_batch_size=16, n_texts=64, repeats=1, train_steps=2,
             cache_texts=32, cache_shard_rows=512, throughput_plan="small")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for field in dataclasses.fields(Workload):
        flag = "--" + field.name.replace("_", "-")
        kind = type(field.default)
        parser.add_argument(flag, type=(lambda v: v.lower() in ("1", "true", "yes"))
                            if kind is bool else kind, default=None,
                            help=f"default: {field.default}")
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke test")
    parser.add_argument("--sections", default=None,
                        help=f"comma-separated subset of: {','.join(SECTIONS + EXTRA_SECTIONS)} "
                        f"(default: {','.join(SECTIONS)}, and throughput with --device cuda)")
    parser.add_argument("--json", default="runs/benchmark.json",
                        help="where to write results (default: %(default)s)")
    parser.add_argument("--distributed", action="store_true",
                        help="instead: the data-parallel step on --world processes vs one "
                        "(scaling, the all-reduce's share of a step)")
    parser.add_argument("--world", type=int, default=2, help="processes for --distributed")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    if args.distributed:
        return distributed(args)
    values = dict(QUICK) if args.quick else {}
    values.update({f.name: getattr(args, f.name) for f in dataclasses.fields(Workload)
                   if getattr(args, f.name) is not None})
    workload = Workload(**values)
    sections = (args.sections.split(",") if args.sections else
                list(SECTIONS) + (list(EXTRA_SECTIONS) if workload.device.startswith("cuda")
                                  else []))
    results = run_all(workload, sections=tuple(sections))
    Path(args.json).write_text(json.dumps(results, indent=2))
    print(format_table(results))
    print(f"\nfull results: {args.json}")
    return 0


def distributed(args) -> int:
    from dictionary_learning.measure.distributed_benchmark import (distributed_benchmark,
                                                                   format_distributed)

    device = args.device or "cpu"
    results = []
    for arch in ("AutoEncoder", "AutoEncoderTopK"):
        sizes = dict(d=64, m=512, batch=512, steps=3) if args.quick else dict(
            d=args.d_model or 512, m=args.dict_size or 4096, batch=args.train_batch or 2048)
        results.append(distributed_benchmark(world=args.world, arch=arch, device=device,
                                             **sizes))
        print(format_distributed(results[-1]))
    Path(args.json).write_text(json.dumps(results, indent=2))
    print(f"\nfull results: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
