"""ActivationBuffer against an independent reference: a plain PyTorch forward hook."""

import pytest
import torch

from dictionary_learning.buffer import ActivationBuffer

CTX = 32

# (architecture, submodule path, io). GPTNeoX and Llama MLPs and decoder layers return
# tensors in transformers 5; GPT-2's attention returns a tuple.
CASES = [
    ("pythia", "gpt_neox.layers.1.mlp", "out"),
    ("pythia", "gpt_neox.layers.1.mlp", "in"),
    ("pythia", "gpt_neox.layers.0.mlp", "in_to_out"),
    ("gpt2", "transformer.h.0.attn", "out"),
    ("gpt2", "transformer.h.1", "out"),
    ("llama", "model.layers.0", "out"),
    ("llama", "model.layers.1.mlp", "in_to_out"),
]


def get_module(hf_model, path):
    return hf_model.get_submodule(path)


def hooked_rows(hf_model, path, io, batches):
    """Real-token activations from a forward hook on the plain HF model.

    ``batches`` are dicts of input_ids/attention_mask/(position_ids); rows are gathered
    where the attention mask is 1. Returns one ``[n, d]`` tensor per served stream.
    """
    captured = {}

    def hook(module, args, kwargs, output):
        inp = args[0] if args else kwargs["hidden_states"]
        captured["in"] = inp
        captured["out"] = output[0] if isinstance(output, tuple) else output

    handle = get_module(hf_model, path).register_forward_hook(hook, with_kwargs=True)
    kinds = {"out": ["out"], "in": ["in"], "in_to_out": ["in", "out"]}[io]
    rows = {k: [] for k in kinds}
    try:
        with torch.no_grad():
            for batch in batches:
                hf_model(**batch)
                keep = batch["attention_mask"].bool()
                for k in kinds:
                    rows[k].append(captured[k][keep])
    finally:
        handle.remove()
    return [torch.cat(rows[k]) for k in kinds]


def drain(buffer):
    served = list(buffer)
    if isinstance(served[0], tuple):
        return [torch.cat([b[i] for b in served]) for i in range(len(served[0]))]
    return [torch.cat(served)]


def twins(served, reference):
    """For each served row, the index of its nearest reference row, after checking that
    every row of each has a twin in the other (the same rows, in another order). Matching
    by distance, not by sorting on a random projection, which pairs near-ties wrongly."""
    distance = torch.cdist(served, reference, compute_mode="donot_use_mm_for_euclid_dist")
    assert distance.min(dim=1).values.max() < 1e-3
    assert distance.min(dim=0).values.max() < 1e-3
    return distance.argmin(dim=1)


def padded_batches(tokenizer, texts, size):
    """Left-padded batches built here, independently of the package's tokenisation."""
    for i in range(0, len(texts), size):
        enc = tokenizer(texts[i:i + size], return_tensors="pt", padding=True, truncation=True,
                        max_length=CTX)
        mask = enc["attention_mask"]
        pos = torch.clamp(torch.cumsum(mask, dim=1) - 1, min=0)
        yield {"input_ids": enc["input_ids"], "attention_mask": mask, "position_ids": pos}


@pytest.mark.parametrize("arch,path,io", CASES)
def test_buffer_equals_forward_hook_on_same_batches(models, texts, arch, path, io):
    model = models[arch]
    data = texts[:60]
    buffer = ActivationBuffer(iter(data), model, path, io=io, n_ctxs=10, ctx_len=CTX,
                              refresh_batch_size=8, out_batch_size=50, progress=False)
    served = drain(buffer)
    reference = hooked_rows(model._module, path, io,
                            padded_batches(model.tokenizer, data, size=8))
    assert len(served) == len(reference)
    for s, r in zip(served, reference):
        assert s.shape == r.shape  # every real token once: nothing lost, nothing twice
    idx = twins(served[0], reference[0])  # the pairing of the first stream holds for all
    for s, r in zip(served, reference):
        torch.testing.assert_close(s, r[idx], rtol=1e-4, atol=1e-5)
    assert buffer.tokens_seen == reference[0].shape[0]


@pytest.mark.parametrize("arch,path,io", [("gpt2", "transformer.h.1.mlp", "out"),
                                          ("pythia", "gpt_neox.layers.1", "in")])
def test_buffer_equals_each_text_run_alone(models, texts, arch, path, io):
    """No padding at all in the reference; GPT-2's absolute positions expose any position
    error in the padded batches. Padded and unpadded runs differ by float noise only."""
    model = models[arch]
    data = texts[60:90]
    buffer = ActivationBuffer(data, model, path, io=io, n_ctxs=8, ctx_len=CTX,
                              refresh_batch_size=7, out_batch_size=64, progress=False)
    (served,) = drain(buffer)
    alone = [model.tokenizer(t, return_tensors="pt", truncation=True, max_length=CTX)
             for t in data]
    (reference,) = hooked_rows(model._module, path, io,
                               ({"input_ids": e["input_ids"],
                                 "attention_mask": e["attention_mask"]} for e in alone))
    assert served.shape == reference.shape
    dist = torch.cdist(served.double(), reference.double())
    scale = reference.norm(dim=-1).mean()
    # Every served row is a reference row and every reference row was served.
    assert dist.min(dim=1).values.max() < 1e-3 * scale
    assert dist.min(dim=0).values.max() < 1e-3 * scale


def test_refill_at_half_depletion_and_clean_exhaustion(models, texts, monkeypatch):
    model = models["pythia"]
    buffer = ActivationBuffer(texts[:80], model, model.gpt_neox.layers[0].mlp, n_ctxs=10,
                              ctx_len=CTX, refresh_batch_size=4, out_batch_size=30,
                              progress=False)
    capacity = 10 * CTX
    unread_at_refresh = []
    original = buffer.refresh

    def counting_refresh():
        unread_at_refresh.append(buffer.n_unread)
        original()

    monkeypatch.setattr(buffer, "refresh", counting_refresh)
    served = 0
    unread_before = []
    for batch in buffer:
        assert batch.shape[1] == 64 and batch.shape[0] <= 30
        served += batch.shape[0]
        unread_before.append(buffer.n_unread + batch.shape[0])
    assert unread_at_refresh[0] == 0
    assert len(unread_at_refresh) > 2
    # Every refill came when fewer than half were unread, never earlier.
    assert all(u < capacity // 2 for u in unread_at_refresh)
    assert served == buffer.tokens_seen
    with pytest.raises(StopIteration):
        next(buffer)


def test_remove_bos_drops_the_first_real_token(models, texts):
    model = models["pythia"]
    data = texts[:20]
    kept = sum(b.shape[0] for b in ActivationBuffer(
        data, model, "gpt_neox.layers.0.mlp", ctx_len=CTX, n_ctxs=4, refresh_batch_size=5,
        progress=False))
    dropped = sum(b.shape[0] for b in ActivationBuffer(
        data, model, "gpt_neox.layers.0.mlp", ctx_len=CTX, n_ctxs=4, refresh_batch_size=5,
        remove_bos=True, progress=False))
    assert kept - dropped == len(data)


def test_widths_inferred_given_and_aliases(models, texts):
    model = models["llama"]
    # nn.Linear: read off its features without a forward pass.
    buf = ActivationBuffer(texts, model, model.model.layers[0].mlp.up_proj, io="in_to_out",
                           progress=False)
    assert buf.d_submodule == (64, 256)
    # Probed: a decoder layer.
    buf = ActivationBuffer(texts, model, model.model.layers[0], progress=False)
    assert buf.d_submodule == 64
    # Seed-era names.
    buf = ActivationBuffer(texts, model, model.model.layers[0].mlp, io="in_to_out",
                           in_feats=64, out_feats=64, in_batch_size=3, n_ctxs=2, ctx_len=16,
                           out_batch_size=7, progress=False)
    assert buf.refresh_batch_size == 3 and buf.d_submodule == (64, 64)
    x_in, x_out = next(buf)
    assert x_in.shape == (7, 64) and x_out.shape == (7, 64)


def test_storage_dtype_and_config(models, texts):
    model = models["pythia"]
    buf = ActivationBuffer(texts, model, model.gpt_neox.layers[1].mlp, dtype=torch.bfloat16,
                           n_ctxs=4, ctx_len=16, out_batch_size=8, progress=False)
    assert next(buf).dtype == torch.bfloat16
    config = buf.config
    assert config["submodule_name"] == "gpt_neox.layers.1.mlp"
    assert config["d_submodule"] == 64 and config["io"] == "out" and config["ctx_len"] == 16
    assert config["dtype"] == "bfloat16"


def test_misuse_raises_clear_errors(models, texts):
    model, other = models["pythia"], models["gpt2"]
    with pytest.raises(ValueError, match="not a module of this model"):
        ActivationBuffer(texts, model, other.transformer.h[0].mlp)
    with pytest.raises(ValueError, match="nearest names: gpt_neox.layers.0.mlp"):
        ActivationBuffer(texts, model, "gpt_neox.layers.0.mpl")
    with pytest.raises(ValueError, match="no text"):
        ActivationBuffer(iter([]), model, model.gpt_neox.layers[0].mlp)
    with pytest.raises(TypeError, match="strings"):
        ActivationBuffer([1, 2, 3], model, model.gpt_neox.layers[0].mlp)
    with pytest.raises(TypeError, match="single string"):
        ActivationBuffer("just one text", model, model.gpt_neox.layers[0].mlp)
    with pytest.raises(ValueError, match="io must be"):
        ActivationBuffer(texts, model, model.gpt_neox.layers[0].mlp, io="outt")
    buf = ActivationBuffer(texts, model, model.gpt_neox.layers[0].mlp, d_submodule=65,
                           n_ctxs=2, ctx_len=16)
    with pytest.raises(ValueError, match="width 64.*told 65"):
        next(buf)
    # Non-strings later in the stream are caught when they are reached.
    buf = ActivationBuffer(["fine text"] * 3 + [None], model, model.gpt_neox.layers[0].mlp,
                           n_ctxs=2, ctx_len=16, refresh_batch_size=2, progress=False)
    with pytest.raises(TypeError, match="NoneType"):
        list(buf)


def test_several_submodules_in_one_forward_pass(models, texts):
    """Nested and sibling submodules, served as aligned rows of one dict per batch, each
    equal to a plain hook's activations; one forward per model batch, stopped early."""
    model = models["pythia"]
    paths = ["gpt_neox.layers.1", "gpt_neox.layers.0.mlp", "gpt_neox.layers.1.mlp"]
    data = texts[:40]
    calls = {"embed": 0, "final_norm": 0}
    hf = model._module
    h1 = hf.gpt_neox.embed_in.register_forward_hook(
        lambda *a: calls.__setitem__("embed", calls["embed"] + 1))
    h2 = hf.gpt_neox.final_layer_norm.register_forward_hook(
        lambda *a: calls.__setitem__("final_norm", calls["final_norm"] + 1))
    try:
        buffer = ActivationBuffer(data, model, paths, io="in_to_out", n_ctxs=10, ctx_len=CTX,
                                  refresh_batch_size=8, out_batch_size=50, progress=False)
        batches = list(buffer)
    finally:
        h1.remove()
        h2.remove()
    # One probe forward reads the widths, then 40 texts / 8 per forward; all stopped early.
    assert calls == {"embed": 1 + 5, "final_norm": 0}
    assert set(batches[0]) == set(paths)
    assert buffer.d_submodule == {p: (64, 64) for p in paths}
    served = {p: [torch.cat([b[p][i] for b in batches]) for i in range(2)] for p in paths}
    references = {p: hooked_rows(model._module, p, "in_to_out",
                                 padded_batches(model.tokenizer, data, size=8)) for p in paths}
    # Rows are aligned across submodules: one pairing, from the first, holds for them all.
    idx = twins(served[paths[0]][0], references[paths[0]][0])
    for p in paths:
        for s, r in zip(served[p], references[p]):
            torch.testing.assert_close(s, r[idx], rtol=1e-4, atol=1e-5)


def test_packing_fills_windows_without_padding(models, texts):
    model = models["gpt2"]
    tok = model.tokenizer
    data = texts[100:140]
    buffer = ActivationBuffer(data, model, "transformer.h.1.mlp", pack=True, n_ctxs=20,
                              ctx_len=CTX, refresh_batch_size=6, out_batch_size=100,
                              progress=False)
    (served,) = drain(buffer)
    # Independent reference: concatenate every document's ids and an EOS, cut windows.
    stream = []
    for t in data:
        stream += tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    windows = [stream[i:i + CTX] for i in range(0, len(stream), CTX)]
    assert served.shape[0] == len(stream) == buffer.tokens_seen
    batches = [{"input_ids": torch.tensor([w]), "attention_mask": torch.ones(1, len(w),
                                                                            dtype=torch.long)}
               for w in windows]
    (reference,) = hooked_rows(model._module, "transformer.h.1.mlp", "out", batches)
    torch.testing.assert_close(served, reference[twins(served, reference)], rtol=1e-4,
                               atol=1e-5)
