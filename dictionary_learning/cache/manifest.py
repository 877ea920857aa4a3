"""The manifest of an activation cache: what was collected, how, and which shards hold it.

A cache folder holds ``manifest.json`` and shards ``shard_00000.safetensors``, ... . Each
shard holds, for ``rows`` consecutive collected tokens (in text order):

    "<submodule>.<input|output>"   [rows, width]  the activations (``dtype``), one per hook
    "token_ids"                    [rows] int32   the token at each row
    "positions"                    [rows] int32   its position among its context's real
                                                  tokens (a context starts where the
                                                  position does not grow by one)

The manifest is the cache's only commit point: a shard exists for readers once the manifest
lists it (shards are written to a temporary name and renamed before the manifest is
rewritten, both atomically). It also says where the collection stands in the text
(``resume``), so a killed writer continues from the last listed shard, and carries the
activations' statistics (count, per-dimension mean and variance, mean norm), accumulated in
float64 from the stored values as the shards are written.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..files import write_json

MANIFEST = "manifest.json"
FORMAT = "dictionary_learning.activation_cache"
VERSION = 1
TOKEN_KEYS = ("token_ids", "positions")


class CacheError(ValueError):
    """A cache folder that cannot be read (missing, damaged, or not what was asked for)."""


def shard_name(index: int, part: tuple[int, int] | None = None) -> str:
    """``shard_00007.safetensors``; written by rank 2 of 4 under torchrun,
    ``shard_2of4_00007.safetensors``."""
    tag = "" if part is None else f"{part[0]}of{part[1]}_"
    return f"shard_{tag}{index:05d}.safetensors"


def manifest_name(part: tuple[int, int] | None = None) -> str:
    """The manifest of the whole cache, or of one rank's part of it under torchrun (merged
    into ``manifest.json`` when every part is complete)."""
    return MANIFEST if part is None else f"manifest.part{part[0]}of{part[1]}.json"


def hook_key(submodule: str, kind: str) -> str:
    """The tensor name of one hook in a shard: ``"gpt_neox.layers.1.mlp.output"``."""
    return f"{submodule}.{kind}"


@dataclass
class RunningStats:
    """Streamed float64 sums of one hook's rows: enough for the mean, the variance and the
    mean norm, and exact to resume (they are saved as they are)."""

    count: int
    total: torch.Tensor        # [d] sum of x
    total_sq: torch.Tensor     # [d] sum of x^2
    norm_total: float          # sum of ||x||

    @classmethod
    def empty(cls, width: int) -> "RunningStats":
        return cls(0, torch.zeros(width, dtype=torch.float64),
                   torch.zeros(width, dtype=torch.float64), 0.0)

    def add(self, rows: torch.Tensor) -> None:
        x = rows.to(torch.float64)
        self.count += x.shape[0]
        self.total += x.sum(0)
        self.total_sq += (x * x).sum(0)
        self.norm_total += float(x.norm(dim=-1).sum())

    def summary(self) -> dict:
        n = max(self.count, 1)
        mean = self.total / n
        var = (self.total_sq / n - mean * mean).clamp_min(0)
        return {"count": self.count, "mean_norm": self.norm_total / n,
                "mean": mean.tolist(), "var": var.tolist()}

    def to_json(self) -> dict:
        return {"count": self.count, "total": self.total.tolist(),
                "total_sq": self.total_sq.tolist(), "norm_total": self.norm_total}

    @classmethod
    def from_json(cls, d: dict) -> "RunningStats":
        return cls(int(d["count"]), torch.tensor(d["total"], dtype=torch.float64),
                   torch.tensor(d["total_sq"], dtype=torch.float64), float(d["norm_total"]))


def write_manifest(folder: Path, manifest: dict, name: str = MANIFEST) -> None:
    """Rewrite ``manifest.json`` atomically (compact: the statistics are long lists)."""
    write_json(folder / name, manifest, indent=None, compact=True)


def read_manifest(folder: str | Path, name: str = MANIFEST) -> dict:
    """The manifest of the cache in ``folder``, checked enough that readers can trust it."""
    folder = Path(folder)
    path = folder / name
    if name == MANIFEST and not path.is_file() and any(folder.glob("manifest.part*.json")):
        raise CacheError(f"{folder} holds the parts of a cache written by several processes "
                         "that did not all finish: continue it with the same torchrun command "
                         "and --resume")
    if not path.is_file():
        what = "does not exist" if not folder.exists() else f"has no {MANIFEST}"
        raise CacheError(f"{folder} {what}: it is not an activation cache; write one with "
                         "`python -m dictionary_learning cache ... --out "
                         f"{folder}`")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CacheError(f"{path} is damaged ({e}): write the cache again") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CacheError(f"{path} is not an activation cache manifest (no \"format\": "
                         f"\"{FORMAT}\")")
    if manifest.get("version") != VERSION:
        raise CacheError(f"{path} has version {manifest.get('version')!r}; this toolkit reads "
                         f"version {VERSION}: write the cache again with this version")
    for key in ("hooks", "shards", "dtype", "io", "submodules"):
        if key not in manifest:
            raise CacheError(f"{path} is damaged: it has no {key!r}; write the cache again")
    return manifest


def bytes_per_row(hooks: list[dict], dtype: torch.dtype) -> int:
    """Disk bytes of one cached token: every hook's activations plus its two int32s."""
    return sum(h["width"] for h in hooks) * dtype.itemsize + 4 * len(TOKEN_KEYS)


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    return f"{n} B"  # pragma: no cover

