"""Released dictionaries of Gemma Scope (``params.npz``), Gemma Scope 2 (``params.safetensors``
+ ``config.json``), Llama Scope (``hyperparams.json`` + ``checkpoints/final.safetensors``) and
Goodfire (one ``.pth`` state_dict): each file is written here from the keys their releases
document, in their folder layouts, and what ``load_dictionary`` computes is compared with
the formula of the code that released them, written out below."""

import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from test_formats import check_close, inputs

from dictionary_learning.loading import load_dictionary

D, M = 16, 48
TOL = {"rtol": 1e-4, "atol": 1e-4}


def jumprelu_weights(seed=0, lower=False):
    g = torch.Generator().manual_seed(seed)
    w = {"W_enc": torch.randn(D, M, generator=g) * D ** -0.5,
         "W_dec": torch.randn(M, D, generator=g) * 0.3, "b_enc": torch.randn(M, generator=g) * 0.3,
         "b_dec": torch.randn(D, generator=g), "threshold": torch.rand(M, generator=g) * 0.6}
    return {(k.lower() if lower else k): v for k, v in w.items()}


def gemma_scope(w, x):
    """Gemma Scope's JumpReLUSAE (its tutorial): no b_dec subtracted before encoding."""
    pre = x @ w["W_enc"] + w["b_enc"]
    f = (pre > w["threshold"]) * torch.relu(pre)
    return f, f @ w["W_dec"] + w["b_dec"]


def test_gemma_scope_params_npz(tmp_path):
    folder = tmp_path / "layer_20" / "width_16k" / "average_l0_71"
    folder.mkdir(parents=True)
    w = jumprelu_weights()
    np.savez(folder / "params.npz", **{k: v.numpy() for k, v in w.items()})
    ae, config = load_dictionary(folder)
    assert type(ae).__name__ == "JumpReluAutoEncoder"
    assert (config["format"], config["release"]) == ("gemma_scope", "gemma_scope")
    assert (config["layer"], config["width"], config["l0"]) == (20, "16k", "71")
    x = inputs()
    check_close(ae, x, *gemma_scope(w, x))
    assert type(load_dictionary(folder / "params.npz")[0]) is type(ae)
    # an .npz holding pickled objects is never unpickled
    np.savez(folder / "params.npz", **{k: v.numpy() for k, v in w.items()},
             evil=np.array([{"a": 1}], dtype=object))
    with pytest.raises(ValueError, match=r"params\.npz could not be read"):
        load_dictionary(folder)


def test_gemma_scope_2_params_safetensors(tmp_path):
    folder = tmp_path / "resid_post" / "layer_17_width_16k_l0_medium"
    folder.mkdir(parents=True)
    w = jumprelu_weights(1, lower=True)
    save_file(w, folder / "params.safetensors")
    cfg = {"architecture": "jump_relu", "model_name": "gemma-v3-4b-pt",
           "hf_hook_point_in": "model.layers.17.output"}
    (folder / "config.json").write_text(json.dumps(cfg))
    ae, config = load_dictionary(folder)
    assert (config["release"], config["layer"], config["width"], config["l0"]) == \
        ("gemma_scope_2", 17, "16k", "medium")
    assert config["cfg"] == cfg and config["hook_in"] == config["hook_out"] == cfg[
        "hf_hook_point_in"]
    x = inputs()
    check_close(ae, x, *gemma_scope({k.replace("w_", "W_"): v for k, v in w.items()}, x))
    # a transcoder without the affine connection computes the same formula across two sites
    tc = tmp_path / "transcoder" / "layer_3_width_16k_l0_small"
    tc.mkdir(parents=True)
    save_file(w, tc / "params.safetensors")
    (tc / "config.json").write_text(json.dumps({**cfg, "affine_connection": False,
                                                "hf_hook_point_out": "post_ff.output"}))
    assert load_dictionary(tc)[1]["hook_out"] == "post_ff.output"
    save_file({**w, "affine_skip_connection": torch.zeros(D, D)}, tc / "params.safetensors")
    with pytest.raises(ValueError, match="affine skip transcoder"):
        load_dictionary(tc)
    save_file({**w, "w_dec": torch.zeros(M, 3, D)}, tc / "params.safetensors")
    (tc / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="cross-layer transcoder"):
        load_dictionary(tc)


def llama_scope_folder(folder, avg_in, avg_out, t=0.4, seed=0, unit_decoder=False,
                       dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(seed)
    dec = torch.randn(D, M, generator=g) * 0.2
    if unit_decoder:
        dec = dec / dec.norm(dim=0)
    w = {"encoder.weight": torch.randn(M, D, generator=g) * D ** -0.5,
         "encoder.bias": torch.randn(M, generator=g) * 0.3, "decoder.weight": dec,
         "decoder.bias": torch.randn(D, generator=g) * 0.3}
    w = {k: v.to(dtype) for k, v in w.items()}  # released in bf16
    (folder / "checkpoints").mkdir(parents=True)
    save_file(w, folder / "checkpoints" / "final.safetensors")
    hp = {"dtype": "torch.bfloat16", "hook_point_in": "blocks.13.hook_resid_post",
          "hook_point_out": "blocks.13.hook_resid_post", "use_decoder_bias": True,
          "apply_decoder_bias_to_pre_encoder": False, "expansion_factor": 3, "d_model": D,
          "d_sae": M, "act_fn": "jumprelu", "jump_relu_threshold": t,
          "norm_activation": "dataset-wise",
          "dataset_average_activation_norm": {"in": avg_in, "out": avg_out},
          "sparsity_include_decoder_norm": True, "top_k": 50}
    (folder / "hyperparams.json").write_text(json.dumps(hp))
    return {k: v.float() for k, v in w.items()}


def lm_saes(w, x, avg_in, avg_out, t):
    """lm_saes's ``from_pretrained`` then forward: the dataset-wise scales folded
    (``standardize_parameters_of_dataset_activation_scaling``), the decoder made unit norm
    (``transform_to_unit_decoder_norm``), then ``pre = encoder(x)``, ``f = pre * (pre > t)``,
    ``y = decoder(f)``."""
    s_in, s_out = math.sqrt(D) / avg_in, math.sqrt(D) / avg_out
    enc, b_enc = w["encoder.weight"], w["encoder.bias"] / s_in
    dec, b_dec = w["decoder.weight"] * s_in / s_out, w["decoder.bias"] / s_out
    n = dec.norm(dim=0)
    enc, b_enc, dec = enc * n[:, None], b_enc * n, dec / n
    pre = x @ enc.T + b_enc
    f = pre * (pre > t)
    return f, f @ dec.T + b_dec


@pytest.mark.parametrize("avg_out", [2.5, 0.7])  # an SAE (in == out), a transcoder
def test_llama_scope_folder(tmp_path, avg_out):
    avg_in, t = 2.5, 0.4
    folder = tmp_path / "Llama3_1-8B-Base-L13R-8x"
    w = llama_scope_folder(folder, avg_in, avg_out, t)
    ae, config = load_dictionary(folder)
    assert type(ae).__name__ == "JumpReluAutoEncoder" and config["format"] == "llama_scope"
    assert config["hook_in"] == "blocks.13.hook_resid_post" and config["dtype"] == "bfloat16"
    x = inputs() * 0.3
    check_close(ae, x, *lm_saes(w, x, avg_in, avg_out, t))
    assert type(load_dictionary(folder / "checkpoints" / "final.safetensors")[0]) is type(ae)


def test_llama_scope_and_saelens_agree_on_unit_decoders(tmp_path):
    """SAELens's loader (``expected_average_only_in``, threshold ``t * s``, the norms ignored)
    gives features ``s`` times lm_saes's and the same reconstruction when the released
    decoder columns are unit norm (in float32 here: bf16 rounds unit norms by ~1e-3)."""
    avg, t = 2.5, 0.4
    w = llama_scope_folder(tmp_path / "sae", avg, avg, t, unit_decoder=True,
                           dtype=torch.float32)
    ae, _ = load_dictionary(tmp_path / "sae")
    s = math.sqrt(D) / avg
    x = inputs() * 0.3
    h = (x * s) @ w["encoder.weight"].T + w["encoder.bias"]
    f_saelens = h * (h > t * s)
    x_hat_saelens = (f_saelens @ w["decoder.weight"].T + w["decoder.bias"]) / s
    torch.testing.assert_close(ae.encode(x) * s, f_saelens, **TOL)
    torch.testing.assert_close(ae(x), x_hat_saelens, **TOL)


def test_llama_scope_settings_that_change_the_formula_are_refused(tmp_path):
    llama_scope_folder(tmp_path / "s", 2.5, 2.5)
    hp_path = tmp_path / "s" / "hyperparams.json"
    hp = json.loads(hp_path.read_text())
    for change, message in (({"apply_decoder_bias_to_pre_encoder": True}, "not supported"),
                            ({"act_fn": "topk"}, "act_fn 'topk' is not supported"),
                            ({"norm_activation": "token-wise"}, "'token-wise' is not supported"),
                            ({"d_sae": 7}, "says d_sae=7")):
        hp_path.write_text(json.dumps({**hp, **change}))
        with pytest.raises(ValueError, match=message):
            load_dictionary(tmp_path / "s")


def test_goodfire_pth(tmp_path):
    g = torch.Generator().manual_seed(0)
    sd = {"encoder_linear.weight": torch.randn(M, D, generator=g) * D ** -0.5,
          "encoder_linear.bias": torch.randn(M, generator=g) * 0.3,
          "decoder_linear.weight": torch.randn(D, M, generator=g) * 0.3,
          "decoder_linear.bias": torch.randn(D, generator=g)}
    torch.save(sd, tmp_path / "Llama-3.1-8B-Instruct-SAE-l19.pth")
    ae, config = load_dictionary(tmp_path / "Llama-3.1-8B-Instruct-SAE-l19.pth")
    assert type(ae).__name__ == "AutoEncoderNew" and config["format"] == "goodfire"
    x = inputs()
    f = torch.relu(x @ sd["encoder_linear.weight"].T + sd["encoder_linear.bias"])
    check_close(ae, x, f, f @ sd["decoder_linear.weight"].T + sd["decoder_linear.bias"])
