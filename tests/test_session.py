"""load_session on folders the train command wrote: the model, the dictionary and a buffer
whose first batch equals one built by hand from the run's settings; and one clear error per
missing fact, naming the argument that supplies it."""

import json
from itertools import islice

import pytest
import torch

from dictionary_learning import ActivationBuffer, AutoEncoder, load_dictionary
from dictionary_learning.cli import main
from dictionary_learning.session import load_session, load_setting
from dictionary_learning.sources import load_model, open_texts

from cli_helpers import D_MODEL, save_dictionary, shared_model_folder, write_jsonl

TRAIN = ["--submodule", "1.mlp", "--expansion", "2", "--batch-size", "64", "--ctx-len", "16",
         "--n-ctxs", "12", "--refresh-batch-size", "4", "--warmup-steps", "1", "--steps", "3",
         "--eval-texts", "10", "--eval-loss-texts", "3", "--seed", "7", "--no-progress"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A sweep of two dictionaries (packed text) and a single one (padded text)."""
    model_dir = shared_model_folder(tmp_path_factory)
    root = tmp_path_factory.mktemp("session")
    data = root / "docs.jsonl"
    write_jsonl(data, n=120)
    sweep, single = root / "sweep", root / "single"
    common = ["train", "--model", str(model_dir), "--data", str(data), *TRAIN]
    assert main([*common, "--save-dir", str(sweep), "--l1", "1e-3,3e-3", "--pack"]) == 0
    assert main([*common, "--save-dir", str(single), "--io", "in"]) == 0
    return {"model": model_dir, "data": data, "sweep": sweep, "single": single}


def hand_buffer(env, io="out", pack=False, texts=None):
    model = load_model(str(env["model"]))
    texts = islice(open_texts(str(env["data"])), 10, None) if texts is None else iter(texts)
    return ActivationBuffer(texts, model, "gpt_neox.layers.1.mlp", io=io, n_ctxs=12,
                            ctx_len=16, refresh_batch_size=4, out_batch_size=64, pack=pack,
                            seed=7, progress=False)


@pytest.mark.parametrize("which, io, pack", [("sweep/trainer_1", "out", True),
                                             ("single", "in", False)])
def test_first_batch_equals_a_buffer_built_by_hand(trained, which, io, pack):
    folder = trained["sweep"] / "trainer_1" if which.startswith("sweep") else trained["single"]
    model, dictionary, buffer = load_session(folder)
    want, _ = load_dictionary(folder)
    assert type(dictionary) is type(want)
    assert all(torch.equal(a, b) for a, b in zip(dictionary.state_dict().values(),
                                                 want.state_dict().values()))
    assert (buffer.submodule_name, buffer.io, buffer.ctx_len, buffer.pack) == (
        "gpt_neox.layers.1.mlp", io, 16, pack)
    assert model._module.config._name_or_path == str(trained["model"])
    reference = hand_buffer(trained, io, pack)
    first, expected = next(buffer), next(reference)
    assert first.shape == (64, D_MODEL) and torch.equal(first, expected)
    assert torch.equal(next(buffer), next(reference))
    metrics = json.loads((folder / "eval.json").read_text())  # evaluate wrote KL too
    assert 0 <= metrics["kl_div"] and metrics["kl_score"] <= 1


def test_data_and_the_model_can_be_given(trained):
    texts = list(islice(open_texts(str(trained["data"])), 50, 120))
    model = load_model(str(trained["model"]))
    got_model, _, buffer = load_session(trained["single"], data=texts, model=model,
                                        batch_size=64)
    assert got_model is model
    assert torch.equal(next(buffer), next(hand_buffer(trained, "in", texts=texts)))


def test_each_missing_fact_names_the_argument_that_supplies_it(trained, tmp_path):
    torch.manual_seed(0)
    bare = save_dictionary(tmp_path / "bare", AutoEncoder(D_MODEL, 128), None)
    with pytest.raises(ValueError, match=r"which model .* pass model="):
        load_session(bare)
    with pytest.raises(ValueError, match=r"which submodule .* pass submodule="):
        load_session(bare, model=str(trained["model"]))
    with pytest.raises(ValueError, match=r"which text .* pass data="):
        load_session(bare, model=str(trained["model"]), submodule="1.mlp")
    model, dictionary, buffer = load_session(bare, data=str(trained["data"]),
                                             model=str(trained["model"]), submodule="1.mlp",
                                             n_ctxs=4, batch_size=16)
    assert next(buffer).shape == (16, D_MODEL) and buffer.io == "out"
    setting = load_setting(bare, model=model, submodule="gpt_neox.layers.0")
    assert setting.submodule == "gpt_neox.layers.0" and setting.model is model


def test_foreign_folders_name_their_model_and_hookpoint(trained, tmp_path):
    import json as json_

    from safetensors.torch import save_file

    from dictionary_learning.formats import save_saelens

    torch.manual_seed(1)
    saelens = save_saelens(AutoEncoder(D_MODEL, 128), tmp_path / "saelens",
                           model_name=str(trained["model"]), hook_name="blocks.1.hook_mlp_out")
    with pytest.raises(ValueError, match=r"'blocks.1.hook_mlp_out'.* pass submodule="):
        load_setting(saelens)
    setting = load_setting(saelens, submodule="1.mlp")
    assert (setting.submodule, setting.model_name) == ("gpt_neox.layers.1.mlp",
                                                       str(trained["model"]))
    # sparsify: the folder is the hookpoint, named in the base model (no model name).
    folder = tmp_path / "sparsify" / "layers.1.mlp"
    folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(2)
    save_file({"encoder.weight": torch.randn(128, D_MODEL, generator=g) / 8,
               "encoder.bias": torch.zeros(128), "W_dec": torch.randn(128, D_MODEL, generator=g),
               "b_dec": torch.zeros(D_MODEL)}, folder / "sae.safetensors")
    (folder / "cfg.json").write_text(json_.dumps({"activation": "topk", "k": 8,
                                                  "num_latents": 128, "d_in": D_MODEL,
                                                  "transcode": True}))
    with pytest.raises(ValueError, match="pass model="):
        load_setting(folder)
    setting = load_setting(folder, model=str(trained["model"]))
    assert type(setting.dictionary).__name__ == "Transcoder"
    assert (setting.submodule, setting.io) == ("gpt_neox.layers.1.mlp", "in_to_out")
