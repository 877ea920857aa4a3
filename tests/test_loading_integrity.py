"""Loading refuses damaged dictionaries: non-finite weights (any format), weights whose
SHA-256 differs from the one config.json records, config.json that is not a UTF-8 JSON
object, and pickles carrying a payload (also inside a trainer state)."""

import collections
import json
import logging
import os
import re

import pytest
import torch
from conftest import dictionary_kwargs

from dictionary_learning.files import file_sha256
from dictionary_learning.formats import save_saelens
from dictionary_learning.loading import load_dictionary, read_pickle, read_state_dict
from dictionary_learning.registry import DICTIONARY_CLASSES

D, M = 16, 48


def build(name):
    torch.manual_seed(0)
    return DICTIONARY_CLASSES[name](D, M, **dictionary_kwargs(name, M))


def float_keys(dictionary):
    return sorted(k for k, v in dictionary.state_dict().items() if v.is_floating_point())


# Every trainable class that has floating-point weights (IdentityDict has none).
TRAINABLE = sorted(n for n, c in DICTIONARY_CLASSES.items()
                   if not getattr(c, "inference_only", False)
                   and n != "IdentityDict" and float_keys(build(n)))


def save_folder(folder, name, state_dict=None, checksum=False, extra=None):
    """``folder/ae.pt`` + ``config.json`` naming the class; with ``checksum`` the config
    records the weights' SHA-256 as the writer does."""
    dictionary = build(name)
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(dictionary.state_dict() if state_dict is None else state_dict, folder / "ae.pt")
    config = {"trainer": {"dict_class": name, **dictionary.config()}, "buffer": {},
              **(extra or {})}
    if checksum:
        config["sha256"] = {"ae.pt": file_sha256(folder / "ae.pt")}
    (folder / "config.json").write_text(json.dumps(config))
    return dictionary


def flip_one_float_bit(path, tensor):
    """Change the lowest mantissa bit of ``tensor``'s first value inside ``path``: the file
    still unpickles, with one value off by an ulp."""
    data = bytearray(path.read_bytes())
    at = data.find(tensor.contiguous().numpy().tobytes())
    assert at >= 0
    data[at] ^= 1
    path.write_bytes(bytes(data))


def warnings_of(caplog):
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


# ---------------------------------------------------------------------------------------
# Non-finite weights


@pytest.mark.parametrize("name", TRAINABLE)
def test_non_finite_weight_is_refused_naming_key_and_file(tmp_path, name):
    dictionary = build(name)
    sd = dictionary.state_dict()
    key = float_keys(dictionary)[-1]
    sd[key] = sd[key].clone()
    sd[key].view(-1)[0] = float("nan")
    save_folder(tmp_path, name, sd)
    message = rf"ae\.pt: tensor {re.escape(key)} holds 1 non-finite value \(NaN or inf\)"
    with pytest.raises(ValueError, match=message) as e:
        load_dictionary(tmp_path)
    assert str(tmp_path / "ae.pt") in str(e.value) and "check_finite=False" in str(e.value)
    with pytest.raises(ValueError, match=message):
        read_state_dict(tmp_path)
    loaded, _ = load_dictionary(tmp_path, check_finite=False)
    assert type(loaded) is DICTIONARY_CLASSES[name]
    assert torch.isnan(loaded.state_dict()[key]).sum() == 1
    assert torch.isnan(read_state_dict(tmp_path, check_finite=False)[key]).sum() == 1


def test_inf_is_refused_and_earlier_checkpoints_are_named(tmp_path):
    dictionary = build("AutoEncoder")
    sd = dictionary.state_dict()
    (tmp_path / "checkpoints").mkdir()
    for step in (10, 20):
        torch.save(sd, tmp_path / "checkpoints" / f"ae_{step}.pt")
    sd["encoder.bias"] = sd["encoder.bias"].clone()
    sd["encoder.bias"][:3] = torch.tensor([float("inf"), -float("inf"), float("nan")])
    save_folder(tmp_path, "AutoEncoder", sd)
    torch.save(sd, tmp_path / "checkpoints" / "ae_30.pt")
    with pytest.raises(ValueError, match=r"tensor encoder\.bias holds 3 non-finite values.*"
                                         r"steps there: 10, 20, 30\)"):
        load_dictionary(tmp_path)
    with pytest.raises(ValueError, match=r"ae_30\.pt: tensor encoder\.bias .*steps there: "
                                         r"10, 20\)"):
        load_dictionary(tmp_path / "checkpoints" / "ae_30.pt")
    load_dictionary(tmp_path / "checkpoints" / "ae_20.pt")


def test_huge_finite_weight_loads_with_a_warning(tmp_path, caplog):
    dictionary = build("AutoEncoder")
    sd = dictionary.state_dict()
    sd["encoder.weight"] = sd["encoder.weight"] * 1e38
    save_folder(tmp_path, "AutoEncoder", sd)
    with caplog.at_level(logging.WARNING, logger="dictionary_learning"):
        load_dictionary(tmp_path)
    (message,) = warnings_of(caplog)
    assert "encoder.weight" in message and str(tmp_path / "ae.pt") in message


def test_cast_that_overflows_is_refused(tmp_path):
    sd = build("AutoEncoder").state_dict()
    sd["encoder.weight"] = sd["encoder.weight"] * 1e6  # finite in float32, inf in float16
    save_folder(tmp_path, "AutoEncoder", sd)
    with pytest.raises(ValueError, match=r"tensor encoder\.weight .*do not fit in "
                                         r"torch\.float16"):
        load_dictionary(tmp_path, dtype=torch.float16)
    loaded, _ = load_dictionary(tmp_path, dtype=torch.float16, check_finite=False)
    assert loaded.encoder.weight.isinf().any()


def test_non_finite_foreign_formats_are_refused(tmp_path):
    ae = build("AutoEncoder")
    with torch.no_grad():
        ae.encoder.weight[2, 3] = float("nan")
    folder = save_saelens(ae, tmp_path / "saelens")
    with pytest.raises(ValueError, match=r"saelens: tensor \S+ holds 1 non-finite value"):
        load_dictionary(folder)
    assert load_dictionary(folder, check_finite=False)[0].encoder.weight.isnan().sum() == 1
    g = torch.Generator().manual_seed(0)
    sd = collections.OrderedDict({
        "encoder.weight": torch.randn(M, D, generator=g),
        "decoder.weight": torch.randn(D, M, generator=g),
        "pre_bias": torch.randn(D, generator=g), "latent_bias": torch.randn(M, generator=g),
        "stats_last_nonzero": torch.zeros(M, dtype=torch.long), "activation": "ReLU",
        "activation_state_dict": {}})
    sd["latent_bias"][0] = float("inf")
    torch.save(sd, tmp_path / "openai.pt")
    with pytest.raises(ValueError, match=r"openai\.pt: tensor \S+ holds 1 non-finite value"):
        load_dictionary(tmp_path / "openai.pt")


# ---------------------------------------------------------------------------------------
# Checksums recorded in config.json


@pytest.mark.parametrize("name", TRAINABLE)
def test_checksum_matches_silently_and_a_changed_file_is_flagged(tmp_path, caplog, name):
    dictionary = save_folder(tmp_path, name, checksum=True)
    with caplog.at_level(logging.WARNING, logger="dictionary_learning"):
        load_dictionary(tmp_path)
        load_dictionary(tmp_path, strict=True)
        load_dictionary(tmp_path / "ae.pt", strict=True)
    assert warnings_of(caplog) == []
    flip_one_float_bit(tmp_path / "ae.pt", dictionary.state_dict()[float_keys(dictionary)[0]])
    with caplog.at_level(logging.WARNING, logger="dictionary_learning"):
        loaded, _ = load_dictionary(tmp_path)
    (message,) = warnings_of(caplog)
    assert f"{tmp_path / 'ae.pt'} changed since it was written (SHA-256 differs from " \
           "config.json)" in message
    assert type(loaded) is DICTIONARY_CLASSES[name]
    for path in (tmp_path, tmp_path / "ae.pt"):
        with pytest.raises(ValueError, match=r"ae\.pt changed since it was written"):
            load_dictionary(path, strict=True)


def test_configs_without_a_checksum_for_the_file_are_not_checked(tmp_path, caplog):
    dictionary = save_folder(tmp_path / "old", "AutoEncoder")  # no "sha256": older, upstream's
    save_folder(tmp_path / "other", "AutoEncoder", extra={"sha256": {"ae_10.pt": "00"}})
    for folder in (tmp_path / "old", tmp_path / "other"):
        flip_one_float_bit(folder / "ae.pt", dictionary.state_dict()["bias"])
        with caplog.at_level(logging.WARNING, logger="dictionary_learning"):
            load_dictionary(folder, strict=True)
    assert warnings_of(caplog) == []


def test_a_malformed_checksum_section_warns_or_with_strict_raises(tmp_path, caplog):
    save_folder(tmp_path, "AutoEncoder", extra={"sha256": "abc"})
    with caplog.at_level(logging.WARNING, logger="dictionary_learning"):
        load_dictionary(tmp_path)
    assert any("'sha256' should map file names" in m for m in warnings_of(caplog))
    with pytest.raises(ValueError, match=r"config\.json: 'sha256' should map file names"):
        load_dictionary(tmp_path, strict=True)


def test_strict_refuses_a_changed_file_before_unpickling_it(tmp_path):
    save_folder(tmp_path, "AutoEncoder", checksum=True)
    (tmp_path / "ae.pt").write_bytes((tmp_path / "ae.pt").read_bytes()[:100])
    with pytest.raises(ValueError, match="changed since it was written"):
        load_dictionary(tmp_path, strict=True)
    with pytest.raises(ValueError, match="could not be read"):
        load_dictionary(tmp_path)


# ---------------------------------------------------------------------------------------
# config.json that is not a UTF-8 JSON object


@pytest.mark.parametrize("text,kind", [("[]", "list"), ("true", "bool"), ("3", "int"),
                                       ('"text"', "str"), ("null", "null")])
def test_config_that_is_not_an_object_is_refused(tmp_path, text, kind):
    save_folder(tmp_path, "AutoEncoder")
    (tmp_path / "config.json").write_text(text)
    with pytest.raises(ValueError, match=rf"config\.json: expected a JSON object, got {kind}"):
        load_dictionary(tmp_path)
    with pytest.raises(ValueError, match=r"config\.json: expected a JSON object"):
        load_dictionary(tmp_path / "ae.pt")


def test_config_that_is_not_utf8_is_refused(tmp_path):
    save_folder(tmp_path, "AutoEncoder")
    (tmp_path / "config.json").write_bytes(
        '{"trainer": {"dict_class": "AutoEncoder", "note": "café"}}'.encode("latin-1"))
    with pytest.raises(ValueError, match=r"config\.json is not UTF-8 text \(byte 0xe9"):
        load_dictionary(tmp_path)


def test_config_with_a_trainer_that_is_not_an_object_is_refused(tmp_path):
    save_folder(tmp_path, "AutoEncoder", extra={"trainer": [1, 2]})
    with pytest.raises(ValueError, match=r"config\.json: \"trainer\" should be a JSON object"):
        load_dictionary(tmp_path)


def test_foreign_cfg_json_goes_through_the_same_reader(tmp_path):
    folder = save_saelens(build("AutoEncoder"), tmp_path / "saelens")
    (folder / "cfg.json").write_text("[]")
    with pytest.raises(ValueError, match=r"cfg\.json: expected a JSON object, got list"):
        load_dictionary(folder)
    (folder / "cfg.json").write_bytes(b'{"architecture": "standard\xff"}')
    with pytest.raises(ValueError, match=r"cfg\.json is not UTF-8 text"):
        load_dictionary(folder)


# ---------------------------------------------------------------------------------------
# Pickles carrying a payload, also in a trainer state's structure


class Payload:
    def __reduce__(self):
        import os
        return (os.system, ("touch PWNED",))


def trainer_state(optimizer_value):
    ae = build("AutoEncoder")
    optimizer = torch.optim.Adam(ae.parameters())
    ae(torch.randn(4, D)).pow(2).sum().backward()
    optimizer.step()
    opt = optimizer.state_dict()
    if optimizer_value is not None:
        opt["state"][0]["exp_avg"] = optimizer_value
    return {"dictionary": ae.state_dict(), "optimizer": opt,
            "steps_since_active": torch.zeros(M, dtype=torch.long),
            "tokens_since_active": torch.zeros(M, dtype=torch.long), "warm_start": True,
            "activation_scale": 1.0, "n_resampled": 0, "step": 3,
            "activations_trained": 12, "texts_read": -1}


def test_trainer_state_reads_and_a_payload_inside_it_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    state = trainer_state(None)
    torch.save(state, tmp_path / "trainer_state_3.pt")
    read = read_pickle(tmp_path / "trainer_state_3.pt")
    assert read["step"] == 3 and torch.equal(read["optimizer"]["state"][0]["exp_avg"],
                                             state["optimizer"]["state"][0]["exp_avg"])
    for value in (Payload(), os.system):  # a call, and a bare reference
        torch.save(trainer_state(value), tmp_path / "evil.pt")
        for load in (read_pickle, load_dictionary):
            with pytest.raises(ValueError, match=r"evil\.pt: refused to unpickle it: it names "
                                                 r"\S+, which is not a tensor") as e:
                load(tmp_path / "evil.pt")
            assert "weights_only" not in str(e.value) and "safe_globals" not in str(e.value)
    assert not (tmp_path / "PWNED").exists()
