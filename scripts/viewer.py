"""Serve an analysis run folder in a local web page: ``python scripts/viewer.py RUN_DIR``."""
import sys; from pathlib import Path  # noqa: E401, E702
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dictionary_learning.cli import main  # noqa: E402
sys.exit(main(["viewer", *sys.argv[1:]]))
