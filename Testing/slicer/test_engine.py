"""``UMLSegmentationLib.engine``: the engine runner (progress parsing, command line, exit-code mapping,
non-blocking reads, killing the process tree) and the engine's refusals as ``logic.process`` reports them."""

from __future__ import annotations

import json
import shutil
import sys
import textwrap
import time
from pathlib import Path

import pytest

from UMLSegmentationLib.engine import (
    EngineProcess,
    ProgressEvent,
    buildServeCommand,
    engineEnvironment,
    engineRequest,
    engineFailure,
    parseProgressLine,
)
from UMLSegmentationLib.errors import EngineError, InputError
from UMLSegmentationLib.paths import umlcorePythonPath

from .umlslicer_helpers import add_volume, alive


def test_parse_progress_lines():
    assert parseProgressLine('{"stage": "inference", "case": "c1", "fraction": 0.25, "message": "slice 2 of 8"}\n') == ProgressEvent("inference", "c1", 0.25, "slice 2 of 8")
    assert parseProgressLine('{"stage": "done", "case": null, "fraction": 1}') == ProgressEvent("done", "", 1.0, "")
    assert parseProgressLine('{"stage": "read", "fraction": 7}').fraction == 1.0  # clipped
    assert parseProgressLine('{"stage": "read", "fraction": "NaN"}').fraction == 0.0
    assert parseProgressLine('{"stage": "read", "extra": [1, 2]}') == ProgressEvent("read", "", 0.0, "")
    for line in ("", "warning: something", "{not json", "[1, 2]", '{"fraction": 0.5}', '{"stage": 3}'):
        assert parseProgressLine(line) is None


def test_serve_command_and_request_lines(tmp_path):
    assert buildServeCommand("/py", Path("/m"), "cuda", 4) == [
        "/py", "-m", "umlcore", "serve", "--model", "/m", "--device", "cuda", "--batch-size", "4"]
    assert buildServeCommand("/py", Path("/m"), "mps")[-3:] == ["mps", "--batch-size", "auto"]
    request = engineRequest([[Path("/a/pre.nrrd"), Path("/a/early.nrrd")], [Path("/b/c.nrrd")]], Path("/out"))
    assert json.loads(request) == {"inputs": ["/a/pre.nrrd,/a/early.nrrd", "/b/c.nrrd"], "output": "/out", "format": "nrrd"}
    assert "\n" not in request
    with pytest.raises(InputError, match="contains a comma"):
        engineRequest([[Path("/a,b/x.nrrd")]], Path("/out"))
    with pytest.raises(InputError, match="no input files"):
        engineRequest([], Path("/out"))
    with pytest.raises(InputError, match="batch size True"):
        buildServeCommand("/py", Path("/m"), batchSize=True)
    with pytest.raises(InputError, match="device 'tpu' is unknown"):
        buildServeCommand("/py", Path("/m"), "tpu")


def test_environment_puts_the_engine_first_on_pythonpath(tmp_path):
    env = engineEnvironment(tmp_path / "UMLCore", {"PYTHONPATH": "/x", "HOME": "/h"})
    assert env["PYTHONPATH"].split(":" if sys.platform != "win32" else ";") == [str(tmp_path / "UMLCore"), "/x"]
    assert env["PYTHONUNBUFFERED"] == "1" and env["HOME"] == "/h"


def test_exit_codes_map_to_one_line_errors():
    usage = engineFailure(2, ["some warning", "uml: error: input x.nii.gz is 2D: give a 3D volume"], None)
    assert isinstance(usage, InputError) and str(usage) == "input x.nii.gz is 2D: give a 3D volume"
    internal = engineFailure(1, ["Traceback (most recent call last):", "  ...", "uml: internal error: ValueError: boom (rerun with --debug)"], None)
    assert isinstance(internal, EngineError)
    assert str(internal) == "the UML engine failed (exit code 1): ValueError: boom (rerun with --debug); see the log for details"
    assert "Traceback" in internal.details
    from_event = engineFailure(1, [], ProgressEvent("error", "c", 0.3, "CUDA out of memory"))
    assert "CUDA out of memory" in str(from_event)
    killed = engineFailure(-9, [], None)
    assert isinstance(killed, EngineError) and "stopped before it finished" in str(killed)


def fake_engine(tmp_path, body: str) -> EngineProcess:
    script = tmp_path / "fake_engine.py"
    script.write_text(textwrap.dedent(body))
    return EngineProcess([sys.executable, str(script)], engineEnvironment(tmp_path), tmp_path)


def wait(engine: EngineProcess, timeout: float = 30.0) -> list:
    events, deadline = [], time.monotonic() + timeout
    while not engine.finished and time.monotonic() < deadline:
        events += engine.poll()
        time.sleep(0.02)
    return events + engine.poll()


def test_events_arrive_while_the_process_runs_and_stderr_is_kept(tmp_path):
    engine = fake_engine(tmp_path, """
        import json, sys, time
        print(json.dumps({"stage": "read", "case": "c", "fraction": 0.1, "message": "reading"}), flush=True)
        print("a line that is not progress", flush=True)
        sys.stderr.write("x" * 200000 + "\\n")  # more than a pipe buffer: must not block
        time.sleep(1.0)
        print(json.dumps({"stage": "done", "case": None, "fraction": 1.0, "message": "ok"}), flush=True)
    """)
    first, deadline = [], time.monotonic() + 20
    while not first and time.monotonic() < deadline:
        first = engine.poll()
        time.sleep(0.01)
    assert [e.stage for e in first] == ["read"] and not engine.finished  # non-blocking, before the exit
    rest = wait(engine)
    assert [e.stage for e in rest] == ["done"]
    assert engine.returncode == 0 and engine.failure() is None
    assert engine.otherStdoutLines == ["a line that is not progress"]
    assert len(engine.stderrLines[-1]) == 200000


def test_a_refusing_engine_gives_its_message(tmp_path):
    engine = fake_engine(tmp_path, """
        import json, sys
        print(json.dumps({"stage": "error", "case": "c7", "fraction": 0.0, "message": "bad input"}), flush=True)
        sys.stderr.write("uml: error: input c7.nii.gz has 1 slice: give a 3D volume\\n")
        sys.exit(2)
    """)
    events = wait(engine)
    assert [e.stage for e in events] == ["error"] and engine.lastError.case == "c7"
    failure = engine.failure()
    assert isinstance(failure, InputError) and str(failure) == "input c7.nii.gz has 1 slice: give a 3D volume"


@pytest.mark.skipif(sys.platform != "linux", reason="process checks read /proc")
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


def test_tampered_weights_are_refused_by_the_engine(check_refused, bundle_dir, tmp_path):
    """The card reads fine, the engine's hash check refuses the weights: its message, one InputError, no node."""
    tampered = tmp_path / "tampered"
    shutil.copytree(bundle_dir, tampered)
    weights = tampered / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    node = add_volume()
    message = check_refused(lambda logic: logic.process(node, model=tampered, device="cpu"), r"does not match the sha256")
    assert not message.startswith("uml:")


def test_engine_that_cannot_start(check_refused, bundle_dir, tmp_path):
    node = add_volume()

    def run(logic):
        logic.pythonExecutable = str(tmp_path / "no-python")
        logic.process(node, model=bundle_dir)

    check_refused(run, r"could not start the UML engine", error=EngineError)
