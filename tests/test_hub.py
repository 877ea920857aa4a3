"""The Hugging Face Hub path, offline: each test lays out a Hub cache folder itself (what
``huggingface_hub`` leaves after a download: ``models--ORG--NAME/refs/REVISION`` holding a
commit hash, ``snapshots/COMMIT/...`` the files) and loads from it with the Hub offline
(``HF_HUB_OFFLINE=1`` in a subprocess; in-process, the same switch of
``huggingface_hub.constants``), comparing with loading the same files from a local folder."""

import fnmatch
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from test_formats import inputs, saelens_weights, sparsify_folder, v6_cfg, write_saelens

from dictionary_learning.formats.hub import save_to_hub
from dictionary_learning.loading import load_dictionary
from dictionary_learning.registry import DICTIONARY_CLASSES

REPO = "someone/saes"
COMMITS = {"main": "a" * 40, "v1": "b" * 40}
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def offline(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def snapshot(cache, repo=REPO, revision="main"):
    """The snapshot folder of ``repo`` at ``revision`` in the cache ``cache`` (created)."""
    storage = cache / f"models--{repo.replace('/', '--')}"
    commit = COMMITS.get(revision, revision)
    (storage / "refs").mkdir(parents=True, exist_ok=True)
    if revision != commit:
        (storage / "refs" / revision).write_text(commit)
    folder = storage / "snapshots" / commit
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def our_folder(folder, seed=0):
    torch.manual_seed(seed)
    ae = DICTIONARY_CLASSES["AutoEncoderTopK"](16, 48, k=5)
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(ae.state_dict(), folder / "ae.pt")
    (folder / "config.json").write_text(json.dumps(
        {"trainer": {"dict_class": "AutoEncoderTopK", **ae.config()}, "buffer": {}}))
    (folder / "checkpoints").mkdir(exist_ok=True)
    torch.save(ae.state_dict(), folder / "checkpoints" / "trainer_state_10.pt")
    return folder


def repo_of_every_format(root):
    """One repo holding a folder of each format (the layouts of the published repos)."""
    our_folder(root / "ours" / "resid_out_layer3")
    write_saelens(root / "blocks.3.hook_resid_pre", saelens_weights("jumprelu"),
                  v6_cfg("jumprelu", False))
    sparsify_folder(root / "sparsify" / "layers.3.mlp", torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    gemma = root / "layer_3" / "width_16k" / "average_l0_50"
    gemma.mkdir(parents=True)
    np.savez(gemma / "params.npz", W_enc=torch.randn(16, 48, generator=g).numpy(),
             W_dec=torch.randn(48, 16, generator=g).numpy(), b_enc=np.zeros(48, np.float32),
             b_dec=np.zeros(16, np.float32), threshold=np.full(48, 0.1, np.float32))
    torch.save({"encoder_linear.weight": torch.randn(48, 16, generator=g),
                "encoder_linear.bias": torch.zeros(48),
                "decoder_linear.weight": torch.randn(16, 48, generator=g),
                "decoder_linear.bias": torch.zeros(16)}, root / "Goodfire-SAE-l3.pth")
    return ["ours/resid_out_layer3", "blocks.3.hook_resid_pre", "sparsify/layers.3.mlp",
            "sparsify", "layer_3/width_16k/average_l0_50", "Goodfire-SAE-l3.pth"]


def same(a, b, x=None):
    x = inputs() if x is None else x
    return type(a) is type(b) and torch.equal(a.encode(x.to(a.W_dec.dtype)),
                                              b.encode(x.to(b.W_dec.dtype)))


def test_hf_paths_load_every_format_from_the_cache(tmp_path, offline):
    cache = tmp_path / "cache"
    paths = repo_of_every_format(snapshot(cache))
    local_root = snapshot(cache)
    for path in paths:
        ae, config = load_dictionary(f"hf://{REPO}/{path}", cache_dir=cache)
        reference, reference_config = load_dictionary(local_root / path)
        assert same(ae, reference), path
        assert config["source"]["hub"] == {"repo_id": REPO, "path": path, "revision": None,
                                           "local": str(local_root / path)}
        assert {k: v for k, v in config.items() if k != "source"} == reference_config
    # the same through repo_id=, and with the sparsify hookpoint option
    ae, _ = load_dictionary("sparsify", repo_id=REPO, cache_dir=cache, hookpoint="layers.3.mlp")
    assert same(ae, load_dictionary(local_root / "sparsify/layers.3.mlp")[0])


def test_revisions_branches_tags_and_commits(tmp_path, offline):
    cache = tmp_path / "cache"
    our_folder(snapshot(cache) / "sae", seed=0)
    our_folder(snapshot(cache, revision="v1") / "sae", seed=1)
    main, _ = load_dictionary(f"hf://{REPO}/sae", cache_dir=cache)
    tagged, config = load_dictionary(f"hf://{REPO}@v1/sae", cache_dir=cache)
    assert not same(main, tagged) and config["source"]["hub"]["revision"] == "v1"
    for revision in ("v1", COMMITS["v1"]):  # a tag, and the commit it points to
        again, _ = load_dictionary("sae", repo_id=REPO, revision=revision, cache_dir=cache)
        assert same(again, tagged)
    with pytest.raises(ValueError, match="two revisions"):
        load_dictionary(f"hf://{REPO}@v1/sae", revision="main", cache_dir=cache)
    with pytest.raises(TypeError, match="names its repo"):
        load_dictionary(f"hf://{REPO}/sae", repo_id=REPO, cache_dir=cache)


def test_what_the_cache_lacks_is_one_clear_error(tmp_path, offline):
    cache = tmp_path / "cache"
    our_folder(snapshot(cache) / "sae")
    with pytest.raises(FileNotFoundError, match=r"hf://someone/saes/elsewhere: no dictionary"):
        load_dictionary(f"hf://{REPO}/elsewhere", cache_dir=cache)
    with pytest.raises(ConnectionError, match="HF_HUB_OFFLINE=1.*cache"):
        load_dictionary("hf://nobody/nothing/sae", cache_dir=cache)
    with pytest.raises(ValueError, match="is not a Hub path"):
        load_dictionary("hf://just-a-name", cache_dir=cache)
    with pytest.raises(TypeError, match="as a string"):
        load_dictionary(Path(f"hf://{REPO}/sae"), cache_dir=cache)


def test_hf_hub_offline_environment_variable(tmp_path):
    """A fresh process with ``HF_HUB_OFFLINE=1`` and ``HF_HUB_CACHE`` set, as a user would."""
    cache = tmp_path / "cache"
    our_folder(snapshot(cache) / "sae")
    script = ("from dictionary_learning.loading import load_dictionary\n"
              f"ae, c = load_dictionary('hf://{REPO}/sae')\n"
              "print(type(ae).__name__, c['source']['hub']['local'])\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache),
           "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["AutoEncoderTopK", str(snapshot(cache) / "sae")]


REGISTRY = """
saelens-release:
  conversion_func: null
  model: gpt2
  repo_id: someone/saes
  saes:
  - id: blocks.3.hook_resid_pre
    path: saelens/blocks.3
    norm_scaling_factor: 2.5
gemma-scope-like:
  conversion_func: gemma_2
  model: gemma-2-2b
  repo_id: someone/saes
  saes:
  - id: layer_3/width_16k/canonical
    path: layer_3/width_16k/average_l0_50
qwen-scope-like:
  conversion_func: qwen_scope
  model: qwen
  repo_id: someone/saes
  saes:
  - id: x
    path: x
"""


def test_saelens_release_ids_from_its_registry(tmp_path, offline):
    cache = tmp_path / "cache"
    root = snapshot(cache)
    repo_of_every_format(root)
    w = saelens_weights("standard")
    write_saelens(root / "saelens" / "blocks.3", w, v6_cfg("standard", True,
                                                           "expected_average_only_in"))
    registry = tmp_path / "pretrained_saes.yaml"
    registry.write_text(REGISTRY)
    ae, config = load_dictionary("blocks.3.hook_resid_pre", release="saelens-release",
                                 registry=registry, cache_dir=cache)
    # SAELens's from_pretrained folds the registry's norm_scaling_factor: so here
    assert same(ae, load_dictionary(root / "saelens" / "blocks.3", norm_scaling_factor=2.5)[0])
    hub = config["source"]["hub"]
    assert (hub["release"], hub["sae_id"], hub["norm_scaling_factor"]) == (
        "saelens-release", "blocks.3.hook_resid_pre", 2.5)
    ae, config = load_dictionary("layer_3/width_16k/canonical", release="gemma-scope-like",
                                 registry=registry, cache_dir=cache)
    assert config["format"] == "gemma_scope" and config["source"]["hub"]["conversion"] == "gemma_2"
    with pytest.raises(ValueError, match="'qwen_scope' converter, which has no counterpart"):
        load_dictionary("x", release="qwen-scope-like", registry=registry, cache_dir=cache)
    with pytest.raises(ValueError, match="no SAELens release 'nope'"):
        load_dictionary("x", release="nope", registry=registry, cache_dir=cache)
    with pytest.raises(ValueError, match="has no SAE 'layer_9'"):
        load_dictionary("layer_9", release="gemma-scope-like", registry=registry,
                        cache_dir=cache)


class FakeHub:
    """Stands in for ``HfApi``: an upload lands in a Hub cache snapshot, as a later download
    would leave it."""

    def __init__(self, cache):
        self.cache, self.calls = cache, []

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id, kwargs))

    def upload_folder(self, *, folder_path, repo_id, path_in_repo, ignore_patterns, **kwargs):
        self.calls.append(("upload_folder", repo_id, path_in_repo, ignore_patterns, kwargs))
        target = snapshot(self.cache, repo_id) / (path_in_repo or "")
        for f in Path(folder_path).rglob("*"):
            rel = f.relative_to(folder_path).as_posix()
            if f.is_file() and not any(fnmatch.fnmatch(rel, p) for p in ignore_patterns or ()):
                (target / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(f, target / rel)
        return "commit-info"


def test_save_to_hub_uploads_a_folder_that_loads_back(tmp_path, offline):
    folder = our_folder(tmp_path / "run")
    hub = FakeHub(tmp_path / "cache")
    assert save_to_hub(folder, "me/my-saes", "layer3", private=True, api=hub) == "commit-info"
    (_, repo, options), upload = hub.calls
    assert (repo, options["private"], options["exist_ok"]) == ("me/my-saes", True, True)
    assert upload[:3] == ("upload_folder", "me/my-saes", "layer3")
    uploaded = snapshot(tmp_path / "cache", "me/my-saes") / "layer3"
    assert (uploaded / "ae.pt").is_file()
    assert not (uploaded / "checkpoints" / "trainer_state_10.pt").exists()  # stays local
    back, _ = load_dictionary("hf://me/my-saes/layer3", cache_dir=tmp_path / "cache")
    assert same(back, load_dictionary(folder)[0])
    (folder / "ae.pt").write_bytes(b"not a pickle")
    hub.calls.clear()
    with pytest.raises(ValueError, match="could not be read"):
        save_to_hub(folder, "me/my-saes", api=hub)
    assert hub.calls == []  # refused before anything was sent
