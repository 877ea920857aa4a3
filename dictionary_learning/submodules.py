"""Finding a submodule in an nnsight model, and its hidden states in what it takes and returns.

Shared by the buffer (which reads activations) and evaluation (which patches them).
"""

from __future__ import annotations

import difflib

import torch

IO_MODES = ("out", "in", "in_to_out")
"""Which activation of a submodule: its output, its input, or both as (input, output)."""


def resolve_submodule(model, submodule):
    """The nnsight envoy for ``submodule`` and its dotted name within the model.

    ``submodule`` may be an envoy of ``model`` (``model.gpt_neox.layers[1].mlp``), the
    ``torch.nn.Module`` inside it, or a dotted path (``"gpt_neox.layers.1.mlp"``).
    """
    root = model._module
    names = {id(m): name for name, m in root.named_modules() if name}
    if isinstance(submodule, str):
        envoy = model
        for part in submodule.split("."):
            try:
                envoy = envoy[int(part)] if part.isdigit() else getattr(envoy, part)
            except (AttributeError, IndexError, TypeError):
                close = difflib.get_close_matches(submodule, list(names.values()), n=5)
                raise ValueError(
                    f"model has no submodule {submodule!r}"
                    + (f"; nearest names: {', '.join(close)}" if close else "")
                ) from None
        submodule = envoy
    module = getattr(submodule, "_module", submodule)
    if not isinstance(module, torch.nn.Module) or id(module) not in names:
        raise ValueError(
            "submodule is not a module of this model: pass an envoy of the same nnsight model "
            "(e.g. model.gpt_neox.layers[1].mlp) or a dotted path such as 'gpt_neox.layers.1.mlp'"
        )
    name = names[id(module)]
    if submodule is module:  # a plain nn.Module: walk to its envoy
        return resolve_submodule(model, name)
    return submodule, name


def hidden_states(value, where: str) -> torch.Tensor:
    """The hidden-states tensor of a module input or output.

    Decoder layers in transformers 5 return a plain tensor; attention modules return a tuple
    whose first element is the hidden states. A tensor is never indexed.
    """
    if isinstance(value, (tuple, list)):
        value = value[0]
    if not isinstance(value, torch.Tensor) or value.ndim != 3:
        shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise ValueError(f"{where} is not a (batch, seq, d) tensor (got {shape}); "
                         "choose a submodule that maps hidden states to hidden states")
    return value


def with_hidden_states(value, new: torch.Tensor):
    """``value`` (a module input or output) with its hidden states replaced by ``new``,
    keeping the container type of a tuple and its other elements."""
    if isinstance(value, (tuple, list)):
        return type(value)((new, *value[1:]))
    return new


def forward_order(root: torch.nn.Module, hooks: list[tuple[torch.nn.Module, str]]) -> list[int]:
    """Indices of ``hooks`` (``(module, "input" | "output")``) sorted in the order a forward
    pass produces them: a module's input when it is entered, its output when it is left,
    children in registration order (nnsight must be asked for values in this order)."""
    events: dict[tuple[int, str], int] = {}

    def walk(module: torch.nn.Module) -> None:
        events[(id(module), "input")] = len(events)
        for child in module.children():
            walk(child)
        events[(id(module), "output")] = len(events)

    walk(root)
    return sorted(range(len(hooks)), key=lambda i: events[(id(hooks[i][0]), hooks[i][1])])


# Short names of a layer's components, tried in order among the layer's children.
COMPONENTS = {
    "mlp": ("mlp",),
    "attn": ("attention", "attn", "self_attn"),
    "resid": (),  # the whole layer: its output is the residual stream after it
}


def submodule_path(model, spec: str) -> str:
    """The dotted path of a submodule named by ``spec``.

    ``spec`` is a dotted path (``"gpt_neox.layers.1.mlp"``), ``"embed"`` (the input
    embedding), or a layer number and a component: ``"1.mlp"``, ``"3.attn"``, ``"2.resid"``
    (the layer itself). The layers are the model's ``ModuleList`` as long as its
    ``num_hidden_layers``, so the short form works for GPTNeoX, GPT-2 and Llama alike.
    """
    root = model._module
    if spec == "embed":
        embedding = root.get_input_embeddings()
        return next(name for name, m in root.named_modules() if m is embedding)
    layer, _, component = spec.partition(".")
    if not (layer.isdigit() and component in COMPONENTS):
        return spec
    config = getattr(root, "config", None)
    n_layers = getattr(config, "num_hidden_layers", None)
    lists = [(name, m) for name, m in root.named_modules()
             if isinstance(m, torch.nn.ModuleList) and len(m) == n_layers]
    if not lists:
        raise ValueError(f"cannot find the layers of this {type(root).__name__} to resolve "
                         f"{spec!r}; pass a dotted path instead (e.g. 'gpt_neox.layers.1.mlp')")
    prefix, layers = lists[0]
    if int(layer) >= len(layers):
        raise ValueError(f"{spec!r}: the model has {len(layers)} layers (0 to "
                         f"{len(layers) - 1})")
    path = f"{prefix}.{layer}"
    if not COMPONENTS[component]:
        return path
    children = dict(layers[int(layer)].named_children())
    for child in COMPONENTS[component]:
        if child in children:
            return f"{path}.{child}"
    raise ValueError(f"{spec!r}: layer {layer} has no {component} child (it has "
                     f"{', '.join(children)}); pass a dotted path instead")
