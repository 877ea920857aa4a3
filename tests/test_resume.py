"""Resuming a run on a stream without a state of its own (batches from an iterator, which
the caller positions by ``texts_seen``): a run killed after a checkpoint, or stopped with
Ctrl-C, and then resumed, ends with exactly the dictionary of the same run left alone. The
real buffer, which saves and restores its state, is tested in ``test_exact_resume.py``."""

import os
import signal

import pytest
import torch

from dictionary_learning import TrainerConfig, load_dictionary, train_dictionaries
from dictionary_learning.training import TrainingInterrupted, checkpoint_texts_read

from conftest import planted_dictionary_data

STEPS = 12


@pytest.fixture(scope="module")
def batches():
    x, _ = planted_dictionary_data(d=16, m=32, n=STEPS * 64, seed=3)
    return list(x.split(64))


def configs():
    return [TrainerConfig(16, 64, lr=3e-3, warmup_steps=3, resample_steps=4, decay_start=6),
            TrainerConfig(16, 64, dict_class="AutoEncoderTopK", dict_kwargs={"k": 4},
                          warmup_steps=3, normalize_activations=True)]


class Stream:
    """Batches with a position, like a buffer's ``texts_seen``; can fail at a given batch."""

    def __init__(self, batches, start=0, fail_at=None, interrupt_at=None):
        self.batches, self.texts_seen = batches, start
        self.fail_at, self.interrupt_at = fail_at, interrupt_at

    def __iter__(self):
        for i in range(self.texts_seen, len(self.batches)):
            if i == self.fail_at:
                raise RuntimeError("killed")
            if i == self.interrupt_at:
                os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C while the batch is being made
            self.texts_seen = i + 1
            yield self.batches[i]


def assert_same_dictionaries(a, b):
    for da, db in zip(a, b):
        sa, sb = da.state_dict(), db.state_dict()
        assert sa.keys() == sb.keys()
        for key in sa:
            torch.testing.assert_close(sa[key], sb[key], rtol=0, atol=0, msg=key)


def reference(batches, tmp_path):
    return train_dictionaries(Stream(batches), configs(), steps=STEPS,
                              save_dir=tmp_path / "ref", progress=False)


def test_killed_run_resumes_to_the_same_dictionaries(batches, tmp_path):
    expected = reference(batches, tmp_path)
    run = tmp_path / "run"
    with pytest.raises(RuntimeError, match="killed"):
        train_dictionaries(Stream(batches, fail_at=7), configs(), steps=STEPS, save_dir=run,
                           save_steps=5, progress=False)
    # The checkpoint of step 5 loads on its own, and says how much text had been read.
    ckpt, _ = load_dictionary(run / "trainer_0" / "checkpoints" / "ae_5.pt")
    assert ckpt.dict_size == 64
    assert checkpoint_texts_read(run, n_trainers=2) == 5
    resumed = train_dictionaries(Stream(batches, start=5), configs(), steps=STEPS,
                                 save_dir=run, save_steps=5, progress=False, resume=True)
    assert_same_dictionaries(resumed, expected)
    final, config = load_dictionary(run / "trainer_1")
    assert config["run"]["finished"] and config["run"]["steps_done"] == STEPS
    assert_same_dictionaries([final], [expected[1]])
    # The metrics log has each logged step once: the lines after the checkpoint were dropped.
    steps = [int(line.split('"step": ')[1].split(",")[0])
             for line in (run / "trainer_0" / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == STEPS


def test_ctrl_c_writes_a_checkpoint_then_resumes(batches, tmp_path):
    expected = reference(batches, tmp_path)
    run = tmp_path / "run"
    with pytest.raises(TrainingInterrupted) as stopped:
        train_dictionaries(Stream(batches, interrupt_at=7), configs(), steps=STEPS,
                           save_dir=run, save_steps=100, progress=False)
    # Ctrl-C arrived while batch 7 was made: that step finished, then the checkpoint.
    assert stopped.value.step == 8
    assert (run / "trainer_0" / "checkpoints" / "trainer_state_8.pt").is_file()
    assert checkpoint_texts_read(run, n_trainers=2) == 8
    resumed = train_dictionaries(Stream(batches, start=8), configs(), steps=STEPS,
                                 save_dir=run, progress=False, resume=True)
    assert_same_dictionaries(resumed, expected)


def test_resume_without_checkpoint_is_a_clear_error(batches, tmp_path):
    with pytest.raises(ValueError, match="no checkpoint to resume from"):
        train_dictionaries(Stream(batches), configs(), steps=STEPS, save_dir=tmp_path,
                           progress=False, resume=True)


def test_a_checkpoint_resumes_only_at_its_own_learning_rate(caplog):
    """The TopK family's default learning rate (2e-3) is not the one an older checkpoint
    may have trained at: a run that leaves lr unset continues at the checkpoint's rate
    (with a warning), an explicit other rate is refused with the value to give, and a
    checkpoint that does not record its schedule continues, with a warning."""
    from dictionary_learning import trainer as trainer_module
    from dictionary_learning.trainer import Trainer

    topk = TrainerConfig(16, 64, dict_class="AutoEncoderTopK", dict_kwargs={"k": 4})
    state = Trainer(topk, total_steps=STEPS).state()
    assert state["schedule"]["lr"] == 2e-3 and state["schedule"]["decay_start"] == 10
    older = dict(state, schedule={**state["schedule"], "lr": 1e-3})
    trainer_module._warned.clear()
    with caplog.at_level("WARNING", logger="dictionary_learning.trainer"):
        adopted = Trainer(topk, total_steps=STEPS)
        adopted.load_state(older)
    assert "trained at lr=0.001 (this version's default is 0.002)" in caplog.text
    assert adopted.config.lr == 1e-3
    assert adopted.lr_at(0) == pytest.approx(1e-3) and adopted.lr_at(STEPS - 1) == \
        pytest.approx(1e-3 * (1 - (STEPS - 1 - 10) / (STEPS - 10)))
    explicit = TrainerConfig(16, 64, lr=2e-3, dict_class="AutoEncoderTopK",
                             dict_kwargs={"k": 4})
    with pytest.raises(ValueError, match=r"trained at lr=0\.001, not the lr=0\.002 given: "
                                         r"resume with lr=0\.001"):
        Trainer(explicit, total_steps=STEPS).load_state(older)
    Trainer(TrainerConfig(16, 64, lr=1e-3, dict_class="AutoEncoderTopK",
                          dict_kwargs={"k": 4}), total_steps=STEPS).load_state(older)
    # A checkpoint from before its class decayed keeps training without decay.
    undecayed = dict(state, schedule={**state["schedule"], "lr": 1e-3, "decay_start": None})
    trainer_module._warned.clear()
    with caplog.at_level("WARNING", logger="dictionary_learning.trainer"):
        kept = Trainer(topk, total_steps=STEPS)
        kept.load_state(undecayed)
    assert "trained with decay_start=None (this version's default gives 10)" in caplog.text
    assert kept.config.decay_start is None and kept.lr_at(STEPS - 1) == pytest.approx(1e-3)
    trainer_module._warned.clear()
    unrecorded = {k: v for k, v in state.items() if k != "schedule"}
    with caplog.at_level("WARNING", logger="dictionary_learning.trainer"):
        resumed = Trainer(topk, total_steps=STEPS)
        resumed.load_state(unrecorded)
    assert "does not record its schedule; it continues with lr=0.002, decay_start=10" \
        in caplog.text
    for key, tensor in state["dictionary"].items():
        assert torch.equal(resumed.dictionary.state_dict()[key], tensor), key
