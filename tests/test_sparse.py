"""The sparse TopK-family kernels (``sparse.py``) against dense references on CPU, in
float32 and bfloat16: the decode and the gathered pre-activations with their gradients,
then each class's whole training loss (TopK, BatchTopK, Matryoshka) with the gradients of
``x``, ``W_enc``, ``b_enc``, ``W_dec`` and ``b_dec``, in float32, bf16 weights and under
bf16 autocast. (``test_architectures.py`` checks the float32 losses against a reference
that makes its own top-k selection; here the bf16 references take the support the sparse
path selected, since bf16 rounding may reorder near-ties, and compute in float64.)

Tolerances, stated once: float32 paths rtol 1e-5 / atol 1e-5 (values) and 1e-4 / 1e-5
(gradients); bf16 paths are compared with float64 on the same bf16-rounded inputs, to
``BF16`` = 3e-2 relative plus 3e-2 of the tensor's largest magnitude (bf16 keeps 8 bits:
one rounding is 4e-3; the worst error seen here, |err| / (|ref| + max |ref|), was 5.3e-3).
"""

import pytest
import torch

from dictionary_learning.base import LossContext
from dictionary_learning.dictionary import (AutoEncoderTopK, BatchTopKSAE,
                                            MatryoshkaBatchTopKSAE)
from dictionary_learning.sparse import (AUXK_NEGATIVE_SLOPE, SparseCode, auxk_loss,
                                        gather_preacts, sparse_decode, topk_code)

FP32 = dict(rtol=1e-5, atol=1e-5)
FP32_GRAD = dict(rtol=1e-4, atol=1e-5)
BF16 = 3e-2


def close_bf16(got, ref, what):
    """``got`` (bf16 or float32) within BF16 of the float64 ``ref``."""
    got, ref = got.detach().double(), ref.detach().double()
    scale = float(ref.abs().max()) or 1.0
    torch.testing.assert_close(got, ref, rtol=BF16, atol=BF16 * scale, msg=what)


def random_code(B, m, k, g):
    cols = torch.stack([torch.randperm(m, generator=g)[:k] for _ in range(B)]).reshape(-1)
    return SparseCode(torch.arange(B).repeat_interleave(k), cols, (B, m))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sparse_decode_equals_the_dense_product_with_gradients(dtype):
    g = torch.Generator().manual_seed(0)
    B, m, d, k = 24, 40, 32, 5
    code = random_code(B, m, k, g)
    vals = torch.rand(B * k, generator=g).to(dtype).requires_grad_()
    W = torch.randn(m, d, generator=g).to(dtype).requires_grad_()
    out = sparse_decode(code, vals, W)
    assert out.dtype == dtype and out.shape == (B, d)
    grad_out = torch.randn(B, d, generator=g).to(dtype)
    out.backward(grad_out)
    # Reference: the dense [B, m] matrix of the same entries, in float64.
    v64, W64 = vals.detach().double().requires_grad_(), W.detach().double().requires_grad_()
    ref = code.to_dense(v64) @ W64
    ref.backward(grad_out.double())
    if dtype == torch.float32:
        torch.testing.assert_close(out.double(), ref, **FP32)
        torch.testing.assert_close(vals.grad.double(), v64.grad, **FP32_GRAD)
        torch.testing.assert_close(W.grad.double(), W64.grad, **FP32_GRAD)
    else:
        close_bf16(out, ref, "x_hat")
        close_bf16(vals.grad, v64.grad, "grad values")
        close_bf16(W.grad, W64.grad, "grad W_dec")
    # Rows of W that no entry uses get exactly no gradient.
    unused = torch.ones(m, dtype=torch.bool)
    unused[code.cols] = False
    assert unused.any() and bool((W.grad[unused] == 0).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gather_preacts_gradients_equal_the_dense_ones(dtype):
    g = torch.Generator().manual_seed(1)
    B, m, d, k = 20, 48, 24, 6
    x = torch.randn(B, d, generator=g).to(dtype).requires_grad_()
    W = torch.randn(m, d, generator=g).to(dtype).requires_grad_()
    b = torch.randn(m, generator=g).to(dtype).requires_grad_()
    with torch.no_grad():
        pre = torch.addmm(b, x, W.t())
    code = topk_code(pre, k)
    vals = gather_preacts(x, W, b, pre, code)
    upstream = torch.randn(len(code), generator=g).to(dtype)
    vals.backward(upstream)
    leaves = [t.detach().double().requires_grad_() for t in (x, W, b)]
    x64, W64, b64 = leaves
    ref = (x64 @ W64.T + b64)[code.rows, code.cols]
    ref.backward(upstream.double())
    for name, got, want in [("x", x.grad, x64.grad), ("W_enc", W.grad, W64.grad),
                            ("b_enc", b.grad, b64.grad)]:
        assert got.dtype == dtype, name
        if dtype == torch.float32:
            torch.testing.assert_close(got.double(), want, **FP32_GRAD, msg=name)
        else:
            close_bf16(got, want, name)
    if dtype == torch.float32:
        torch.testing.assert_close(vals.double(), ref, **FP32)
    else:
        close_bf16(vals, ref, "values")


# -- whole losses -------------------------------------------------------------------------

D, M = 32, 64
CLASSES = {
    "AutoEncoderTopK": lambda: AutoEncoderTopK(D, M, k=6, k_aux=6),
    "BatchTopKSAE": lambda: BatchTopKSAE(D, M, k=6, k_aux=6),
    "MatryoshkaBatchTopKSAE": lambda: MatryoshkaBatchTopKSAE(D, M, k=6,
                                                             group_sizes=[8, 24, 32], k_aux=6),
}


def build(name, seed=0):
    torch.manual_seed(seed)
    ae = CLASSES[name]()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in ae.parameters():  # off the initial values (biases start at 0)
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return ae


def roles(name, params):
    """(W_enc rows [m, d], b_enc, W_dec rows [m, d], b_dec) of a parameter dict."""
    if name == "MatryoshkaBatchTopKSAE":
        return params["W_enc"].T, params["b_enc"], params["W_dec"], params["b_dec"]
    return (params["encoder.weight"], params["encoder.bias"], params["decoder.weight"].T,
            params["b_dec"])


def dense_loss(name, ae, x, support, dead):
    """The class's loss with dense matrices, in float64, on copies of ``x`` and the
    parameters; ``support`` [B, m] (bool) is the selection, ``dead`` [m] the dead latents
    (fewer than k_aux, so AuxK keeps all of them: no second selection to tie-break).
    Returns (terms, leaves: {"x": ..., stored parameter name: ...})."""
    leaves = {n: p.detach().double().requires_grad_() for n, p in ae.named_parameters()}
    leaves["x"] = x.detach().double().requires_grad_()
    W_enc, b_enc, W_dec, b_dec = roles(name, leaves)
    x64 = leaves["x"]
    pre = (x64 - b_dec) @ W_enc.T + b_enc
    post = torch.relu(pre)
    f = post * support
    x_hat = f @ W_dec + b_dec
    terms = {"mse": (x64 - x_hat).pow(2).sum(-1).mean()}
    if name == "MatryoshkaBatchTopKSAE":
        terms["prefix_mse"] = sum((x64 - (f[:, :end] @ W_dec[:end] + b_dec)).pow(2).sum(-1)
                                  .mean() for end in ae.group_ends[:-1])
    e = (x64 - x_hat).detach()
    # AuxK's ReLU: value relu(pre), gradient AUXK_NEGATIVE_SLOPE where pre < 0
    leaky = torch.where(pre > 0, pre, AUXK_NEGATIVE_SLOPE * (pre - pre.detach()))
    aux = (leaky * dead) @ W_dec
    terms["auxk"] = ae.auxk_alpha * (e - aux).pow(2).sum(-1).mean() / \
        (e - e.mean(0)).pow(2).sum(-1).mean()
    return terms, leaves


def run_sparse(ae, x, dead, autocast):
    x = x.detach().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = ae.loss_terms(x, x, LossContext(dead=dead))
    sum(v.float() for v in out.terms.values()).backward()
    return out, x.grad


@pytest.mark.parametrize("mode", ["float32", "bf16_weights", "bf16_autocast"])
@pytest.mark.parametrize("name", sorted(CLASSES))
def test_sparse_loss_values_and_gradients_equal_the_dense_reference(name, mode):
    ae = build(name)
    x = torch.randn(48, D, generator=torch.Generator().manual_seed(7)) * 2
    if mode == "bf16_weights":  # the dictionary and its batches in bf16 throughout
        ae, x = ae.to(torch.bfloat16), x.to(torch.bfloat16)
    dead = torch.zeros(M, dtype=torch.bool)
    dead[[3, 17, 40, 41, 60]] = True  # 5 < k_aux = 6
    out, x_grad = run_sparse(ae, x, dead, autocast=mode == "bf16_autocast")
    support = out.features.detach() != 0
    assert support.sum() <= 6 * 48 and support.sum() > 48  # k per token on average
    terms, leaves = dense_loss(name, ae, x, support.double(), dead.double())
    assert set(out.terms) == set(terms)
    sum(terms.values()).backward()
    if mode == "float32":
        # In float32 the selection itself is checked too: it is the dense top-k.
        post = ae.pre_activations(x).detach()
        if name == "AutoEncoderTopK":
            cut = post.topk(6, dim=-1).values[:, -1:]
        else:
            cut = post.flatten().topk(6 * 48).values[-1]
        assert torch.equal(support, (post >= cut) & (post > 0))
    for term, ref in terms.items():
        if mode == "float32":
            torch.testing.assert_close(out.terms[term].double(), ref, **FP32, msg=term)
        else:
            close_bf16(out.terms[term], ref, term)
    grads = {"x": x_grad, **{n: p.grad for n, p in ae.named_parameters()}}
    assert set(grads) == set(leaves)
    for n, got in grads.items():
        assert got is not None and got.dtype == (torch.bfloat16 if mode == "bf16_weights"
                                                 else torch.float32), n
        if mode == "float32":
            torch.testing.assert_close(got.double(), leaves[n].grad, **FP32_GRAD, msg=n)
        else:
            close_bf16(got, leaves[n].grad, n)


@pytest.mark.parametrize("slope", [0.0, AUXK_NEGATIVE_SLOPE, 1.0])
def test_auxk_teaches_a_dead_latent_whose_pre_activations_are_all_negative(slope):
    """AuxK's value is the textbook one (the latent contributes relu(pre) = 0), but the
    encoder row and bias of a dead latent that never has a positive pre-activation get
    ``slope`` times the gradient a linear unit would get, computed here by hand; its
    decoder row gets none (its value is 0)."""
    g = torch.Generator().manual_seed(3)
    B, d, m = 5, 4, 3
    x_c = torch.randn(B, d, dtype=torch.float64, generator=g)
    W_enc = torch.randn(m, d, dtype=torch.float64, generator=g).requires_grad_()
    b_enc = torch.tensor([-100.0, 0.5, 0.5], dtype=torch.float64, requires_grad=True)
    W_dec = torch.randn(m, d, dtype=torch.float64, generator=g).requires_grad_()
    e = torch.randn(B, d, dtype=torch.float64, generator=g)
    pre = (x_c @ W_enc.T + b_enc).detach()
    assert (pre[:, 0] < 0).all()
    dead = torch.tensor([True, False, False])
    loss = auxk_loss(e, x_c, W_enc, b_enc, W_dec, pre, dead, k_aux=1, negative_slope=slope)
    denom = (e - e.mean(0)).pow(2).sum(-1).mean()
    torch.testing.assert_close(loss.detach(), e.pow(2).sum(-1).mean() / denom)
    loss.backward()
    d_val = -2 * (e @ W_dec[0].detach()) / (B * denom)  # dloss/dvalue of latent 0, per token
    torch.testing.assert_close(b_enc.grad[0], slope * d_val.sum())
    torch.testing.assert_close(W_enc.grad[0], slope * d_val @ x_c)
    assert float(W_dec.grad.abs().sum()) == 0.0
    assert float(b_enc.grad[1:].abs().sum()) == 0.0  # alive latents get nothing from AuxK
