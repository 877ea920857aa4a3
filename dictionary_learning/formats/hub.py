"""Dictionaries on the Hugging Face Hub: ``hf://`` paths, SAELens release ids, uploads.

``load_dictionary("hf://org/repo/path/in/repo")`` (``hf://org/repo@revision/path`` for a
branch, tag or commit), or ``load_dictionary("path/in/repo", repo_id="org/repo",
revision=...)``, fetches the files a dictionary's loader reads (``FOLDER_FILES`` in that
folder, or the one file named) through ``huggingface_hub`` into its cache
(``HF_HUB_CACHE`` / ``HF_HOME``, or ``cache_dir``), then loads the local copy as any folder:
every format of ``formats/`` works. Offline (``HF_HUB_OFFLINE=1``) the cache alone is read.

``load_dictionary(sae_id, release=RELEASE)`` looks a SAELens release id up in SAELens's
registry (``pretrained_saes.yaml``, read from an installed ``sae_lens`` package without
importing it, or from ``registry=PATH``) for its repo, folder and loader, then loads it as
above. ``save_to_hub(folder, repo_id)`` uploads a dictionary folder with
``HfApi.upload_folder``.
"""

from __future__ import annotations

import importlib.util
import logging
import posixpath
import re
from pathlib import Path

logger = logging.getLogger(__name__)

HF_PREFIX = "hf://"
# What the loaders read in a dictionary's folder (the sparsify ones also one level down).
FOLDER_FILES = ("ae.pt", "config.json", "cfg.json", "sae_weights.safetensors",
                "sparsity.safetensors", "sae.safetensors", "params.npz", "params.safetensors",
                "hyperparams.json", "checkpoints/final.safetensors", "*/cfg.json",
                "*/sae.safetensors")
FILE_SUFFIXES = (".pt", ".pth", ".safetensors", ".npz")
# SAELens's loader names (``conversion_func``) and the format that reads their files here.
RELEASE_FORMATS = {None: "saelens", "sae_lens": "saelens", "gemma_2": "gemma_scope",
                   "gemma_3": "gemma_scope", "llama_scope": "llama_scope",
                   "goodfire": "goodfire", "dictionary_learning_1": "dictionary_learning",
                   "sparsify": "sparsify"}
# Training-state files of our folders, left out of uploads unless asked for.
TRAINING_STATE = ["checkpoints/trainer_state_*", "checkpoints/stream_state_*"]
_REVISION = re.compile(r"^([^/@]+/[^/@]+)(?:@([^/]+))?(?:/(.*))?$")


def is_hub_path(path) -> bool:
    return isinstance(path, str) and path.startswith(HF_PREFIX)


def parse_hub_path(uri: str) -> tuple[str, str | None, str]:
    """``hf://org/repo[@revision][/path]`` -> ``(repo_id, revision, path)``."""
    match = _REVISION.match(uri[len(HF_PREFIX):].strip("/"))
    if not match:
        raise ValueError(f"{uri!r} is not a Hub path: write hf://ORG/REPO/PATH/IN/REPO "
                         "(hf://ORG/REPO@REVISION/PATH for a branch, tag or commit)")
    return match.group(1), match.group(2), (match.group(3) or "").strip("/")


def _patterns(path: str) -> list[str]:
    """The files to fetch for ``path`` (a folder, or one weights file with its folder's
    configs; Llama Scope's ``checkpoints/final.safetensors`` with the folder above)."""
    folders, patterns = [path], []
    if path.endswith(FILE_SUFFIXES):
        patterns.append(path)
        folders = [posixpath.dirname(path)]
        if posixpath.basename(folders[0]) == "checkpoints":
            folders.append(posixpath.dirname(folders[0]))
    for folder in folders:
        patterns += [posixpath.join(folder, name) if folder else name for name in FOLDER_FILES]
    return patterns


def fetch(repo_id: str, path: str = "", revision: str | None = None,
          cache_dir: str | Path | None = None) -> Path:
    """The local copy (in the Hub cache) of ``path`` in the model repo ``repo_id``, with
    the files its loader reads. ``ConnectionError`` when the Hub cannot be reached and the
    cache lacks it, ``FileNotFoundError`` when the repo has no such path."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (HfHubHTTPError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    path = path.strip("/")
    where = f"{repo_id}{'@' + revision if revision else ''}/{path}"
    from ..hub_access import require_hub
    require_hub(f"hf://{where}")
    try:
        root = Path(snapshot_download(repo_id, revision=revision, cache_dir=cache_dir,
                                      allow_patterns=_patterns(path)))
    except (RepositoryNotFoundError, RevisionNotFoundError) as e:
        raise FileNotFoundError(f"no Hugging Face model repo {repo_id!r}"
                                f"{' at revision ' + repr(revision) if revision else ''} "
                                f"({type(e).__name__}); check the name, and log in "
                                "(HF_TOKEN) for a private or gated repo") from e
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConnectionError(f"could not fetch hf://{where} ({type(e).__name__}: {first}); "
                              "check the network, or with HF_HUB_OFFLINE=1 that the Hugging "
                              "Face cache holds it (HF_HUB_CACHE, or cache_dir=)") from e
    local = root / path
    if not local.exists() or (local.is_dir() and not any(local.iterdir())):
        raise FileNotFoundError(f"hf://{where}: no dictionary files at that path in the repo "
                                f"(or, offline, in the cached snapshot {root}); expected one "
                                f"of {', '.join(FOLDER_FILES[:10])} in a folder, or a "
                                f"{'/'.join(FILE_SUFFIXES)} file")
    return local


# ---------------------------------------------------------------------------------------
# SAELens's registry of pretrained SAEs.


def registry_path(registry: str | Path | None = None) -> Path:
    """``registry`` or the ``pretrained_saes.yaml`` of an installed ``sae_lens`` (found
    without importing it)."""
    if registry is not None:
        return Path(registry)
    spec = importlib.util.find_spec("sae_lens")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("SAELens release ids are looked up in SAELens's registry "
                         "(pretrained_saes.yaml): pip install sae-lens (it is read, not "
                         "imported), or pass registry=PATH to a copy, or load the repo "
                         "path directly: hf://ORG/REPO/PATH")
    return Path(next(iter(spec.submodule_search_locations))) / "pretrained_saes.yaml"


def read_registry(registry: str | Path | None = None) -> dict:
    path = registry_path(registry)
    try:
        import yaml
    except ImportError as e:
        raise ImportError("reading SAELens's registry needs PyYAML: pip install pyyaml") from e
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ValueError(f"cannot read SAELens's registry {path}: {e}") from e
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    try:
        data = yaml.load(text, Loader=loader)
    except yaml.YAMLError as e:
        raise ValueError(f"{path} is not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of release ids, got {type(data).__name__}")
    return data


def lookup_release(release: str, sae_id: str, registry: str | Path | None = None) -> dict:
    """``{"repo_id", "path", "conversion", "format", "norm_scaling_factor", "model",
    "release", "sae_id", "neuronpedia"}`` of one SAE of a SAELens release."""
    data = read_registry(registry)
    if release not in data:
        close = sorted(r for r in data if release.lower() in r.lower())[:8]
        raise ValueError(f"no SAELens release {release!r} in {registry_path(registry)}"
                         f"{'; similar: ' + ', '.join(close) if close else ''}")
    info = data[release]
    saes = {str(s["id"]): s for s in info.get("saes", []) if isinstance(s, dict) and "id" in s}
    if sae_id not in saes:
        raise ValueError(f"release {release!r} has no SAE {sae_id!r}; it has "
                         f"{len(saes)}, e.g. {', '.join(list(saes)[:5])}")
    conversion = info.get("conversion_func")
    if conversion not in RELEASE_FORMATS:
        raise ValueError(f"release {release!r} is loaded by SAELens's {conversion!r} "
                         "converter, which has no counterpart here; supported: "
                         f"{', '.join(str(c) for c in RELEASE_FORMATS if c)} and SAELens's "
                         "own folders")
    sae = saes[sae_id]
    return {"release": release, "sae_id": sae_id, "repo_id": info["repo_id"],
            "path": str(sae["path"]).strip("/"), "conversion": conversion,
            "format": RELEASE_FORMATS[conversion], "model": info.get("model"),
            "norm_scaling_factor": sae.get("norm_scaling_factor"),
            "neuronpedia": sae.get("neuronpedia")}


def resolve(path, repo_id: str | None = None, revision: str | None = None,
            release: str | None = None, registry: str | Path | None = None,
            cache_dir: str | Path | None = None, options: dict | None = None):
    """``(local path, options, source)`` for ``load_dictionary``: ``path`` itself when it is
    local (``source`` ``None``); else the cached copy of the Hub path (``hf://...``, or
    ``path`` inside ``repo_id``, or the SAE ``path`` of SAELens ``release``), with the options
    its loader needs (a release's ``norm_scaling_factor``, when the cfg asks for one) and
    ``source`` = where it came from, as plain data."""
    options = dict(options or {})
    if not isinstance(path, str) and str(path).startswith("hf:/"):
        raise TypeError(f"{path!r}: pass a Hub path as a string (a Path turns hf:// into "
                        "hf:/)")
    if release is None and repo_id is None and not is_hub_path(path):
        if registry is not None or cache_dir is not None:
            raise TypeError("registry and cache_dir apply to Hub paths, repo_id or release")
        return path, options, None
    info = {}
    if release is not None:
        if repo_id is not None or is_hub_path(path):
            raise TypeError("pass a SAELens release with its sae_id as the path, without "
                            "repo_id or an hf:// path")
        info = lookup_release(release, str(path), registry)
        repo_id, path = info["repo_id"], info["path"]
    elif is_hub_path(path):
        if repo_id is not None:
            raise TypeError(f"{path!r} names its repo: repo_id is not needed")
        repo_id, in_uri, path = parse_hub_path(path)
        if in_uri and revision and in_uri != revision:
            raise ValueError(f"two revisions: {in_uri!r} in the path and revision={revision!r}")
        revision = in_uri or revision
    local = fetch(repo_id, str(path), revision, cache_dir)
    source = {"hub": {"repo_id": repo_id, "path": str(path).strip("/"),
                      "revision": revision, "local": str(local), **info}}
    factor = info.get("norm_scaling_factor")
    if factor is not None and info.get("format") == "saelens" \
            and "norm_scaling_factor" not in options and _needs_scaling_factor(local):
        options["norm_scaling_factor"] = float(factor)  # as SAELens's from_pretrained folds it
    return local, options, source


def _needs_scaling_factor(folder: Path) -> bool:
    from .common import read_json

    cfg = folder / "cfg.json"
    return cfg.is_file() and read_json(cfg).get("normalize_activations") in (
        "expected_average_only_in", True)


# ---------------------------------------------------------------------------------------
# Upload.


def save_to_hub(folder: str | Path, repo_id: str, path_in_repo: str | None = None, *,
                revision: str | None = None, private: bool | None = None,
                commit_message: str | None = None, token: str | None = None,
                include_training_state: bool = False, api=None):
    """Upload a dictionary folder (any format ``load_dictionary`` reads) to the model repo
    ``repo_id`` (created if missing) under ``path_in_repo`` (default: the repo's root),
    with ``HfApi.upload_folder``; returns its ``CommitInfo``. The folder is loaded first,
    so a damaged one is refused before anything is sent. Trainer and stream states
    (``checkpoints/trainer_state_*``, ``stream_state_*``: what resuming needs, often larger
    than the weights) stay local unless ``include_training_state``. ``api`` replaces
    ``HfApi(token=token)`` (tests)."""
    from ..loading import load_dictionary

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"no dictionary folder at {folder}")
    load_dictionary(folder)  # refuses damaged or unrecognisable folders, naming the problem
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi(token=token)
    api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    return api.upload_folder(
        folder_path=str(folder), repo_id=repo_id, repo_type="model",
        path_in_repo=(path_in_repo or "").strip("/") or None, revision=revision,
        commit_message=commit_message or f"Upload dictionary {folder.name}",
        ignore_patterns=None if include_training_state else TRAINING_STATE)
