"""The manual stays true: every `python -m training.*` and `uml` command in the README, the docs and the recipes
parses with its tool's own parser, and every config it names loads."""

import importlib
import re
import shlex
from pathlib import Path

import pytest

from training.config import load_config
from training.evaluate import EvaluateConfig
from training.train import TrainConfig
from training.train_reader import ReaderTrainConfig
from umlcore.cli import build_parser as uml_parser

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "training" / "recipes").glob("*.md"))]
SETTINGS = {"train": TrainConfig, "train_reader": ReaderTrainConfig, "evaluate": EvaluateConfig}


def code_commands(page: Path) -> list[tuple[str, list[str]]]:
    """``(where, argv)`` of each command line in the page's code (fenced blocks and indented blocks), its
    backslash continuations joined and trailing comments dropped; usage synopses (``[--flag]``) are not commands."""
    out, fenced, pending, start = [], False, "", 0
    for n, line in enumerate(page.read_text().splitlines(), 1):
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        if not (fenced or line.startswith("    ")) and not pending:
            continue
        text = pending + " " + line.strip() if pending else line.strip()
        start = start if pending else n
        if text.endswith("\\"):
            pending = text[:-1]
            continue
        pending = ""
        if text.startswith(("python -m training.", "uml ")) and not re.search(r"\[-|[A-Z]{3,} \[", text):  # not a synopsis
            out.append((f"{page.name}:{start}", shlex.split(text, comments=True)))
    return out


COMMANDS = [c for page in PAGES for c in code_commands(page)]


def test_the_pages_hold_commands_of_every_tool():
    tools = {argv[2] if argv[0] == "python" else argv[0] for _, argv in COMMANDS}
    assert {"training.train", "training.train_reader", "training.export", "training.evaluate", "training.fit",
            "uml"} <= tools


@pytest.mark.parametrize("where, argv", COMMANDS, ids=[w for w, _ in COMMANDS])
def test_each_command_parses_and_its_config_loads(where, argv):
    if argv[0] == "uml":
        uml_parser().parse_args(argv[1:])
        return
    name = argv[2].split(".", 1)[1]
    importlib.import_module(f"training.{name}").build_parser().parse_args(argv[3:])
    if "--config" in argv:
        load_config(SETTINGS[name], ROOT / argv[argv.index("--config") + 1])
