"""Upstream (saprmarks/dictionary_learning) folders load as upstream's ``load_dictionary``
loads them: files written here from the documented keys, compared with upstream's formulas
written below (``tests/crosscheck_formats.py`` compares with upstream's code itself).

- ``AutoEncoder.from_pretrained`` normalises a decoder whose columns are not unit norm
  (``StandardTrainerAprilUpdate`` leaves them free), multiplying each feature's encoder row
  and bias by its column norm: the features scale, the reconstruction does not change.
- ``StandardTrainer(dict_class=AutoEncoderNew)`` writes ``"dict_class": "AutoEncoder"``
  beside ``AutoEncoderNew`` keys: the keys decide, with a warning.
"""

import json
import logging

import pytest
import torch

from dictionary_learning.loading import load_dictionary

D, M = 16, 40
TOL = {"rtol": 1e-5, "atol": 1e-5}


def upstream_folder(folder, state_dict, dict_class, trainer_class):
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(state_dict, folder / "ae.pt")
    (folder / "config.json").write_text(json.dumps({
        "trainer": {"dict_class": dict_class, "trainer_class": trainer_class,
                    "activation_dim": D, "dict_size": M, "lr": 1e-3, "l1_penalty": 0.1,
                    "layer": 3, "lm_name": "EleutherAI/pythia-70m-deduped"},
        "buffer": {"d_submodule": D, "io": "out", "ctx_len": 128}}))
    return folder


def april_update_weights(seed=0):
    g = torch.Generator().manual_seed(seed)
    decoder = torch.randn(D, M, generator=g)
    decoder *= (torch.rand(M, generator=g) * 0.3 + 0.05) / decoder.norm(dim=0)  # norms ~0.1
    return {"bias": torch.randn(D, generator=g), "encoder.weight": torch.randn(M, D, generator=g),
            "encoder.bias": torch.randn(M, generator=g) * 0.3, "decoder.weight": decoder}


def test_april_update_autoencoder_is_normalised_as_upstream_loads_it(tmp_path, caplog):
    sd = april_update_weights()
    folder = upstream_folder(tmp_path / "april", sd, "AutoEncoder", "StandardTrainerAprilUpdate")
    x = torch.randn(30, D) * 2
    # upstream: norms = ||decoder[:, i]||; decoder /= norms; encoder rows and bias *= norms
    norms = sd["decoder.weight"].norm(dim=0)
    f_raw = torch.relu((x - sd["bias"]) @ sd["encoder.weight"].T + sd["encoder.bias"])
    x_hat = f_raw @ sd["decoder.weight"].T + sd["bias"]
    f_upstream = torch.relu((x - sd["bias"]) @ (sd["encoder.weight"] * norms[:, None]).T
                            + sd["encoder.bias"] * norms)
    with caplog.at_level(logging.INFO):
        ae, config = load_dictionary(folder)
    assert "not unit norm" in caplog.text
    assert config["trainer"]["trainer_class"] == "StandardTrainerAprilUpdate"
    torch.testing.assert_close(ae.W_dec.norm(dim=-1), torch.ones(M), **TOL)
    torch.testing.assert_close(ae.encode(x), f_upstream, **TOL)
    torch.testing.assert_close(f_upstream, f_raw * norms, **TOL)  # features scale...
    torch.testing.assert_close(ae(x), x_hat, **TOL)  # ...the reconstruction does not
    raw, _ = load_dictionary(folder, normalize_decoder=False)
    torch.testing.assert_close(raw.encode(x), f_raw, **TOL)
    # a unit-norm decoder (what StandardTrainer writes, what we write) is left untouched
    unit = {**sd, "decoder.weight": sd["decoder.weight"] / norms}
    upstream_folder(tmp_path / "unit", unit, "AutoEncoder", "StandardTrainer")
    same, _ = load_dictionary(tmp_path / "unit")
    assert torch.equal(same.encoder.weight, unit["encoder.weight"])


def test_autoencoder_new_keys_under_an_autoencoder_config_load_by_their_keys(tmp_path, caplog):
    g = torch.Generator().manual_seed(1)
    sd = {"encoder.weight": torch.randn(M, D, generator=g),
          "encoder.bias": torch.randn(M, generator=g),
          "decoder.weight": torch.randn(D, M, generator=g) * 0.1,
          "decoder.bias": torch.randn(D, generator=g)}
    folder = upstream_folder(tmp_path / "new", sd, "AutoEncoder", "StandardTrainer")
    with caplog.at_level(logging.WARNING):
        ae, _ = load_dictionary(folder)
    assert type(ae).__name__ == "AutoEncoderNew"
    assert "names AutoEncoder, but the weights have the keys of AutoEncoderNew" in caplog.text
    x = torch.randn(30, D)
    f = torch.relu(x @ sd["encoder.weight"].T + sd["encoder.bias"])  # upstream AutoEncoderNew
    torch.testing.assert_close(ae.encode(x), f, **TOL)
    torch.testing.assert_close(ae(x), f @ sd["decoder.weight"].T + sd["decoder.bias"], **TOL)
    # keys that fit no class are still refused, naming the keys
    torch.save({"mystery": torch.zeros(3)}, folder / "ae.pt")
    with pytest.raises(ValueError, match="mystery"):
        load_dictionary(folder)
