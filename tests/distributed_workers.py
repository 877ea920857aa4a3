"""What each process of the distributed tests runs (spawned, so it must be importable).
Every worker joins a gloo group on localhost, trains, and leaves its results in files."""

from __future__ import annotations

import datetime
import json
import os
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist


def join(rank: int, world: int, port: int, timeout_s: float = 60) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout_s))


def configs():
    from dictionary_learning import TrainerConfig

    kw = dict(lr=3e-3, warmup_steps=4, dead_feature_tokens=300, seed=0)
    return [
        TrainerConfig(32, 128, dict_class="AutoEncoder", resample_steps=7,
                      normalize_activations=True, **kw),
        TrainerConfig(32, 128, dict_class="AutoEncoderTopK", dict_kwargs={"k": 4}, **kw),
        TrainerConfig(32, 128, dict_class="BatchTopKSAE",
                      dict_kwargs={"k": 4, "threshold_start_step": 5}, **kw),
        TrainerConfig(32, 128, dict_class="JumpReluAutoEncoder", sparsity_penalty=0.1,
                      dict_kwargs={"target_l0": 8}, **kw),
    ]


def global_batches(n_steps: int = 20, size: int = 64) -> list[torch.Tensor]:
    """Planted sparse data, with per-dimension offsets (so a mean matters)."""
    g = torch.Generator().manual_seed(0)
    D = torch.nn.functional.normalize(torch.randn(96, 32, generator=g), dim=-1)
    f = (torch.rand(n_steps * size, 96, generator=g) < 0.05) * torch.rand(n_steps * size, 96,
                                                                          generator=g)
    x = f @ D * 3 + torch.randn(32, generator=g)
    return list(x.split(size))


def data_parallel(rank: int, world: int, port: int, out: str) -> None:
    """Train the four dictionaries on this rank's half of each global batch."""
    from dictionary_learning import train_dictionaries

    join(rank, world, port)
    mine = [b.chunk(world)[rank] for b in global_batches()]
    trained = train_dictionaries(iter(mine), configs(), steps=20, save_dir=Path(out) / "run",
                                 log_steps=1, progress=False)
    torch.save([d.state_dict() for d in trained], Path(out) / f"rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


def dictionary_parallel(rank: int, world: int, port: int, out: str) -> None:
    """Each rank trains its two of the four dictionaries on the gathered global batches."""
    from dictionary_learning import train_dictionaries

    join(rank, world, port)
    mine = [b.chunk(world)[rank] for b in global_batches()]
    trained = train_dictionaries(iter(mine), configs(), steps=20, save_dir=Path(out) / "run",
                                 progress=False, shard_dictionaries=True)
    torch.save({i: d.state_dict() for i, d in enumerate(trained) if d is not None},
               Path(out) / f"rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


def cached_run(rank: int, world: int, port: int, cache: str, save_dir: str, die_at: int,
               resume: bool) -> None:
    """Train on this rank's shards of a cache; the source raises after ``die_at`` batches."""
    from dictionary_learning import train_dictionaries
    from dictionary_learning.cache import CachedActivations

    join(rank, world, port)
    source = CachedActivations(cache, 48, window=300, epochs=5, seed=1, rank=rank,
                               world_size=world, prefetch=False)

    class Dying:
        config = source.config
        state_dict, load_state_dict = source.state_dict, source.load_state_dict

        def __iter__(self):
            for i, batch in enumerate(source):
                if die_at and i == die_at:
                    raise RuntimeError("killed")
                yield batch

    cfgs = [c.__class__(**{**c.__dict__, "activation_dim": 64, "dict_size": 128})
            for c in configs()[1:3]]
    try:
        train_dictionaries(Dying(), cfgs, steps=20, save_dir=save_dir, save_steps=5,
                           progress=False, resume=resume)
    except RuntimeError as e:
        if "killed" not in str(e):
            raise
    dist.barrier()
    dist.destroy_process_group()


def dies_or_waits(rank: int, world: int, port: int, out: str) -> None:
    """Rank 1 exits abruptly at step 5; rank 0 records what it raised and when."""
    from dictionary_learning import train_dictionaries

    join(rank, world, port, timeout_s=30)
    batches = [b.chunk(world)[rank] for b in global_batches(40)]

    def stream():
        for i, b in enumerate(batches):
            if rank == 1 and i == 5:
                os._exit(3)
            yield b

    start = time.time()
    try:
        train_dictionaries(stream(), configs()[:1], steps=40, progress=False)
        outcome = {"error": None}
    except Exception as e:  # noqa: BLE001 - the test reads what it was
        outcome = {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()}
    outcome["seconds"] = time.time() - start
    Path(out, f"rank{rank}.json").write_text(json.dumps(outcome))


def cache_part(rank: int, world: int, port: int, model_dir: str, data: str, out: str) -> None:
    """This process's part of a cache (what `torchrun ... cache` runs)."""
    from dictionary_learning.cache.run import CacheRun, run_cache

    join(rank, world, port)
    run_cache(CacheRun(model=model_dir, data=data, submodule=("1.mlp",), ctx_len=32,
                       refresh_batch_size=1, skip_texts=5, shard_mb=0.1, out=out),
              progress=False, announce=lambda line: None)
    dist.barrier()
    dist.destroy_process_group()


def uneven(rank: int, world: int, port: int, out: str) -> None:
    """Rank 1's text runs out after 6 batches (the last one short), rank 0's after 10."""
    from dictionary_learning import train_dictionaries

    join(rank, world, port)
    mine = [b.chunk(world)[rank] for b in global_batches(10)]
    if rank == 1:
        mine = mine[:5] + [mine[5][:7]]
    train_dictionaries(iter(mine), configs()[:2], save_dir=Path(out) / "run", progress=False)
    dist.barrier()
    dist.destroy_process_group()


def layer_batches() -> list[dict]:
    """Batches as a buffer collecting two submodules serves them: ``{name: rows}``."""
    return [{"l0": b, "l1": b.flip(-1) * 2} for b in global_batches(12)]


def layer_configs():
    from dictionary_learning import TrainerConfig

    return [TrainerConfig(32, 64, submodule=name, lr=3e-3, warmup_steps=2, seed=i,
                          dict_class=cls, dict_kwargs={"k": 4} if "TopK" in cls else {})
            for i, (name, cls) in enumerate([("l0", "AutoEncoder"), ("l1", "AutoEncoder"),
                                              ("l0", "AutoEncoderTopK")])]


def dictionary_parallel_layers(rank: int, world: int, port: int, out: str) -> None:
    """One dictionary per layer, spread over the ranks, from dict batches."""
    from dictionary_learning import train_dictionaries

    join(rank, world, port)
    mine = [{k: v.chunk(world)[rank] for k, v in b.items()} for b in layer_batches()]
    trained = train_dictionaries(iter(mine), layer_configs(), steps=12, progress=False,
                                 shard_dictionaries=True)
    torch.save({i: d.state_dict() for i, d in enumerate(trained) if d is not None},
               Path(out) / f"rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()
