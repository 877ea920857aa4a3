"""Every command line the README shows parses: its command and options exist as written
(``torchrun ... -m dictionary_learning COMMAND ...`` lines too, from the command on).
(The commands themselves run end to end in the tests of each command.)"""

import re
import shlex
from pathlib import Path

import pytest

from dictionary_learning.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]


def readme_command_lines() -> list[list[str]]:
    text = (ROOT / "README.md").read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words[:1] == ["torchrun"] and "dictionary_learning" in words:
                words = ["python", "-m", *words[words.index("dictionary_learning"):]]
            if words[:3] == ["python", "-m", "dictionary_learning"]:
                commands.append(words[3:])
            elif len(words) > 1 and re.fullmatch(r"scripts/\w+\.py", words[1]) and \
                    words[1] != "scripts/benchmark.py":
                commands.append([Path(words[1]).stem, *words[2:]])
    return commands


def test_readme_shows_every_command():
    shown = {words[0] for words in readme_command_lines()}
    assert {"train", "evaluate", "download", "histograms", "analyze", "viewer",
            "cache"} <= shown


@pytest.mark.parametrize("words", readme_command_lines(), ids=" ".join)
def test_readme_command_parses(words):
    args = build_parser().parse_args(words)
    assert args.command == words[0] and callable(args.func)
