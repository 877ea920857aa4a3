"""What data-parallel training costs: the communication share of a step, and the scaling.

``python scripts/benchmark.py --distributed`` runs, in one go, the same dictionary step
(``Trainer.step``: forward, backward, one flat all-reduce of the gradients, Adam) on the
same global batch of ``B`` rows

- in one process on all ``B`` rows (with every thread of the machine), and
- in ``world`` processes (torch.multiprocessing, gloo on CPU; NCCL on CUDA devices) on
  ``B / world`` rows each,

and reports the medians: step times, tokens/s, the scaling (one-process time over
``world``-process time, ideal ``world``), and the share of a distributed step spent in its
all-reduce (measured as an all-reduce of the gradients' size on its own).
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import statistics
import tempfile
import time
from pathlib import Path

import torch


def _config(d: int, m: int, arch: str):
    from ..trainer import TrainerConfig

    return TrainerConfig(d, m, dict_class=arch, dict_kwargs={"k": 32} if "TopK" in arch else {},
                         lr=1e-3, warmup_steps=1, seed=0)


def _time_steps(trainer, x, steps: int) -> list[float]:
    times = []
    for i in range(steps):
        start = time.perf_counter()
        trainer.step(i, x, x)
        if x.is_cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times[1:]  # the first step starts the dictionary


def _worker(rank: int, world: int, port: int, d: int, m: int, batch: int, steps: int,
            arch: str, device: str, threads: int, out: str) -> None:
    import torch.distributed as dist

    from ..trainer import Trainer

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(threads)
    cuda = device == "cuda"
    if cuda:
        torch.cuda.set_device(rank)
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    dev = torch.device("cuda", rank) if cuda else torch.device("cpu")
    x = torch.randn(batch // world, d, generator=torch.Generator().manual_seed(rank)).to(dev)
    trainer = Trainer(_config(d, m, arch), dev, total_steps=steps)
    step_times = _time_steps(trainer, x, steps)
    grads = torch.zeros(sum(p.numel() for p in trainer.dictionary.parameters()), device=dev)
    comm = []
    for _ in range(steps):
        dist.barrier()
        start = time.perf_counter()
        dist.all_reduce(grads)
        if cuda:
            torch.cuda.synchronize()
        comm.append(time.perf_counter() - start)
    if rank == 0:
        Path(out).write_text(json.dumps({"step": step_times, "allreduce": comm[1:]}))
    dist.barrier()  # no process leaves while another still talks to it
    dist.destroy_process_group()
    # Everything is written; leave without the interpreter's teardown, where gloo's
    # threads were once seen to abort the process (SIGABRT, "terminate called without an
    # active exception") after the figures had been written.
    os._exit(0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def distributed_benchmark(world: int = 2, d: int = 512, m: int = 4096, batch: int = 2048,
                          steps: int = 8, arch: str = "AutoEncoder", device: str = "cpu"
                          ) -> dict:
    """The figures above, as a dict (times in seconds, medians over ``steps - 1`` steps)."""
    import torch.multiprocessing as mp

    from ..trainer import Trainer

    if batch % world:
        raise ValueError(f"batch {batch} does not split over {world} processes")
    threads = max(1, torch.get_num_threads())
    dev = torch.device("cuda" if device == "cuda" else "cpu")
    x = torch.randn(batch, d, generator=torch.Generator().manual_seed(0)).to(dev)
    single = statistics.median(_time_steps(Trainer(_config(d, m, arch), dev, steps), x, steps))
    per_process_threads = max(1, threads // world) if device == "cpu" else threads
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rank0.json"
        mp.start_processes(_worker, args=(world, _free_port(), d, m, batch, steps, arch,
                                          device, per_process_threads, str(out)),
                           nprocs=world, start_method="spawn")
        measured = json.loads(out.read_text())
    step = statistics.median(measured["step"])
    comm = statistics.median(measured["allreduce"])
    return {
        "world": world, "device": device, "arch": arch, "d": d, "m": m, "batch": batch,
        "threads_one_process": threads, "threads_per_process": per_process_threads,
        "step_one_process_s": single, "step_distributed_s": step,
        "tokens_per_s_one_process": batch / single, "tokens_per_s_distributed": batch / step,
        "scaling": single / step, "allreduce_s": comm, "communication_share": comm / step,
        "gradient_mb": 4 * (2 * d * m + d + m) / 2**20,
    }


def format_distributed(r: dict) -> str:
    return "\n".join([
        f"distributed ({r['world']} {r['device']} processes, {r['arch']} {r['d']} -> "
        f"{r['m']}, global batch {r['batch']}, gradients {r['gradient_mb']:.1f} MiB):",
        f"  one process ({r['threads_one_process']} threads): step "
        f"{1e3 * r['step_one_process_s']:.1f} ms, {r['tokens_per_s_one_process']:,.0f} tok/s",
        f"  {r['world']} processes ({r['threads_per_process']} thread(s) each): step "
        f"{1e3 * r['step_distributed_s']:.1f} ms, {r['tokens_per_s_distributed']:,.0f} tok/s",
        f"  scaling {r['scaling']:.2f}x (ideal {r['world']}x); all-reduce "
        f"{1e3 * r['allreduce_s']:.1f} ms = {100 * r['communication_share']:.1f}% of a step",
    ])
