"""Foreign dictionary formats: every file here is written by the test from the documented keys
(shared/FORMATS.md; SAELens, sparsify, OpenAI and mats_sae_training sources), loaded with
``load_dictionary``, and compared with that format's own formula written below, independently
of the converters. Then the SAELens export round trip, and files that must be refused."""

import collections
import dataclasses
import json
import math
import sys
import types
from pathlib import Path

import pytest
import torch
from conftest import dictionary_kwargs
from safetensors.torch import save_file

from dictionary_learning.formats import save_saelens
from dictionary_learning.loading import load_dictionary
from dictionary_learning.registry import DICTIONARY_CLASSES

D, M, K = 16, 48, 5
TOL = {"rtol": 1e-4, "atol": 1e-4}


def rand(g, *shape, scale=1.0):
    return torch.randn(*shape, generator=g) * scale


def inputs(seed=1, n=40):
    return torch.randn(n, D, generator=torch.Generator().manual_seed(seed)) * 2 + 0.5


def topk_then(values, k, post=torch.relu):
    """OpenAI / SAELens TopK: the k largest pre-activations, then the post-activation."""
    top = values.topk(k, dim=-1)
    return torch.zeros_like(values).scatter(-1, top.indices, post(top.values))


def layer_norm(x, eps=1e-5):
    """OpenAI's LN and SAELens's layer_norm: ``((x - mu) / (std + eps), mu, std)``."""
    mu = x.mean(dim=-1, keepdim=True)
    std = (x - mu).std(dim=-1, keepdim=True)
    return (x - mu) / (std + eps), mu, std


def check_close(ae, x, f_ref, x_hat_ref):
    f = ae.encode(x)
    assert (f != 0).any() and (f == 0).any(), "vacuous comparison"
    torch.testing.assert_close(f, f_ref, **TOL)
    x_hat, f2 = ae(x, output_features=True)
    torch.testing.assert_close(f2, f_ref, **TOL)
    torch.testing.assert_close(x_hat, x_hat_ref, **TOL)


# ---------------------------------------------------------------------------------------
# SAELens


def saelens_weights(arch, seed=0, fsf=False):
    g = torch.Generator().manual_seed(seed)
    w = {"W_enc": rand(g, D, M, scale=D ** -0.5), "W_dec": rand(g, M, D, scale=0.3),
         "b_dec": rand(g, D)}
    if arch == "gated":
        w.update(b_gate=rand(g, M, scale=0.3), b_mag=rand(g, M, scale=0.3),
                 r_mag=rand(g, M, scale=0.3))
    else:
        w["b_enc"] = rand(g, M, scale=0.3)
    if arch == "jumprelu":
        w["threshold"] = rand(g, M).abs() * 0.5
    if fsf:
        w["finetuning_scaling_factor"] = rand(g, M).abs() + 0.5
    return w


def saelens_reference(w, cfg, x, s=None):
    """SAELens's SAE on ``x`` from its raw weights and cfg: ``(f, x_hat)``."""
    w = dict(w)
    norm = cfg.get("normalize_activations", "none")
    arch = cfg.get("architecture", "standard")
    if cfg.get("activation_fn_str") == "topk":
        arch = "topk"
    k = cfg.get("k", (cfg.get("activation_fn_kwargs") or {}).get("k"))
    a = cfg.get("apply_b_dec_to_input", True)
    if norm == "expected_average_only_in":  # SAELens's fold_activation_norm_scaling_factor
        w.update(W_enc=w["W_enc"] * s, W_dec=w["W_dec"] / s, b_dec=w["b_dec"] / s)
    x_in, out = x, (lambda y: y)
    if norm == "layer_norm":
        x_in, mu, std = layer_norm(x)
        out = lambda y: y * std + mu  # noqa: E731
    elif norm == "constant_norm_rescale":
        coeff = math.sqrt(x.shape[-1]) / x.norm(dim=-1, keepdim=True)
        x_in, out = x * coeff, (lambda y: y / coeff)
    sae_in = x_in - w["b_dec"] * a
    if arch == "gated":
        active = (sae_in @ w["W_enc"] + w["b_gate"] > 0).float()
        f = active * torch.relu(sae_in @ (w["W_enc"] * w["r_mag"].exp()) + w["b_mag"])
    else:
        pre = sae_in @ w["W_enc"] + w["b_enc"]
        f = {"standard": lambda: torch.relu(pre), "topk": lambda: topk_then(pre, k),
             "jumprelu": lambda: torch.relu(pre) * (pre > w["threshold"])}[arch]()
    if cfg.get("finetuning_scaling_factor"):
        f_dec = f * w["finetuning_scaling_factor"]
    else:
        f_dec = f
    return f, out(f_dec @ w["W_dec"] + w["b_dec"])


def write_saelens(folder, w, cfg, sparsity=None):
    folder.mkdir(parents=True, exist_ok=True)
    save_file({n: t.contiguous() for n, t in w.items()}, folder / "sae_weights.safetensors")
    (folder / "cfg.json").write_text(json.dumps(cfg))
    if sparsity is not None:
        save_file({"sparsity": sparsity}, folder / "sparsity.safetensors")
    return folder


def v6_cfg(arch, a=True, norm="none"):
    cfg = {"architecture": arch, "d_in": D, "d_sae": M, "dtype": "float32", "device": "cpu",
           "apply_b_dec_to_input": a, "normalize_activations": norm,
           "reshape_activations": "none", "metadata": {"model_name": "gpt2",
                                                        "hook_name": "blocks.3.hook_resid_pre",
                                                        "context_size": 128}}
    return {**cfg, "k": K} if arch == "topk" else cfg


EXPECTED_CLASS = {("standard", True): "AutoEncoder", ("standard", False): "AutoEncoderNew",
                  ("topk", True): "AutoEncoderTopK", ("topk", False): "AutoEncoderTopK",
                  ("jumprelu", True): "JumpReluAutoEncoder",
                  ("jumprelu", False): "JumpReluAutoEncoder",
                  ("gated", True): "GatedAutoEncoder", ("gated", False): "GatedAutoEncoder"}
NORMS = ["none", "layer_norm", "constant_norm_rescale", "expected_average_only_in"]


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("a", [True, False])
@pytest.mark.parametrize("arch", ["standard", "topk", "jumprelu", "gated"])
def test_saelens_folder_matches_formula(tmp_path, arch, a, norm):
    w, cfg = saelens_weights(arch), v6_cfg(arch, a, norm)
    folder = write_saelens(tmp_path / "sae", w, cfg)
    per_token = norm in ("layer_norm", "constant_norm_rescale")
    options = {"norm_scaling_factor": 2.5} if norm == "expected_average_only_in" else {}
    if options:
        with pytest.raises(ValueError, match="pass norm_scaling_factor"):
            load_dictionary(folder)
    ae, config = load_dictionary(folder, **options)
    expected = ("TokenNormalizedGatedSAE" if arch == "gated" else "TokenNormalizedSAE") \
        if per_token else EXPECTED_CLASS[arch, a]
    assert type(ae).__name__ == expected and (ae.activation_dim, ae.dict_size) == (D, M)
    assert config["format"] == "saelens" and config["architecture"] == arch
    assert config["hook_name"] == "blocks.3.hook_resid_pre" and config["cfg"] == cfg
    assert config["log10_feature_density"] is None
    x = inputs()
    check_close(ae, x, *saelens_reference(w, cfg, x, s=2.5))
    if per_token:  # the statistics are explicit, and decode alone stays normalised
        mu, s = ae.normalization_stats(x)
        torch.testing.assert_close(ae(x), ae.denormalize(ae.decode(ae.encode(x)), mu, s))


@pytest.mark.parametrize("activation,stored_as", [("relu", "scaling_factor"),
                                                  ("topk", "finetuning_scaling_factor"),
                                                  ("relu", "ones")])
def test_saelens_pre_6_flat_config(tmp_path, activation, stored_as):
    """Pre-6.0 cfg.json: flat, ``activation_fn_str``/``activation_fn_kwargs``, ``hook_point``,
    ``finetuning_scaling_factor`` (a per-latent scale applied before the decoder, stored as
    ``scaling_factor`` in published files; all ones means none, as SAELens reads it)."""
    w = saelens_weights("standard", fsf=True)
    if stored_as == "ones":
        w["finetuning_scaling_factor"] = torch.ones(M)
    file_w = dict(w)
    if stored_as != "finetuning_scaling_factor":
        file_w["scaling_factor"] = file_w.pop("finetuning_scaling_factor")
    cfg = {"architecture": "standard", "d_in": D, "d_sae": M, "dtype": "float32",
           "model_name": "gelu-2l", "hook_point": "blocks.0.hook_mlp_out",
           "hook_point_layer": 0, "activation_fn_str": activation,
           "activation_fn_kwargs": {"k": K} if activation == "topk" else {},
           "apply_b_dec_to_input": True, "finetuning_scaling_factor": True,
           "context_size": 128, "normalize_activations": "none"}
    sparsity = torch.linspace(-6, -1, M)
    ae, config = load_dictionary(write_saelens(tmp_path, file_w, cfg, sparsity=sparsity))
    assert type(ae).__name__ == ("AutoEncoderTopK" if activation == "topk" else "AutoEncoder")
    assert config["hook_name"] == "blocks.0.hook_mlp_out" and config["model_name"] == "gelu-2l"
    assert config["log10_feature_density"] == sparsity.tolist()
    x = inputs()
    check_close(ae, x, *saelens_reference(w, cfg, x))
    # the weights file itself is accepted as the path too
    assert type(load_dictionary(tmp_path / "sae_weights.safetensors")[0]) is type(ae)


# -- export ------------------------------------------------------------------------------

EXPORTABLE = ["AutoEncoder", "AutoEncoderNew", "AutoEncoderTopK", "JumpReluAutoEncoder",
              "GatedAutoEncoder", "BatchTopKSAE", "MatryoshkaBatchTopKSAE", "TokenNormalizedSAE",
              "TokenNormalizedGatedSAE"]
# TokenNormalizedSAE exports as jumprelu (thresholds), topk or standard (no thresholds).
EXPORT_CASES = [(name, {}) for name in EXPORTABLE] + [
    ("TokenNormalizedSAE", {"k": K}), ("TokenNormalizedSAE", {"normalization":
                                                              "constant_norm_rescale"}),
    ("TokenNormalizedGatedSAE", {"normalization": "layer_norm"})]


def built(name, seed=0, **overrides):
    torch.manual_seed(seed)
    ae = DICTIONARY_CLASSES[name](D, M, **{**dictionary_kwargs(name, M), **overrides})
    with torch.no_grad():
        for p in ae.parameters():
            p.add_(0.2 * torch.randn(p.shape))
        if name in ("BatchTopKSAE", "MatryoshkaBatchTopKSAE"):
            ae.threshold.fill_(0.3)
        if name == "TokenNormalizedSAE":
            ae.threshold.copy_(ae.threshold.abs() if not overrides else torch.zeros(M))
    return ae


@pytest.mark.parametrize("name,variant", EXPORT_CASES)
def test_saelens_export_round_trip(tmp_path, name, variant):
    ae = built(name, **variant)
    density = torch.linspace(-5, -2, M)
    folder = save_saelens(ae, tmp_path / "out", model_name="pythia", hook_name="layers.2",
                          log10_feature_density=density, metadata={"context_size": 64})
    cfg = json.loads((folder / "cfg.json").read_text())
    assert cfg["metadata"] == {"model_name": "pythia", "hook_name": "layers.2",
                               "context_size": 64}
    from safetensors.torch import load_file
    raw = load_file(folder / "sae_weights.safetensors")
    x = inputs(3)
    with torch.no_grad():
        f_ref, x_hat_ref = saelens_reference(raw, cfg, x)  # what SAELens computes
        check_close(ae, x, f_ref, x_hat_ref)
        loaded, config = load_dictionary(folder)
        check_close(loaded, x, f_ref, x_hat_ref)
    assert config["log10_feature_density"] == density.tolist()


def test_saelens_export_refuses_classes_without_counterpart(tmp_path):
    for name in ("MLPStretcher", "IdentityDict"):
        ae = DICTIONARY_CLASSES[name](D, D if name == "IdentityDict" else M)
        with pytest.raises(ValueError, match="no SAELens counterpart"):
            save_saelens(ae, tmp_path / name)
    ae = built("BatchTopKSAE")
    ae.threshold.fill_(-1.0)
    with pytest.raises(ValueError, match="no inference threshold yet"):
        save_saelens(ae, tmp_path / "btk")


# ---------------------------------------------------------------------------------------
# OpenAI sparse_autoencoder / Transformer Debugger


def openai_file(path, activation, seed=0):
    g = torch.Generator().manual_seed(seed)
    sd = {"encoder.weight": rand(g, M, D, scale=D ** -0.5), "decoder.weight": rand(g, D, M),
          "pre_bias": rand(g, D), "latent_bias": rand(g, M, scale=0.3),
          "stats_last_nonzero": torch.randint(0, 100, (M,), generator=g),
          "activation": activation,
          "activation_state_dict": {"k": K, "postact_fn": "ReLU"} if activation == "TopK"
          else {}}
    if activation == "TopK":  # v5 files also carry these statistics
        sd["latents_activation_frequency"] = torch.rand(M, generator=g)
        sd["latents_mean_square"] = torch.rand(M, generator=g)
    # as nn.Module.state_dict() returns it (their files are such state_dicts)
    saved = collections.OrderedDict(sd)
    saved._metadata = collections.OrderedDict({"": {"version": 1}})
    torch.save(saved, path)
    return sd


def openai_reference(sd, x):
    """OpenAI's Autoencoder.forward: ``(latents, recons)``."""
    topk = sd["activation"] == "TopK"
    x_in, mu, std = layer_norm(x) if topk else (x, 0.0, 1.0)
    pre = (x_in - sd["pre_bias"]) @ sd["encoder.weight"].T + sd["latent_bias"]
    latents = topk_then(pre, K) if topk else torch.relu(pre)
    recons = latents @ sd["decoder.weight"].T + sd["pre_bias"]
    return latents, recons * std + mu if topk else recons


@pytest.mark.parametrize("activation", ["ReLU", "TopK"])
def test_openai_file_matches_formula(tmp_path, activation):
    sd = openai_file(tmp_path / "v.pt", activation)
    ae, config = load_dictionary(tmp_path / "v.pt")
    assert type(ae).__name__ == ("TokenNormalizedSAE" if activation == "TopK" else "AutoEncoder")
    assert config["format"] == "openai" and config["activation"] == activation
    assert config["stats_last_nonzero"] == sd["stats_last_nonzero"].tolist()
    x = inputs()
    check_close(ae, x, *openai_reference(sd, x))
    if activation == "TopK":
        assert config["k"] == K and int((ae.encode(x) != 0).sum(-1).max()) == K
        torch.testing.assert_close(config["latents_activation_frequency"],
                                   sd["latents_activation_frequency"].tolist())
        mu, std = ae.normalization_stats(x)  # the per-token statistics, explicitly
        torch.testing.assert_close(mu, x.mean(-1, keepdim=True))
        torch.testing.assert_close(std, x.std(-1, keepdim=True))
        # and through our own ae.pt format, unchanged
        torch.save(ae.state_dict(), tmp_path / "ae.pt")
        (tmp_path / "config.json").write_text(json.dumps(
            {"trainer": {"dict_class": "TokenNormalizedSAE", **ae.config()}}))
        again, _ = load_dictionary(tmp_path)
        assert torch.equal(again(x), ae(x)) and torch.equal(again.encode(x), ae.encode(x))


# ---------------------------------------------------------------------------------------
# mats_sae_training


@pytest.fixture
def mats_module(monkeypatch):
    """A stand-in for ``sae_training.config``, so a config object pickles under that name."""
    package, module = types.ModuleType("sae_training"), types.ModuleType("sae_training.config")

    @dataclasses.dataclass
    class LanguageModelSAERunnerConfig:
        model_name: str = "gelu-2l"
        hook_point: str = "blocks.0.hook_mlp_out"
        d_in: int = D
        expansion_factor: int = 3
        lr: float = 4e-4
        dtype: torch.dtype = torch.float32
        device: torch.device = torch.device("cpu")
        feature_sampling_window: int = 1000

    class OtherConfig:
        pass

    LanguageModelSAERunnerConfig.__module__ = OtherConfig.__module__ = "sae_training.config"
    LanguageModelSAERunnerConfig.__qualname__ = "LanguageModelSAERunnerConfig"
    OtherConfig.__qualname__ = "OtherConfig"
    module.LanguageModelSAERunnerConfig, module.OtherConfig = LanguageModelSAERunnerConfig, \
        OtherConfig
    package.config = module
    monkeypatch.setitem(sys.modules, "sae_training", package)
    monkeypatch.setitem(sys.modules, "sae_training.config", module)
    return module


def test_mats_file_loads_with_a_stub_config(tmp_path, mats_module):
    g = torch.Generator().manual_seed(0)
    sd = {"W_enc": rand(g, D, M, scale=D ** -0.5), "b_enc": rand(g, M, scale=0.3),
          "W_dec": rand(g, M, D), "b_dec": rand(g, D)}
    torch.save({"cfg": mats_module.LanguageModelSAERunnerConfig(), "state_dict": sd},
               tmp_path / "sae.pt")
    ae, config = load_dictionary(tmp_path / "sae.pt")
    assert type(ae).__name__ == "AutoEncoder" and config["format"] == "mats_sae_training"
    assert config["cfg"] == {"model_name": "gelu-2l", "hook_point": "blocks.0.hook_mlp_out",
                             "d_in": D, "expansion_factor": 3, "lr": 4e-4,
                             "dtype": "torch.float32", "device": "cpu",
                             "feature_sampling_window": 1000}
    assert config["hook_name"] == "blocks.0.hook_mlp_out"
    json.dumps(config)  # plain data
    x = inputs()
    f = torch.relu((x - sd["b_dec"]) @ sd["W_enc"] + sd["b_enc"])
    check_close(ae, x, f, f @ sd["W_dec"] + sd["b_dec"])
    # any other class in the pickle is refused
    torch.save({"cfg": mats_module.OtherConfig(), "state_dict": sd}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match=r"other\.pt: refused to unpickle"):
        load_dictionary(tmp_path / "other.pt")


# ---------------------------------------------------------------------------------------
# EleutherAI sparsify


def sparsify_folder(folder, dtype=torch.float32, seed=0, d_out=D, **cfg_overrides):
    g = torch.Generator().manual_seed(seed)
    w = {"encoder.weight": rand(g, M, D, scale=D ** -0.5), "encoder.bias": rand(g, M, scale=0.3),
         "W_dec": rand(g, M, d_out), "b_dec": rand(g, d_out)}
    if cfg_overrides.get("skip_connection"):
        w["W_skip"] = rand(g, d_out, D, scale=0.2)
    w = {n: t.to(dtype) for n, t in w.items()}
    folder.mkdir(parents=True)
    save_file(w, folder / "sae.safetensors")
    cfg = {"activation": "topk", "expansion_factor": 3, "normalize_decoder": True,
           "num_latents": M, "k": K, "multi_topk": False, "skip_connection": False,
           "transcode": False, "d_in": D, **cfg_overrides}
    (folder / "cfg.json").write_text(json.dumps(cfg))
    return w


def sparsify_reference(w, x, transcode=False):
    """sparsify's SparseCoder: encode (``- b_dec`` unless transcoding), top-k of the ReLU,
    decode, plus the skip connection ``x @ W_skip.T`` where there is one."""
    w = {n: t.float() for n, t in w.items()}
    pre = torch.relu((x if transcode else x - w["b_dec"]) @ w["encoder.weight"].T
                     + w["encoder.bias"])
    top = pre.topk(K, dim=-1)
    acts = torch.zeros_like(pre).scatter(-1, top.indices, top.values)
    out = acts @ w["W_dec"] + w["b_dec"]
    return acts, out + x @ w["W_skip"].T if "W_skip" in w else out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sparsify_hookpoint_matches_formula(tmp_path, dtype):
    w = sparsify_folder(tmp_path / "layers.3.mlp", dtype)
    x = inputs()
    for path, options in ((tmp_path / "layers.3.mlp", {}), (tmp_path, {}),
                          (tmp_path, {"hookpoint": "layers.3.mlp"})):
        ae, config = load_dictionary(path, **options)
        assert type(ae).__name__ == "AutoEncoderTopK" and config["hookpoint"] == "layers.3.mlp"
        assert config["dtype"] == str(dtype).removeprefix("torch.")
        assert torch.equal(ae.W_dec, w["W_dec"].float())  # bf16 upcast exactly
        check_close(ae, x, *sparsify_reference(w, x))
    ae16, _ = load_dictionary(tmp_path, dtype=torch.bfloat16)
    assert ae16.W_dec.dtype == torch.bfloat16 and torch.equal(ae16.W_dec, w["W_dec"].bfloat16())
    sparsify_folder(tmp_path / "layers.4.mlp", dtype, seed=1)
    with pytest.raises(ValueError, match="holds 2 sparsify hookpoints.*pass hookpoint"):
        load_dictionary(tmp_path)
    with pytest.raises(FileNotFoundError, match="no sparsify hookpoint 'layers.9'"):
        load_dictionary(tmp_path, hookpoint="layers.9")


@pytest.mark.parametrize("transcode,skip,d_out", [(True, True, D), (True, False, 24),
                                                  (False, True, D)])
def test_sparsify_transcoders_match_formula(tmp_path, transcode, skip, d_out):
    w = sparsify_folder(tmp_path / "t", torch.bfloat16, d_out=d_out, transcode=transcode,
                        skip_connection=skip)
    ae, _ = load_dictionary(tmp_path / "t")
    assert type(ae).__name__ == ("Transcoder" if transcode else "SkipSAE")
    assert ae.output_dim == d_out
    x = inputs()
    f_ref, y_ref = sparsify_reference(w, x, transcode)
    check_close(ae, x, f_ref, y_ref)
    torch.testing.assert_close(ae.reconstruct(ae.encode(x), x), y_ref, **TOL)
    torch.save(ae.state_dict(), tmp_path / "ae.pt")  # and through our own format
    (tmp_path / "config.json").write_text(json.dumps(
        {"trainer": {"dict_class": type(ae).__name__, **ae.config()}}))
    again, _ = load_dictionary(tmp_path)
    assert torch.equal(again(x), ae(x))
    with pytest.raises(ValueError, match="no SAELens counterpart"):
        save_saelens(ae, tmp_path / "export")


@pytest.mark.parametrize("transcode,skip", [(False, False), (False, True), (True, False),
                                            (True, True)])
def test_sparsify_in_bf16_computes_in_sparsify_order(tmp_path, transcode, skip):
    """Loaded with ``dtype=torch.bfloat16``, the features are sparsify's bit for bit: its
    own order of bf16 operations (``x - b_dec`` rounded, then ``F.linear`` with the bias,
    ReLU, top-k) is the one computed, not a bias folded in float64 (which rounds apart).
    The outputs differ from sparsify's only in how the k decoder rows are summed (sparsify:
    ``embedding_bag``), within a bf16 step of the output's scale."""
    w = sparsify_folder(tmp_path / "t", torch.bfloat16, transcode=transcode,
                        skip_connection=skip)
    ae, _ = load_dictionary(tmp_path / "t", dtype=torch.bfloat16)
    x = inputs().bfloat16()
    pre = torch.relu(torch.nn.functional.linear(x if transcode else x - w["b_dec"],
                                                w["encoder.weight"], w["encoder.bias"]))
    top = pre.topk(K, dim=-1, sorted=False)
    f = torch.zeros_like(pre).scatter(-1, top.indices, top.values)
    y = torch.nn.functional.embedding_bag(top.indices, w["W_dec"], per_sample_weights=top.values,
                                          mode="sum") + w["b_dec"]
    if skip:
        y = y + x @ w["W_skip"].mT
    with torch.no_grad():
        assert torch.equal(ae.encode(x), f)
        step = torch.finfo(torch.bfloat16).eps * float(y.abs().max())
        assert float((ae(x) - y).abs().max()) <= step


def test_sparsify_groupmax_is_refused(tmp_path):
    sparsify_folder(tmp_path / "gm", activation="groupmax")
    with pytest.raises(ValueError, match="'groupmax' is not supported"):
        load_dictionary(tmp_path / "gm")


# ---------------------------------------------------------------------------------------
# Files that must be refused, with one clear error naming the file.


class Payload:
    def __reduce__(self):
        import os
        return (os.system, ("touch PWNED",))


@pytest.mark.parametrize("layout", ["openai", "mats", "ae.pt"])
def test_pickled_code_is_refused_and_never_runs(tmp_path, monkeypatch, layout):
    monkeypatch.chdir(tmp_path)
    obj = {"openai": {"pre_bias": Payload(), "latent_bias": torch.zeros(3)},
           "mats": {"cfg": Payload(), "state_dict": {}},
           "ae.pt": {"bias": Payload()}}[layout]
    torch.save(obj, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match=r"evil\.pt: refused to unpickle"):
        load_dictionary(tmp_path / "evil.pt")
    assert not (tmp_path / "PWNED").exists()


def test_no_unsafe_torch_load_in_the_package():
    package = Path(__file__).resolve().parents[1] / "dictionary_learning"
    offenders = [str(p) for p in package.rglob("*.py")
                 if "weights_only=False" in p.read_text() or "pickle.load(" in p.read_text()]
    assert offenders == []


def test_corrupted_and_malformed_files_are_refused(tmp_path):
    folder = write_saelens(tmp_path / "s", saelens_weights("standard"), v6_cfg("standard"))
    weights = folder / "sae_weights.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(good[: len(good) // 2])
    with pytest.raises(ValueError, match=r"sae_weights\.safetensors could not be read"):
        load_dictionary(folder)
    weights.write_bytes(good)
    (folder / "cfg.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"cfg\.json is not valid JSON"):
        load_dictionary(folder)
    (folder / "cfg.json").write_text(json.dumps(v6_cfg("mystery")))
    with pytest.raises(ValueError, match=r"cfg\.json: unknown or unsupported SAELens "
                                         r"architecture 'mystery'"):
        load_dictionary(folder)
    w = saelens_weights("standard")
    bad_shape = write_saelens(tmp_path / "shape", {**w, "W_dec": torch.zeros(M, D + 1)},
                              v6_cfg("standard"))
    with pytest.raises(ValueError, match=r"sae_weights\.safetensors: W_dec has shape "
                                         r"\(48, 17\), expected \(48, 16\)"):
        load_dictionary(bad_shape)
    del w["b_dec"]
    missing = write_saelens(tmp_path / "missing", w, v6_cfg("standard"))
    with pytest.raises(ValueError, match=r"sae_weights\.safetensors: missing keys \['b_dec'\]"):
        load_dictionary(missing)
    sf = write_saelens(tmp_path / "sf", {**saelens_weights("standard"),
                                         "scaling_factor": torch.full((M,), 2.0)},
                       v6_cfg("standard"))
    with pytest.raises(ValueError, match="holds a scaling_factor but cfg.json's "
                                         "finetuning_scaling_factor is false"):
        load_dictionary(sf)
    wrong_width = write_saelens(tmp_path / "width", saelens_weights("standard"),
                                {**v6_cfg("standard"), "d_sae": 99})
    with pytest.raises(ValueError, match="cfg.json says d_sae=99"):
        load_dictionary(wrong_width)
    openai_file(tmp_path / "o.pt", "TopK")
    data = (tmp_path / "o.pt").read_bytes()
    (tmp_path / "o.pt").write_bytes(data[: len(data) // 3])
    with pytest.raises(ValueError, match=r"o\.pt could not be read"):
        load_dictionary(tmp_path / "o.pt")
    sd = openai_file(tmp_path / "o2.pt", "TopK")
    torch.save({**sd, "activation_state_dict": {}}, tmp_path / "o2.pt")
    with pytest.raises(ValueError, match=r"o2\.pt: activation_state_dict needs an integer k"):
        load_dictionary(tmp_path / "o2.pt")
    (tmp_path / "text.pt").write_text("hello world")
    (tmp_path / "noise.pt").write_bytes(bytes(range(7, 250, 3)))
    for name in ("text.pt", "noise.pt"):
        with pytest.raises(ValueError, match=rf"{name} could not be read"):
            load_dictionary(tmp_path / name)
    with pytest.raises(FileNotFoundError, match="no dictionary at"):
        load_dictionary(tmp_path / "nowhere")
    (folder / "cfg.json").unlink()
    with pytest.raises(ValueError, match=r"sae_weights\.safetensors: a safetensors file is read"):
        load_dictionary(weights)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no dictionary weights in .*SAELens"):
        load_dictionary(tmp_path / "empty")
