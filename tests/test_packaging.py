"""The package works vendored (copied under another name) and the README's examples run."""

import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_python_file(path: Path, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    # nnsight re-reads a trace's body from its source file: code must run from a real file.
    result = subprocess.run([sys.executable, str(path)], cwd=cwd, capture_output=True,
                            text=True, timeout=timeout)
    assert result.returncode == 0, f"{path.name} failed:\n{result.stdout}\n{result.stderr}"
    return result


def test_vendored_copy_under_another_name_imports_and_trains(tmp_path):
    project = tmp_path / "research_repo"
    shutil.copytree(ROOT / "dictionary_learning", project / "third_party" / "dl_vendored",
                    ignore=shutil.ignore_patterns("__pycache__"))
    (project / "third_party" / "__init__.py").write_text("")
    script = project / "train_vendored.py"
    script.write_text(textwrap.dedent("""
        import sys
        from third_party.dl_vendored import ActivationBuffer, trainSAE
        from third_party.dl_vendored.dictionary import AutoEncoder
        from third_party.dl_vendored.tiny import stdlib_texts, tiny_language_model

        assert "dictionary_learning" not in sys.modules, "the copy imported the installed package"
        model = tiny_language_model("gpt2")
        buffer = ActivationBuffer(stdlib_texts(), model, model.transformer.h[0].mlp,
                                  n_ctxs=20, ctx_len=32, out_batch_size=64, progress=False)
        ae = trainSAE(buffer, 64, 128, lr=1e-3, sparsity_penalty=1e-3, steps=5, progress=False)
        assert isinstance(ae, AutoEncoder)
        print("vendored ok")
    """))
    result = run_python_file(script, cwd=project)
    assert "vendored ok" in result.stdout


def readme_python_blocks():
    text = (ROOT / "README.md").read_text()
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_readme_has_examples():
    assert len(readme_python_blocks()) >= 2


def test_readme_examples_run_as_written(tmp_path):
    """Each README block runs as its own file, in order, in one fresh folder (a later block
    may read what an earlier one saved, as a reader following the README would)."""
    for i, block in enumerate(readme_python_blocks()):
        path = tmp_path / f"readme_example_{i}.py"
        path.write_text(block)
        run_python_file(path, cwd=tmp_path)
