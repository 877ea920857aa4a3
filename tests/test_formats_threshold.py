"""Batch-top-k dictionaries (BatchTopK, Matryoshka) are never saved with an unestimated
threshold when they have been trained: a run shorter than ``threshold_start_step`` (a short
run through the Python API, whose default is 1000) is saved with the estimate of the steps
it trained, ``config.json`` says so, and the file encodes, with our loader and with
upstream's formula ``post * (post > threshold)`` read off the raw ``ae.pt``, as the trained
dictionary does in memory, with a mean L0 near the k it was trained for."""

import json
import logging
import types

import pytest
import torch

from dictionary_learning.architectures.batch_topk import EARLY_THRESHOLD_BETA
from dictionary_learning.distributed import LOCAL
from dictionary_learning.loading import load_dictionary, read_state_dict
from dictionary_learning.registry import DICTIONARY_CLASSES
from dictionary_learning.training import TrainerConfig, train_dictionaries

D, M, K, B, STEPS = 16, 64, 4, 128, 30
KWARGS = {"BatchTopKSAE": {"k": K},
          "MatryoshkaBatchTopKSAE": {"k": K, "group_sizes": [16, 16, 32]}}


def batches(n, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    basis = torch.randn(M, D, generator=g)
    for _ in range(n):
        codes = torch.rand(B, M, generator=g) * (torch.rand(B, M, generator=g) < 0.08)
        yield scale * (codes @ basis + 0.05 * torch.randn(B, D, generator=g))


def upstream_encode(sd, x):
    """upstream's BatchTopKSAE / MatryoshkaBatchTopKSAE.encode from the raw state_dict."""
    if "W_enc" in sd:
        post = torch.relu((x - sd["b_dec"]) @ sd["W_enc"] + sd["b_enc"])
    else:
        post = torch.relu((x - sd["b_dec"]) @ sd["encoder.weight"].T + sd["encoder.bias"])
    return post * (post > sd["threshold"])


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("name", sorted(KWARGS))
def test_a_short_run_saves_its_estimated_threshold(tmp_path, name, normalize):
    # threshold_start_step given: left unset, the trainer would scale it to the short run
    config = TrainerConfig(D, M, dict_class=name, lr=3e-3, warmup_steps=5,
                           dict_kwargs={**KWARGS[name], "threshold_start_step": 1000},
                           normalize_activations=normalize)
    assert DICTIONARY_CLASSES[name](D, M, **KWARGS[name]).threshold_start_step == 1000
    # activations far from unit norm, so normalisation's folding is not vacuous
    (trained,) = train_dictionaries(batches(STEPS, scale=3.0), [config], steps=STEPS,
                                    save_dir=tmp_path, save_steps=[10], progress=False)
    assert float(trained.threshold) == -1.0  # the running average has not started...
    assert float(trained.early_threshold) > 0  # ...but the run's estimate exists
    note = json.loads((tmp_path / "config.json").read_text())["run"]["inference"]
    assert note["rule"] == "threshold" and f"the {STEPS} steps trained" in note["estimated_from"]
    sd = read_state_dict(tmp_path)
    assert set(sd) == set(trained.state_dict())  # the published keys, nothing added
    torch.testing.assert_close(sd["threshold"], trained.early_threshold)
    assert float(sd["threshold"]) == pytest.approx(note["threshold"])
    x = torch.cat(list(batches(4, seed=9, scale=3.0)))
    loaded, _ = load_dictionary(tmp_path)
    with torch.no_grad():
        f_memory, f_loaded, f_upstream = trained.encode(x), loaded.encode(x), upstream_encode(sd, x)
    torch.testing.assert_close(f_loaded, f_memory)
    torch.testing.assert_close(f_upstream, f_memory)
    l0 = float((f_loaded > 0).sum(-1).float().mean())
    assert K / 2 <= l0 <= 2 * K, l0  # as trained (top k*B of each batch), not every positive
    everything = float((upstream_encode({**sd, "threshold": torch.tensor(-1.0)}, x) > 0)
                       .sum(-1).float().mean())
    assert everything > 3 * l0  # what the unestimated -1 would have given upstream
    # the checkpoint too, and the trainer state keeps -1 so a resumed run goes on exactly
    ckpt = read_state_dict(tmp_path / "checkpoints" / "ae_10.pt")
    assert float(ckpt["threshold"]) > 0
    state = torch.load(tmp_path / "checkpoints" / "trainer_state_10.pt", weights_only=True)
    assert float(state["dictionary"]["threshold"]) == -1.0
    assert float(state["dictionary_counters"]["early_threshold"]) > 0


def test_the_early_estimate_is_a_running_average_of_batch_minima():
    ae = DICTIONARY_CLASSES["BatchTopKSAE"](D, M, k=K, threshold_start_step=3,
                                             threshold_beta=0.5)
    minima = [0.4, 0.2, 0.8, 0.6, 1.0]
    for value in minima:
        features = torch.zeros(2, M)
        features[0, :3] = torch.tensor([value, value + 1, value + 2])
        ae.apply_constraints(types.SimpleNamespace(features=features, batch=LOCAL))
    b = EARLY_THRESHOLD_BETA
    early = (0.4 * b + 0.2 * (1 - b)) * b + 0.8 * (1 - b)  # the first 3 steps
    assert float(ae.early_threshold) == pytest.approx(early)
    assert float(ae.threshold) == pytest.approx(0.6 * 0.5 + 1.0 * 0.5)  # then the main one
    ae.scale_biases(2.0)
    assert float(ae.early_threshold) == pytest.approx(2 * early)


def test_an_untrained_dictionary_says_it_encodes_per_token_top_k(tmp_path):
    config = TrainerConfig(D, M, dict_class="BatchTopKSAE", dict_kwargs={"k": K})
    (ae,) = train_dictionaries(iter([]), [config], steps=5, save_dir=tmp_path, progress=False)
    note = json.loads((tmp_path / "config.json").read_text())["run"]["inference"]
    assert note["rule"] == "per-token top-k" and note["k"] == K
    assert float(read_state_dict(tmp_path)["threshold"]) == -1.0
    loaded, _ = load_dictionary(tmp_path)
    x = torch.randn(10, D)
    assert ((loaded.encode(x) > 0).sum(-1) <= K).all()


def test_an_upstream_folder_with_an_unestimated_threshold_warns(tmp_path, caplog):
    ae = DICTIONARY_CLASSES["BatchTopKSAE"](D, M, k=K)
    torch.save(ae.state_dict(), tmp_path / "ae.pt")
    (tmp_path / "config.json").write_text(json.dumps(
        {"trainer": {"dict_class": "BatchTopKSAE", "trainer_class": "BatchTopKTrainer",
                     "k": K, "activation_dim": D, "dict_size": M}}))
    with caplog.at_level(logging.WARNING):
        loaded, _ = load_dictionary(tmp_path)
    assert "threshold = -1" in caplog.text and "top k" in caplog.text
    assert ((loaded.encode(torch.randn(10, D)) > 0).sum(-1) <= K).all()
