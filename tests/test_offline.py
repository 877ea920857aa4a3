"""The Hub probe: an unreachable endpoint is reported quickly, one that answers is found."""

import http.server
import threading
import time

import pytest

from cli_helpers import D_MODEL, nested_config, save_dictionary, shared_model_folder
from dictionary_learning import AutoEncoder, hub_access
from dictionary_learning.cli import main


def test_unreachable_is_false_quickly():
    start = time.monotonic()
    assert hub_access.reachable("http://127.0.0.1:9", timeout=2.0) is False
    assert time.monotonic() - start < 3


def test_answering_server_is_true():
    server = http.server.HTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        assert hub_access.reachable(f"http://127.0.0.1:{server.server_port}") is True
    finally:
        server.shutdown()
        server.server_close()


# -- every command that would open a hub id or dataset name ---------------------------------
@pytest.fixture
def hub_unreachable(monkeypatch):
    """The Hub endpoint refuses connections (nothing listens on port 9) and no offline
    variable tells the libraries to stay in their cache: what a user without network sees."""
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(hub_access, "_CACHE", {})


def commands(tmp_path, model_dir):
    folder = save_dictionary(tmp_path / "dictionary", AutoEncoder(D_MODEL, 32),
                             nested_config(model_dir, "gpt_neox.layers.1.mlp", 32))
    return {
        "download": ["download", "--dest", str(tmp_path / "d"), "--cache-dir",
                     str(tmp_path / "c"), "--components", "mlp_out_layer1"],
        # online defaults: EleutherAI/pythia-70m-deduped on monology/pile-uncopyrighted
        "train": ["train", "--save-dir", str(tmp_path / "run"), "--steps", "10"],
        # a local model, no --data and no train_args.json: the Pile by default
        "evaluate": ["evaluate", str(folder)],
        "analyze": ["analyze", str(folder), "--data", "monology/pile-uncopyrighted", "--out",
                    str(tmp_path / "analysis")],
        "train --model": ["train", "--model", "EleutherAI/pythia-70m-deduped", "--data",
                          "stdlib", "--save-dir", str(tmp_path / "run2"), "--steps", "10"],
    }


@pytest.mark.parametrize("name", ["download", "train", "evaluate", "analyze", "train --model"])
def test_each_command_fails_at_once_with_one_line(name, hub_unreachable, tmp_path,
                                                  tmp_path_factory, capsys):
    argv = commands(tmp_path, shared_model_folder(tmp_path_factory))[name]
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    capsys.readouterr()  # what building the shared model printed
    start = time.monotonic()
    code = main(argv)
    seconds = time.monotonic() - start
    err = capsys.readouterr().err
    assert code == 2, err
    [line] = [line for line in err.splitlines() if line.strip()]
    assert line.startswith("error: ") and "unreachable" in line, line
    assert "127.0.0.1:9" in line
    # No retries: the probe's one refused connection, not the libraries' back-off (34-47 s
    # before the probe); the bound leaves room for a loaded machine.
    assert seconds < 10, seconds
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
