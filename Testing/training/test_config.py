"""training.config: a run's settings from a JSON file, overridden by flags, modes checked."""

import json
from dataclasses import dataclass
from typing import Literal

import pytest

from training.config import config_parser, load_config, parse_config


def parse(argv):
    return parse_config(Settings, argv, config_parser(Settings, "test", "test"))


@dataclass
class Settings:
    out: str = "runs/x"
    steps: int = 10
    lr: float = 1e-3
    mode: Literal["a", "b"] = "a"
    shape: tuple[int, int, int] = (4, 8, 8)


def test_flags_override_the_config_file_which_overrides_the_defaults(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"steps": 20, "mode": "b", "shape": [2, 4, 4]}))
    cfg, args = parse(["--config", str(path), "--lr", "0.5"])
    assert cfg == Settings(steps=20, lr=0.5, mode="b", shape=(2, 4, 4))
    assert parse(["--shape", "1", "2", "3"])[0].shape == (1, 2, 3)
    assert load_config(Settings, path).shape == (2, 4, 4)


def test_unknown_settings_wrong_types_and_modes_are_refused_with_one_line(tmp_path, capsys):
    path = tmp_path / "c.json"
    for content, phrase in (({"stepz": 1}, "unknown settings ['stepz']"), ({"mode": "c"}, "--mode must be one of a, b"),
                            ({"steps": "ten"}, "setting 'steps' in"), ({"steps": 1.5}, "must be int like 10"),
                            ([1, 2], "must hold a JSON object")):
        path.write_text(json.dumps(content))
        with pytest.raises(SystemExit) as exc:
            parse(["--config", str(path)])
        err = capsys.readouterr().err
        assert exc.value.code == 2 and phrase in err and err.count("\n") == 1, err
    path.write_text("{not json")
    with pytest.raises(SystemExit):
        parse(["--config", str(path)])
    assert "cannot read" in capsys.readouterr().err
    path.write_text(json.dumps({"lr": 1}))  # an int for a float setting
    assert parse(["--config", str(path)])[0].lr == 1
    with pytest.raises(SystemExit):
        parse(["--mode", "c"])
    assert "invalid choice: 'c'" in capsys.readouterr().err
