"""Reading activations ahead of training (``prefetch.py``) and the loop's options around it:
the batches served are the source's, in order, and no more than asked; a checkpoint's
stream state is the consumer's (a resumed run equals the one left alone, after a Ctrl-C
too); a source's error comes out at its batch or at the next checkpoint; the data-wait
fraction is measured; ``compile=True`` falls back to eager with a warning."""

import logging
import os
import signal
import threading
import time

import pytest
import torch

from dictionary_learning import TrainerConfig, train_dictionaries
from dictionary_learning.prefetch import Prefetcher
from dictionary_learning.training import TrainingInterrupted

from conftest import planted_dictionary_data

STEPS = 12


@pytest.fixture(scope="module")
def batches():
    x, _ = planted_dictionary_data(d=16, m=32, n=STEPS * 64, seed=4)
    return list(x.split(64))


class Positioned:
    """A resumable source over a list: its state is the index of the next batch. It can
    fail, send itself a Ctrl-C, or be slow, at given batches."""

    def __init__(self, batches, fail_at=None, interrupt_at=None, delay=0.0):
        self.batches, self.pos, self.texts_seen = batches, 0, 0
        self.fail_at, self.interrupt_at, self.delay = fail_at, interrupt_at, delay
        self.reader = None  # the thread that read the last batch

    def __iter__(self):
        while self.pos < len(self.batches):
            i = self.pos
            if i == self.fail_at:
                raise RuntimeError("killed")
            if i == self.interrupt_at:
                os.kill(os.getpid(), signal.SIGINT)
            time.sleep(self.delay)
            self.pos = self.texts_seen = i + 1
            self.reader = threading.current_thread()
            yield self.batches[i]

    def state_dict(self):
        return {"pos": self.pos}

    def load_state_dict(self, state):
        self.pos = self.texts_seen = state["pos"]


def configs():
    return [TrainerConfig(16, 64, lr=3e-3, warmup_steps=3, resample_steps=4, decay_start=6),
            TrainerConfig(16, 64, dict_class="AutoEncoderTopK", dict_kwargs={"k": 4},
                          warmup_steps=3, normalize_activations=True)]


def assert_same(a, b):
    for da, db in zip(a, b):
        sa, sb = da.state_dict(), db.state_dict()
        assert sa.keys() == sb.keys()
        for key in sa:
            assert torch.equal(sa[key], sb[key]), key


def no_prefetch_thread_left():
    return not any(t.name == "activation-prefetch" for t in threading.enumerate())


def test_prefetcher_serves_the_source_in_order_and_no_more_than_the_limit(batches):
    source = Positioned(batches)
    p = Prefetcher(source, torch.device("cpu"), depth=2, limit=5)
    served = []
    while (got := p.get()) is not None:
        served.append(got)
    p.close()
    assert len(served) == 5 and source.pos == 5  # the source was not read past the limit
    for i, (batch, texts) in enumerate(served):
        assert batch is batches[i] and texts == i + 1  # the position read with each batch
    assert source.reader is not threading.main_thread()  # read by the producer thread
    assert p.get() is None and no_prefetch_thread_left()


def test_prefetcher_state_is_the_consumers_and_restores_exactly(batches):
    source = Positioned(batches)
    p = Prefetcher(source, torch.device("cpu"), depth=3)
    first = [p.get()[0] for _ in range(4)]
    time.sleep(0.05)  # let the producer fill its queue
    state = p.state_dict()
    assert source.pos == 4 + len(state["ahead"]) and 1 <= len(state["ahead"]) <= 3
    rest = []
    while (got := p.get()) is not None:
        rest.append(got[0])
    p.close()
    again = Positioned(batches)
    again.load_state_dict(state["source"])
    q = Prefetcher(again, torch.device("cpu"), depth=3, ahead=state["ahead"])
    resumed = []
    while (got := q.get()) is not None:
        resumed.append(got[0])
    q.close()
    assert first + rest == batches
    assert len(resumed) == len(rest) and all(torch.equal(a, b) for a, b in zip(resumed, rest))


def test_a_source_error_surfaces_at_its_batch_or_at_the_checkpoint(batches):
    p = Prefetcher(Positioned(batches, fail_at=3), torch.device("cpu"), depth=2)
    assert [p.get()[1] for _ in range(3)] == [1, 2, 3]  # the batches before it are served
    with pytest.raises(RuntimeError, match="killed"):
        p.get()
    p.close()
    q = Prefetcher(Positioned(batches, fail_at=1), torch.device("cpu"), depth=2)
    q.get()
    time.sleep(0.05)  # the producer has met the failure while reading ahead
    with pytest.raises(RuntimeError, match="killed"):
        q.state_dict()  # a half-read source is not saved
    q.close()


@pytest.mark.parametrize("prefetch", [1, 3])
def test_prefetched_training_equals_synchronous_training(batches, prefetch):
    expected = train_dictionaries(Positioned(batches), configs(), steps=STEPS, progress=False,
                                  prefetch=0)
    stats = {}
    source = Positioned(batches)
    got = train_dictionaries(source, configs(), steps=STEPS - 2, progress=False,
                             prefetch=prefetch, stats=stats)
    assert source.pos == STEPS - 2  # nothing read past the last step
    rest = train_dictionaries(Positioned(batches), configs(), steps=STEPS, progress=False,
                              prefetch=prefetch)
    assert_same(rest, expected)
    assert stats["steps"] == STEPS - 2 and stats["prefetch"] == prefetch
    assert 0 <= stats["data_wait_s"] <= stats["wall_s"]
    assert stats["data_wait_fraction"] == stats["data_wait_s"] / stats["wall_s"]
    assert len(got) == 2 and no_prefetch_thread_left()


def test_default_prefetch_reads_ahead_only_for_resumable_sources_on_cuda(batches):
    from dictionary_learning.training import default_prefetch

    resumable, plain = {}, {}
    train_dictionaries(Positioned(batches), configs()[:1], steps=2, progress=False,
                       stats=resumable)
    train_dictionaries(iter(batches), configs()[:1], steps=2, progress=False, stats=plain)
    assert resumable["prefetch"] == 0 and plain["prefetch"] == 0  # on the CPU: none
    assert default_prefetch(torch.device("cuda", 0)) == 2 and default_prefetch("cpu") == 0
    with pytest.raises(ValueError, match="prefetch must be a non-negative integer"):
        train_dictionaries(iter(batches), configs()[:1], steps=2, progress=False, prefetch=-1)


@pytest.mark.parametrize("prefetch", [0, 2])
def test_data_wait_fraction_sees_a_slow_source(batches, prefetch):
    """A source that takes 0.1 s a batch: without prefetch the loop waits for every one of
    them; with it, at least for the first (a queue cannot make data faster than it is
    made). An instant source is waited for far less."""
    slow, fast = {}, {}
    train_dictionaries(Positioned(batches, delay=0.1), configs()[:1], steps=6, progress=False,
                       prefetch=prefetch, stats=slow)
    train_dictionaries(Positioned(batches), configs()[:1], steps=6, progress=False,
                       prefetch=prefetch, stats=fast)
    assert slow["data_wait_s"] >= (0.57 if prefetch == 0 else 0.095), slow
    assert slow["data_wait_s"] <= slow["wall_s"] and 0 < slow["data_wait_fraction"] <= 1
    assert fast["data_wait_s"] < slow["data_wait_s"] / 4, (fast, slow)


def test_ctrl_c_while_reading_ahead_checkpoints_the_consumers_state(batches, tmp_path):
    expected = train_dictionaries(Positioned(batches), configs(), steps=STEPS, progress=False,
                                  prefetch=0)
    run = tmp_path / "run"
    with pytest.raises(TrainingInterrupted) as stopped:
        train_dictionaries(Positioned(batches, interrupt_at=7), configs(), steps=STEPS,
                           save_dir=run, save_steps=100, progress=False, prefetch=2)
    step = stopped.value.step
    assert 1 <= step <= 8  # the Ctrl-C came while batch 7 was read, up to 2 ahead
    assert (run / "trainer_0" / "checkpoints" / f"trainer_state_{step}.pt").is_file()
    assert no_prefetch_thread_left()
    resumed = train_dictionaries(Positioned(batches), configs(), steps=STEPS, save_dir=run,
                                 progress=False, resume=True, prefetch=2)
    assert_same(resumed, expected)


def test_compile_falls_back_to_eager_with_a_warning(batches, monkeypatch, caplog):
    from torch._dynamo.exc import InternalTorchDynamoError

    expected = train_dictionaries(iter(batches), configs(), steps=4, progress=False)

    def broken_compile(fn, **kwargs):
        def run(*args, **kw):
            raise InternalTorchDynamoError("no compiler here")
        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    stats = {}
    with caplog.at_level(logging.WARNING, logger="dictionary_learning.compiling"):
        got = train_dictionaries(iter(batches), configs(), steps=4, progress=False,
                                 compile=True, stats=stats)
    assert_same(got, expected)  # the eager path, exactly
    assert stats["compiled"] == []
    warned = [r.getMessage() for r in caplog.records if "training it eagerly" in r.getMessage()]
    assert len(warned) == 2 and "no compiler here" in warned[0]  # once per dictionary
    assert all("loss_terms" not in vars(d) for d in got)  # the eager method is back


def test_compile_traces_the_sparse_loss_and_trains_the_same(batches, caplog):
    """The real torch.compile, through dynamo and AOT autograd (the ``aot_eager`` backend:
    inductor's C++ code generation takes minutes on these CPUs, ~100 s here for this
    test): the compiled losses train to the eager result within float32 reordering, or the
    run says it fell back."""
    cfg = [TrainerConfig(16, 64, dict_class="AutoEncoderTopK", dict_kwargs={"k": 4},
                         warmup_steps=2)]
    expected = train_dictionaries(iter(batches), cfg, steps=3, progress=False)
    stats = {}
    with caplog.at_level(logging.WARNING, logger="dictionary_learning.compiling"):
        got = train_dictionaries(iter(batches), cfg, steps=3, progress=False,
                                 compile="aot_eager", stats=stats)
    fell_back = any("training it eagerly" in r.getMessage() for r in caplog.records)
    assert (stats["compiled"] == []) == fell_back
    assert stats["compiled"] == [0], "torch.compile fell back on a loss it should trace"
    for key, value in expected[0].state_dict().items():
        torch.testing.assert_close(got[0].state_dict()[key], value, rtol=1e-4, atol=1e-5,
                                   msg=key)


def test_live_buffer_read_ahead_resumes_to_the_run_left_alone(failing_buffer, tmp_path):
    """The real ActivationBuffer on a tiny model, read ahead (prefetch 2, as on CUDA; the
    CPU default is 0): its text fails after a checkpoint, the resumed run ends equal to one
    left alone, which equals reading in turn."""
    buffer = failing_buffer

    cfg = [TrainerConfig(64, 256, dict_class="AutoEncoderTopK", dict_kwargs={"k": 8},
                         lr=3e-3, warmup_steps=4)]
    in_turn = train_dictionaries(buffer(), cfg, steps=24, progress=False, prefetch=0)
    alone = train_dictionaries(buffer(), cfg, steps=24, progress=False, prefetch=2)
    with pytest.raises(RuntimeError, match="killed"):
        train_dictionaries(buffer(fail_after=26), cfg, steps=24, save_dir=tmp_path,
                           save_steps=5, progress=False, prefetch=2)
    assert list(tmp_path.rglob("*.pt")), "no checkpoint was written before the failure"
    stats = {}
    resumed = train_dictionaries(buffer(), cfg, steps=24, save_dir=tmp_path, save_steps=5,
                                 progress=False, prefetch=2, resume=True, stats=stats)
    assert_same(alone, in_turn)
    assert_same(resumed, alone)
    assert 0 < stats["steps"] < 24 and stats["prefetch"] == 2  # it resumed, reading ahead
    assert no_prefetch_thread_left()
