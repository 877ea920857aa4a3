"""An optional ``torch.compile`` of each dictionary's loss (the forward half of a step and,
through AOT autograd, its backward), with the eager path as the fallback.

Compiling can fail where the step itself would not: no C++ compiler for inductor on a CPU
machine, an operation dynamo cannot trace. Then training warns once per dictionary and goes
on eagerly, with the same results; an error that the eager loss raises too is raised.
"""

from __future__ import annotations

import copy
import logging

import torch

logger = logging.getLogger(__name__)


def _compile_errors() -> tuple[type[BaseException], ...]:
    from torch._dynamo.exc import TorchDynamoException

    return (TorchDynamoException,)


class CompiledLoss:
    """``loss_terms`` of one dictionary through ``torch.compile``, eager after a failure."""

    def __init__(self, eager, name: str, backend: str | None = None):
        self.eager, self.name = eager, name
        self.compiled = torch.compile(eager, **({} if backend is None else {"backend": backend}))
        self.ok: bool | None = None  # None: not run yet; False: fell back to eager

    def __call__(self, *args, **kwargs):
        if self.ok is False:
            return self.eager(*args, **kwargs)
        try:
            out = self.compiled(*args, **kwargs)
        except _compile_errors() as e:
            self.ok = False
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            logger.warning("torch.compile of %s's loss failed (%s: %.200s); training it "
                           "eagerly", self.name, type(e).__name__, first)
            return self.eager(*args, **kwargs)
        self.ok = True
        return out

    def __deepcopy__(self, memo):
        # A copy of the dictionary (e.g. the raw one saved at a checkpoint) gets its own
        # eager loss_terms, not this compiled one, which is bound to the original.
        return copy.deepcopy(self.eager, memo)


class _Restore:
    def __init__(self, wrapped):
        self.wrapped = wrapped  # [(index, dictionary, CompiledLoss)]

    def compiled(self) -> list[int]:
        """Indices of the dictionaries whose compiled loss ran (did not fall back)."""
        return [i for i, _, w in self.wrapped if w.ok]

    def __call__(self) -> None:
        for _, dictionary, _ in self.wrapped:
            if "loss_terms" in vars(dictionary):
                del dictionary.loss_terms


def compile_losses(trainers, backend: str | None = None) -> _Restore:
    """Route each trainer's ``dictionary.loss_terms`` through :class:`CompiledLoss`; the
    returned callable puts the eager methods back (``.compiled()`` says which ran)."""
    wrapped = []
    for i, t in enumerate(trainers):
        ae = t.dictionary
        loss = CompiledLoss(ae.loss_terms, f"trainer {i} ({t.config.dict_class})", backend)
        ae.loss_terms = loss  # an instance attribute: shadows the class's method
        wrapped.append((i, ae, loss))
    return _Restore(wrapped)
