"""Measurements: what the library's stages cost and what its dictionaries reach.

``benchmark`` times each stage (buffer, training step, end to end, TopK, the non-finite
guard, sweeps, the activation cache) against its own limit, for ``scripts/benchmark.py``;
``throughput`` is that script's ``throughput`` section (several model shapes and widths) and
``distributed_benchmark`` its ``--distributed`` (data-parallel scaling and communication
share); ``quality`` trains every architecture at several sparsities on the demo LM and
scores them, for ``scripts/quality.py``.

Nothing in the library imports this package: the scripts and tests do.
"""
