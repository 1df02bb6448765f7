"""training.config: a run's settings from a JSON file, overridden by flags, modes checked."""

import json
from dataclasses import dataclass
from typing import Literal

import pytest

from training.config import load_config, parse_config


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
    cfg, args = parse_config(Settings, ["--config", str(path), "--lr", "0.5"], "test")
    assert cfg == Settings(steps=20, lr=0.5, mode="b", shape=(2, 4, 4))
    assert parse_config(Settings, ["--shape", "1", "2", "3"], "test")[0].shape == (1, 2, 3)
    assert load_config(Settings, path).shape == (2, 4, 4)


def test_unknown_settings_and_modes_are_refused(tmp_path, capsys):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"stepz": 1}))
    with pytest.raises(SystemExit, match=r"unknown settings \['stepz'\]"):
        parse_config(Settings, ["--config", str(path)], "test")
    path.write_text(json.dumps({"mode": "c"}))
    with pytest.raises(SystemExit):
        parse_config(Settings, ["--config", str(path)], "test")
    assert "--mode must be one of a, b, got 'c'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_config(Settings, ["--mode", "c"], "test")
    assert "invalid choice: 'c'" in capsys.readouterr().err
