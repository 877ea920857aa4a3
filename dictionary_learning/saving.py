"""Writing a trained dictionary's folder, atomically.

Layout (upstream's, so its own loader reads our folders)::

    save_dir/
      ae.pt                            state_dict of the final dictionary
      config.json                      {"trainer": {...}, "buffer": {...}, "run": {...}}
      metrics.jsonl                    one line of logged loss terms per logged step
      training_curves.png              those lines plotted (at each checkpoint and the end)
      checkpoints/ae_{step}.pt         bare state_dicts
      checkpoints/trainer_state_{step}.pt   what resuming needs: the training-time
                                       dictionary, optimizer, counters, generators, step
    run_dir/checkpoints/stream_state_{step}.pt   the activation buffer's state (one per run,
                                       shared by a sweep's trainers; only the latest kept;
                                       under torchrun one per rank,
                                       stream_state_{step}.rank{r}of{world}.pt)

A checkpoint is complete once every trainer's ``trainer_state_{step}.pt`` exists: they are
written last, after the weights and the stream state. Every file is written through
:func:`~dictionary_learning.files.atomic_write` (temporary name, fsync, rename), so an
interrupted run never leaves a truncated file, and leftovers of killed writes are removed
when the folder is next opened. Nothing non-finite is written: a dictionary holding NaN or
inf raises :class:`~dictionary_learning.trainer.NonFiniteError` instead. ``config.json`` of
a finished run records the SHA-256 of ``ae.pt`` (``{"sha256": {"ae.pt": ...}}``), which
the loader checks.

Batch-top-k dictionaries (BatchTopK, Matryoshka) are written with the inference threshold
they encode with (``inference_state_dict``: the running average, or for a run shorter than
``threshold_start_step`` the estimate of the steps it trained), never with the unestimated
-1 while one exists; ``config.json``'s ``run.inference`` says which rule and where the
threshold came from.
"""

from __future__ import annotations

import dataclasses
import json
import platform
import re
from importlib import metadata
from pathlib import Path

import torch

from .files import (atomic_write, file_sha256, json_line,  # noqa: F401 - re-exported
                    remove_stale_temps, write_json)
from .formats.common import read_pickle
from .loading import CONFIG_NAME, WEIGHTS_NAME
from .trainer import NonFiniteError


def save_state_dict(state_dict: dict, path: Path) -> None:
    atomic_write(path, lambda tmp: torch.save(state_dict, tmp))


def check_finite(state_dict: dict, what: str) -> None:
    """Raise :class:`NonFiniteError` when a tensor of ``state_dict`` holds NaN or inf."""
    for key, value in state_dict.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point() \
                and not bool(torch.isfinite(value).all()):
            raise NonFiniteError(f"{what}: {key} is not finite; not written (the last "
                                 "complete checkpoint stays the resume point)")


def save_json(obj: dict, path: Path) -> None:
    write_json(path, obj)


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for package in ("dictionary_learning", "torch", "nnsight", "transformers", "datasets"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = "not installed"
    return found


def _logged_step(line: str) -> int:
    try:
        return int(json.loads(line)["step"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError):
        return 1 << 62  # a torn or foreign line: dropped on resume


def _layer(submodule_name: str | None) -> int | None:
    match = re.search(r"\.(\d+)(\.|$)", submodule_name or "")
    return int(match.group(1)) if match else None


CHECKPOINT_STATE = re.compile(r"^trainer_state_(\d+)\.pt$")


def checkpoint_steps(folder: str | Path) -> list[int]:
    """Steps at which ``folder`` holds a complete checkpoint (weights and trainer state)."""
    folder = Path(folder) / "checkpoints"
    if not folder.is_dir():
        return []
    found = [int(m.group(1)) for p in folder.iterdir() if (m := CHECKPOINT_STATE.match(p.name))]
    return sorted(s for s in found if (folder / f"ae_{s}.pt").is_file())


def read_trainer_state(folder: str | Path, step: int) -> dict:
    """The trainer state saved at ``step`` in ``folder/checkpoints`` (tensors and numbers only)."""
    path = Path(folder) / "checkpoints" / f"trainer_state_{step}.pt"
    try:
        return read_pickle(path)
    except ValueError as e:
        raise ValueError(f"{e}; the run cannot resume from step {step} (only the latest "
                         "checkpoint keeps the activation stream's state)") from e


STREAM_STATE = re.compile(r"^stream_state_(\d+)(?:\.rank(\d+)of(\d+))?\.pt$")


def _stream_state_path(run_dir: str | Path, step: int, rank: int = 0, world: int = 1) -> Path:
    """One file per rank: each rank's source (its share of the text or shards) has its
    own position. One process: ``stream_state_{step}.pt``."""
    tail = "" if world == 1 else f".rank{rank}of{world}"
    return Path(run_dir) / "checkpoints" / f"stream_state_{step}{tail}.pt"


def _stream_states(run_dir: str | Path) -> list[tuple[int, int, int]]:
    """``(step, rank, world)`` of every stream state in ``run_dir/checkpoints``."""
    folder = Path(run_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    return sorted((int(m.group(1)), int(m.group(2) or 0), int(m.group(3) or 1))
                  for p in folder.iterdir() if (m := STREAM_STATE.match(p.name)))


def stream_state_steps(run_dir: str | Path, world: int = 1) -> list[int]:
    """Steps at which ``run_dir/checkpoints`` holds the activation stream's state of every
    one of ``world`` ranks."""
    found: dict[int, set[int]] = {}
    for step, rank, w in _stream_states(run_dir):
        if w == world:
            found.setdefault(step, set()).add(rank)
    return sorted(step for step, ranks in found.items() if len(ranks) == world)


def stream_state_worlds(run_dir: str | Path) -> set[int]:
    """The numbers of ranks the run's stream states were saved by."""
    return {w for _, _, w in _stream_states(run_dir)}


def save_stream_state(run_dir: str | Path, step: int, state: dict, rank: int = 0,
                      world: int = 1) -> None:
    save_state_dict(state, _stream_state_path(run_dir, step, rank, world))


def read_stream_state(run_dir: str | Path, step: int, rank: int = 0, world: int = 1) -> dict:
    path = _stream_state_path(run_dir, step, rank, world)
    try:
        return read_pickle(path)
    except ValueError as e:
        raise ValueError(f"{e}; the run cannot resume exactly from step {step}") from e


def prune_stream_states(run_dir: str | Path, keep: int, rank: int = 0, world: int = 1
                        ) -> None:
    """Remove this rank's stream states of steps before ``keep`` (each can be as large as
    the buffer; only the latest complete checkpoint's is needed)."""
    for step, r, w in _stream_states(run_dir):
        if step < keep and (r, w) == (rank, world):
            _stream_state_path(run_dir, step, rank, world).unlink(missing_ok=True)


class CheckpointWriter:
    """Writes one trainer's folder: config at the start, checkpoints, the final weights.

    With ``resume_step`` the folder's ``metrics.jsonl`` is kept up to that step (later lines,
    logged after the checkpoint, are dropped) instead of started afresh.
    """

    def __init__(self, folder: str | Path, trainer, buffer_config: dict, run_info: dict,
                 steps: int | None, resume_step: int | None = None):
        self.folder = Path(folder)
        self.trainer = trainer
        self.buffer_config = buffer_config
        trainer_section = {
            **dataclasses.asdict(trainer.config),
            **trainer.config.dict_kwargs,  # upstream's loader reads e.g. "k" here
            "trainer_class": "Trainer",
            "steps": steps,
            "device": str(trainer.device),
            **run_info,
        }
        if trainer.config.penalty == "l1":
            trainer_section["l1_penalty"] = trainer.config.sparsity_penalty
        trainer_section.setdefault("layer", _layer(run_info.get("submodule_name")))
        self.trainer_section = trainer_section
        self.inference_note = None  # how the last weights written encode (batch top-k)
        self.folder.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(self.folder)
        remove_stale_temps(self.folder / "checkpoints")
        metrics = self.folder / "metrics.jsonl"
        if resume_step is None:
            metrics.unlink(missing_ok=True)
            self._write_config(step=0, n_tokens=0, finished=False)
        elif metrics.is_file():
            kept = [line for line in metrics.read_text().splitlines()
                    if line.strip() and _logged_step(line) <= resume_step]
            atomic_write(metrics, lambda tmp: Path(tmp).write_text(
                "".join(line + "\n" for line in kept)))

    def _write_config(self, step: int, n_tokens: int, finished: bool,
                      weights_sha256: str | None = None) -> None:
        config = {
            "trainer": self.trainer_section,
            "buffer": self.buffer_config,
            "run": {
                "finished": finished,
                "steps_done": step,
                "activations_trained": n_tokens,
                "features_resampled": self.trainer.n_resampled,
                "skipped_steps": self.trainer.n_skipped,
                "activation_scale": self.trainer.activation_scale,
                "versions": versions(),
            },
        }
        if self.inference_note is not None:
            config["run"]["inference"] = self.inference_note
        if weights_sha256 is not None:
            config["sha256"] = {WEIGHTS_NAME: weights_sha256}
        save_json(config, self.folder / CONFIG_NAME)

    def log(self, step: int, n_tokens: int, entry: dict) -> None:
        """Append one line (strict JSON: a non-finite number is ``null``)."""
        line = json_line({"step": step, "activations": n_tokens, **entry})
        with open(self.folder / "metrics.jsonl", "a") as f:
            f.write(line + "\n")

    def _raw_state_dict(self, what: str) -> dict:
        """The state_dict to write: the dictionary on raw activations, with the inference
        threshold it encodes with where it has one (``inference_state_dict``)."""
        dictionary = self.trainer.raw_dictionary()
        if callable(getattr(dictionary, "inference_state_dict", None)):
            state_dict, self.inference_note = dictionary.inference_state_dict()
        else:
            state_dict = dictionary.state_dict()
        check_finite(state_dict, what)
        return state_dict

    def write_weights(self, step: int) -> None:
        """``checkpoints/ae_{step}.pt``: the dictionary on raw activations, loadable alone."""
        path = self.folder / "checkpoints" / f"ae_{step}.pt"
        save_state_dict(self._raw_state_dict(str(path)), path)

    def write_state(self, step: int, n_tokens: int, texts_read: int | None = None) -> None:
        """``checkpoints/trainer_state_{step}.pt``, which marks the checkpoint complete for
        resuming; then ``config.json`` and the curves."""
        path = self.folder / "checkpoints" / f"trainer_state_{step}.pt"
        state = self.trainer.state()
        check_finite(state["dictionary"], str(path))
        save_state_dict({**state, "step": step, "activations_trained": n_tokens,
                         "texts_read": -1 if texts_read is None else texts_read}, path)
        self._write_config(step, n_tokens, finished=False)
        self.plot_curves()

    def checkpoint(self, step: int, n_tokens: int, texts_read: int | None = None) -> None:
        """A whole checkpoint of this trainer: :meth:`write_weights`, then
        :meth:`write_state`."""
        self.write_weights(step)
        self.write_state(step, n_tokens, texts_read)

    def plot_curves(self) -> None:
        """``training_curves.png`` from ``metrics.jsonl`` (nothing before the first log)."""
        from .dashboards import plot_training_curves

        metrics = self.folder / "metrics.jsonl"
        if metrics.is_file():
            plot_training_curves(metrics, self.folder / "training_curves.png",
                                 title=f"{self.trainer.config.dict_class} "
                                       f"{self.trainer.config.activation_dim}->"
                                       f"{self.trainer.config.dict_size}")

    def finish(self, step: int, n_tokens: int, buffer_config: dict) -> None:
        self.buffer_config = buffer_config
        path = self.folder / WEIGHTS_NAME
        save_state_dict(self._raw_state_dict(str(path)), path)
        self._write_config(step, n_tokens, finished=True, weights_sha256=file_sha256(path))
        self.plot_curves()
