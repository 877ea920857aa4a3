"""Training on several processes with torch.distributed: what a step needs across ranks.

Data parallel training splits every global batch of ``B`` rows over the ranks (each reads a
disjoint share of the text, or of a cache's shards) and must compute the step one process
would compute on all ``B`` rows. Everything that depends on the whole batch goes through a
:class:`Batch`:

- gradients: each rank's gradient of its own mean loss, weighted by its row count, summed
  over ranks and divided by ``B`` (one flat all-reduce per step, with the finiteness check
  riding along, so every rank skips or applies the same steps);
- whole-batch statistics inside a loss (BatchTopK's top ``k * B``, JumpReLU's mean L0,
  AuxK's residual variance, a threshold's batch minimum): :meth:`Batch.mean` gives the
  global value with the local gradient, :meth:`Batch.gather` all rows;
- dead-feature counts (a feature fired on any rank), normalisation, the first batch's
  geometric median and resampling's draws (on the gathered batch, the same on every rank).

With one process :data:`LOCAL` is used: every operation is the identity and no collective
runs, so the single-process path is the same code. Only rank 0 writes folders, logs and
progress bars.

This module imports nothing from the package: every layer may use it.
"""

from __future__ import annotations

import datetime
import logging
import os

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 60


class PeerLostError(RuntimeError):
    """A collective failed: another process of the run died, stopped or timed out."""


def _collective(collective, *args, **kwargs):
    """``collective(*args)`` (a torch.distributed call), its failure one clear error."""
    try:
        return collective(*args, **kwargs)
    except RuntimeError as e:  # gloo/NCCL report a lost peer or a timeout as RuntimeError
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise PeerLostError(
            f"rank {dist.get_rank()}: another process of the distributed run stopped or "
            f"did not answer within the timeout ({first}); see that process's error "
            "above") from e


class Batch:
    """Reductions over the global batch. This base class is one process: the identity."""

    rank, world_size = 0, 1

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def max(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def min(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def mean(self, local_mean: torch.Tensor, n: int) -> torch.Tensor:
        """The mean over the global batch of a per-row mean over this rank's ``n`` rows;
        its gradient is the local one (the weighted gradient sum makes it global)."""
        return local_mean

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """Every rank's rows of ``x`` concatenated in rank order (sizes may differ)."""
        return x

    def all_true(self, flag: bool) -> bool:
        return flag


LOCAL = Batch()


class DistributedBatch(Batch):
    """The reductions of the default process group (``torch.distributed`` initialised)."""

    def __init__(self):
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        # NCCL reduces CUDA tensors only, gloo CPU ones (or either): reduce where it can.
        self.device = (torch.device("cuda", torch.cuda.current_device())
                       if dist.get_backend() == "nccl" else torch.device("cpu"))

    def _reduce(self, t: torch.Tensor, op) -> torch.Tensor:
        out = t.detach().to(self.device, copy=True)
        _collective(dist.all_reduce, out, op=op)
        return out.to(t.device)

    def sum(self, t):
        return self._reduce(t, dist.ReduceOp.SUM)

    def max(self, t):
        return self._reduce(t, dist.ReduceOp.MAX)

    def min(self, t):
        return self._reduce(t, dist.ReduceOp.MIN)

    def mean(self, local_mean, n):
        both = torch.stack([local_mean.detach().float() * n,
                            torch.tensor(float(n), device=local_mean.device)])
        total = self.sum(both)
        value = (total[0] / total[1]).to(local_mean.dtype)
        return local_mean + (value - local_mean).detach()

    def gather(self, x):
        sizes = [torch.zeros((), dtype=torch.long, device=x.device)
                 for _ in range(self.world_size)]
        _collective(dist.all_gather, sizes, torch.tensor(x.shape[0], device=x.device))
        most = int(max(sizes))
        padded = x.new_zeros((most, *x.shape[1:]))
        padded[:x.shape[0]] = x
        parts = [torch.empty_like(padded) for _ in range(self.world_size)]
        _collective(dist.all_gather, parts, padded.contiguous())
        return torch.cat([p[:int(n)] for p, n in zip(parts, sizes)])

    def all_true(self, flag):
        return bool(self.min(torch.tensor(int(flag))))


def current_batch() -> Batch:
    """:data:`LOCAL`, or the process group's reductions when torch.distributed runs with
    more than one rank."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return DistributedBatch()
    return LOCAL


def rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    return rank_and_world()[0] == 0


def init_from_environment(device: str = "cpu", timeout_s: float = DEFAULT_TIMEOUT_S) -> bool:
    """Join the process group torchrun describes (``WORLD_SIZE`` > 1 in the environment),
    once; returns whether this process is one of several. The backend is NCCL for CUDA
    devices and gloo otherwise; a collective that waits longer than ``timeout_s`` (a rank
    died) fails instead of hanging."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if not dist.is_initialized():
        backend = "nccl" if str(device).startswith("cuda") else "gloo"
        kwargs = {}
        if backend == "nccl":
            local = int(os.environ.get("LOCAL_RANK", "0"))
            torch.cuda.set_device(local)
            kwargs["device_id"] = torch.device("cuda", local)
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s),
                                **kwargs)
        logger.info("rank %d of %d (%s)", dist.get_rank(), dist.get_world_size(), backend)
    return dist.get_world_size() > 1


def barrier() -> None:
    """Wait for every process (nothing to wait for in one)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        _collective(dist.barrier)


def rank_device(device: str) -> str:
    """``cuda`` means this rank's GPU (``LOCAL_RANK``) under torchrun."""
    if device == "cuda" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
    return device


def reduce_gradients(params: list[torch.nn.Parameter], n_local: int, checks: torch.Tensor,
                     batch: Batch) -> tuple[int, torch.Tensor]:
    """Make every parameter's ``.grad`` the gradient of the global batch's mean loss; returns
    the global row count and ``checks`` summed over ranks. One flat all-reduce carries the
    gradients (weighted by ``n_local``), the row count and the checks."""
    if batch.world_size == 1:
        return n_local, checks
    grads = [p.grad for p in params if p.grad is not None]
    flat = torch.cat([*(g.reshape(-1).float() * n_local for g in grads),
                      checks.float().reshape(-1),
                      torch.tensor([float(n_local)], device=checks.device)])
    _collective(dist.all_reduce, flat)
    n_global = int(flat[-1])
    offset = 0
    for g in grads:
        g.copy_((flat[offset:offset + g.numel()] / n_global).view_as(g))
        offset += g.numel()
    return n_global, flat[offset:offset + checks.numel()].view_as(checks)
