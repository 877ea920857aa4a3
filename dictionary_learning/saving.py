"""Writing a trained dictionary's folder, atomically.

Layout (upstream's, so its own loader reads our folders)::

    save_dir/
      ae.pt                            state_dict of the final dictionary
      config.json                      {"trainer": {...}, "buffer": {...}, "run": {...}}
      metrics.jsonl                    one line of logged loss terms per logged step
      training_curves.png              those lines plotted (at each checkpoint and the end)
      checkpoints/ae_{step}.pt         bare state_dicts
      checkpoints/trainer_state_{step}.pt   what resuming needs: the training-time
                                       dictionary, optimizer, counters, step, stream position

Every file is written to a temporary name in the same folder and renamed into place, so
an interrupted run never leaves a truncated file: the last complete checkpoint loads.
"""

from __future__ import annotations

import dataclasses
import json
import platform
import re
from importlib import metadata
from pathlib import Path

import torch

from .files import atomic_write, json_line, write_json  # noqa: F401 - atomic_write re-exported
from .loading import CONFIG_NAME, WEIGHTS_NAME


def save_state_dict(state_dict: dict, path: Path) -> None:
    atomic_write(path, lambda tmp: torch.save(state_dict, tmp))


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
        return torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError) as e:
        raise ValueError(f"{path} could not be read (truncated?): {e}; delete it to resume from "
                         "an earlier checkpoint") from e


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
        self.folder.mkdir(parents=True, exist_ok=True)
        metrics = self.folder / "metrics.jsonl"
        if resume_step is None:
            metrics.unlink(missing_ok=True)
            self._write_config(step=0, n_tokens=0, finished=False)
        elif metrics.is_file():
            kept = [line for line in metrics.read_text().splitlines()
                    if line.strip() and _logged_step(line) <= resume_step]
            atomic_write(metrics, lambda tmp: Path(tmp).write_text(
                "".join(line + "\n" for line in kept)))

    def _write_config(self, step: int, n_tokens: int, finished: bool) -> None:
        config = {
            "trainer": self.trainer_section,
            "buffer": self.buffer_config,
            "run": {
                "finished": finished,
                "steps_done": step,
                "activations_trained": n_tokens,
                "features_resampled": self.trainer.n_resampled,
                "activation_scale": self.trainer.activation_scale,
                "versions": versions(),
            },
        }
        save_json(config, self.folder / CONFIG_NAME)

    def log(self, step: int, n_tokens: int, entry: dict) -> None:
        with open(self.folder / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"step": step, "activations": n_tokens, **entry}) + "\n")

    def checkpoint(self, step: int, n_tokens: int, texts_read: int | None = None) -> None:
        """``ae_{step}.pt`` (raw activations, loadable alone) and, written last, the
        ``trainer_state_{step}.pt`` that marks the checkpoint complete for resuming."""
        t = self.trainer
        folder = self.folder / "checkpoints"
        save_state_dict(t.raw_dictionary().state_dict(), folder / f"ae_{step}.pt")
        save_state_dict({**t.state(), "step": step, "activations_trained": n_tokens,
                         "texts_read": -1 if texts_read is None else texts_read},
                        folder / f"trainer_state_{step}.pt")
        self._write_config(step, n_tokens, finished=False)
        self.plot_curves()

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
        save_state_dict(self.trainer.raw_dictionary().state_dict(), self.folder / WEIGHTS_NAME)
        self._write_config(step, n_tokens, finished=True)
        self.plot_curves()
