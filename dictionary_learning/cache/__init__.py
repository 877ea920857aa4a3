"""Activation caches on disk: collect a model's activations once, train any number of times.

``write_cache`` runs the buffer's collection into fixed-size safetensors shards plus a
manifest (:mod:`.manifest` says what each holds); ``CachedActivations`` serves them back
as the batches an ``ActivationBuffer`` serves, shuffled and resumable, so
``train_dictionaries`` and ``python -m dictionary_learning train --cache DIR`` train from
either without asking which."""

from .contexts import CacheRows, context_batches, fitting_keys
from .manifest import CacheError, read_manifest
from .reader import Cache, CachedActivations
from .writer import merge_parts, write_cache

__all__ = ["Cache", "CacheError", "CacheRows", "CachedActivations", "context_batches",
           "fitting_keys", "merge_parts", "read_manifest", "write_cache"]
