"""Reading an analysis run folder (written by ``analyze``) for the viewer.

A run folder holds ``metadata.json`` (``format: dictionary_learning.analysis/1``),
``features.json`` (one list of ``dict_size`` floats per statistic; feature id = index),
``histograms.json``, ``contexts.json`` and ``logits.json``. Everything is read once, when the
run is opened; rankings are sorted the first time a metric is asked for, and a feature's
contexts are turned into token strings only when that feature is asked for.
"""

from __future__ import annotations

import json
import logging
import math
from datetime import datetime, timezone
from pathlib import Path

logger = logging.getLogger(__name__)

FORMAT_PREFIX = "dictionary_learning.analysis/"


def _read_json(path: Path, default=None):
    """The JSON in ``path``; ``default`` when the file is absent and a default is given."""
    if not path.exists():
        if default is not None:
            logger.warning("%s is missing; showing the run without it", path)
            return default
        raise FileNotFoundError(f"{path} is missing: is this a run folder written by analyze?")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); re-run analyze to rewrite it") from e


def read_metadata(run_dir: Path) -> dict:
    """``run_dir/metadata.json``, checked to be an analysis run's metadata."""
    path = Path(run_dir) / "metadata.json"
    meta = _read_json(path)
    if not isinstance(meta, dict) or not str(meta.get("format", "")).startswith(FORMAT_PREFIX):
        raise ValueError(f"{path} is not an analysis run's metadata (expected a 'format' of "
                         f"'{FORMAT_PREFIX}1'); point the viewer at a folder written by analyze")
    size = meta.get("dict_size")
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise ValueError(f"{path}: 'dict_size' must be a non-negative integer, got {size!r}")
    return meta


def _created(run_dir: Path, meta: dict) -> float:
    """When the run was made: metadata ``created`` (ISO time), else metadata.json's mtime."""
    text = meta.get("created")
    if isinstance(text, str):
        try:
            when = datetime.fromisoformat(text.replace("Z", "+00:00"))
            if when.tzinfo is None:
                when = when.replace(tzinfo=timezone.utc)
            return when.timestamp()
        except ValueError:
            logger.warning("%s: unreadable 'created' time %r; using the file time", run_dir, text)
    return (run_dir / "metadata.json").stat().st_mtime


def find_run(path: str | Path, name: str | None = None) -> Path:
    """The run folder to serve: ``path`` itself if it is a run, else its run subfolder
    ``name``, else its newest run subfolder (by metadata ``created``, then file time)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"no run folder at {path}: pass the --out folder of analyze")
    if not path.is_dir():
        raise NotADirectoryError(f"{path} is not a folder: pass a run folder written by analyze")
    if name is not None:
        if (path / "metadata.json").exists() and path.name == name:
            return path
        if not (path / name / "metadata.json").exists():
            runs = sorted(p.name for p in path.iterdir() if (p / "metadata.json").exists())
            raise FileNotFoundError(f"no run named {name!r} in {path} (runs there: "
                                    f"{', '.join(runs) or 'none'})")
        read_metadata(path / name)
        return path / name
    if (path / "metadata.json").exists():
        read_metadata(path)
        return path
    candidates = []
    for sub in sorted(p for p in path.iterdir() if (p / "metadata.json").exists()):
        try:
            candidates.append((_created(sub, read_metadata(sub)), sub.name, sub))
        except ValueError as e:
            logger.warning("skipping %s: %s", sub, e)
    if not candidates:
        raise FileNotFoundError(f"{path} holds no analysis run (no metadata.json in it or in "
                                "its subfolders): run analyze with --out first")
    return max(candidates)[2]


def _finite(value):
    """A JSON-safe number: NaN and infinities (which JSON cannot carry) become None."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class Run:
    """One analysis run, read into memory; the viewer's API answers from it."""

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir)
        self.metadata = read_metadata(self.path)
        self.size = self.metadata["dict_size"]  # m features
        features = _read_json(self.path / "features.json")
        if not isinstance(features, dict):
            raise ValueError(f"{self.path / 'features.json'} must be an object of columns")
        for key, column in features.items():
            if not isinstance(column, list) or len(column) != self.size:
                got = len(column) if isinstance(column, list) else type(column).__name__
                raise ValueError(f"{self.path / 'features.json'}: column {key!r} has {got} "
                                 f"values, but metadata says dict_size = {self.size}")
            if not all(v is None or (isinstance(v, (int, float)) and not isinstance(v, bool))
                       for v in column):
                raise ValueError(f"{self.path / 'features.json'}: column {key!r} holds values "
                                 "that are not numbers")
        self.columns = {k: [_finite(v) for v in col] for k, col in features.items()}
        ranked = [r for r in self.metadata.get("rankings", []) if r in self.columns]
        self.metrics = ranked + [k for k in self.columns if k not in ranked]
        self.histograms = _read_json(self.path / "histograms.json", {"upper": [], "counts": []})
        contexts = _read_json(self.path / "contexts.json", {"vocab": [], "top": {}, "random": {}})
        self.vocab = contexts.get("vocab", [])
        self.top = contexts.get("top", {})
        self.random = contexts.get("random", {})
        self.logits = _read_json(self.path / "logits.json", {})
        self._order: dict[str, list[int]] = {}

    def ranking(self, metric: str) -> list[int]:
        """Feature ids by ``metric``, largest first (ties by id; missing values last)."""
        if metric not in self.columns:
            raise KeyError(metric)
        if metric not in self._order:
            column = self.columns[metric]
            self._order[metric] = sorted(
                range(self.size),
                key=lambda i: (column[i] is None, -(column[i] or 0.0), i))
        return self._order[metric]

    def features(self, metric: str, offset: int = 0, limit: int | None = None) -> dict:
        """One page of the ranking: ``{metric, total, offset, features: [{id, value, stats}]}``."""
        order = self.ranking(metric)
        end = len(order) if limit is None else offset + limit
        rows = []
        for i in order[offset:end]:
            row = {"id": i, "value": self.columns[metric][i]}
            for name in self.metrics:
                row[name] = self.columns[name][i]
            rows.append(row)
        return {"metric": metric, "total": self.size, "offset": offset, "features": rows}

    def _contexts(self, table: dict, i: int) -> list[dict]:
        """Feature ``i``'s contexts with token ids turned into strings."""
        out = []
        for ctx in table.get(str(i), []):
            tokens = [self.vocab[t] if isinstance(t, int) and 0 <= t < len(self.vocab)
                      else f"<unk {t}>" for t in ctx.get("tokens", [])]
            out.append({"tokens": tokens, "acts": [_finite(a) for a in ctx.get("acts", [])],
                        "max": _finite(ctx.get("max")), "pos": ctx.get("pos")})
        return out

    def _histogram(self, i: int) -> dict | None:
        upper, counts = self.histograms.get("upper", []), self.histograms.get("counts", [])
        if i >= len(upper) or i >= len(counts):
            return None
        return {"upper": _finite(upper[i]), "counts": counts[i]}

    def feature_info(self, i: int) -> dict:
        """Everything about feature ``i`` (0 <= i < dict_size): statistics, histogram,
        top and random contexts (tokens as strings) and logit effects."""
        if not 0 <= i < self.size:
            raise IndexError(f"feature {i} is out of range: this run has features 0.."
                             f"{self.size - 1}")
        info = {"id": i}
        for name in self.metrics:
            info[name] = self.columns[name][i]
        info["histogram"] = self._histogram(i)
        info["top_contexts"] = self._contexts(self.top, i)
        info["random_contexts"] = self._contexts(self.random, i)
        effects = self.logits.get(str(i), {})
        info["logit_effects"] = {"promoted": effects.get("promoted", []),
                                 "suppressed": effects.get("suppressed", [])}
        if "ablation" in effects:
            info["logit_effects"]["ablation"] = effects["ablation"]
        return info
