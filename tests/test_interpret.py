"""Interpretation helpers against brute force: every activation of a small dataset collected
with a plain forward hook on the HF model (same padded batches), encoded, then sorted and
counted by hand; logit effects against the unembedding matrix and a hand-patched forward."""

import copy
import math
from collections import Counter
from itertools import islice

import pytest
import torch

from dictionary_learning.architectures import AutoEncoder
from dictionary_learning.interpret import (ContextCollector, FeatureStatistics, feature_activations,
                                            round_significant)
from dictionary_learning.logit_effects import ablation_effect, logit_lens
from dictionary_learning.tiny import stdlib_texts, tiny_language_model
from dictionary_learning.tokens import tokenize_batch

SUBMODULE = "gpt_neox.layers.1.mlp"
CTX_LEN, BATCH, K, BEFORE, AFTER = 24, 8, 4, 5, 3


@pytest.fixture(scope="module")
def model():
    m = tiny_language_model("pythia", n_texts=300)
    with torch.no_grad():  # a non-trivial final-norm gain, so applying it is visible
        m._module.gpt_neox.final_layer_norm.weight.copy_(torch.rand(64) + 0.5)
    return m


@pytest.fixture(scope="module")
def dictionary():
    torch.manual_seed(1)
    ae = AutoEncoder(64, 96)
    with torch.no_grad():  # sparse-ish: features fire on a minority of tokens (MLP outputs
        ae.encoder.weight.mul_(10)  # of this random model are ~0.1 in size)
        ae.encoder.bias.fill_(-0.3)
    return ae


@pytest.fixture(scope="module")
def texts():
    return list(islice(stdlib_texts(), 500, 540))


def brute_force(model, dictionary, texts):
    """[(input_ids [B, T], mask [B, T], f [B, T, m])] per batch, via a plain forward hook."""
    hf = model._module
    captured = {}
    hook = hf.get_submodule(SUBMODULE).register_forward_hook(
        lambda mod, inp, out: captured.__setitem__("x", out))
    batches = []
    try:
        for s in range(0, len(texts), BATCH):
            inputs = tokenize_batch(model.tokenizer, texts[s:s + BATCH], CTX_LEN)
            with torch.no_grad():
                hf(**inputs)
                mask = inputs["attention_mask"].bool()
                f = dictionary.encode(captured["x"]) * mask[..., None]
            batches.append((inputs["input_ids"], mask, f))
    finally:
        hook.remove()
    return batches


def window(masks, c, t):
    """First and last index of the window around token t of context c: real tokens only."""
    lo = max(t - BEFORE, 0)
    while not masks[c, lo]:
        lo += 1
    return lo, min(t + AFTER, CTX_LEN - 1)


def same_example(e, ids, masks, acts, c, t) -> bool:
    """Does example ``e`` hold the window of context c around token t (tokens, the feature's
    activations ``acts`` [N, T], position of the centre)?"""
    lo, hi = window(masks, c, t)
    return (e.tokens == ids[c, lo:hi + 1].tolist() and e.pos == t - lo
            and torch.allclose(torch.tensor(e.acts), acts[c, lo:hi + 1], rtol=1e-4, atol=1e-5))


def test_top_contexts_and_statistics_equal_brute_force(model, dictionary, texts):
    top = ContextCollector(96, K, BEFORE, AFTER, mode="top")
    rand = ContextCollector(96, 3, BEFORE, AFTER, mode="random",
                            generator=torch.Generator().manual_seed(0))
    stats = FeatureStatistics(96, n_bins=10)
    for inputs, f, mask in feature_activations(model, SUBMODULE, dictionary, texts,
                                               ctx_len=CTX_LEN, batch_size=BATCH,
                                               progress=False):
        top.update(f, inputs["input_ids"], mask)
        rand.update(f, inputs["input_ids"], mask)
        stats.update(f[mask])

    # Brute force: one (max, context, position) per context and feature, sorted.
    batches = brute_force(model, dictionary, texts)
    pad = torch.nn.functional.pad
    ids = torch.cat([pad(i, (CTX_LEN - i.shape[1], 0)) for i, _, _ in batches])
    masks = torch.cat([pad(m, (CTX_LEN - m.shape[1], 0)) for _, m, _ in batches])
    f = torch.cat([pad(a, (0, 0, CTX_LEN - a.shape[1], 0)) for _, _, a in batches])  # [N, T, m]
    n_checked = 0
    for i in range(96):
        contexts = []
        for c in range(f.shape[0]):
            t = int(f[c, :, i].argmax())
            if f[c, t, i] > 0:
                contexts.append((float(f[c, t, i]), c, t))
        contexts.sort(reverse=True)
        got = top.examples(i)
        assert len(got) == min(K, len(contexts))
        torch.testing.assert_close(torch.tensor([e.max for e in got]),
                                   torch.tensor([v for v, _, _ in contexts[:K]]))
        for e in got:  # some context with this max (ties: texts sharing a prefix) matches
            assert any(same_example(e, ids, masks, f[..., i], c, t)
                       for v, c, t in contexts if abs(v - e.max) <= 1e-5 * max(v, 1))
            n_checked += 1
        # Random contexts: distinct contexts where the feature fired, as many as allowed.
        # (a sub-multiset: two contexts may share a window).
        fired = Counter(tuple(ids[c, lo:hi + 1].tolist())
                        for _, c, t in contexts for lo, hi in [window(masks, c, t)])
        sample = Counter(tuple(e.tokens) for e in rand.examples(i))
        assert sum(sample.values()) == min(3, len(contexts))
        assert all(n <= fired[w] for w, n in sample.items())
    assert n_checked > 100

    # Statistics by hand over the same activations.
    rows = f[masks]                                                      # [n, m]
    summary = stats.summary()
    assert stats.n_tokens == rows.shape[0] == int(masks.sum())
    for i in range(96):
        v = rows[:, i][rows[:, i] > 0]
        assert summary["density"][i] == pytest.approx(len(v) / rows.shape[0])
        if len(v) == 0:
            assert stats.upper[i] == 0 and stats.counts[i].sum() == 0
            continue
        assert summary["max_activation"][i] == pytest.approx(float(v.max()), rel=1e-5)
        assert summary["mean_activation"][i] == pytest.approx(float(v.double().mean()), rel=1e-4)
        upper = 2.0 ** (math.floor(math.log2(float(v.max()))) + 1)
        assert float(stats.upper[i]) == upper
        edges = [j * upper / 10 for j in range(11)]
        expected = [int(((v >= lo) & (v < hi)).sum()) for lo, hi in zip(edges, edges[1:])]
        assert stats.counts[i].tolist() == expected


def test_histogram_merges_bins_exactly_when_the_max_grows():
    stats = FeatureStatistics(1, n_bins=4)
    values = [0.1, 0.3, 0.45, 0.9, 1.7, 3.9, 0.2]     # upper: 1/8, 1/2, 1, 2, 4, 4, 4
    for v in values:
        stats.update(torch.tensor([[v], [0.0]]))
    assert float(stats.upper[0]) == 4.0
    assert stats.counts[0].tolist() == [5, 1, 0, 1]   # bins of width 1 over [0, 4)
    assert stats.summary()["density"][0] == pytest.approx(7 / 14)


def test_logit_lens_equals_unembedding_product(model, dictionary):
    hf = model._module
    W_U = hf.lm_head.weight.detach()
    g = hf.gpt_neox.final_layer_norm.weight.detach()
    features = [0, 5, 17]
    for apply, scale in ((True, g), (False, torch.ones_like(g))):
        lens = logit_lens(dictionary, hf, features=features, top=10, apply_final_norm=apply,
                          chunk=2)
        assert lens["final_norm_applied"] is apply
        for row, i in enumerate(features):
            logits = W_U @ (scale * dictionary.W_dec[i].detach())          # [V]
            order = logits.argsort(descending=True)
            torch.testing.assert_close(lens["promoted"][0][row], logits[order[:10]])
            assert lens["promoted"][1][row].tolist() == order[:10].tolist()
            torch.testing.assert_close(lens["suppressed"][0][row], logits[order.flip(0)[:10]])


def _hand_logprobs(model, dictionary, context, feature=None, io="out", contribution=None):
    """Log-probabilities [T, V] of one unpadded context, with ``feature`` subtracted from the
    MLP's output (io "out"), its input ("in"), or its output using the input's features
    ("in_to_out"), by a plain hook. ``contribution(x)``: the feature's part of ``x``
    (default ``f_i(x) * W_dec[i]``)."""
    mlp = model._module.get_submodule(SUBMODULE)

    if contribution is None:
        def contribution(x):
            return dictionary.encode(x)[..., feature, None] * dictionary.W_dec[feature]

    handle = None
    if feature is not None and io == "in":
        handle = mlp.register_forward_pre_hook(lambda mod, inp: (inp[0] - contribution(inp[0]),))
    elif feature is not None:
        handle = mlp.register_forward_hook(
            lambda mod, inp, out: out - contribution(out if io == "out" else inp[0]))
    try:
        with torch.no_grad():
            logits = model._module(input_ids=torch.tensor([context])).logits[0]
    finally:
        if handle is not None:
            handle.remove()
    return torch.log_softmax(logits.float(), dim=-1)


@pytest.mark.parametrize("io", ["out", "in", "in_to_out"])
def test_ablation_effect_equals_hand_patched_forward(model, dictionary, texts, io):
    tok = model.tokenizer
    contexts = [tok(t)["input_ids"][:n] for t, n in zip(texts[:3], (12, 7, 10))]
    positions = [11, 3, 9]
    feature = 3
    dictionary = copy.deepcopy(dictionary)
    with torch.no_grad():  # a long decoder row: the random model's logits then move visibly
        dictionary.W_dec[feature].mul_(30)
    effect = ablation_effect(model, SUBMODULE, dictionary, feature, contexts, positions, io=io)
    expected = torch.stack([
        _hand_logprobs(model, dictionary, c)[q]
        - _hand_logprobs(model, dictionary, c, feature, io)[q]
        for c, q in zip(contexts, positions)]).mean(dim=0)
    assert expected.abs().max() > 1e-4, "the feature should matter somewhere in these contexts"
    torch.testing.assert_close(effect, expected, rtol=1e-3, atol=2e-5)

    zeroed = copy.deepcopy(dictionary)
    with torch.no_grad():
        zeroed.W_dec[feature].zero_()
    zero_effect = ablation_effect(model, SUBMODULE, zeroed, feature, contexts, positions, io=io)
    assert torch.equal(zero_effect, torch.zeros_like(zero_effect))


def test_bad_inputs_are_refused(model, dictionary):
    with pytest.raises(ValueError, match="mode"):
        ContextCollector(4, 2, mode="best")
    with pytest.raises(ValueError, match="even"):
        FeatureStatistics(4, n_bins=5)
    with pytest.raises(ValueError, match="out of range"):
        ablation_effect(model, SUBMODULE, dictionary, 96, [[1, 2]], [1])
    with pytest.raises(ValueError, match="position"):
        ablation_effect(model, SUBMODULE, dictionary, 0, [[1, 2]], [2])
    narrow = AutoEncoder(32, 8)
    with pytest.raises(ValueError, match="width"):
        next(feature_activations(model, SUBMODULE, narrow, ["some text here"], progress=False))


def test_round_significant_matches_python_formatting():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(20_000, generator=g, dtype=torch.float64) * torch.exp(
        torch.randn(20_000, generator=g, dtype=torch.float64) * 8)
    x[:3] = torch.tensor([0.0, 1234.5678e10, -3.0])
    assert round_significant(x).tolist() == [float(f"{v:.4g}") for v in x.tolist()]


def test_ablation_of_a_per_token_normalised_dictionary(model, texts):
    """Where the reconstruction is rescaled per token (OpenAI TopK, SAELens layer_norm), the
    feature's contribution to the activation is ``f_i * W_dec[i] * s(x)``."""
    from dictionary_learning.architectures.token_normalized import TokenNormalizedSAE

    torch.manual_seed(3)
    sae = TokenNormalizedSAE(64, 96, k=8)
    contexts = [model.tokenizer(t)["input_ids"][:10] for t in texts[:3]]
    positions = [9, 9, 9]
    mlp = model._module.get_submodule(SUBMODULE)
    seen = []
    # Layer 1 is the last layer: only the MLP output at the scored position matters.
    handle = mlp.register_forward_hook(lambda mod, inp, out: seen.append(out[0, -1:]))
    with torch.no_grad():
        for c in contexts:
            model._module(input_ids=torch.tensor([c]))
    handle.remove()
    feature = int(sae.encode(torch.cat(seen)).count_nonzero(dim=0).argmax())  # fires there
    with torch.no_grad():
        sae.W_dec[feature].mul_(30)

    def scaled(x):  # the per-token scale s(x) multiplies the feature's decoded part
        return sae.encode(x)[..., feature, None] * sae.W_dec[feature] \
            * sae.normalization_stats(x)[1]

    expected = torch.stack([
        _hand_logprobs(model, sae, c)[q]
        - _hand_logprobs(model, sae, c, feature, contribution=scaled)[q]
        for c, q in zip(contexts, positions)]).mean(dim=0)
    effect = ablation_effect(model, SUBMODULE, sae, feature, contexts, positions)
    assert expected.abs().max() > 1e-4
    torch.testing.assert_close(effect, expected, rtol=1e-3, atol=2e-5)
