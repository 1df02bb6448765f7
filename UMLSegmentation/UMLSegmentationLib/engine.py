"""The UML engine's process: ``python -m umlcore serve`` out of process, with JSON progress and clean kill.

The engine loads the model once, then answers request lines on its stdin (:func:`engineRequest`) with one JSON
object per stdout line::

    {"stage": "inference", "case": "case01", "fraction": 0.42, "message": "slice batch 3/7"}

and one ``{"stage": "exit", "code": N, "message": ...}`` line per request: 0 success, 2 bad input (the message
is the engine's one line), 1 internal error, 130 cancelled. :class:`EngineProcess` starts the process in its own
process group (session on POSIX), reads stdout and stderr on two daemon threads so that neither pipe can fill
up, hands parsed events to the caller through :meth:`EngineProcess.poll` (never blocks: safe from a Qt timer),
and :meth:`EngineProcess.kill` ends the whole process tree. Keeping the process between runs is
:mod:`.server`'s job.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Mapping, Optional, Sequence, Union

from .errors import EngineError, InputError

__all__ = [
    "STAGES",
    "Device",
    "OutputFormat",
    "ProgressEvent",
    "parseProgressLine",
    "buildServeCommand",
    "engineRequest",
    "engineEnvironment",
    "EngineProcess",
    "killProcessTree",
    "engineFailure",
]

#: Stages reported by the engine: ``ready`` once the model is loaded, then per request in order (``error`` may
#: come at any point), and ``exit`` (with the request's exit code) last.
STAGES = ("ready", "read", "preprocess", "inference", "postprocess", "write", "done", "error", "exit")

Device = Literal["auto", "cpu", "cuda", "mps"]
DEVICES = ("auto", "cpu", "cuda", "mps")
#: Slices per forward pass: ``"auto"`` lets the engine choose for its device (1 on the CPU, 8 on a GPU).
BatchSize = Union[int, Literal["auto"]]
OutputFormat = Literal["nrrd", "nii.gz"]

_STDERR_KEEP = 200  # lines of stderr kept for the error message and the log


@dataclass(frozen=True)
class ProgressEvent:
    """One progress report.

    Attributes:
        stage: Engine stage (see :data:`STAGES`) or one of the module's own: ``"prepare"`` (writing the
            inputs), ``"import"`` (loading results into the scene), ``"finished"``.
        case: Case id.
        fraction: Progress of the whole engine run in 0..1 (all cases of the call together).
        message: Human-readable status.
        code: The request's exit code (``exit`` events only).
    """

    stage: str
    case: str
    fraction: float
    message: str
    code: Optional[int] = None


def parseProgressLine(line: str) -> Optional[ProgressEvent]:
    """Parse one stdout line of the engine; ``None`` for anything that is not a progress object.

    Unknown extra keys are ignored; the fraction is clipped to 0..1.
    """
    text = line.strip()
    if not text.startswith("{"):
        return None
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return None
    if not isinstance(data, dict) or not isinstance(data.get("stage"), str):
        return None
    try:
        fraction = float(data.get("fraction", 0.0))
    except (TypeError, ValueError):
        fraction = 0.0
    if fraction != fraction:  # NaN
        fraction = 0.0
    case = data.get("case")
    code = data.get("code")
    return ProgressEvent(
        stage=data["stage"],
        case="" if case is None else str(case),
        fraction=min(1.0, max(0.0, fraction)),
        message=str(data.get("message", "")),
        code=code if isinstance(code, int) and not isinstance(code, bool) else None,
    )


def checkEngineOptions(device: str, batchSize: BatchSize) -> None:
    """Refuse a device or batch size the engine would refuse (:class:`InputError`, the fix named)."""
    if device not in DEVICES:
        raise InputError(f"device {device!r} is unknown: use 'auto' (GPU when available), 'cpu', 'cuda' (NVIDIA GPU) "
                         "or 'mps' (Apple-silicon GPU)")
    if batchSize != "auto" and (not isinstance(batchSize, int) or isinstance(batchSize, bool) or batchSize < 1):
        raise InputError(f"batch size {batchSize!r} is not allowed: give 'auto' (1 slice at a time on the CPU, 8 on a "
                         "GPU) or a positive integer (lower it if the GPU runs out of memory)")


def buildServeCommand(pythonExecutable: str, modelPath: Path, device: Device = "auto", batchSize: BatchSize = "auto") -> list[str]:
    """The engine's command line: ``python -m umlcore serve`` with the model, device and batch size it keeps.

    Raises:
        InputError: a bad device or batch size.
    """
    checkEngineOptions(device, batchSize)
    return [str(pythonExecutable), "-m", "umlcore", "serve", "--model", str(modelPath), "--device", device,
            "--batch-size", str(batchSize)]


def engineRequest(cases: Sequence[Sequence[Path]], outputDirectory: Path, outputFormat: OutputFormat = "nrrd") -> str:
    """One request line for the engine: each case is one INPUT (its phase files comma-joined).

    Raises:
        InputError: no case, a bad format, or a path containing a comma.
    """
    if not cases or any(len(c) == 0 for c in cases):
        raise InputError("no input files given: give at least one case with at least one file")
    if outputFormat not in ("nrrd", "nii.gz"):
        raise InputError(f"output format {outputFormat!r} is unknown: use 'nrrd' or 'nii.gz'")
    for case in cases:
        for p in case:
            if "," in str(p):
                raise InputError(f"input path {p} contains a comma, which separates phase files: rename or move it")
    return json.dumps({"inputs": [",".join(str(p) for p in case) for case in cases], "output": str(outputDirectory),
                       "format": outputFormat})


def engineEnvironment(umlcorePath: Path, base: Optional[Mapping[str, str]] = None) -> dict[str, str]:
    """The child's environment: ``base`` (default: this process's) with ``umlcorePath`` first on PYTHONPATH
    and unbuffered output, so progress lines arrive as they are printed."""
    env = dict(os.environ if base is None else base)
    parts = [str(umlcorePath)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(parts))
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONIOENCODING"] = "utf-8"
    return env


def _processGroupOptions() -> dict:
    if sys.platform == "win32":
        flags = getattr(subprocess, "CREATE_NEW_PROCESS_GROUP", 0) | getattr(subprocess, "CREATE_NO_WINDOW", 0)
        return {"creationflags": flags}
    return {"start_new_session": True}


def killProcessTree(process: subprocess.Popen, graceSeconds: float = 2.0) -> None:
    """End ``process`` and every process it started, then reap it.

    POSIX: SIGTERM to the process group (the child was started as a session leader), SIGKILL after
    ``graceSeconds``. Windows: ``taskkill /T /F``.
    """
    if sys.platform == "win32":
        if process.poll() is None:
            subprocess.run(["taskkill", "/F", "/T", "/PID", str(process.pid)], capture_output=True, check=False)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        return
    pgid = process.pid  # session leader: its pid is the group id, even after it has exited

    def signalGroup(sig: int) -> bool:
        try:
            os.killpg(pgid, sig)
            return True
        except (ProcessLookupError, PermissionError):
            return False

    if not signalGroup(signal.SIGTERM):
        process.poll()
        return
    deadline = time.monotonic() + graceSeconds
    while time.monotonic() < deadline:
        if process.poll() is not None and not signalGroup(0):
            return
        time.sleep(0.02)
    signalGroup(signal.SIGKILL)
    process.wait()


def engineFailure(returncode: int, stderrLines: Sequence[str], lastError: Optional[ProgressEvent]):
    """The one-line error for a failed engine run: :class:`InputError` for exit code 2, else :class:`EngineError`.

    The message is the engine's own ``uml: error: ...`` line when there is one (the prefix removed), else the
    last ``error`` progress message, else the last stderr line. The whole stderr is kept in ``details``.
    """
    details = "\n".join(stderrLines)
    prefixes = ("uml: error:", "uml: internal error:", "uml: cancelled:")
    userLines = [l.strip() for l in stderrLines if l.strip().startswith(prefixes)]
    if userLines:
        line = userLines[-1]
        message = line[len(next(p for p in prefixes if line.startswith(p))):].strip()
    elif lastError is not None and lastError.message:
        message = lastError.message
    else:
        nonEmpty = [l.strip() for l in stderrLines if l.strip()]
        message = nonEmpty[-1] if nonEmpty else "no error message"
    if returncode == 2:
        return InputError(message, details)
    if returncode < 0 or returncode == 130:
        return EngineError(f"the UML engine was stopped before it finished: {message}", details)
    return EngineError(f"the UML engine failed (exit code {returncode}): {message}; see the log for details", details)


class EngineProcess:
    """A running engine process with non-blocking progress.

    Args:
        command: The command line (see :func:`buildServeCommand`).
        environment: The child's environment (see :func:`engineEnvironment`).
        workingDirectory: The child's working directory.

    Raises:
        EngineError: the process could not be started (for example a wrong Python path).
    """

    def __init__(self, command: Sequence[str], environment: Mapping[str, str], workingDirectory: Path) -> None:
        self.command = list(command)
        self._events: "queue.Queue[ProgressEvent]" = queue.Queue()
        self._stdoutOther: list[str] = []
        self._stderr: list[str] = []
        self._lastError: Optional[ProgressEvent] = None
        self._lock = threading.Lock()
        try:
            self._process = subprocess.Popen(
                self.command,
                stdin=subprocess.PIPE,  # the requests (:meth:`send`); closing it ends the engine
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                cwd=str(workingDirectory),
                env=dict(environment),
                text=True,
                encoding="utf-8",
                errors="replace",
                bufsize=1,
                **_processGroupOptions(),
            )
        except OSError as exc:
            raise EngineError(f"could not start the UML engine ({self.command[0]}): {exc.strerror or exc}: check the Python executable") from None
        self._threads = [
            threading.Thread(target=self._readStdout, name="uml-engine-stdout", daemon=True),
            threading.Thread(target=self._readStderr, name="uml-engine-stderr", daemon=True),
        ]
        for t in self._threads:
            t.start()

    @property
    def pid(self) -> int:
        return self._process.pid

    def send(self, line: str) -> bool:
        """Write one line to the child's stdin; False when it can no longer read (it has exited)."""
        try:
            self._process.stdin.write(line.rstrip("\n") + "\n")
            self._process.stdin.flush()
            return True
        except (OSError, ValueError, AttributeError):
            return False

    def closeInput(self) -> None:
        """Close the child's stdin (the engine ends at the end of its input)."""
        if self._process.stdin is not None:
            try:
                self._process.stdin.close()
            except OSError:
                pass

    def _readStdout(self) -> None:
        assert self._process.stdout is not None
        for line in self._process.stdout:
            event = parseProgressLine(line)
            if event is None:
                with self._lock:
                    self._stdoutOther.append(line.rstrip("\n"))
                    del self._stdoutOther[:-_STDERR_KEEP]
                continue
            if event.stage == "error":
                self._lastError = event
            self._events.put(event)

    def _readStderr(self) -> None:
        assert self._process.stderr is not None
        for line in self._process.stderr:
            with self._lock:
                self._stderr.append(line.rstrip("\n"))
                del self._stderr[:-_STDERR_KEEP]

    def poll(self) -> list[ProgressEvent]:
        """All progress events received since the last call (never blocks)."""
        events: list[ProgressEvent] = []
        while True:
            try:
                events.append(self._events.get_nowait())
            except queue.Empty:
                return events

    @property
    def finished(self) -> bool:
        """True once the process has exited and both pipes are drained."""
        return self._process.poll() is not None and not any(t.is_alive() for t in self._threads)

    @property
    def returncode(self) -> Optional[int]:
        return self._process.poll()

    @property
    def stderrLines(self) -> list[str]:
        with self._lock:
            return list(self._stderr)

    @property
    def otherStdoutLines(self) -> list[str]:
        """Stdout lines that were not progress objects (kept for the log)."""
        with self._lock:
            return list(self._stdoutOther)

    def wait(self, timeout: Optional[float] = None) -> int:
        """Wait for the process and the reader threads; returns the exit code."""
        code = self._process.wait(timeout=timeout)
        for t in self._threads:
            t.join(timeout=5)
        return code

    @property
    def lastError(self) -> Optional[ProgressEvent]:
        """The last ``error`` progress event (its ``case`` names the failing case, when known)."""
        return self._lastError

    def failure(self) -> Optional[Exception]:
        """``None`` after a successful exit, else the error to raise (see :func:`engineFailure`)."""
        code = self._process.poll()
        if code is None or code == 0:
            return None
        return engineFailure(code, self.stderrLines, self._lastError)

    def kill(self) -> None:
        """End the process tree (no-op when it has already exited) and close the pipes."""
        killProcessTree(self._process)
        for t in self._threads:
            t.join(timeout=5)
        for stream in (self._process.stdin, self._process.stdout, self._process.stderr):
            if stream is not None:
                try:
                    stream.close()
                except OSError:
                    pass
