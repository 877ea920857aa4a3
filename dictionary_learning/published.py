"""The published pythia-70m-deduped dictionaries: download and unpack them safely.

The ``10_32768`` set (one ``AutoEncoder(512, 32768)`` per component of
``EleutherAI/pythia-70m-deduped``) is one zip archive in the Hugging Face repo
``saprmarks/pythia-70m-deduped-saes``: ``dictionaries_pythia-70m-deduped_10.zip``
(about 2.4 GB), the file upstream's ``pretrained_dictionary_downloader.sh`` fetches.
Its members are ``dictionaries/pythia-70m-deduped/{component}/10_32768/...`` with
components ``embed`` and ``{attn,mlp,resid}_out_layer{0..5}``. The older sets (``0_8192``,
``1_32768``, ...) were served from a university web page whose links are dead.

:func:`unpack` writes ``dest/{component}/{set}/...`` from any zip or tar archive of that
layout (whatever prefix it has), refusing members that would land outside ``dest``.
"""

from __future__ import annotations

import logging
import os
import shutil
import tarfile
import zipfile
from collections.abc import Callable, Iterable
from pathlib import Path, PurePosixPath

from tqdm.auto import tqdm

from .assess import COMPONENT_RE
from .loading import WEIGHTS_NAME
from .saving import atomic_write

logger = logging.getLogger(__name__)

REPO_ID = "saprmarks/pythia-70m-deduped-saes"
ARCHIVES = {"10_32768": "dictionaries_pythia-70m-deduped_10.zip"}
DEAD_SETS = ("0_8192", "1_32768", "2_32768", "5_32768")
N_LAYERS = 6
COMPONENTS = ("embed", *(f"{kind}_out_layer{i}" for i in range(N_LAYERS)
                         for kind in ("attn", "mlp", "resid")))


def check_set(set_name: str) -> str:
    """The archive file name of a downloadable set; a clear ``ValueError`` otherwise."""
    if set_name in ARCHIVES:
        return ARCHIVES[set_name]
    if set_name in DEAD_SETS:
        raise ValueError(f"the {set_name} set can no longer be downloaded (its links are dead); "
                         f"only {', '.join(ARCHIVES)} is published on the Hugging Face hub")
    raise ValueError(f"unknown set {set_name!r}; downloadable: {', '.join(ARCHIVES)}")


def check_components(components: Iterable[str] | None) -> tuple[str, ...]:
    if components is None:
        return COMPONENTS
    components = tuple(components)
    unknown = [c for c in components if c not in COMPONENTS]
    if unknown:
        raise ValueError(f"unknown component(s) {', '.join(unknown)}; choose from embed, "
                         f"attn_out_layerN, mlp_out_layerN, resid_out_layerN (N = 0..5)")
    return components


def missing(dest: str | os.PathLike, set_name: str, components: Iterable[str]) -> list[str]:
    """The components whose ``dest/{component}/{set}/ae.pt`` is not there yet."""
    return [c for c in components if not (Path(dest) / c / set_name / WEIGHTS_NAME).is_file()]


def fetch_archive(filename: str, repo_id: str = REPO_ID, cache_dir: str | None = None) -> Path:
    """Download ``filename`` from the hub repo ``repo_id`` (a progress bar; resumed and
    cached by ``huggingface_hub``). Raises ``ConnectionError`` when it cannot be fetched."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError

    from .hub_access import require_hub
    require_hub(f"{filename} of the Hugging Face repo {repo_id} (or pass --archive PATH)")
    try:
        return Path(hf_hub_download(repo_id, filename, cache_dir=cache_dir))
    except (OSError, HfHubHTTPError) as e:  # offline, unknown repo or file, refused
        first = str(e).splitlines()[0] if str(e) else "no details"
        raise ConnectionError(f"could not download {filename} from the Hugging Face repo "
                              f"{repo_id} ({type(e).__name__}: {first}); check your network "
                              "(and HF_HUB_OFFLINE), or download the file yourself and pass "
                              "--archive PATH") from e


def _members(archive: Path) -> list[tuple[str, bool, Callable]]:
    """``(name, is_file, open)`` of every member; links and devices are refused."""
    if zipfile.is_zipfile(archive):
        zf = zipfile.ZipFile(archive)
        return [(i.filename, not i.is_dir(), lambda i=i: zf.open(i)) for i in zf.infolist()]
    if tarfile.is_tarfile(archive):
        tf = tarfile.open(archive)
        out = []
        for m in tf.getmembers():
            if not (m.isfile() or m.isdir()):
                raise ValueError(f"{archive}: member {m.name!r} is a link or special file; "
                                 "refusing to unpack this archive")
            out.append((m.name, m.isfile(), lambda m=m: tf.extractfile(m)))
        return out
    raise ValueError(f"{archive} is neither a zip nor a tar archive")


def _target(name: str, set_name: str) -> PurePosixPath | None:
    """Where a member goes under ``dest``: ``{component}/{set}/...``, or ``None`` for a
    member outside the layout. Absolute names and ``..`` are refused."""
    path = PurePosixPath(name.replace("\\", "/"))
    if path.is_absolute() or ".." in path.parts or (path.parts and ":" in path.parts[0]):
        raise ValueError(f"archive member {name!r} would be written outside the destination; "
                         "refusing to unpack this archive")
    parts = path.parts
    for i, part in enumerate(parts[:-1]):
        if COMPONENT_RE.match(part) and parts[i + 1] == set_name:
            return PurePosixPath(*parts[i:])
    return None


def unpack(archive: str | os.PathLike, dest: str | os.PathLike, set_name: str = "10_32768",
           components: Iterable[str] | None = None) -> list[Path]:
    """Write the archive's ``{component}/{set_name}/...`` members under ``dest`` and return
    the dictionary folders written. Every member name is checked before anything is
    written; each file is written atomically (an interrupted unpack leaves no partial file).
    """
    archive, dest = Path(archive), Path(dest)
    if not archive.is_file():
        raise FileNotFoundError(f"no archive at {archive}")
    wanted = set(check_components(components))
    plan = []
    for name, is_file, opener in _members(archive):
        target = _target(name, set_name)
        if target is not None and is_file and target.parts[0] in wanted:
            plan.append((dest.joinpath(*target.parts), opener))
    if not plan:
        raise ValueError(f"{archive} holds no {{component}}/{set_name}/ files: is it an archive "
                         "of the published layout?")
    for path, opener in tqdm(plan, desc="Unpacking", unit="file"):
        def write(tmp, opener=opener):
            with opener() as src, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst, length=1 << 20)
        atomic_write(path, write)
    folders = sorted({p.parent for p, _ in plan if p.name == WEIGHTS_NAME})
    lost = wanted - {f.parent.name for f in folders}
    if lost:
        logger.warning("%s has no %s for: %s", archive, WEIGHTS_NAME, ", ".join(sorted(lost)))
    return folders


def download(dest: str | os.PathLike, set_name: str = "10_32768", repo_id: str = REPO_ID,
             components: Iterable[str] | None = None, archive: str | os.PathLike | None = None,
             fetch: Callable[..., Path] = fetch_archive, cache_dir: str | None = None
             ) -> tuple[list[Path], bool]:
    """Make ``dest/{component}/{set_name}/ae.pt`` present for ``components`` (default: all
    19). Returns ``(folders, fetched)``; nothing is fetched or written when every folder is
    already there. ``archive`` unpacks a local copy instead of fetching; ``fetch(filename,
    repo_id, cache_dir)`` is the download (injectable for tests)."""
    filename = check_set(set_name)
    components = check_components(components)
    todo = missing(dest, set_name, components)
    if not todo:
        return [Path(dest) / c / set_name for c in components], False
    path = Path(archive) if archive is not None else fetch(filename, repo_id=repo_id,
                                                          cache_dir=cache_dir)
    unpack(path, dest, set_name, todo)
    still = missing(dest, set_name, components)
    if still:
        raise ValueError(f"{path} did not contain {', '.join(still)} for set {set_name}")
    return [Path(dest) / c / set_name for c in components], True
