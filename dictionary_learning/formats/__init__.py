"""Converters from other tools' dictionary files to this project's classes.

One module per foreign format. Folder formats offer ``detect(path) -> bool`` and
``load(path, **options) -> (dictionary, config)``; formats stored as one pickle offer
``recognise(obj)`` and ``convert(obj, path, **options)`` instead, so the file is read once.
``loading.load_dictionary`` dispatches here; our own ``ae.pt`` folders stay in ``loading``.

==================  ==========================================  =============================
format              what is on disk                             recognised by
==================  ==========================================  =============================
saelens             ``cfg.json`` + ``sae_weights.safetensors``  the two file names
sparsify            ``cfg.json`` + ``sae.safetensors``          the two file names (or a
                                                                folder of hookpoint folders)
gemma_scope         ``params.npz`` (Gemma Scope) or             the file name
                    ``params.safetensors`` (+ ``config.json``,
                    Gemma Scope 2)
llama_scope         ``hyperparams.json`` +                      the two file names
                    ``checkpoints/final.safetensors``
mats_sae_training   one ``.pt``: ``{"cfg", "state_dict"}``      the pickle's two keys
openai              one ``.pt``: ``pre_bias``, ``latent_bias``  those keys
goodfire            one ``.pth``: ``encoder_linear.*``,         those four keys
                    ``decoder_linear.*``
==================  ==========================================  =============================

``hub`` resolves ``hf://org/repo/path`` (and SAELens release ids) to a local copy in the
Hugging Face cache first; ``hub.save_to_hub`` uploads a folder.

Targets are our registered classes; where none computed a format's math, an inference-only
class was added (``TokenNormalizedSAE``: per-token normalised inputs; ``Transcoder``: sparsify
transcoders). Every ``config`` returned is plain data with ``"format"`` naming the format.
Export: ``saelens_export.save_saelens`` writes our dictionaries as SAELens folders.
"""

from __future__ import annotations

from pathlib import Path

from . import gemmascope, goodfire, llamascope, mats, openai, saelens, sparsify
from .common import read_pickle
from .hub import save_to_hub
from .saelens_export import save_saelens

FORMATS = {module.NAME: module for module in (saelens, sparsify, gemmascope, llamascope, mats,
                                              openai, goodfire)}
FOLDER_FORMATS = (saelens, sparsify, gemmascope, llamascope)
PICKLE_FORMATS = (mats, openai, goodfire)
OWN_WEIGHTS_NAME = "ae.pt"


def folder_format(path: Path) -> str | None:
    """The name of the folder format at ``path`` (a folder or its weights file), or ``None``
    (our own ``ae.pt`` folders, single ``.pt`` files, nothing recognisable)."""
    if path.is_dir() and (path / OWN_WEIGHTS_NAME).is_file():
        return None
    for module in FOLDER_FORMATS:
        if module.detect(path):
            return module.NAME
    return None


def pickle_format(obj) -> str | None:
    """The name of the single-pickle format of an unpickled object, or ``None``."""
    for module in PICKLE_FORMATS:
        if module.recognise(obj):
            return module.NAME
    return None


__all__ = ["FORMATS", "folder_format", "pickle_format", "read_pickle", "save_saelens",
           "save_to_hub"]
