"""Dictionaries: published layouts, formulas, constraints, save and load."""

import json

import pytest
import torch
from conftest import dictionary_kwargs

from dictionary_learning.dictionary import AutoEncoder, IdentityDict, MLPStretcher
from dictionary_learning.loading import load_dictionary
from dictionary_learning.registry import DICTIONARY_CLASSES

D, M = 16, 48


def published_state_dict(d=D, m=M, seed=0):
    """An AutoEncoder state_dict written from the documented keys, not by our class."""
    g = torch.Generator().manual_seed(seed)
    dec = torch.randn(d, m, generator=g)
    return {
        "bias": torch.randn(d, generator=g),
        "encoder.weight": torch.randn(m, d, generator=g),
        "encoder.bias": torch.randn(m, generator=g),
        "decoder.weight": dec / dec.norm(dim=0, keepdim=True),
    }


def test_published_autoencoder_layout_loads_and_matches_formula(tmp_path):
    sd = published_state_dict()
    torch.save(sd, tmp_path / "ae.pt")
    x = torch.randn(10, D)
    f_ref = torch.relu((x - sd["bias"]) @ sd["encoder.weight"].T + sd["encoder.bias"])
    x_hat_ref = f_ref @ sd["decoder.weight"].T + sd["bias"]
    for ae in (AutoEncoder.from_pretrained(tmp_path), AutoEncoder.from_pretrained(tmp_path / "ae.pt"),
               load_dictionary(tmp_path)[0]):
        assert isinstance(ae, AutoEncoder)
        assert set(ae.state_dict()) == set(sd)
        x_hat, f = ae(x, output_features=True)
        torch.testing.assert_close(f, f_ref)
        torch.testing.assert_close(x_hat, x_hat_ref)
        torch.testing.assert_close(ae.decode(ae.encode(x)), x_hat)


def test_accessor_layout_rows_are_features():
    ae = AutoEncoder(D, M)
    assert ae.W_dec.shape == (M, D) and ae.W_enc.shape == (M, D) and ae.b_enc.shape == (M,)
    f = torch.zeros(1, M)
    f[0, 5] = 1.0
    torch.testing.assert_close(ae.decode(f)[0] - ae.bias, ae.W_dec[5])
    # The views share storage with the stored parameters.
    with torch.no_grad():
        ae.W_dec[3] = 0.0
    assert ae.decoder.weight[:, 3].abs().sum() == 0


@pytest.mark.parametrize("cls", [AutoEncoder, MLPStretcher])
def test_normalize_decoder_keeps_outputs(cls):
    torch.manual_seed(0)
    ae = cls(D, M)
    with torch.no_grad():
        ae.W_dec.mul_(torch.rand(M, 1) * 3 + 0.1)
        ae.b_enc.normal_()
    x = torch.randn(20, D)
    before = ae(x)
    ae.normalize_decoder()
    torch.testing.assert_close(ae.W_dec.norm(dim=-1), torch.ones(M))
    torch.testing.assert_close(ae(x), before, rtol=1e-5, atol=1e-5)


def test_scale_biases_matches_scaled_inputs():
    ae = AutoEncoder.from_state_dict(published_state_dict())
    x = torch.randn(8, D)
    expected = ae(x) * 3.0
    ae.scale_biases(3.0)
    torch.testing.assert_close(ae(x * 3.0), expected, rtol=1e-5, atol=1e-5)


def test_stretcher_widths_and_formula():
    st = MLPStretcher(D, M, output_dim=24)
    x = torch.randn(5, D)
    f = torch.relu((x - st.in_bias) @ st.encoder.weight.T + st.encoder.bias)
    torch.testing.assert_close(st(x), f @ st.decoder.weight.T + st.out_bias)
    assert st(x).shape == (5, 24) and st.W_dec.shape == (M, 24)


def test_identity_reconstructs_exactly():
    ident = IdentityDict(D)
    x = torch.randn(4, D)
    assert torch.equal(ident(x), x)


def test_encode_rejects_wrong_width():
    with pytest.raises(ValueError, match=r"last dimension is 16, got shape \(3, 17\)"):
        AutoEncoder(D, M).encode(torch.randn(3, 17))


@pytest.mark.parametrize("name", sorted(DICTIONARY_CLASSES))
def test_save_load_roundtrip_every_registered_class(tmp_path, name):
    cls = DICTIONARY_CLASSES[name]
    torch.manual_seed(1)
    ae = cls(D, D if name == "IdentityDict" else M, **dictionary_kwargs(name, M))
    torch.save(ae.state_dict(), tmp_path / "ae.pt")
    (tmp_path / "config.json").write_text(json.dumps(
        {"trainer": {"dict_class": name, **ae.config()}, "buffer": {}}))
    loaded, config = load_dictionary(tmp_path, activation_dim=D) if name == "IdentityDict" \
        else load_dictionary(tmp_path)
    assert type(loaded) is cls and config["trainer"]["dict_class"] == name
    x = torch.randn(6, D)
    assert torch.equal(loaded(x), ae(x))


def test_load_dictionary_flat_config_and_no_config(tmp_path):
    sd = published_state_dict()
    torch.save(sd, tmp_path / "ae.pt")
    ae, config = load_dictionary(tmp_path)  # no config.json: class recognised from the keys
    assert config == {} and (ae.activation_dim, ae.dict_size) == (D, M)
    (tmp_path / "config.json").write_text(json.dumps(
        {"dictionary_size": M, "activation_dim": D, "lr": 1e-3, "l1_penalty": 1e-3}))
    ae, config = load_dictionary(tmp_path)  # older flat schema
    assert config["lr"] == 1e-3 and ae.dict_size == M
    with pytest.raises(ValueError, match="activation_dim is 16 in the weights, not 32"):
        load_dictionary(tmp_path, activation_dim=32)


def test_loading_refuses_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no dictionary weights"):
        load_dictionary(tmp_path)
    torch.save(published_state_dict(), tmp_path / "ae.pt")
    data = (tmp_path / "ae.pt").read_bytes()
    (tmp_path / "ae.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="could not be read"):
        load_dictionary(tmp_path)
    sd = published_state_dict()
    del sd["bias"]
    torch.save(sd, tmp_path / "ae.pt")
    (tmp_path / "config.json").write_text(json.dumps({"trainer": {"dict_class": "AutoEncoder"}}))
    with pytest.raises(ValueError, match=r"missing keys \['bias'\]"):
        load_dictionary(tmp_path)


class Payload:
    def __reduce__(self):
        import os
        return (os.system, ("touch PWNED",))


def test_loading_never_runs_pickled_code(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.save({"bias": Payload()}, tmp_path / "ae.pt")
    with pytest.raises(ValueError, match="refused"):
        load_dictionary(tmp_path)
    assert not (tmp_path / "PWNED").exists()
