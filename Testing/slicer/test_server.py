"""The warm engine (``UMLSegmentationLib.server``): one ``umlcore serve`` process kept between runs, started again
after a crash, a cancel, a change of model or settings, and ended with its logic."""

from __future__ import annotations

import gc
import os
import signal
import sys
import textwrap
import time

import pytest

from UMLSegmentationLib.errors import EngineError, InputError, RunCancelled
from UMLSegmentationLib.logic import UMLSegmentationLogic
from UMLSegmentationLib.paths import umlcorePythonPath
from UMLSegmentationLib.server import EngineHost, EngineKey

from .umlslicer_helpers import alive, scene_node_ids, write_case

linux_only = pytest.mark.skipif(sys.platform != "linux", reason="process checks read /proc")


def gone(pid: int, seconds: float = 15.0) -> bool:
    deadline = time.monotonic() + seconds
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not alive(pid)


def stages(logic, volume, bundle_dir, **options) -> list[str]:
    events = []
    logic.process(volume, model=bundle_dir, device="cpu", progressCallback=events.append, **options)
    return [e.stage for e in events]


@linux_only
def test_a_second_run_reuses_the_engine_and_other_settings_start_another(mrml, volume, bundle_dir, tmp_path):
    logic = UMLSegmentationLogic(temporaryDirectory=tmp_path / "tmp")
    first = stages(logic, volume, bundle_dir)
    pid = logic.engines.server.pid
    second = stages(logic, volume, bundle_dir)
    assert "ready" in first and "ready" not in second  # the model was loaded once
    assert logic.engines.starts == 1 and logic.engines.server.pid == pid and alive(pid)
    stages(logic, volume, bundle_dir, batchSize=3)  # another batch size: another engine, the first one ended
    assert logic.engines.starts == 2 and logic.engines.server.pid != pid and gone(pid)
    logic.shutdownEngine()
    assert logic.engines.server is None


def crashing_engine(tmp_path):
    """A stand-in for ``python -m umlcore serve`` (the engine's protocol): ready, then at the first request one
    progress line, one line on stderr, and death by SIGKILL."""
    script = tmp_path / "crashing-python"
    script.write_text(f"#!{sys.executable}\n" + textwrap.dedent("""
        import json, os, signal, sys
        print(json.dumps({"stage": "ready", "message": "stand-in"}), flush=True)
        for line in sys.stdin:
            print(json.dumps({"stage": "read", "case": "MRBreast", "fraction": 0.1, "message": "reading"}), flush=True)
            print("Fatal Python error: Segmentation fault", file=sys.stderr, flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
    """))
    script.chmod(0o755)
    return str(script)


@linux_only
def test_an_engine_that_crashed_is_started_again_and_a_crash_mid_run_changes_nothing(mrml, volume, bundle_dir, tmp_path):
    logic = UMLSegmentationLogic(temporaryDirectory=tmp_path / "tmp")
    stages(logic, volume, bundle_dir)
    os.kill(logic.engines.server.pid, signal.SIGKILL)  # between runs
    assert gone(logic.engines.server.pid)
    result = logic.process(volume, model=bundle_dir, device="cpu")
    assert logic.engines.starts == 2 and result.segmentationNode is not None
    before = scene_node_ids(mrml.scene)
    python, logic.pythonExecutable = logic.pythonExecutable, crashing_engine(tmp_path)
    with pytest.raises(EngineError, match=r"stopped before it finished: Fatal Python error: Segmentation fault"):
        logic.process(volume, model=bundle_dir, device="cpu")
    assert scene_node_ids(mrml.scene) == before and list((tmp_path / "tmp").glob("UML-*")) == []
    logic.pythonExecutable = python
    assert "done" in stages(logic, volume, bundle_dir) and logic.engines.starts == 4


@linux_only
def test_cancel_ends_the_engine_and_the_next_run_starts_one(mrml, volume, bundle_dir, tmp_path):
    """An engine busy with a request (a stand-in that never answers) is ended by cancel; the scene is untouched."""
    hanging = tmp_path / "hanging-python"
    hanging.write_text(f"#!{sys.executable}\n" + textwrap.dedent("""
        import json, sys, time
        print(json.dumps({"stage": "ready", "message": "stand-in"}), flush=True)
        sys.stdin.readline()
        print(json.dumps({"stage": "read", "case": "MRBreast", "fraction": 0.1, "message": "reading"}), flush=True)
        time.sleep(120)
    """))
    hanging.chmod(0o755)
    logic = UMLSegmentationLogic(temporaryDirectory=tmp_path / "tmp")
    python, logic.pythonExecutable = logic.pythonExecutable, str(hanging)
    before = scene_node_ids(mrml.scene)

    def cancel(event):
        if event.stage == "read":
            raise RunCancelled()

    with pytest.raises(RunCancelled):
        logic.process(volume, model=bundle_dir, device="cpu", progressCallback=cancel)
    assert gone(logic.engines.server.pid) and scene_node_ids(mrml.scene) == before
    assert list((tmp_path / "tmp").glob("UML-*")) == []
    logic.pythonExecutable = python
    assert "done" in stages(logic, volume, bundle_dir) and logic.engines.starts == 2


def test_a_refused_request_keeps_the_engine_and_one_run_at_a_time(bundle_dir, tmp_path):
    good = tmp_path / "good.nrrd"
    write_case(good, seed=0)
    host = EngineHost()
    key = EngineKey(sys.executable, str(umlcorePythonPath()), str(bundle_dir), "x", "cpu", 8)
    try:
        refused = host.run(key, [[tmp_path / "missing.nrrd"]], tmp_path / "out1", tmp_path)
        with pytest.raises(InputError, match="already in progress"):
            host.run(key, [[good]], tmp_path / "out2", tmp_path)
        refused.wait(120)
        failure = refused.failure()
        assert isinstance(failure, InputError) and "missing.nrrd does not exist" in str(failure)
        ok = host.run(key, [[good]], tmp_path / "out2", tmp_path)
        ok.wait(120)
        assert ok.failure() is None and (tmp_path / "out2" / "good" / "summary.json").is_file()
        assert host.starts == 1
        host.server.process.closeInput()  # the engine ends (as when idle): the next run starts another
        host.server.process.wait(60)
        again = host.run(key, [[good]], tmp_path / "out3", tmp_path)
        again.wait(120)
        assert again.failure() is None and host.starts == 2
    finally:
        host.shutdown()


@linux_only
def test_the_engine_ends_with_its_logic(mrml, volume, bundle_dir, tmp_path):
    logic = UMLSegmentationLogic(temporaryDirectory=tmp_path / "tmp")
    stages(logic, volume, bundle_dir)
    pid = logic.engines.server.pid
    del logic
    gc.collect()
    assert gone(pid)


def test_a_kept_engine_that_ends_without_reading_the_request_hands_it_to_a_new_one(tmp_path):
    """The engine kept from the last run was already ending (crashed or killed between runs, not yet seen): the
    request it never answered goes, once, to a new engine."""
    script = tmp_path / "once-python"
    script.write_text(f"#!{sys.executable}\n" + textwrap.dedent("""
        import json, os, sys
        print(json.dumps({"stage": "ready", "message": "stand-in"}), flush=True)
        for n, line in enumerate(sys.stdin):
            if n == 1:
                os._exit(0)  # ends silently at its second request
            print(json.dumps({"stage": "exit", "code": 0, "message": ""}), flush=True)
    """))
    script.chmod(0o755)
    host = EngineHost()
    key = EngineKey(str(script), str(umlcorePythonPath()), str(tmp_path), "x", "cpu", 8)
    try:
        first = host.run(key, [[tmp_path / "a.nrrd"]], tmp_path / "out", tmp_path)
        first.wait(60)
        assert first.failure() is None and host.starts == 1
        second = host.run(key, [[tmp_path / "a.nrrd"]], tmp_path / "out", tmp_path)
        second.wait(60)
        assert second.failure() is None and host.starts == 2  # answered by the new engine
    finally:
        host.shutdown()
    script.write_text(script.read_text().replace("n == 1", "n == 0"))  # a new engine that ends at once: no retry
    host = EngineHost()
    try:
        fresh = host.run(key, [[tmp_path / "a.nrrd"]], tmp_path / "out", tmp_path)
        fresh.wait(60)
        assert isinstance(fresh.failure(), EngineError) and "ended before it answered" in str(fresh.failure())
        assert host.starts == 1
    finally:
        host.shutdown()
