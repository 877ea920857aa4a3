"""Reading the activation stream ahead of training, in a thread of its own.

A producer thread reads batches from the source (an ``ActivationBuffer``'s refills run the
language model there) into a bounded queue of ``depth`` ready batches; on a CUDA device it
also starts each batch's copy to the device on a side stream, so the copy and the next
refill overlap the training step. The training loop (the consumer) only takes ready batches.

Resuming stays exact: every batch read from the source is either in the queue or trained
on, and reading one and queueing it happen under one lock. :meth:`Prefetcher.state_dict`
takes that lock, so it sees the source's state together with the batches read ahead but not
yet trained (their host copies); a resumed stream serves those first, then the source. The
source's ``texts_seen`` after each batch travels with it in the queue, so the position a
checkpoint records is the consumer's, not the producer's. A source that fails while read
ahead (a refill cut short) has no state to resume from: its error is raised at the batch
where it failed or at the checkpoint that would have saved it, whichever comes first.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Iterable
from typing import Any, NamedTuple

import torch

logger = logging.getLogger(__name__)


def to_device(batch, device: torch.device):
    """A served batch (tensor, pair or ``{name: batch}`` dict) on ``device``; the copies
    are non-blocking (asynchronous from pinned host memory)."""
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch.to(device, non_blocking=True)


def _tensors(batch):
    if isinstance(batch, dict):
        for v in batch.values():
            yield from _tensors(v)
    elif isinstance(batch, (tuple, list)):
        for v in batch:
            yield from _tensors(v)
    else:
        yield batch


class _Item(NamedTuple):
    host: Any            # the batch as the source served it (what a checkpoint saves)
    ready: Any           # the batch on the training device (the copy may still run)
    event: Any           # a CUDA event recorded after the copy, or None
    texts_seen: Any      # the source's texts_seen once this batch was read


_END = object()


class _Failed(NamedTuple):
    error: BaseException


class Prefetcher:
    """Serves the batches of ``ahead`` (restored read-ahead batches), then of ``source``,
    read by a producer thread at most ``depth`` batches ahead of :meth:`get`; at most
    ``limit`` batches in all (``None``: until the source ends), so a run that stops at a
    known step leaves the source exactly where it trained up to."""

    def __init__(self, source: Iterable, device: torch.device, depth: int,
                 limit: int | None = None, ahead: Iterable = ()):
        if depth < 1:
            raise ValueError(f"prefetch depth must be at least 1, got {depth}")
        self.source, self.device, self.depth, self.limit = source, device, depth, limit
        self._restored = deque(ahead)
        self._queue: deque = deque()
        self._ready = threading.Condition()  # guards _queue
        self._source_lock = threading.Lock()  # held while a batch is read and queued
        self._stop = threading.Event()
        self.wait_s = 0.0                    # time get() spent blocked on an empty queue
        self._copy_stream = (torch.cuda.Stream(device) if device.type == "cuda" else None)
        self._thread = threading.Thread(target=self._run, name="activation-prefetch",
                                        daemon=True)
        self._thread.start()

    # -- producer ---------------------------------------------------------------------------
    def _run(self) -> None:
        it, produced = None, 0
        while True:
            with self._ready:
                while len(self._queue) >= self.depth and not self._stop.is_set():
                    self._ready.wait()
            if self._stop.is_set():
                return
            with self._source_lock:
                try:
                    if self.limit is not None and produced >= self.limit:
                        item = _END
                    elif self._restored:
                        item = self._prepare(self._restored.popleft())
                    else:
                        if it is None:
                            it = iter(self.source)
                        batch = next(it, _END)
                        item = batch if batch is _END else self._prepare(batch)
                except BaseException as e:  # handed to the consumer, raised there
                    item = _Failed(e)
                produced += 1
                with self._ready:
                    self._queue.append(item)
                    self._ready.notify_all()
            if item is _END or isinstance(item, _Failed):
                return

    def _prepare(self, batch) -> _Item:
        texts = getattr(self.source, "texts_seen", None)
        if self._copy_stream is None:
            return _Item(batch, batch if self.device.type == "cpu"
                         else to_device(batch, self.device), None, texts)
        with torch.cuda.stream(self._copy_stream):
            ready = to_device(batch, self.device)
            event = torch.cuda.Event()
            event.record(self._copy_stream)
        return _Item(batch, ready, event, texts)

    # -- consumer ---------------------------------------------------------------------------
    def get(self):
        """``(batch on the device, texts_seen)``, or ``None`` when the stream has ended;
        re-raises what the source raised, at the batch where it raised it."""
        with self._ready:
            if not self._queue:
                start = time.perf_counter()
                while not self._queue:
                    self._ready.wait()
                self.wait_s += time.perf_counter() - start
            item = self._queue[0]
            if item is not _END and not isinstance(item, _Failed):
                self._queue.popleft()
                self._ready.notify_all()
        if item is _END:
            return None
        if isinstance(item, _Failed):
            raise item.error
        if item.event is not None:  # the compute stream waits for the copy, on the device
            current = torch.cuda.current_stream(self.device)
            current.wait_event(item.event)
            for t in _tensors(item.ready):
                t.record_stream(current)  # its memory is not reused while the step runs
        return item.ready, item.texts_seen

    def state_dict(self) -> dict:
        """The source's state and, in serving order, the batches read ahead of the consumer
        (host copies): what a stream resumed from here must serve."""
        with self._source_lock:
            with self._ready:
                failed = [i for i in self._queue if isinstance(i, _Failed)]
                queued = [i.host for i in self._queue if isinstance(i, _Item)]
            if failed:
                # The source failed in the middle of a read ahead (a refill half done): its
                # state is not one to resume from. The run stops here, with the source's
                # error, and resumes from the checkpoint before.
                raise failed[0].error
            state = self.source.state_dict()
        return {"source": state, "ahead": queued + list(self._restored)}

    def close(self, timeout: float | None = None) -> None:
        """Stop the producer; waits for the batch it is reading (at most ``timeout`` s)."""
        self._stop.set()
        with self._ready:
            self._ready.notify_all()
        self._thread.join(timeout)
        if self._thread.is_alive():
            logger.warning("the activation prefetch thread is still reading a batch; it "
                           "stops when that batch is read")
