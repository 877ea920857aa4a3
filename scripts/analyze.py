import sys; from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dictionary_learning.cli import main
sys.exit(main(["analyze", *sys.argv[1:]]))
