"""Interventions on a dictionary's features while the model runs or generates.

An intervention edits the features ``f = encode(x)`` of the hooked activation and puts the
change back into the model through the dictionary's decoder:

    x' = x̂(f') + (x - x̂(f))  =  x + (x̂(f') - x̂(f))

the edited reconstruction plus the dictionary's error term, so nothing the dictionary
fails to reconstruct is lost. It is computed as ``x + delta`` with ``delta`` from the
edited features only (``(f'_S - f_S) @ W_dec[S]`` for the touched features ``S``; times
the per-token scale of a per-token-normalised dictionary), so an empty intervention adds
exact zeros and reproduces the clean model bit for bit.

Edits, combined with ``+`` and applied in order to each token's features:

- ``ablate(features)``          ``f'_i = 0``
- ``clamp(features, value)``    ``f'_i = value``
- ``add(features, scale)``      ``f'_i = f_i + scale``: adds ``scale * W_dec[i]``, the
  feature's decoder direction (for a per-token-normalised dictionary, that direction in
  the normalised space, i.e. scaled by the token's norm factor)
- ``scale(features, factor)``   ``f'_i = factor * f_i``

each at every real token from position ``start`` on (0, the default: the whole prompt and
every generated token; positions count a prompt's real tokens from 0, then the generated
ones). ``io`` says which activation: ``"out"`` the submodule's output, ``"in"`` its input,
``"in_to_out"`` the features of its input edit its output (stretchers, transcoders).

:func:`generate` samples (or decodes greedily) from the model with and without the
intervention, through nnsight's ``generate`` with the edit applied at every step;
:func:`logit_diff` gives the change in the next-token log-probabilities after a prompt.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import NamedTuple

import torch

from .submodules import IO_MODES, hidden_states, resolve_submodule, with_hidden_states

KINDS = ("ablate", "clamp", "add", "scale")


def _feature_ids(features) -> tuple[int, ...]:
    ids = [features] if isinstance(features, int) else list(features)
    if not ids or any(isinstance(i, bool) or not isinstance(i, int) for i in ids):
        raise TypeError(f"features must be a feature id or a non-empty list of ids, got "
                        f"{features!r}")
    return tuple(sorted(set(ids)))


@dataclass(frozen=True)
class Edit:
    """One edit of some features' activations, at positions ``>= start``."""

    kind: str
    features: tuple[int, ...]
    value: float = 0.0
    start: int = 0

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown edit {self.kind!r}: use one of {KINDS}")
        if isinstance(self.start, bool) or not isinstance(self.start, int) or self.start < 0:
            raise ValueError(f"start must be a position >= 0, got {self.start!r}")
        value = float(self.value)
        if value != value or value in (float("inf"), float("-inf")):
            raise ValueError(f"{self.kind} needs a finite value, got {self.value!r}")

    def apply(self, f_new: torch.Tensor, positions: torch.Tensor) -> None:
        """Edit ``f_new`` ``[N, m]`` in place on the rows whose position is ``>= start``."""
        idx = list(self.features)
        current = f_new[:, idx]
        if self.kind == "ablate":
            edited = torch.zeros_like(current)
        elif self.kind == "clamp":
            edited = torch.full_like(current, self.value)
        elif self.kind == "add":
            edited = current + self.value
        else:
            edited = current * self.value
        rows = (positions >= self.start)[:, None]
        f_new[:, idx] = torch.where(rows, edited, current)

    def __str__(self) -> str:
        ids = ",".join(map(str, self.features))
        what = {"ablate": f"ablate {ids}", "clamp": f"clamp {ids} to {self.value:g}",
                "add": f"add {self.value:g} to {ids}",
                "scale": f"scale {ids} by {self.value:g}"}[self.kind]
        return what + (f" from position {self.start}" if self.start else "")


@dataclass(frozen=True)
class Interventions:
    """Edits applied in order; ``a + b`` is ``a``'s edits then ``b``'s. Empty: the clean
    model."""

    edits: tuple[Edit, ...] = ()

    def __add__(self, other: "Interventions") -> "Interventions":
        if not isinstance(other, Interventions):
            return NotImplemented
        return Interventions(self.edits + other.edits)

    def __len__(self) -> int:
        return len(self.edits)

    @property
    def features(self) -> list[int]:
        """Every feature some edit touches, sorted."""
        return sorted({i for e in self.edits for i in e.features})

    def from_position(self, start: int) -> "Interventions":
        """The same edits, each applied from position ``start`` on."""
        return Interventions(tuple(replace(e, start=start) for e in self.edits))

    def check(self, dict_size: int) -> None:
        bad = [i for i in self.features if not 0 <= i < dict_size]
        if bad:
            raise ValueError(f"feature{'s' * (len(bad) > 1)} {', '.join(map(str, bad))} out "
                             f"of range: the dictionary has features 0..{dict_size - 1}")

    def __str__(self) -> str:
        return "; ".join(map(str, self.edits)) or "no intervention"


def ablate(features, start: int = 0) -> Interventions:
    """Set the features to 0."""
    return Interventions((Edit("ablate", _feature_ids(features), 0.0, start),))


def clamp(features, value: float, start: int = 0) -> Interventions:
    """Set the features to ``value``."""
    return Interventions((Edit("clamp", _feature_ids(features), float(value), start),))


def add(features, scale: float, start: int = 0) -> Interventions:
    """Add ``scale`` to the features: ``scale`` times each one's decoder direction."""
    return Interventions((Edit("add", _feature_ids(features), float(scale), start),))


def scale(features, factor: float, start: int = 0) -> Interventions:
    """Multiply the features by ``factor``."""
    return Interventions((Edit("scale", _feature_ids(features), float(factor), start),))


def combine(interventions: Iterable[Interventions] | Interventions) -> Interventions:
    """One :class:`Interventions` from one or several (applied in the given order)."""
    if isinstance(interventions, Interventions):
        return interventions
    out = Interventions()
    for i in interventions:
        if not isinstance(i, Interventions):
            raise TypeError(f"expected Interventions (from ablate, clamp, add, scale), got "
                            f"{type(i).__name__}")
        out = out + i
    return out


# ---------------------------------------------------------------------------------------
# The arithmetic


def _param(dictionary) -> torch.Tensor | None:
    return next(dictionary.parameters(), None)


@torch.no_grad()
def steer_activations(dictionary, interventions: Interventions, x_enc: torch.Tensor,
                      target: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """``target + x̂(f') - x̂(f)`` with ``f = encode(x_enc)`` and ``f'`` the edited features.

    ``x_enc`` ``[B, T, d_in]`` is what the dictionary encodes, ``target`` ``[B, T, d_out]``
    the activation that is changed (the same tensor, except for ``in_to_out``),
    ``positions`` ``[B, T]`` each token's position (negative: padding, never edited).
    Returns a tensor shaped and typed like ``target``.
    """
    B, T, _ = x_enc.shape
    if target.shape[:2] != (B, T) or positions.shape != (B, T):
        raise ValueError(f"shapes do not fit: x_enc {tuple(x_enc.shape)}, target "
                         f"{tuple(target.shape)}, positions {tuple(positions.shape)}")
    p = _param(dictionary)
    rows = x_enc.reshape(B * T, -1)
    if p is not None:
        rows = rows.to(device=p.device, dtype=p.dtype)
    f = dictionary.encode(rows)                                         # [N, m]
    f_new = f.clone()
    pos = positions.reshape(-1).to(f.device)
    for edit in interventions.edits:
        edit.apply(f_new, pos)
    touched = interventions.features
    W = dictionary.W_dec                                                # [m, d_out] or None
    if W is None:  # weightless (IdentityDict): the features are the activation
        delta = torch.zeros_like(f)
        delta[:, touched] = f_new[:, touched] - f[:, touched]
    else:
        delta = (f_new[:, touched] - f[:, touched]) @ W[touched]        # [N, d_out]
        if hasattr(dictionary, "normalization_stats"):  # decoded in a normalised space
            delta = delta * dictionary.normalization_stats(rows)[1]
    delta = delta.reshape(B, T, -1)
    if delta.shape[-1] != target.shape[-1]:
        raise ValueError(f"the dictionary decodes to width {delta.shape[-1]} but the patched "
                         f"activation has width {target.shape[-1]}: check io")
    return target + delta.to(device=target.device, dtype=target.dtype)


def patch_submodule(envoy, io: str, fn) -> None:
    """Inside an nnsight trace: replace the submodule's activation by
    ``fn(x_enc, target)`` (see :func:`steer_activations`)."""
    if io == "in":
        x = hidden_states(envoy.input, "submodule input")
        envoy.input = fn(x, x)
        return
    x_in = hidden_states(envoy.input, "submodule input") if io == "in_to_out" else None
    out = envoy.output
    x_out = hidden_states(out, "submodule output")
    envoy.output = with_hidden_states(out, fn(x_out if x_in is None else x_in, x_out))


def _check(model, submodule, dictionary, interventions, io: str):
    if io not in IO_MODES:
        raise ValueError(f"io must be one of {IO_MODES}, got {io!r}")
    interventions = combine(interventions)
    interventions.check(dictionary.dict_size)
    envoy, _ = resolve_submodule(model, submodule)
    return envoy, interventions


def _prompt_batch(model, prompts) -> dict[str, torch.Tensor]:
    """Left-padded ``input_ids`` and ``attention_mask`` of the prompts, on the model's
    device."""
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    if not prompts or not all(isinstance(p, str) and p for p in prompts):
        raise ValueError("prompts must be a non-empty string or a list of them")
    tokenizer = model.tokenizer
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    enc = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left")
    device = next(model._module.parameters()).device
    return {"input_ids": enc["input_ids"].to(device),
            "attention_mask": enc["attention_mask"].to(device)}


def prompt_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """``[B, T]``: each real token's position among its row's real tokens; -1 on padding."""
    return torch.where(attention_mask.bool(), attention_mask.cumsum(-1) - 1,
                       torch.full_like(attention_mask, -1))


# ---------------------------------------------------------------------------------------
# Next-token log-probabilities


class NextToken(NamedTuple):
    """Next-token log-probabilities ``[B, V]`` after each prompt, clean and intervened."""

    clean: torch.Tensor
    intervened: torch.Tensor

    @property
    def diff(self) -> torch.Tensor:
        """``log p_intervened - log p_clean`` ``[B, V]``."""
        return self.intervened - self.clean


def _last_logprobs(model, envoy, inputs: dict, io: str, fn) -> torch.Tensor:
    with torch.inference_mode(), model.trace(inputs):
        if fn is not None:
            patch_submodule(envoy, io, fn)
        logp = torch.log_softmax(model.output.logits[:, -1].float(), dim=-1).save()
    return logp


@torch.no_grad()
def logit_diff(model, submodule, dictionary, prompts, interventions, io: str = "out"
               ) -> NextToken:
    """The next-token log-probabilities after each prompt, clean and with the
    intervention applied at every prompt token from its ``start`` on (float32, CPU)."""
    envoy, interventions = _check(model, submodule, dictionary, interventions, io)
    inputs = _prompt_batch(model, prompts)
    positions = prompt_positions(inputs["attention_mask"])

    def fn(x_enc, target):
        return steer_activations(dictionary, interventions, x_enc, target, positions)

    clean = _last_logprobs(model, envoy, inputs, io, None)
    steered = _last_logprobs(model, envoy, inputs, io, fn)
    return NextToken(clean.cpu(), steered.cpu())


def top_changes(next_token: NextToken, tokenizer, k: int = 5, row: int = 0) -> dict:
    """The ``k`` tokens whose next-token probability the intervention raised most and the
    ``k`` it lowered most: ``{"raised": [...], "lowered": [...]}``, each entry
    ``{"token", "id", "p_clean", "p_intervened"}``."""
    p_clean, p_new = next_token.clean[row].exp(), next_token.intervened[row].exp()
    change = (p_new - p_clean).double()
    k = min(k, change.numel())

    def entries(ids):
        return [{"token": tokenizer.decode([int(i)]), "id": int(i),
                 "p_clean": float(p_clean[i]), "p_intervened": float(p_new[i])} for i in ids]

    return {"raised": entries(change.topk(k).indices),
            "lowered": entries(change.topk(k, largest=False).indices)}


# ---------------------------------------------------------------------------------------
# Generation


class Continuation(NamedTuple):
    """Generated tokens of each prompt (up to and with the first end-of-text token)."""

    ids: list[list[int]]
    text: list[str]


class Generation(NamedTuple):
    prompt_ids: list[list[int]]
    baseline: Continuation
    intervened: Continuation
    interventions: Interventions


def _sampling(model, max_new_tokens: int, temperature: float, top_k: int, top_p: float,
              extra: dict) -> dict:
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) \
            or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0 (0: greedy), got {temperature!r}")
    tokenizer = model.tokenizer
    kwargs = {"max_new_tokens": max_new_tokens, "pad_token_id": tokenizer.pad_token_id}
    if temperature == 0:
        kwargs.update(do_sample=False, temperature=None, top_k=None, top_p=None)
    else:
        kwargs.update(do_sample=True, temperature=float(temperature), top_k=top_k,
                      top_p=top_p)
    return {**kwargs, **extra}


def _generate(model, envoy, inputs: dict, io: str, fn, kwargs: dict,
              seed: int | None) -> torch.Tensor:
    """``[B, T + new]`` token ids, with ``fn(x_enc, target, step)`` patching the
    submodule at every forward of the decoding loop (``None``: the clean model)."""
    device = inputs["input_ids"].device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else [],
                               enabled=seed is not None), \
            torch.inference_mode(), warnings.catch_warnings():
        if seed is not None:  # the caller's random state is restored afterwards
            torch.manual_seed(seed)
        # An open tracer.all() loop ends by asking for one step more than the run makes.
        warnings.filterwarnings("ignore", message=".*was never reached.*")
        with model.generate(**kwargs) as tracer:
            with tracer.invoke(inputs):
                if fn is not None:
                    for step in tracer.all():
                        patch_submodule(envoy, io, lambda x, t: fn(x, t, step))
            with tracer.invoke():
                ids = tracer.result.save()
    return ids


def _continuations(ids: torch.Tensor, n_prompt: int, tokenizer) -> Continuation:
    eos = tokenizer.eos_token_id
    rows = []
    for row in ids[:, n_prompt:].tolist():
        if eos is not None and eos in row:
            row = row[:row.index(eos) + 1]
        rows.append(row)
    return Continuation(rows, [tokenizer.decode(r, skip_special_tokens=True) for r in rows])


@torch.no_grad()
def generate(model, submodule, dictionary, prompts, interventions, io: str = "out",
             max_new_tokens: int = 30, temperature: float = 0.0, seed: int | None = None,
             top_k: int = 0, top_p: float = 1.0, **generate_kwargs) -> Generation:
    """Continue each prompt twice, without and with ``interventions``, and return both.

    ``temperature`` 0 (the default) decodes greedily; above 0 samples with that
    temperature (``top_k`` 0 and ``top_p`` 1: from the whole distribution). With ``seed``
    both runs start from the same random state, so they draw the same random numbers
    and differ only where the intervention changes the distribution. Other keyword
    arguments go to the model's ``generate``. The edit is applied at every forward pass
    of the decoding loop: to the prompt's tokens, then to each new token, at positions
    ``>= start`` of each edit.
    """
    envoy, interventions = _check(model, submodule, dictionary, interventions, io)
    inputs = _prompt_batch(model, prompts)
    kwargs = _sampling(model, max_new_tokens, temperature, top_k, top_p, generate_kwargs)
    mask = inputs["attention_mask"]
    Tp = mask.shape[1]
    prompt_pos = prompt_positions(mask)                                 # [B, Tp]
    n_real = mask.sum(-1, keepdim=True)                                 # [B, 1]

    def fn(x_enc, target, step):
        # At step s the sequence holds Tp + s columns; this forward computes the last T.
        T = x_enc.shape[1]
        cols = torch.arange(Tp + step - T, Tp + step, device=mask.device)
        generated = n_real + (cols - Tp)                                # [B, T]
        positions = torch.where(cols < Tp, prompt_pos[:, cols.clamp(max=Tp - 1)], generated)
        return steer_activations(dictionary, interventions, x_enc, target, positions)

    clean = _generate(model, envoy, inputs, io, None, kwargs, seed)
    steered = _generate(model, envoy, inputs, io, fn, kwargs, seed)
    tokenizer = model.tokenizer
    prompt_ids = [row[mask[r].bool().tolist().index(True):]
                  for r, row in enumerate(inputs["input_ids"].tolist())]
    return Generation(prompt_ids, _continuations(clean, Tp, tokenizer),
                      _continuations(steered, Tp, tokenizer), interventions)
