"""``download``: a local archive of the published layout unpacks into dest and loads; a
second run does nothing; members that would escape dest are refused; offline fails fast."""

import io
import json
import tarfile
import time
import zipfile

import pytest
import torch

from dictionary_learning import AutoEncoder, load_dictionary
from dictionary_learning.cli import main
from dictionary_learning.published import COMPONENTS, download, unpack

PREFIX = "dictionaries/pythia-70m-deduped"  # the published zip's member prefix
PICKED = ("embed", "attn_out_layer2", "mlp_out_layer1", "resid_out_layer5")


def weights(seed: int) -> dict:
    torch.manual_seed(seed)
    return AutoEncoder(16, 32).state_dict()


def serialised(state_dict) -> bytes:
    buf = io.BytesIO()
    torch.save(state_dict, buf)
    return buf.getvalue()


def members(components=PICKED, set_name="10_32768") -> dict[str, bytes]:
    """Archive members of the published layout with tiny AutoEncoder weights."""
    out = {}
    for i, c in enumerate(components):
        out[f"{PREFIX}/{c}/{set_name}/ae.pt"] = serialised(weights(i))
        out[f"{PREFIX}/{c}/{set_name}/config.json"] = json.dumps(
            {"dictionary_size": 32, "activation_dim": 16}).encode()
    out["README.txt"] = b"outside the layout: ignored"
    return out


def make_zip(path, files: dict[str, bytes]):
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return path


def make_tar(path, files: dict[str, bytes], links=()):
    with tarfile.open(path, "w:gz") as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        for name, target in links:
            info = tarfile.TarInfo(name)
            info.type, info.linkname = tarfile.SYMTYPE, target
            tf.addfile(info)
    return path


def test_local_zip_unpacks_loads_and_is_idempotent(tmp_path, capsys):
    archive = make_zip(tmp_path / "sets.zip", members())
    dest = tmp_path / "dictionaries" / "pythia-70m-deduped"
    args = ["download", "--archive", str(archive), "--dest", str(dest), "--components", *PICKED]
    assert main(args) == 0
    assert "4 dictionaries of set 10_32768" in capsys.readouterr().out
    for i, c in enumerate(PICKED):
        ae, config = load_dictionary(dest / c / "10_32768")
        assert config["dictionary_size"] == 32
        for key, value in weights(i).items():
            assert torch.equal(ae.state_dict()[key], value), (c, key)
    assert sorted(p.name for p in dest.iterdir()) == sorted(PICKED)  # nothing else written
    stamp = (dest / "embed/10_32768/ae.pt").stat().st_mtime_ns
    archive.unlink()  # present already: the archive is not even opened
    assert main(args) == 0
    assert "already present, nothing downloaded" in capsys.readouterr().out
    assert (dest / "embed/10_32768/ae.pt").stat().st_mtime_ns == stamp


def test_injected_fetch_is_called_once_and_tar_works(tmp_path):
    archive = make_tar(tmp_path / "sets.tar.gz", members(COMPONENTS))
    calls = []

    def fetch(filename, repo_id, cache_dir):
        calls.append((filename, repo_id))
        return archive

    folders, fetched = download(tmp_path / "out", fetch=fetch)
    assert fetched and len(folders) == 19 == len(COMPONENTS)
    assert calls == [("dictionaries_pythia-70m-deduped_10.zip",
                      "saprmarks/pythia-70m-deduped-saes")]
    assert download(tmp_path / "out", fetch=fetch)[1] is False and len(calls) == 1


def test_archive_missing_components_is_an_error(tmp_path, capsys):
    archive = make_zip(tmp_path / "partial.zip", members())
    assert main(["download", "--archive", str(archive), "--dest", str(tmp_path / "d")]) == 2
    assert "did not contain attn_out_layer0" in capsys.readouterr().err


@pytest.mark.parametrize("bad", ["../escape/10_32768/ae.pt",
                                 f"{PREFIX}/mlp_out_layer1/10_32768/../../../../x.pt",
                                 "/abs/mlp_out_layer1/10_32768/ae.pt"])
def test_members_escaping_dest_are_refused(tmp_path, capsys, bad):
    files = {**members(), bad: b"evil"}
    dest = tmp_path / "inner" / "dest"
    for archive in (make_zip(tmp_path / "bad.zip", files), make_tar(tmp_path / "bad.tgz", files)):
        code = main(["download", "--archive", str(archive), "--dest", str(dest),
                     "--components", *PICKED])
        err = capsys.readouterr().err
        assert code == 2 and "would be written outside the destination" in err
        assert not dest.exists() and not (tmp_path / "x.pt").exists()


def test_links_in_tar_are_refused(tmp_path):
    archive = make_tar(tmp_path / "link.tgz", members(),
                       links=[(f"{PREFIX}/embed/10_32768/evil", "/etc/passwd")])
    with pytest.raises(ValueError, match="is a link or special file"):
        unpack(archive, tmp_path / "d", components=PICKED)


def test_dead_and_unknown_sets_and_components(capsys, tmp_path):
    assert main(["download", "--set", "0_8192", "--dest", str(tmp_path)]) == 2
    assert "0_8192 set can no longer be downloaded" in capsys.readouterr().err
    assert main(["download", "--components", "mlp_out_layer9", "--dest", str(tmp_path)]) == 2
    assert "unknown component(s) mlp_out_layer9" in capsys.readouterr().err


def test_offline_fails_fast_with_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    code = main(["download", "--dest", str(tmp_path / "d"), "--cache-dir", str(tmp_path / "c"),
                 "--components", "mlp_out_layer1"])
    err = capsys.readouterr().err
    assert code == 2 and time.perf_counter() - start < 20
    [line] = err.strip().splitlines()
    assert line.startswith("error: could not download dictionaries_pythia-70m-deduped_10.zip "
                           "from the Hugging Face repo saprmarks/pythia-70m-deduped-saes")
    assert not (tmp_path / "d").exists()
