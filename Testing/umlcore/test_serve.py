"""``uml serve``: the warm engine the Slicer module keeps between runs (one model load, many requests)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import SimpleITK as sitk


def serve(bundle: Path, requests: list, cwd: Path, *extra: str, timeout: float = 300) -> tuple[int, list[dict], str]:
    """Run ``uml serve`` on ``requests`` (objects, or raw lines) to the end of stdin: (exit code, stdout objects, stderr)."""
    lines = "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in requests)
    done = subprocess.run([sys.executable, "-m", "umlcore", "serve", "--model", str(bundle), "--device", "cpu", *extra],
                          input=lines, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    return done.returncode, [json.loads(l) for l in done.stdout.splitlines()], done.stderr


def answers(events: list[dict]) -> list[list[dict]]:
    """The events of each request (split at the exit lines), the ready line left out."""
    out, current = [], []
    for e in events[1:]:
        current.append(e)
        if e["stage"] == "exit":
            out.append(current)
            current = []
    assert current == []
    return out


def test_one_engine_answers_each_request_in_turn_and_a_refusal_does_not_end_it(tmp_path, make_volume, tiny_bundle_dir):
    good = tmp_path / "good.nii.gz"
    sitk.WriteImage(make_volume(size=(24, 16, 4)), str(good))
    requests = [
        {"inputs": [str(good)], "output": str(tmp_path / "a")},
        "not json",
        {"inputs": [str(tmp_path / "missing.nii.gz")], "output": str(tmp_path / "b")},
        {"inputs": [str(good)], "output": str(tmp_path / "c"), "colour": "red"},
        {"inputs": [], "output": str(tmp_path / "d")},
        {"inputs": [str(good)], "output": str(tmp_path / "e"), "format": "nrrd"},
        {"inputs": [str(good)], "output": str(tmp_path / "a")},  # exists: refused without overwrite
    ]
    code, events, stderr = serve(tiny_bundle_dir, requests, tmp_path)
    assert code == 0, stderr
    assert events[0]["stage"] == "ready" and events[0]["device"] == "cpu" and events[0]["torch"]
    replies = answers(events)
    exits = [r[-1] for r in replies]
    assert [e["code"] for e in exits] == [0, 2, 2, 2, 2, 0, 2]
    assert exits[0]["message"] == "" and [e["stage"] for e in replies[0]][-2] == "done"
    assert "not JSON" in exits[1]["message"] and "missing.nii.gz does not exist" in exits[2]["message"]
    assert "unknown field(s) ['colour']" in exits[3]["message"] and "non-empty list" in exits[4]["message"]
    assert "exists" in exits[6]["message"] and "--overwrite" in exits[6]["message"]
    assert all("\n" not in e["message"] for e in exits)
    assert (tmp_path / "a" / "good" / "summary.json").is_file() and (tmp_path / "e" / "good" / "segmentation.nrrd").is_file()
    assert not (tmp_path / "b").exists() or list((tmp_path / "b").iterdir()) == []
    assert stderr.count("uml: error:") == 5 and "Traceback" not in stderr


def test_the_engine_ends_when_idle_and_refuses_a_bad_model_at_start(tmp_path, tiny_bundle_dir):
    proc = subprocess.Popen([sys.executable, "-m", "umlcore", "serve", "--model", str(tiny_bundle_dir), "--device", "cpu",
                             "--idle-exit", "0.5"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=tmp_path, text=True)
    try:
        started = time.monotonic()
        assert proc.wait(timeout=120) == 0  # stdin still open: it ended because nothing came
        assert time.monotonic() - started >= 0.5
        assert json.loads(proc.stdout.readline())["stage"] == "ready"
    finally:
        proc.kill()
        proc.wait()
    code, events, stderr = serve(tmp_path / "no-such-model", [], tmp_path)
    assert code == 2 and events == [] and stderr.startswith("uml: error:") and stderr.count("\n") == 1
