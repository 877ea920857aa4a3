"""Exact resumes on the real stream: an ActivationBuffer over a tiny model, whose store is
refilled several times, saved with every checkpoint and restored, so that a run stopped at
any point and resumed ends with exactly (torch.equal) the weights of the run left alone."""

import itertools

import pytest
import torch

from dictionary_learning import TrainerConfig, train_dictionaries
from dictionary_learning.buffer import ActivationBuffer
from dictionary_learning.saving import checkpoint_steps, stream_state_steps

SUBMODULE = "gpt_neox.layers.1.mlp"
STEPS = 24
ARCHS = ["AutoEncoder", "AutoEncoderTopK", "BatchTopKSAE", "JumpReluAutoEncoder",
         "GatedAutoEncoder", "MatryoshkaBatchTopKSAE"]


def make_buffer(model, texts, pack, fail_after=None):
    """A small store (256 rows, batches of 48: a refill every ~3 batches) over ``texts``;
    the text stream raises after ``fail_after`` documents, like a kill during a refill."""
    def stream():
        for i, t in enumerate(texts):
            if i == fail_after:
                raise RuntimeError("killed")
            yield t
    return ActivationBuffer(stream(), model, SUBMODULE, n_ctxs=8, ctx_len=32,
                            refresh_batch_size=4, out_batch_size=48, pack=pack,
                            progress=False, seed=5)


def config(arch, d=64, m=256):
    kwargs = {"AutoEncoderTopK": {"k": 8}, "BatchTopKSAE": {
        "k": 8, "threshold_start_step": 6, "threshold_beta": 0.9},
        "MatryoshkaBatchTopKSAE": {"k": 8, "group_sizes": [64, 64, 128],
                                   "threshold_start_step": 6}}.get(arch, {})
    return TrainerConfig(d, m, dict_class=arch, dict_kwargs=kwargs, lr=3e-3, warmup_steps=4,
                         decay_start=12, dead_feature_tokens=200,
                         resample_steps=7 if arch == "AutoEncoder" else None,
                         normalize_activations=arch == "GatedAutoEncoder")


def states(dictionaries):
    return [d.state_dict() for d in dictionaries]


def assert_equal_states(a, b):
    for sa, sb in zip(a, b):
        assert sa.keys() == sb.keys()
        for key in sa:
            assert torch.equal(sa[key], sb[key]), key


def test_buffer_state_serves_exactly_the_remaining_batches(models, texts):
    for pack in (False, True):
        model = models["pythia"]
        original = make_buffer(model, texts[:120], pack)
        for _ in range(7):  # past two refills, mid-store
            next(original)
        state = original.state_dict()
        expected = list(original)
        restored = make_buffer(model, texts[:120], pack)
        restored.load_state_dict(state)
        served = list(restored)
        assert len(served) == len(expected) > 3
        for a, b in zip(served, expected):
            assert torch.equal(a, b)


def test_buffer_state_refuses_another_buffer(models, texts):
    state = make_buffer(models["pythia"], texts, pack=False).state_dict()
    with pytest.raises(ValueError, match="does not fit this buffer"):
        make_buffer(models["pythia"], texts, pack=True).load_state_dict(state)


CASES = [([a], pack) for a, pack in itertools.product(ARCHS, (False, True))] + \
        [(ARCHS, pack) for pack in (False, True)]


@pytest.mark.parametrize("archs, pack", CASES,
                         ids=[f"{'sweep' if len(a) > 1 else a[0]}-{'pack' if p else 'pad'}"
                              for a, p in CASES])
def test_stopped_run_resumes_bit_identical(models, texts, tmp_path, archs, pack):
    model, docs = models["pythia"], texts[:300]
    configs = [config(a) for a in archs]
    expected = states(train_dictionaries(make_buffer(model, docs, pack), configs, steps=STEPS,
                                         progress=False))
    run = tmp_path / "run"
    # The text fails during a refill (padded: at step 12; packed: at step 18), after a
    # checkpoint and with the packer holding carried-over tokens.
    with pytest.raises(RuntimeError, match="killed"):
        train_dictionaries(make_buffer(model, docs, pack, fail_after=12 if pack else 26),
                           configs, steps=STEPS, save_dir=run, save_steps=5, progress=False)
    folder = run if len(archs) == 1 else run / "trainer_0"
    done = max(checkpoint_steps(folder))
    assert 5 <= done < STEPS - 5
    assert stream_state_steps(run) == [done]  # only the latest stream state is kept
    resumed = train_dictionaries(make_buffer(model, docs, pack), configs, steps=STEPS,
                                 save_dir=run, save_steps=5, progress=False, resume=True)
    assert_equal_states(states(resumed), expected)
