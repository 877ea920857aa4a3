"""Activation caches on disk: collect a model's activations once, train any number of times.

``write_cache`` runs the buffer's collection into fixed-size safetensors shards plus a
manifest (:mod:`.manifest` says what each holds); ``CachedActivations`` serves them back
as the batches an ``ActivationBuffer`` serves, shuffled and resumable, so
``train_dictionaries`` and ``python -m dictionary_learning train --cache DIR`` train from
either without asking which."""

from .manifest import CacheError, read_manifest
from .reader import Cache, CachedActivations
from .writer import expected_bytes, write_cache

__all__ = ["Cache", "CacheError", "CachedActivations", "expected_bytes", "read_manifest",
           "write_cache"]
