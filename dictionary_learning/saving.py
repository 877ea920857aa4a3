"""Writing a trained dictionary's folder, atomically.

Layout (upstream's, so its own loader reads our folders)::

    save_dir/
      ae.pt                            state_dict of the final dictionary
      config.json                      {"trainer": {...}, "buffer": {...}, "run": {...}}
      metrics.jsonl                    one line of logged loss terms per logged step
      checkpoints/ae_{step}.pt         bare state_dicts
      checkpoints/trainer_state_{step}.pt   what resuming needs: optimizer, counters, step

Every file is written to a temporary name in the same folder and renamed into place, so
an interrupted run never leaves a truncated file: the last complete checkpoint loads.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import re
import tempfile
from importlib import metadata
from pathlib import Path

import torch

from .loading import CONFIG_NAME, WEIGHTS_NAME


def atomic_write(path: Path, write) -> None:
    """Call ``write(tmp_path)`` then rename the temporary file to ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_state_dict(state_dict: dict, path: Path) -> None:
    atomic_write(path, lambda tmp: torch.save(state_dict, tmp))


def save_json(obj: dict, path: Path) -> None:
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, default=str)
    atomic_write(path, write)


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for package in ("dictionary_learning", "torch", "nnsight", "transformers", "datasets"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = "not installed"
    return found


def _layer(submodule_name: str | None) -> int | None:
    match = re.search(r"\.(\d+)(\.|$)", submodule_name or "")
    return int(match.group(1)) if match else None


class CheckpointWriter:
    """Writes one trainer's folder: config at the start, checkpoints, the final weights."""

    def __init__(self, folder: str | Path, trainer, buffer_config: dict, run_info: dict,
                 steps: int | None):
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
        (self.folder / "metrics.jsonl").unlink(missing_ok=True)
        self._write_config(step=0, n_tokens=0, finished=False)

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

    def checkpoint(self, step: int, n_tokens: int) -> None:
        t = self.trainer
        folder = self.folder / "checkpoints"
        save_state_dict(t.raw_dictionary().state_dict(), folder / f"ae_{step}.pt")
        save_state_dict({
            "step": step,
            "activations_trained": n_tokens,
            "optimizer": t.optimizer.state_dict(),
            "steps_since_active": t.steps_since_active,
            "tokens_since_active": t.tokens_since_active,
            "warm_start": t.warm_start,
            "activation_scale": t.activation_scale,
            "n_resampled": t.n_resampled,
        }, folder / f"trainer_state_{step}.pt")
        self._write_config(step, n_tokens, finished=False)

    def finish(self, step: int, n_tokens: int, buffer_config: dict) -> None:
        self.buffer_config = buffer_config
        save_state_dict(self.trainer.raw_dictionary().state_dict(), self.folder / WEIGHTS_NAME)
        self._write_config(step, n_tokens, finished=True)
