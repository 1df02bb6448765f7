"""Cancel: the engine's process tree ends, temporary files go, the scene stays as it was."""

from __future__ import annotations

import os
import sys
import textwrap
import time

import pytest

from UMLSegmentationLib.engine import EngineProcess, engineEnvironment
from UMLSegmentationLib.errors import RunCancelled
from UMLSegmentationLib.logic import UMLSegmentationLogic
from UMLSegmentationLib.paths import umlcorePythonPath


pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="process checks read /proc")


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie (exited, not yet reaped by its parent) counts as gone
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


def scene_state(mrml):
    return sorted(mrml.scene.GetNthNode(i).GetID() for i in range(mrml.scene.GetNumberOfNodes()))


def test_cancel_from_the_progress_callback_kills_the_engine_and_leaves_nothing(mrml, volume, bundle_dir, tmp_path):
    before = scene_state(mrml)
    logic = UMLSegmentationLogic(temporaryDirectory=tmp_path / "tmp")
    seen = []
    pids = []

    def callback(event):
        seen.append(event.stage)
        if event.stage == "read":  # the engine is running: it reports reading its input
            raise RunCancelled()

    original = EngineProcess.__init__

    def spy(self, *args, **kwargs):
        original(self, *args, **kwargs)
        pids.append(self.pid)

    EngineProcess.__init__ = spy
    try:
        with pytest.raises(RunCancelled):
            logic.process(volume, model=bundle_dir, device="cpu", progressCallback=callback)
    finally:
        EngineProcess.__init__ = original
    assert "read" in seen and "import" not in seen
    assert scene_state(mrml) == before
    assert list((tmp_path / "tmp").iterdir()) == []
    assert len(pids) == 1 and not alive(pids[0])


def test_cancel_a_started_run_before_any_progress(mrml, volume, bundle_dir, tmp_path):
    before = scene_state(mrml)
    logic = UMLSegmentationLogic(temporaryDirectory=tmp_path / "tmp")
    run = logic.startRun(volume, bundle_dir, "cpu")
    assert run.temporaryDirectory.is_dir() and (run.temporaryDirectory / "inputs" / "MRBreast.nrrd").is_file()
    assert not run.finished
    run.cancel()
    assert run.finished and not alive(run.engine.pid)
    assert not run.temporaryDirectory.exists()
    with pytest.raises(RunCancelled):
        logic.finishRun(run)
    assert scene_state(mrml) == before
    assert list((tmp_path / "tmp").iterdir()) == []


def test_kill_ends_the_whole_process_tree(tmp_path):
    """A child that starts a grandchild: killing the engine process also ends the grandchild."""
    script = tmp_path / "tree.py"
    script.write_text(textwrap.dedent(f"""
        import subprocess, sys, time, json
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        open({str(tmp_path / 'grandchild.pid')!r}, "w").write(str(child.pid))
        print(json.dumps({{"stage": "inference", "case": "c", "fraction": 0.5, "message": "busy"}}), flush=True)
        time.sleep(60)
    """))
    engine = EngineProcess([sys.executable, str(script)], engineEnvironment(umlcorePythonPath()), tmp_path)
    deadline = time.monotonic() + 30
    events = []
    while not events and time.monotonic() < deadline:
        events += engine.poll()
        time.sleep(0.02)
    assert [e.stage for e in events] == ["inference"]
    grandchild = int((tmp_path / "grandchild.pid").read_text())
    assert alive(grandchild)
    engine.kill()
    assert engine.finished
    deadline = time.monotonic() + 10
    while alive(grandchild) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(grandchild)
