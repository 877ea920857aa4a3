"""SAELens folders that sae-lens 6 writes by default: TopK with ``rescale_acts_by_decoder_norm``
(the default of its TopK training config) as final models (unit decoder rows) and as training
checkpoints (decoder norms free, ~0.1 at initialisation), and ``batchtopk`` training
checkpoints (a scalar ``topk_threshold``). Files are written from the documented keys and
compared with SAELens's formulas written here (``tests/crosscheck_formats.py`` compares with
sae-lens itself):

    h = ((norm(x) - a * b_dec) @ W_enc + b_enc) * n,   n_i = ||W_dec[i]|| (1 without rescale)
    topk:      f = relu(top-k of h)                batchtopk (inference): f = relu(h) * (h > t)
    x_hat = denorm((f / n) @ W_dec + b_dec)
"""

import pytest
import torch
from test_formats import D, K, M, TOL, check_close, inputs, layer_norm, rand, topk_then, \
    v6_cfg, write_saelens

from dictionary_learning.loading import load_dictionary


def weights(arch, decoder_norms, seed=0):
    g = torch.Generator().manual_seed(seed)
    W_dec = rand(g, M, D)
    W_dec = W_dec / W_dec.norm(dim=-1, keepdim=True) * decoder_norms(g)[:, None]
    w = {"W_enc": rand(g, D, M, scale=D ** -0.5), "b_enc": rand(g, M, scale=0.3),
         "W_dec": W_dec, "b_dec": rand(g, D)}
    if arch == "batchtopk":
        w["topk_threshold"] = torch.tensor(0.2, dtype=torch.float64)  # SAELens keeps it double
    return w


DECODERS = {"final": lambda g: torch.ones(M),  # SAELens folds the norms when it saves
            "checkpoint": lambda g: torch.rand(M, generator=g) * 0.3 + 0.05}


def reference(w, cfg, x):
    """SAELens's TopK / BatchTopK (as saved for inference) on ``x``: ``(f, x_hat)``."""
    x_in, out = x, (lambda y: y)
    if cfg["normalize_activations"] == "layer_norm":
        x_in, mu, std = layer_norm(x)
        out = lambda y: y * std + mu  # noqa: E731
    n = w["W_dec"].norm(dim=-1) if cfg.get("rescale_acts_by_decoder_norm") else torch.ones(M)
    h = ((x_in - w["b_dec"] * cfg["apply_b_dec_to_input"]) @ w["W_enc"] + w["b_enc"]) * n
    if cfg["architecture"] == "topk":
        f = topk_then(h, K)
    else:
        f = torch.relu(h) * (h > float(w["topk_threshold"]))
    return f, out((f / n) @ w["W_dec"] + w["b_dec"])


@pytest.mark.parametrize("norm", ["none", "layer_norm"])
@pytest.mark.parametrize("a", [True, False])
@pytest.mark.parametrize("rescale", [True, False])
@pytest.mark.parametrize("decoder", sorted(DECODERS))
@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
def test_topk_rescaled_by_decoder_norms_matches_saelens(tmp_path, arch, decoder, rescale, a,
                                                        norm):
    w = weights(arch, DECODERS[decoder])
    cfg = {**v6_cfg("topk", a, norm), "architecture": arch,
           "rescale_acts_by_decoder_norm": rescale}
    folder = write_saelens(tmp_path / "sae", w, cfg)
    ae, config = load_dictionary(folder)
    expected = "TokenNormalizedSAE" if norm == "layer_norm" else \
        "AutoEncoderTopK" if arch == "topk" else "JumpReluAutoEncoder"
    assert type(ae).__name__ == expected
    assert config["architecture"] == arch
    x = inputs()
    f_ref, x_hat_ref = reference(w, cfg, x)
    check_close(ae, x, f_ref, x_hat_ref)
    torch.testing.assert_close(ae.W_dec.norm(dim=-1), torch.ones(M) if rescale
                               else w["W_dec"].norm(dim=-1), **TOL)
    if rescale and decoder == "checkpoint":  # the fold is not vacuous: the norms matter
        f_plain, _ = reference(w, {**cfg, "rescale_acts_by_decoder_norm": False}, x)
        assert not torch.allclose(f_plain, f_ref, **TOL)


def test_settings_without_a_meaning_here_are_refused(tmp_path):
    w = weights("topk", DECODERS["checkpoint"])
    folder = write_saelens(tmp_path / "w", w, {**v6_cfg("topk"),
                                               "normalize_activations": "covariance_whitening"})
    with pytest.raises(ValueError, match="covariance_whitening.*load the final model"):
        load_dictionary(folder)
    folder = write_saelens(tmp_path / "s", weights("topk", DECODERS["final"]),
                           {**v6_cfg("standard"), "rescale_acts_by_decoder_norm": True})
    with pytest.raises(ValueError, match="rescale_acts_by_decoder_norm is a topk setting"):
        load_dictionary(folder)
