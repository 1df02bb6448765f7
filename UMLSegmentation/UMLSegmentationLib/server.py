"""The warm engine: one ``python -m umlcore serve`` process per model and settings, kept between runs.

Starting the engine imports PyTorch and loads the model, which costs seconds on every run. :class:`EngineHost`
(one per :class:`~.logic.UMLSegmentationLogic`) keeps one :class:`EngineServer` alive and hands it each run's
request; a run whose model, device, batch size or Python differs from the running engine's stops it and starts
another. A run is a :class:`ServedRun`, polled like the process itself (never blocks). Cancelling a run ends the
engine's process tree (a request cannot be interrupted otherwise), and an engine that crashed or ended when idle
(``--idle-exit``) is started again by the next run; the engine also ends when its stdin closes, so it never
outlives the Slicer process that started it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Protocol, Sequence, Union

from .engine import (
    EngineProcess,
    OutputFormat,
    ProgressEvent,
    buildServeCommand,
    engineEnvironment,
    engineFailure,
    engineRequest,
)
from .errors import EngineError, InputError

__all__ = ["EngineRun", "EngineKey", "ServedRun", "EngineServer", "EngineHost"]


class EngineRun(Protocol):
    """What the logic needs of a running request (a :class:`ServedRun`, or a stand-in in tests)."""

    def poll(self) -> list[ProgressEvent]: ...

    @property
    def finished(self) -> bool: ...

    @property
    def lastError(self) -> Optional[ProgressEvent]: ...

    def failure(self) -> Optional[Exception]: ...

    def wait(self, timeout: Optional[float] = None) -> None: ...

    def kill(self) -> None: ...


@dataclass(frozen=True)
class EngineKey:
    """What a running engine was started with; a run with another key needs another engine."""

    python: str
    umlcorePath: str
    model: str
    modelSha256: str
    device: str
    batchSize: Union[int, str]


class ServedRun:
    """One request on an :class:`EngineServer`: its progress events, then its exit code.

    ``retry`` (given when the request went to an engine kept from an earlier run) starts a new engine: an engine
    that was already ending (crashed, or killed, between runs) and said nothing to the request gets it again,
    once, on a new engine.
    """

    def __init__(self, server: "EngineServer", line: str, retry: Optional[Callable[[], "EngineServer"]] = None) -> None:
        self._server = server
        self.line = line
        self._retry = retry
        self._seen = False
        self._buffer: list[ProgressEvent] = []
        self._exit: Optional[ProgressEvent] = None
        self._lastError: Optional[ProgressEvent] = None
        server.attach(self)

    @property
    def pid(self) -> int:
        """The engine process's id."""
        return self._server.pid

    def _pump(self) -> None:
        """Move the engine's events into this run's buffer, up to its ``exit`` line."""
        if self._exit is not None:
            return
        if not self._seen and self._retry is not None and self._server.process.finished:
            retry, self._retry = self._retry, None
            self._server = retry()  # the kept engine was gone before it read the request: a new one gets it
            self._server.attach(self)
        for event in self._server.process.poll():
            self._seen = True
            if event.stage == "exit":
                self._exit = event
                return
            if event.stage == "ready":
                self._server.ready = event
            elif event.stage == "error":
                self._lastError = event
            self._buffer.append(event)

    def poll(self) -> list[ProgressEvent]:
        """Progress events received since the last call (never blocks)."""
        self._pump()
        events, self._buffer = self._buffer, []
        return events

    @property
    def finished(self) -> bool:
        """True once the engine answered the request, or exited without answering it."""
        self._pump()
        if self._exit is None and self._server.process.finished:
            self._pump()  # the reader threads are done: every line is in
        return self._exit is not None or self._server.process.finished

    @property
    def lastError(self) -> Optional[ProgressEvent]:
        """The last ``error`` event (its ``case`` names the failing case, when known)."""
        return self._lastError

    def failure(self) -> Optional[Exception]:
        """``None`` after a successful (or unfinished) run, else the error to raise."""
        if not self.finished:
            return None
        details = "\n".join(self._server.process.stderrLines)
        if self._exit is not None:
            if self._exit.code == 0:
                return None
            failure = engineFailure(self._exit.code if self._exit.code is not None else 1,
                                    [f"uml: error: {self._exit.message}"], self._lastError)
            failure.details = details
            return failure
        code = self._server.process.returncode
        if code == 0:  # it ended on its own (idle) before reading the request
            return EngineError("the UML engine ended before it answered: run again", details)
        return engineFailure(code if code is not None else 1, self._server.process.stderrLines, self._lastError)

    def wait(self, timeout: Optional[float] = None) -> None:
        """Block until :attr:`finished` (or raise :class:`EngineError` after ``timeout`` seconds)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.finished:
            if deadline is not None and time.monotonic() > deadline:
                raise EngineError(f"the UML engine did not answer within {timeout:g} s")
            time.sleep(0.02)

    def kill(self) -> None:
        """Cancel: end the engine's process tree (the next run starts a new engine)."""
        self._server.kill()


class EngineServer:
    """One ``umlcore serve`` process.

    Raises:
        EngineError: the process could not be started.
    """

    def __init__(self, key: EngineKey, workingDirectory: Path) -> None:
        self.key = key
        command = buildServeCommand(key.python, Path(key.model), key.device, key.batchSize)  # type: ignore[arg-type]
        self.process = EngineProcess(command, engineEnvironment(Path(key.umlcorePath)), workingDirectory)
        self.ready: Optional[ProgressEvent] = None
        self._current: Optional[ServedRun] = None

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def alive(self) -> bool:
        return self.process.returncode is None

    @property
    def idle(self) -> bool:
        """No request in flight."""
        return self._current is None or self._current.finished

    def attach(self, run: ServedRun) -> None:
        """Send ``run``'s request; the engine must be idle."""
        if not self.idle:
            raise InputError("a UML run is already in progress: wait for it to finish or cancel it")
        self._current = run
        self.process.send(run.line)  # an engine that has exited cannot read it: the run then reports how it ended

    def stop(self, graceSeconds: float = 5.0) -> None:
        """End the engine: close its input (it exits when idle), kill it if it has not after ``graceSeconds``."""
        self.process.closeInput()
        try:
            self.process.wait(timeout=graceSeconds)
        except Exception:  # noqa: BLE001 - subprocess.TimeoutExpired or a wait interrupted: kill it
            pass
        self.kill()

    def kill(self) -> None:
        self.process.kill()


class EngineHost:
    """Keeps one warm :class:`EngineServer` for its owner and starts a new one when needed.

    Attributes:
        starts: How many engines it started (a second run on the same key starts none).
    """

    def __init__(self) -> None:
        self._server: Optional[EngineServer] = None
        self.starts = 0

    @property
    def server(self) -> Optional[EngineServer]:
        """The engine kept now (``None`` before the first run or after :meth:`shutdown`)."""
        return self._server

    def run(self, key: EngineKey, cases: Sequence[Sequence[Path]], outputDirectory: Path, workingDirectory: Path,
            outputFormat: OutputFormat = "nrrd") -> ServedRun:
        """Start the request on the warm engine for ``key`` (started first when there is none, it died, or it was
        started with another key)."""
        line = engineRequest(cases, outputDirectory, outputFormat)
        server = self._server
        if server is not None and not server.idle and server.alive:
            raise InputError("a UML run is already in progress: wait for it to finish or cancel it")
        if server is not None and (server.key != key or not server.alive):
            self.shutdown()
            server = None

        def start() -> EngineServer:
            self.shutdown()
            self._server = EngineServer(key, workingDirectory)
            self.starts += 1
            return self._server

        if server is None:
            return ServedRun(start(), line)
        return ServedRun(server, line, retry=start)

    def shutdown(self) -> None:
        """Stop the warm engine, if any (the next run starts a new one)."""
        server, self._server = self._server, None
        if server is not None:
            server.stop()
