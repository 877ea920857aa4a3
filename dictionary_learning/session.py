"""Open the whole setting of a dictionary from its folder: the model it reads, the
dictionary, and an activation buffer configured as it was in training::

    model, dictionary, buffer = load_session("runs/demo")

Each fact comes from the first place that has it:

- the model: the ``model`` argument (a name, or an nnsight model already open); the run's
  ``train_args.json`` (``"demo"`` included); ``config.json``'s ``trainer.lm_name`` or a
  foreign format's ``model_name``; the published pythia-70m layout;
- the submodule, ``io`` and ``ctx_len``: the arguments; ``config.json`` (or SAELens'
  ``cfg.json``, see :func:`~dictionary_learning.assess.read_target`); a sparsify folder's
  hookpoint; ``train_args.json``;
- the text: the ``data`` argument (from its start, after ``skip_texts``); else the training
  text named by ``train_args.json``, after the documents training kept aside
  (``eval_texts``) and as many epochs as training read; else a SAELens ``dataset_path``;
- the buffer's options (contexts held, texts per forward pass, rows per batch, dtype,
  packing, ``remove_bos``, shuffling seed): the arguments, ``config.json``'s ``buffer``
  section, ``train_args.json``, the defaults.

``train_args.json`` is looked for beside the dictionary and, for a sweep's
``trainer_N`` folder, in the run folder above it. A fact found nowhere is a ``ValueError``
naming it and the argument that supplies it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from itertools import islice
from pathlib import Path
from typing import NamedTuple

import torch

from . import steering
from .assess import folder_config, read_target
from .buffer import DEFAULT_N_CTXS, ActivationBuffer, model_name
from .formats.common import read_json
from .loading import load_dictionary
from .submodules import resolve_submodule, submodule_path

ARGS_NAME = "train_args.json"  # what train_run writes into a run folder
_TRAINER_DIR = re.compile(r"^trainer_\d+$")


class Setting(NamedTuple):
    """A dictionary on its model: where it reads (``submodule``, a dotted path of
    ``model``; ``io``; ``ctx_len``) and ``model_name``, what opened the model."""

    model: object
    dictionary: torch.nn.Module
    submodule: str
    io: str
    ctx_len: int
    model_name: str | None

    def generate(self, prompts, interventions, **kwargs) -> "steering.Generation":
        """:func:`~dictionary_learning.steering.generate` on this setting."""
        return steering.generate(self.model, self.submodule, self.dictionary, prompts,
                                 interventions, io=self.io, **kwargs)

    def logit_diff(self, prompts, interventions) -> "steering.NextToken":
        """:func:`~dictionary_learning.steering.logit_diff` on this setting."""
        return steering.logit_diff(self.model, self.submodule, self.dictionary, prompts,
                                   interventions, io=self.io)


class Session(NamedTuple):
    model: object
    dictionary: torch.nn.Module
    buffer: ActivationBuffer


def run_args(path: str | os.PathLike) -> dict:
    """The ``train_args.json`` of the run that trained the dictionary at ``path`` (beside
    it, or above a sweep's ``trainer_N`` folder), or ``{}``."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    candidates = [folder] + ([folder.parent] if _TRAINER_DIR.match(folder.name) else [])
    for candidate in candidates:
        if (candidate / ARGS_NAME).is_file():
            return read_json(candidate / ARGS_NAME)
    return {}


def _missing(path: Path, fact: str, looked: str, argument: str) -> ValueError:
    return ValueError(f"{path}: cannot tell {fact} ({looked}): pass {argument}")


def _foreign_submodule(model, hookpoint: str) -> str | None:
    """A sparsify hookpoint (a module name in the base model, ``layers.3.mlp``) as a
    dotted path of the causal LM (``gpt_neox.layers.3.mlp``), if the model has it."""
    root = model._module
    names = {name for name, _ in root.named_modules()}
    prefix = getattr(root, "base_model_prefix", "")
    for name in (hookpoint, f"{prefix}.{hookpoint}" if prefix else None):
        if name in names:
            return name
    return None


def _open_model(model, name: str | None, path: Path, device: str, dtype: str | None):
    if model is not None and not isinstance(model, (str, os.PathLike)):
        return model, model_name(model)  # an nnsight model already open
    name = str(model) if model is not None else name
    if name is None:
        raise _missing(path, "which model this dictionary reads", "no config.json names "
                       f"it and no {ARGS_NAME} is beside it", "model= (a hub id, a local "
                       "model folder, or 'demo')")
    from .train_run import open_model

    return open_model(name, device=device, dtype=dtype or "float32", progress=False), name


def load_setting(path: str | os.PathLike, device: str = "cpu", *, model=None,
                 submodule: str | None = None, io: str | None = None,
                 ctx_len: int | None = None, dtype: str | None = None,
                 **load_options) -> Setting:
    """The dictionary at ``path`` (any format :func:`~dictionary_learning.load_dictionary`
    reads; ``load_options`` go to it) and the model it reads, both on ``device``, with the
    submodule resolved in that model. See the module docstring for where each fact comes
    from; ``dtype`` is the model's (default: the run's, else float32)."""
    path = Path(path).expanduser()
    dictionary, loaded = load_dictionary(path, device=device, **load_options)
    args = run_args(path)
    target = read_target(path, folder_config(path), model=None, submodule=submodule, io=io,
                         ctx_len=ctx_len)
    foreign = loaded.get("format")
    name = args.get("model") or target.model or loaded.get("model_name")
    model, name = _open_model(model, name, path, device, dtype or args.get("dtype"))
    spec = target.submodule or args.get("submodule")
    if spec is None and foreign == "sparsify":
        spec = _foreign_submodule(model, loaded["hookpoint"])
    if spec is None:
        hook = loaded.get("hook_name") or loaded.get("hookpoint")
        raise _missing(path, "which submodule of the model this dictionary reads",
                       f"its config names {'the hook ' + repr(hook) if hook else 'none'}, "
                       "not a module of the model", "submodule= (a dotted path such as "
                       "'gpt_neox.layers.1.mlp', or '1.mlp')")
    spec = submodule_path(model, spec)
    resolve_submodule(model, spec)  # an unknown name fails here, with the nearest names
    config = folder_config(path)
    if io is None and "buffer" not in config and "io" in args:
        io = args["io"]
    elif io is None and foreign == "sparsify" and loaded["cfg"].get("transcode"):
        io = "in_to_out"  # a transcoder reads the hookpoint's input, predicts its output
    if ctx_len is None and "buffer" not in config and "ctx_len" in args:
        ctx_len = args["ctx_len"]
    return Setting(model, dictionary, spec, io or target.io, int(ctx_len or target.ctx_len),
                   name)


def _texts(path: Path, data, skip_texts: int | None, args: dict, loaded_cfg: dict,
           text_field: str | None):
    """The documents the buffer reads (see the module docstring)."""
    from .sources import open_texts

    field = text_field or args.get("text_field") or "text"
    if data is not None and not isinstance(data, (str, os.PathLike)):
        if isinstance(data, Iterable):
            return islice(iter(data), skip_texts or 0, None)
        raise TypeError(f"data must be a source name or an iterable of strings, got "
                        f"{type(data).__name__}")
    epochs, spec = 1, None
    if data is not None:
        spec, skip = str(data), skip_texts or 0
    elif args.get("data"):
        spec = args["data"]
        skip = int(args.get("eval_texts", 0)) if skip_texts is None else skip_texts
        epochs = int(args.get("epochs", 1))
    elif loaded_cfg.get("dataset_path"):
        spec, skip = loaded_cfg["dataset_path"], skip_texts or 0
    if spec is None:
        raise _missing(path, "which text to collect activations from", f"no {ARGS_NAME} "
                       "names the training data", "data= ('stdlib', a .jsonl/.txt file or "
                       "folder, a HF dataset name, or an iterable of strings)")
    first = open_texts(spec, text_field=field)  # a bad source fails now

    def stream():
        yield from islice(first, skip, None)
        for _ in range(epochs - 1):
            yield from islice(open_texts(spec, text_field=field), skip, None)

    return stream()


def load_session(path: str | os.PathLike, device: str = "cpu", data=None, *, model=None,
                 submodule: str | None = None, io: str | None = None,
                 ctx_len: int | None = None, n_ctxs: int | None = None,
                 batch_size: int | None = None, skip_texts: int | None = None,
                 seed: int | None = None, text_field: str | None = None,
                 progress: bool = False, **load_options) -> Session:
    """``(model, dictionary, buffer)`` of the dictionary at ``path``: the model and
    dictionary of :func:`load_setting`, and an :class:`ActivationBuffer` on ``device``
    collecting the same activations as in training, from the training text (or ``data``;
    see the module docstring). ``batch_size`` is the buffer's rows per batch, ``n_ctxs``
    the contexts it holds, ``seed`` its shuffling seed (default: the run's)."""
    from .sources import torch_dtype

    path = Path(path).expanduser()
    args = run_args(path)
    setting = load_setting(path, device, model=model, submodule=submodule, io=io,
                           ctx_len=ctx_len, **load_options)
    config = folder_config(path)
    recorded = config.get("buffer", {}) if isinstance(config.get("buffer"), dict) else {}

    def option(given, key, run_key, default):
        if given is not None:
            return given
        for value in (recorded.get(key), args.get(run_key)):
            if value is not None:
                return value
        return default

    texts = _texts(path, data, skip_texts, args, config, text_field)
    pack = recorded.get("tokenization") == "packed" if "tokenization" in recorded \
        else bool(args.get("pack", False))
    buffer = ActivationBuffer(
        texts, setting.model, setting.submodule, io=setting.io, ctx_len=setting.ctx_len,
        n_ctxs=option(n_ctxs, "n_ctxs", "n_ctxs", DEFAULT_N_CTXS),
        refresh_batch_size=option(None, "refresh_batch_size", "refresh_batch_size", 32),
        out_batch_size=option(batch_size, "out_batch_size", "batch_size", 4096),
        dtype=torch_dtype(option(None, "dtype", "dtype", "float32")),
        remove_bos=bool(recorded.get("remove_bos", False)), pack=pack, device=device,
        progress=progress, seed=option(seed, "seed", "seed", None))
    return Session(setting.model, setting.dictionary, buffer)
