"""`python scripts/cache.py ...` = `python -m dictionary_learning cache ...`."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dictionary_learning.cli import main  # noqa: E402

sys.exit(main(["cache", *sys.argv[1:]]))
