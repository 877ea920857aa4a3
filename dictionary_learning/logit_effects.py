"""Which next tokens a feature pushes up or down: read off its decoder direction (logit
lens), and measured by ablating it in real contexts.

Logit lens: feature ``i``'s decoder row ``W_dec[i]`` ``[d]`` is multiplied by the unembedding
``W_U`` ``[V, d]``. With ``apply_final_norm`` (the default) the final norm's elementwise
weight ``g`` is applied first, ``W_U @ (g * W_dec[i])``: the direction is treated as a
residual-stream direction passing through the final LayerNorm/RMSNorm's gain, ignoring its
centring, its division by the norm of the whole residual and its bias (a common
convention: without the gain the readout is off by a per-dimension scale).

Ablation: in each given context the submodule's activation ``x`` is replaced by
``x - f_i(x) * W_dec[i]`` at every token: the dictionary's reconstruction minus the
feature's contribution, plus the dictionary's error term, so nothing but feature ``i``
changes. (Where the reconstruction depends on ``x`` itself, as for per-token normalised
dictionaries, the contribution is ``reconstruct(f, x) - reconstruct(f without i, x)``.) The effect on token ``v`` is ``log p_clean(v) - log p_ablated(v)`` of the next-token
prediction at the context's max-activating token, averaged over contexts: positive means
the feature promotes ``v``.
"""

from __future__ import annotations

import torch

from .submodules import hidden_states, resolve_submodule, with_hidden_states

FINAL_NORMS = ("gpt_neox.final_layer_norm", "transformer.ln_f", "model.norm",
               "model.final_layernorm", "model.decoder.final_layer_norm")


def final_norm(hf_model: torch.nn.Module) -> torch.nn.Module | None:
    """The final norm before the unembedding (by the usual names), or ``None``."""
    modules = dict(hf_model.named_modules())
    return next((modules[n] for n in FINAL_NORMS if n in modules), None)


def unembedding(hf_model: torch.nn.Module, apply_final_norm: bool = True):
    """``(W [V, d], applied)``: the unembedding matrix, with the final norm's weight folded in
    (``W[v, j] = W_U[v, j] * g[j]``) when asked for and found; ``applied`` says whether it was."""
    out = hf_model.get_output_embeddings()
    if out is None or not hasattr(out, "weight"):
        raise ValueError(f"{type(hf_model).__name__} has no output embedding: the logit lens "
                         "needs a causal LM with an unembedding matrix")
    W = out.weight.detach().float()
    norm = final_norm(hf_model) if apply_final_norm else None
    gain = getattr(norm, "weight", None)
    if gain is None:
        return W, False
    return W * gain.detach().float().to(W.device), True


@torch.no_grad()
def logit_lens(dictionary, hf_model: torch.nn.Module, features=None, top: int = 10,
               apply_final_norm: bool = True, chunk: int = 1024) -> dict:
    """Tokens each feature's decoder direction promotes and suppresses most.

    Returns ``{"promoted": (values, ids), "suppressed": (values, ids), "final_norm_applied":
    bool}`` where values and ids are ``[n, top]`` (``n`` features, all by default), promoted
    in decreasing and suppressed in increasing order of ``W @ W_dec[i]``. Computed in chunks
    of ``chunk`` features so a 32k-feature dictionary never holds ``[m, V]`` at once.
    """
    W_dec = dictionary.W_dec
    if W_dec is None:
        raise ValueError(f"{type(dictionary).__name__} has no decoder directions (W_dec)")
    W, applied = unembedding(hf_model, apply_final_norm)
    if W_dec.shape[-1] != W.shape[-1]:
        raise ValueError(f"decoder rows have width {W_dec.shape[-1]} but the unembedding takes "
                         f"{W.shape[-1]}: the logit lens needs a residual-width dictionary")
    ids = torch.arange(W_dec.shape[0]) if features is None else torch.as_tensor(features)
    top = min(top, W.shape[0])
    parts = {"promoted": ([], []), "suppressed": ([], [])}
    for start in range(0, len(ids), chunk):
        rows = W_dec[ids[start:start + chunk].to(W_dec.device)].float().to(W.device)
        logits = rows @ W.T                                             # [c, V]
        for name, largest in (("promoted", True), ("suppressed", False)):
            v, i = logits.topk(top, dim=-1, largest=largest)
            parts[name][0].append(v.cpu())
            parts[name][1].append(i.cpu())
    result = {name: (torch.cat(v), torch.cat(i)) for name, (v, i) in parts.items()}
    return {**result, "final_norm_applied": applied}


def _logprobs(model, envoy, inputs: dict, io: str, patch) -> torch.Tensor:
    """Log-probabilities ``[B, T, V]`` with the submodule's activation passed through
    ``patch`` (``None``: the clean model). ``io="in_to_out"`` patches the output from the
    input's features."""
    with torch.inference_mode(), model.trace(inputs):
        if patch is not None and io == "in":
            envoy.input = patch(hidden_states(envoy.input, "submodule input"), None)
        elif patch is not None:
            x_in = hidden_states(envoy.input, "submodule input") if io == "in_to_out" else None
            out = envoy.output
            x_out = hidden_states(out, "submodule output")
            envoy.output = with_hidden_states(out, patch(x_out if x_in is None else x_in, x_out))
        logp = torch.log_softmax(model.output.logits.float(), dim=-1).save()
    return logp


def _pad_left(contexts: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    T = max(len(c) for c in contexts)
    ids = torch.full((len(contexts), T), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, c in enumerate(contexts):
        ids[r, T - len(c):] = torch.tensor(c)
        mask[r, T - len(c):] = 1
    return {"input_ids": ids, "attention_mask": mask,
            "position_ids": (mask.cumsum(-1) - 1).clamp_min(0)}


@torch.no_grad()
def ablation_effect(model, submodule, dictionary, feature: int, contexts: list[list[int]],
                    positions: list[int], io: str = "out") -> torch.Tensor:
    """Mean over contexts of ``log p_clean - log p_ablated`` ``[V]`` of the next-token
    prediction at ``positions[c]`` of token-id context ``c``, with ``feature`` removed from
    the submodule's activation at every token (see the module docstring)."""
    if not contexts or len(contexts) != len(positions):
        raise ValueError("pass one position per context, and at least one context")
    W_dec = dictionary.W_dec
    if W_dec is None:
        raise ValueError(f"{type(dictionary).__name__} has no decoder directions (W_dec)")
    if not 0 <= feature < W_dec.shape[0]:
        raise ValueError(f"feature {feature} is out of range [0, {W_dec.shape[0]})")
    if any(not 0 <= q < len(c) for c, q in zip(contexts, positions)):
        raise ValueError("every position must index a token of its context")
    envoy, _ = resolve_submodule(model, submodule)
    p = W_dec
    direction = W_dec[feature]                                           # [d_out]

    def patch(x_enc: torch.Tensor, x_out: torch.Tensor | None) -> torch.Tensor:
        target = x_enc if x_out is None else x_out
        rows = x_enc.reshape(-1, x_enc.shape[-1]).to(device=p.device, dtype=p.dtype)
        f = dictionary.encode(rows)                                      # [B*T, m]
        if hasattr(dictionary, "reconstruct"):  # the output depends on x (per-token scale)
            without = f.clone()
            without[:, feature] = 0
            delta = dictionary.reconstruct(f, rows) - dictionary.reconstruct(without, rows)
        else:
            delta = f[:, feature, None] * direction                      # [B*T, d_out]
        delta = delta.reshape(*x_enc.shape[:-1], -1)                     # [B, T, d_out]
        return target - delta.to(device=target.device, dtype=target.dtype)

    pad = model.tokenizer.pad_token_id or 0
    inputs = _pad_left(contexts, pad)
    clean = _logprobs(model, envoy, inputs, io, None)
    ablated = _logprobs(model, envoy, inputs, io, patch)
    T = inputs["input_ids"].shape[1]
    rows = torch.arange(len(contexts))
    cols = torch.tensor([T - len(c) + q for c, q in zip(contexts, positions)])
    return (clean[rows, cols] - ablated[rows, cols]).double().mean(dim=0).float().cpu()
