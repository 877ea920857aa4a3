"""The CUDA paths, on a CUDA device: the sparse kernels equal their CPU results, prefetching
(side-stream copies from pinned memory) trains what synchronous reading trains, and a
stopped run resumes to the run left alone. Without a device each test is SKIPPED (shown
as ``s``, with its reason under ``pytest -rs``), never passed: run them where a GPU is,
with ``scripts/device_check.sh``. Every test name holds ``cuda`` (``pytest -k cuda``).

On CUDA, ``index_add_`` and ``embedding_bag``'s backward accumulate with atomics, in no
fixed order: results are compared with float32 tolerances (rtol 1e-4, atol 1e-5), not bit
for bit."""

import pytest
import torch

from dictionary_learning import TrainerConfig, train_dictionaries
from dictionary_learning.base import LossContext

from conftest import planted_dictionary_data
from test_sparse import CLASSES, D, M  # the same small TopK-family dictionaries

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
TOL = dict(rtol=1e-4, atol=1e-5)


def loss_and_grads(ae, x, dead, autocast):
    x = x.detach().requires_grad_()
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast):
        out = ae.loss_terms(x, x, LossContext(dead=dead))
    sum(v.float() for v in out.terms.values()).backward()
    grads = {"x": x.grad, **{n: p.grad for n, p in ae.named_parameters()}}
    return {k: v.detach().float() for k, v in out.terms.items()}, grads, out.features


@needs_cuda
@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16_autocast"])
@pytest.mark.parametrize("name", sorted(CLASSES))
def test_cuda_sparse_loss_equals_cpu(name, autocast):
    torch.manual_seed(0)
    cpu = CLASSES[name]()
    with torch.no_grad():
        for p in cpu.parameters():
            p.add_(0.1 * torch.randn(p.shape))
    gpu = CLASSES[name]()
    gpu.load_state_dict(cpu.state_dict())
    gpu = gpu.cuda()
    x = torch.randn(48, D, generator=torch.Generator().manual_seed(7)) * 2
    dead = torch.zeros(M, dtype=torch.bool)
    dead[[3, 17, 40, 41, 60]] = True
    t_cpu, g_cpu, f_cpu = loss_and_grads(cpu, x, dead, autocast)
    t_gpu, g_gpu, f_gpu = loss_and_grads(gpu, x.cuda(), dead.cuda(), autocast)
    tol = TOL if not autocast else dict(rtol=3e-2, atol=3e-2)
    if not autocast:  # in bf16 the two devices may round a near-tie apart
        assert torch.equal(f_cpu != 0, f_gpu.cpu() != 0)
    for k in t_cpu:
        torch.testing.assert_close(t_gpu[k].cpu(), t_cpu[k], **tol, msg=k)
    for k in g_cpu:
        scale = float(g_cpu[k].abs().max()) or 1.0
        torch.testing.assert_close(g_gpu[k].cpu().float(), g_cpu[k].float(), rtol=tol["rtol"],
                                   atol=tol["atol"] * scale, msg=k)


class Positioned:
    """A resumable list source (its state: the next index)."""

    def __init__(self, batches):
        self.batches, self.pos, self.texts_seen = batches, 0, 0

    def __iter__(self):
        while self.pos < len(self.batches):
            self.pos = self.texts_seen = self.pos + 1
            yield self.batches[self.pos - 1]

    def state_dict(self):
        return {"pos": self.pos}

    def load_state_dict(self, state):
        self.pos = self.texts_seen = state["pos"]


def configs():
    return [TrainerConfig(16, 64, lr=3e-3, warmup_steps=3),
            TrainerConfig(16, 64, dict_class="AutoEncoderTopK", dict_kwargs={"k": 4},
                          warmup_steps=3, autocast_dtype="bfloat16")]


def assert_close_dicts(a, b):
    for da, db in zip(a, b):
        for key, value in da.state_dict().items():
            torch.testing.assert_close(value.cpu(), db.state_dict()[key].cpu(), **TOL, msg=key)


@needs_cuda
def test_cuda_prefetch_from_pinned_memory_trains_as_synchronous_reading():
    x, _ = planted_dictionary_data(d=16, m=32, n=12 * 64, seed=4)
    pinned = [b.pin_memory() for b in x.split(64)]
    stats = {}
    sync = train_dictionaries(Positioned(pinned), configs(), steps=12, device="cuda",
                              progress=False, prefetch=0)
    ahead = train_dictionaries(Positioned(pinned), configs(), steps=12, device="cuda",
                               progress=False, prefetch=2, stats=stats)
    assert stats["prefetch"] == 2 and 0 <= stats["data_wait_fraction"] <= 1
    assert_close_dicts(ahead, sync)


@needs_cuda
def test_cuda_buffer_prefetch_resumes_to_the_run_left_alone(failing_buffer, tmp_path):
    """A live buffer (store in pinned host memory, model on CPU) training on CUDA with
    prefetch; stopped by its text failing after a checkpoint, then resumed."""
    buffer = failing_buffer
    assert buffer()._store[0].is_pinned()  # a CPU store is pinned when CUDA is there
    cfg = [TrainerConfig(64, 256, dict_class="AutoEncoderTopK", dict_kwargs={"k": 8},
                         lr=3e-3, warmup_steps=4)]
    expected = train_dictionaries(buffer(), cfg, steps=24, device="cuda", progress=False)
    with pytest.raises(RuntimeError, match="killed"):
        train_dictionaries(buffer(fail_after=26), cfg, steps=24, device="cuda",
                           save_dir=tmp_path, save_steps=5, progress=False)
    resumed = train_dictionaries(buffer(), cfg, steps=24, device="cuda", save_dir=tmp_path,
                                 save_steps=5, progress=False, resume=True)
    assert_close_dicts(resumed, expected)
