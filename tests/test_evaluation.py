"""Evaluation: metrics equal hand computations; loss recovered agrees with a plain HF forward
patched by ordinary torch hooks; identity and zero dictionaries hit the known end points."""

import logging
import math

import pytest
import torch
import torch.nn.functional as F

from dictionary_learning.dictionary import AutoEncoder, IdentityDict, MLPStretcher
from dictionary_learning.evaluation import (evaluate, feature_frequency_histogram, loss_recovered,
                                            reconstruction_metrics)
from dictionary_learning.tokens import tokenize_batch

D, M = 16, 48
CTX = 32
SUBMODULES = {  # (layer output: tensor, attention: tuple, mlp: tensor)
    "pythia": ("gpt_neox.layers.0", "gpt_neox.layers.0.attention", "gpt_neox.layers.1.mlp"),
    "gpt2": ("transformer.h.0", "transformer.h.0.attn", "transformer.h.1.mlp"),
    "llama": ("model.layers.0", "model.layers.0.self_attn", "model.layers.1.mlp"),
}


def envoy(model, path):
    for part in path.split("."):
        model = model[int(part)] if part.isdigit() else getattr(model, part)
    return model


@pytest.fixture(scope="module")
def eval_texts(texts):
    return texts[300:316]  # 16 documents, most longer than CTX tokens: padding and truncation


class Scale(IdentityDict):
    """x -> scale * x: a dictionary whose effect on the loss is neither clean nor zero."""

    def __init__(self, d, scale):
        super().__init__(d)
        self.scale = scale

    def decode(self, f):
        return self.scale * f


def zero_autoencoder(d):
    ae = AutoEncoder(d, 4 * d)
    with torch.no_grad():
        ae.decoder.weight.zero_()
        ae.bias.zero_()
    return ae


# ---------------------------------------------------------------------------------------
# Reconstruction metrics


def hand_metrics(f, x_hat, x):
    """The documented definitions, token by token, in float64."""
    f, x_hat, x = f.double(), x_hat.double(), x.double()
    err = ((x - x_hat) ** 2).sum(-1)
    cos = (x * x_hat).sum(-1) / (x.norm(dim=-1) * x_hat.norm(dim=-1))
    freq = (f != 0).double().mean(0)
    return {
        "mse": err.mean().item(),
        "l1": f.abs().sum(-1).mean().item(),
        "l0": (f != 0).double().sum(-1).mean().item(),
        "frac_variance_explained": 1 - (err.sum() / ((x - x.mean(0)) ** 2).sum()).item(),
        "cossim": cos.mean().item(),
        "l2_ratio": (x_hat.norm(dim=-1) / x.norm(dim=-1)).mean().item(),
        "frac_alive": (freq > 0).double().mean().item(),
        "n_tokens": x.shape[0],
        "feature_frequencies": freq,
    }


def assert_metrics_equal(got, want, rel=1e-5):
    assert set(got) == set(want)
    for k, v in want.items():
        if k == "feature_frequencies":
            torch.testing.assert_close(got[k].double(), v.double(), rtol=0, atol=1e-7)
        else:
            assert got[k] == pytest.approx(v, rel=rel, abs=1e-9), k


def random_autoencoder(seed=0):
    torch.manual_seed(seed)
    ae = AutoEncoder(D, M)
    with torch.no_grad():  # encoder biases spread so some features fire rarely, some never
        ae.encoder.bias.copy_(torch.linspace(-4, 0.5, M))
        ae.bias.normal_()
    return ae


def test_metrics_equal_hand_computation():
    ae = random_autoencoder()
    x = torch.randn(500, D, generator=torch.Generator().manual_seed(1)) * 2 + 5  # offset mean
    W, b_enc, W_dec, b = ae.encoder.weight, ae.encoder.bias, ae.decoder.weight, ae.bias
    f = torch.relu((x - b) @ W.T + b_enc)
    x_hat = f @ W_dec.T + b
    want = hand_metrics(f, x_hat, x)
    assert 0 < want["frac_alive"] < 1  # some features dead, so frac_alive is exercised
    assert_metrics_equal(reconstruction_metrics(ae, x), want)


def test_streaming_equals_one_batch():
    ae = random_autoencoder()
    x = torch.randn(1000, D, generator=torch.Generator().manual_seed(2)) + 3
    whole = reconstruction_metrics(ae, x)
    sizes = [1, 7, 300, 92, 600]
    assert_metrics_equal(reconstruction_metrics(ae, list(x.split(sizes))), whole)
    assert_metrics_equal(reconstruction_metrics(ae, iter(x.split(sizes))), whole)
    # max_batches reads exactly the first batches.
    first = reconstruction_metrics(ae, x[:308])
    assert_metrics_equal(reconstruction_metrics(ae, x.split(sizes), max_batches=3), first)


def test_crafted_frac_alive_and_frequencies():
    x = torch.tensor([[1.0, 0, 0, 0], [0, -2, 0, 0], [3, 0, 0, 0]])
    got = reconstruction_metrics(IdentityDict(4), x)
    torch.testing.assert_close(got.pop("feature_frequencies"), torch.tensor([2 / 3, 1 / 3, 0, 0]))
    assert got == pytest.approx({"mse": 0.0, "l1": 2.0, "l0": 1.0, "frac_variance_explained": 1.0,
                                 "cossim": 1.0, "l2_ratio": 1.0, "frac_alive": 0.5,
                                 "n_tokens": 3})


def test_stretcher_pairs_compare_with_output():
    torch.manual_seed(0)
    st = MLPStretcher(8, 32, output_dim=12)
    g = torch.Generator().manual_seed(3)
    x_in, x_out = torch.randn(200, 8, generator=g), torch.randn(200, 12, generator=g)
    f = torch.relu((x_in - st.in_bias) @ st.encoder.weight.T + st.encoder.bias)
    want = hand_metrics(f, f @ st.decoder.weight.T + st.out_bias, x_out)
    pairs = [(x_in[:50], x_out[:50]), (x_in[50:], x_out[50:])]
    assert_metrics_equal(reconstruction_metrics(st, pairs), want)
    with pytest.raises(ValueError, match="stretcher"):
        reconstruction_metrics(st, [(x_in, x_in)])


def test_metrics_reject_empty_and_bad_input():
    with pytest.raises(ValueError, match="no tokens"):
        reconstruction_metrics(IdentityDict(4), [])
    with pytest.raises(TypeError, match="iterable of batches"):
        reconstruction_metrics(IdentityDict(4), 3.0)


# ---------------------------------------------------------------------------------------
# Loss recovered: known end points


@pytest.mark.parametrize("arch", ["pythia", "gpt2", "llama"])
@pytest.mark.parametrize("which", [0, 1], ids=["layer", "attention"])
def test_identity_recovers_clean_loss(models, eval_texts, arch, which):
    model = models[arch]
    sub = envoy(model, SUBMODULES[arch][which])
    got = loss_recovered(eval_texts, model, sub, IdentityDict(64), ctx_len=CTX, batch_size=6)
    assert got["loss_patched"] == pytest.approx(got["loss_clean"], rel=1e-6)
    assert got["frac_recovered"] == pytest.approx(1.0, abs=1e-3)
    assert got["loss_zero"] != pytest.approx(got["loss_clean"], rel=1e-6)
    assert got["n_tokens"] > 16 * 20


@pytest.mark.parametrize("arch", ["pythia", "gpt2"])
def test_zero_dictionary_gives_zero_ablation(models, eval_texts, arch):
    model = models[arch]
    got = loss_recovered(eval_texts, model, SUBMODULES[arch][0], zero_autoencoder(64),
                         ctx_len=CTX)
    assert got["loss_patched"] == pytest.approx(got["loss_zero"], rel=1e-6)
    assert got["frac_recovered"] == pytest.approx(0.0, abs=1e-3)


@pytest.mark.parametrize("io", ["in", "in_to_out"])
def test_identity_on_mlp_input_gives_clean_loss(models, eval_texts, io):
    model = models["pythia"]
    got = loss_recovered(eval_texts, model, model.gpt_neox.layers[1].mlp, IdentityDict(64),
                         io=io, ctx_len=CTX)
    if io == "in":
        assert got["loss_patched"] == pytest.approx(got["loss_clean"], rel=1e-6)
    else:  # the MLP's output replaced by its input: a different model
        assert got["loss_patched"] != pytest.approx(got["loss_clean"], rel=1e-6)


def test_tiny_gap_warns_and_still_reports(models, eval_texts, caplog):
    model = models["pythia"]
    with caplog.at_level(logging.WARNING, logger="dictionary_learning.evaluation"):
        got = loss_recovered(eval_texts[:2], model, "gpt_neox.layers.0", IdentityDict(64),
                             ctx_len=CTX, min_gap=1e6)
    assert math.isfinite(got["loss_zero"]) and math.isfinite(got["loss_clean"])
    gap = got["loss_zero"] - got["loss_clean"]
    assert got["frac_recovered"] == pytest.approx((got["loss_zero"] - got["loss_patched"]) / gap)
    assert "unreliable" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="dictionary_learning.evaluation"):
        loss_recovered(eval_texts[:2], model, "gpt_neox.layers.0", IdentityDict(64),
                       ctx_len=CTX, min_gap=0.0)
    assert "unreliable" not in caplog.text


def test_loss_recovered_rejects_bad_arguments(models, eval_texts):
    model = models["pythia"]
    with pytest.raises(ValueError, match="io must be"):
        loss_recovered(eval_texts, model, model.gpt_neox.layers[0], IdentityDict(64), io="mid")
    with pytest.raises(ValueError, match="no submodule"):
        loss_recovered(eval_texts, model, "gpt_neox.layerz.0", IdentityDict(64))
    with pytest.raises(ValueError, match="last dimension is 32"):
        loss_recovered(eval_texts[:2], model, model.gpt_neox.layers[0], IdentityDict(32))


# ---------------------------------------------------------------------------------------
# Loss recovered against an independent oracle: the plain HF model and torch hooks


def hf_loss(model, texts, module=None, io="out", fn=None):
    """Mean next-token CE over real tokens from a direct HF call, the activation patched
    with a plain torch hook, one batch (the texts given)."""
    hf = model._module
    inputs = tokenize_batch(model.tokenizer, texts, CTX)
    handles = []
    if fn is not None and io == "in":
        def pre(mod, args, kwargs):  # hidden states are the first positional or keyword arg
            if args:
                return (fn(args[0]), *args[1:]), kwargs
            key = next(iter(kwargs))
            return args, {**kwargs, key: fn(kwargs[key])}
        handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
    elif fn is not None:
        def post(mod, args, kwargs, out):
            x = args[0] if args else next(iter(kwargs.values()))
            new = fn(x if io == "in_to_out" else (out[0] if isinstance(out, tuple) else out))
            return (new, *out[1:]) if isinstance(out, tuple) else new
        handles.append(module.register_forward_hook(post, with_kwargs=True))
    try:
        with torch.no_grad():
            logits = hf(**inputs).logits
    finally:
        for h in handles:
            h.remove()
    ids, mask = inputs["input_ids"], inputs["attention_mask"].bool()
    labels = torch.where(mask[:, 1:] & mask[:, :-1], ids[:, 1:], -100)
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).double(),
                           labels.reshape(-1), ignore_index=-100).item()


@pytest.mark.parametrize("arch,which,io", [
    ("pythia", 0, "out"), ("pythia", 1, "out"), ("pythia", 2, "in"), ("pythia", 2, "in_to_out"),
    ("gpt2", 0, "out"), ("gpt2", 1, "in"), ("gpt2", 2, "out"),
    ("llama", 1, "in"), ("llama", 1, "out"), ("llama", 2, "in"),
])
def test_losses_match_plain_hf_with_hooks(models, eval_texts, arch, which, io):
    model = models[arch]
    path = SUBMODULES[arch][which]
    module = model._module.get_submodule(path)
    batch = eval_texts[:6]
    got = loss_recovered(batch, model, path, Scale(64, 0.5), io=io, ctx_len=CTX, batch_size=6)
    want = {"loss_clean": hf_loss(model, batch),
            "loss_patched": hf_loss(model, batch, module, io, lambda x: 0.5 * x),
            "loss_zero": hf_loss(model, batch, module, io, torch.zeros_like)}
    for k, v in want.items():
        assert got[k] == pytest.approx(v, rel=1e-5), k
    # The three differ, so the test would notice a patch applied to the wrong place.
    assert len({round(v, 6) for v in want.values()}) == 3


def test_losses_average_over_tokens_across_batches(models, eval_texts):
    model = models["gpt2"]
    a, b = eval_texts[:3], eval_texts[3:8]
    ra, rb = (loss_recovered(t, model, "transformer.h.0", Scale(64, 0.5), ctx_len=CTX)
              for t in (a, b))
    both = loss_recovered(a + b, model, "transformer.h.0", Scale(64, 0.5), ctx_len=CTX,
                          batch_size=3)
    assert both["n_tokens"] == ra["n_tokens"] + rb["n_tokens"]
    for k in ("loss_clean", "loss_patched", "loss_zero"):
        want = (ra[k] * ra["n_tokens"] + rb[k] * rb["n_tokens"]) / both["n_tokens"]
        assert both[k] == pytest.approx(want, rel=1e-5), k


# ---------------------------------------------------------------------------------------
# evaluate and the histogram


class FakeBuffer:
    """Duck-typed ActivationBuffer: batches of fixed activations and a text stream."""

    def __init__(self, model, submodule, texts, acts):
        self.model, self.submodule, self.io, self.ctx_len = model, submodule, "out", CTX
        self._texts, self._acts, self.taken = iter(texts), iter(acts), 0

    def __iter__(self):
        return self._acts

    def text_batch(self, n):
        out = [t for _, t in zip(range(n), self._texts)]
        self.taken += len(out)
        return out


def test_evaluate_takes_defaults_from_buffer(models, eval_texts):
    model = models["pythia"]
    x = torch.randn(40, 64, generator=torch.Generator().manual_seed(4))
    buf = FakeBuffer(model, model.gpt_neox.layers[0], eval_texts, x.split(10))
    got = evaluate(IdentityDict(64), buf, n_batches=3, n_texts=5)
    assert buf.taken == 5
    freqs = got.pop("feature_frequencies")
    assert freqs.shape == (64,)
    assert {"loss_clean", "loss_patched", "loss_zero", "frac_recovered",
            "n_loss_tokens"} <= set(got)
    assert all(isinstance(v, (int, float)) for v in got.values())
    assert got["n_tokens"] == 30 and got["mse"] == 0 and got["frac_recovered"] == pytest.approx(1)
    want = loss_recovered(eval_texts[:5], model, model.gpt_neox.layers[0], IdentityDict(64),
                          ctx_len=CTX)
    assert got["loss_clean"] == pytest.approx(want["loss_clean"], rel=1e-9)


def test_evaluate_without_model_gives_reconstruction_only():
    x = torch.randn(20, D)
    got = evaluate(IdentityDict(D), x)
    assert "loss_clean" not in got and got["n_tokens"] == 20


def test_evaluate_with_activation_buffer(models, texts):
    from dictionary_learning.buffer import ActivationBuffer

    model = models["pythia"]
    buf = ActivationBuffer(texts[:40], model, model.gpt_neox.layers[1].mlp, n_ctxs=8,
                           ctx_len=CTX, refresh_batch_size=8, out_batch_size=32, progress=False)
    got = evaluate(IdentityDict(64), buf, n_batches=2, n_texts=6)
    assert got["n_tokens"] == 64 and got["frac_variance_explained"] == pytest.approx(1)
    assert got["frac_recovered"] == pytest.approx(1, abs=1e-3)


def test_histogram_written_and_counts_dead(tmp_path):
    freqs = torch.cat([torch.zeros(7), torch.logspace(-5, -0.5, 93)])
    path = feature_frequency_histogram(freqs, tmp_path / "sub" / "hist.png", title="t")
    data = path.read_bytes()
    assert path == tmp_path / "sub" / "hist.png" and data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 1000
    # All dead, or all equal: still a plot.
    assert feature_frequency_histogram(torch.zeros(5), tmp_path / "dead.png").stat().st_size > 0
    assert feature_frequency_histogram(torch.ones(5), tmp_path / "one.png").stat().st_size > 0
    with pytest.raises(ValueError, match="fractions"):
        feature_frequency_histogram(torch.tensor([2.0]), tmp_path / "bad.png")
