"""KL(clean || patched) of loss_recovered against a hand computation from two plain HF
forwards (one clean, one with a hook putting the reconstruction in), and the figures the
evaluate command reports."""

import json
import math

import pytest
import torch

from dictionary_learning import AutoEncoder, IdentityDict, loss_recovered
from dictionary_learning.tokens import tokenize_batch

SUB = "gpt_neox.layers.0.mlp"
CTX = 24


@pytest.fixture(scope="module")
def kl_texts(texts):
    return texts[300:306]


def hand_kl(model, dictionary, texts, io, replace, batch_size):
    """Mean over real tokens of sum_v p(v) (log p(v) - log q(v)), from HF forwards of the
    same padded batches (position ids counted over real tokens), in float64."""
    hf = model._module
    module = hf.get_submodule(SUB)
    total, n = 0.0, 0
    for start in range(0, len(texts), batch_size):
        inputs = tokenize_batch(model.tokenizer, texts[start:start + batch_size], CTX)
        with torch.no_grad():
            clean = hf(**inputs).logits.double().log_softmax(-1)
            if io == "in":
                handle = module.register_forward_pre_hook(
                    lambda m, args: (replace(args[0]).to(args[0].dtype), *args[1:]))
            else:
                handle = module.register_forward_hook(lambda m, args, out: replace(out))
            try:
                patched = hf(**inputs).logits.double().log_softmax(-1)
            finally:
                handle.remove()
        real = inputs["attention_mask"].bool()
        p, q = clean[real], patched[real]
        total += (p.exp() * (p - q)).sum(-1).sum().item()
        n += int(real.sum())
    return total / n, n


@pytest.mark.parametrize("io, batch_size", [("out", 1), ("out", 4), ("in", 3)])
def test_kl_div_equals_two_hf_forwards(models, kl_texts, io, batch_size):
    model = models["pythia"]
    torch.manual_seed(0)
    ae = AutoEncoder(64, 256)
    with torch.no_grad():  # tied unit rows, no bias: closer to the activations than zero
        ae.encoder.bias.zero_()
    got = loss_recovered(kl_texts, model, SUB, ae, io=io, ctx_len=CTX, batch_size=batch_size)
    want, n = hand_kl(model, ae, kl_texts, io, lambda x: ae(x), batch_size)
    zero, _ = hand_kl(model, ae, kl_texts, io, torch.zeros_like, batch_size)
    assert got["n_kl_tokens"] == n
    assert got["n_tokens"] == n - len(kl_texts)  # CE also needs a next token
    assert got["kl_div"] == pytest.approx(want, rel=1e-4, abs=1e-9)
    assert got["kl_zero"] == pytest.approx(zero, rel=1e-4, abs=1e-9)
    assert got["kl_score"] == pytest.approx(1 - want / zero, rel=1e-4)
    assert got["kl_div"] > 1e-6 and got["kl_zero"] > got["kl_div"]  # not trivially 0


def test_identity_has_no_divergence_and_full_score(models, kl_texts):
    got = loss_recovered(kl_texts, models["gpt2"], "transformer.h.0.mlp", IdentityDict(64),
                         ctx_len=CTX, batch_size=3)
    assert got["kl_div"] == 0 and got["kl_score"] == 1 and got["kl_zero"] > 0


def test_evaluate_reports_kl_in_the_table_and_the_json(tmp_path_factory, capsys):
    from dictionary_learning.cli import main

    from cli_helpers import D_MODEL, nested_config, save_dictionary, shared_model_folder, \
        write_jsonl

    model_dir = shared_model_folder(tmp_path_factory)
    root = tmp_path_factory.mktemp("kl_eval")
    data = root / "docs.jsonl"
    texts = write_jsonl(data, n=40)
    torch.manual_seed(1)
    ae = AutoEncoder(D_MODEL, 128)
    with torch.no_grad():
        ae.encoder.bias.zero_()
    folder = save_dictionary(root / "dict", ae, nested_config(model_dir, "gpt_neox.layers.1.mlp",
                                                              128, ctx_len=16))
    out = root / "eval.json"
    assert main(["evaluate", str(folder), "--data", str(data), "--n-tokens", "200",
                 "--n-loss-texts", "5", "--batch-size", "4", "--json", str(out)]) == 0
    table = capsys.readouterr().out
    header = table.splitlines()[0]
    assert "KL" in header.split() and "KL score" in header
    [record] = json.loads(out.read_text())
    # The command's loss texts: the documents after those its activation buffer read.
    from dictionary_learning import ActivationBuffer
    from dictionary_learning.sources import load_model

    model = load_model(str(model_dir))
    buffer = ActivationBuffer(iter(texts), model, "gpt_neox.layers.1.mlp",
                              n_ctxs=math.ceil(200 / 16), ctx_len=16, refresh_batch_size=4,
                              out_batch_size=200, progress=False)
    next(buffer)
    want = loss_recovered(buffer.text_batch(5), model, "gpt_neox.layers.1.mlp", ae, ctx_len=16,
                          batch_size=4)
    for key in ("kl_div", "kl_zero", "kl_score", "n_kl_tokens"):
        assert record[key] == pytest.approx(want[key], rel=1e-6), key
    assert record["n_kl_tokens"] > record["n_loss_tokens"] > 0
    assert 0 < record["kl_div"] < record["kl_zero"]
    assert f"{record['kl_div']:.4g}" in table and f"{record['kl_score']:.4g}" in table
