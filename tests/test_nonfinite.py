"""A batch that is not finite never poisons a run: for every trainable class, a NaN, inf or
huge value injected at one step is skipped (the run equals the same run on the stream
without that batch), or stops the run cleanly; nothing non-finite is ever written."""

import json
import math

import pytest
import torch

from dictionary_learning import TrainerConfig, load_dictionary, train_dictionaries
from dictionary_learning.registry import DICTIONARY_CLASSES
from dictionary_learning.saving import CheckpointWriter, checkpoint_steps, read_trainer_state
from dictionary_learning.trainer import NonFiniteError, Trainer

from conftest import dictionary_kwargs, planted_dictionary_data

TRAINABLE = [n for n, c in DICTIONARY_CLASSES.items()
             if n != "IdentityDict" and not getattr(c, "inference_only", False)]
STEPS, BAD_STEP, D, M = 10, 6, 16, 64


@pytest.fixture(scope="module")
def batches():
    x, _ = planted_dictionary_data(d=D, m=32, n=STEPS * 32, seed=7)
    return list(x.split(32))


def config(name, **overrides):
    # Constant schedules (no warm-up or decay): a skipped step changes nothing but itself.
    kwargs = dictionary_kwargs(name, M)
    if name in ("BatchTopKSAE", "MatryoshkaBatchTopKSAE"):
        kwargs["threshold_start_step"] = 2
    return TrainerConfig(D, M, dict_class=name, dict_kwargs=kwargs, lr=3e-3, warmup_steps=0,
                         output_dim=D if name == "MLPStretcher" else None, **overrides)


def poisoned(batches, value, at=BAD_STEP):
    bad = [b.clone() for b in batches]
    bad[at][3, 5] = value
    return bad


def strict_json_lines(path):
    def refuse(constant):
        raise AssertionError(f"{path} holds {constant}, which is not JSON")
    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]


def assert_all_written_files_finite(folder):
    for step in checkpoint_steps(folder):
        load_dictionary(folder / "checkpoints" / f"ae_{step}.pt")  # refuses non-finite
        state = read_trainer_state(folder, step)["dictionary"]
        assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
    load_dictionary(folder)


@pytest.mark.parametrize("name", TRAINABLE)
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, 1e30])
def test_bad_batch_is_skipped_and_changes_only_its_step(batches, name, value):
    skipped, = train_dictionaries(poisoned(batches, value), [config(name)], steps=STEPS,
                                  progress=False)
    without, = train_dictionaries(batches[:BAD_STEP] + batches[BAD_STEP + 1:],
                                  [config(name)], steps=STEPS - 1, progress=False)
    for key, tensor in without.state_dict().items():
        assert torch.equal(skipped.state_dict()[key], tensor), key


@pytest.mark.parametrize("name", TRAINABLE)
def test_a_skipped_step_is_logged_and_every_file_is_finite(batches, tmp_path, name):
    run = tmp_path / "run"
    train_dictionaries(poisoned(batches, math.inf), [config(name)], steps=STEPS,
                       save_dir=run, save_steps=4, log_steps=1, progress=False)
    assert_all_written_files_finite(run)
    _, saved = load_dictionary(run)
    assert saved["run"]["skipped_steps"] == 1 and saved["run"]["steps_done"] == STEPS
    logged = strict_json_lines(run / "metrics.jsonl")
    assert [e["step"] for e in logged if "skipped" in e] == [BAD_STEP + 1]
    assert logged[-1]["skipped_steps"] == 1


@pytest.mark.parametrize("normalize", [False, True])
def test_bad_first_batch_waits_for_a_finite_one(batches, normalize):
    """The data-dependent initialisation (and the normalisation scale) is taken from the
    first finite batch; a first batch scaled by 1e20 overflows the norm and is skipped."""
    bad = [batches[0] * 1e20] + batches[1:]
    skipped, = train_dictionaries(bad, [config("AutoEncoderTopK",
                                               normalize_activations=normalize)],
                                  steps=STEPS, progress=False)
    without, = train_dictionaries(batches[1:], [config("AutoEncoderTopK",
                                                       normalize_activations=normalize)],
                                  steps=STEPS - 1, progress=False)
    for key, tensor in without.state_dict().items():
        assert torch.equal(skipped.state_dict()[key], tensor), key


def test_stop_policy_stops_cleanly_at_the_bad_step(batches, tmp_path):
    run = tmp_path / "run"
    with pytest.raises(NonFiniteError, match=rf"step {BAD_STEP}, trainer 0 \(AutoEncoder\): "
                       r"the (input|loss) was not finite.*last complete checkpoint \(step 4\)"):
        train_dictionaries(poisoned(batches, math.nan), [config("AutoEncoder")], steps=STEPS,
                           save_dir=run, save_steps=4, progress=False, on_nonfinite="stop")
    assert checkpoint_steps(run) == [4] and not (run / "ae.pt").exists()
    load_dictionary(run / "checkpoints" / "ae_4.pt")
    # The run resumes from that checkpoint once the data is mended.
    train_dictionaries(batches, [config("AutoEncoder")], steps=STEPS, save_dir=run,
                       resume=True, progress=False)
    load_dictionary(run)


def test_too_many_skips_in_a_row_stop_the_run(batches):
    bad = [torch.full_like(b, math.nan) for b in batches]
    with pytest.raises(NonFiniteError, match=r"not finite in 4 steps in a row \(more than "
                       r"max_skips=3\)"):
        train_dictionaries(bad, [config("AutoEncoder")], steps=STEPS, progress=False,
                           max_skips=3)


def test_a_sweep_skips_per_dictionary(batches):
    """In a sweep over two submodules, only the dictionary whose batch is bad skips its
    step; the other trains on every batch."""
    bad = poisoned(batches, math.nan)
    stream = [{"a": good, "b": b} for good, b in zip(batches, bad)]
    configs = [config("AutoEncoder", submodule="a"), config("AutoEncoder", submodule="b")]
    on_a, on_b = train_dictionaries(stream, configs, steps=STEPS, progress=False)
    alone_a, = train_dictionaries(batches, [config("AutoEncoder")], steps=STEPS,
                                  progress=False)
    without_b, = train_dictionaries(batches[:BAD_STEP] + batches[BAD_STEP + 1:],
                                    [config("AutoEncoder")], steps=STEPS - 1, progress=False)
    for trained, reference in ((on_a, alone_a), (on_b, without_b)):
        for key, tensor in reference.state_dict().items():
            assert torch.equal(trained.state_dict()[key], tensor), key


def test_writer_refuses_a_non_finite_dictionary(tmp_path):
    trainer = Trainer(config("AutoEncoder"))
    writer = CheckpointWriter(tmp_path, trainer, {}, {}, steps=STEPS)
    with torch.no_grad():
        trainer.dictionary.encoder.weight[0, 0] = math.nan
    with pytest.raises(NonFiniteError, match="encoder.weight is not finite; not written"):
        writer.checkpoint(3, 96)
    with pytest.raises(NonFiniteError):
        writer.finish(3, 96, buffer_config={})
    assert checkpoint_steps(tmp_path) == [] and not (tmp_path / "ae.pt").exists()
