"""Where `uml predict` writes, so that nothing is lost: inputs are never touched, only uml's own outputs are
replaced, an output folder is claimed by one run at a time, and a failed or killed run leaves nothing behind.

The rules:

- **Never an input.** A case's output folder (``OUTDIR/<case>``) may not be, contain or lie inside an input file or
  DICOM folder, and ``OUTDIR`` may not lie inside an input folder (all resolved through symbolic links).
- **Only uml's own outputs are replaced.** uml marks every case folder it writes with :data:`MARKER`;
  ``--overwrite`` replaces a folder with that mark and refuses any other.
- **One run per output.** A run claims each case folder with a lock file created atomically
  (``OUTDIR/.<case>.uml-lock``, holding its process id); a second run gets a clear refusal. A lock or staging
  folder (``OUTDIR/.uml-tmp-<pid>-*``) of a process that no longer runs is removed by the next run.
- **All or nothing.** Cases are written into the staging folder and moved into place only when all of them
  succeeded; on any failure the folders this run created are removed and replaced ones restored.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Sequence

from .errors import UMLInputError

__all__ = ["MARKER", "check_output_folder", "refuse_inputs", "check_targets", "OutputClaim", "os_error_message"]

#: The file uml writes into every case folder it creates (what ``--overwrite`` may replace).
MARKER = ".uml-output"
#: What the marker of a case folder written by ``uml predict`` says (Slicer's folder mode writes another).
WRITTEN_BY = "uml predict"
_LOCK = ".{}.uml-lock"
_STAGING = ".uml-tmp-"


def _resolved(path: os.PathLike) -> Path:
    return Path(os.path.realpath(os.path.abspath(path)))


def _within(path: Path, folder: Path) -> bool:
    """Whether ``path`` is ``folder`` or lies inside it."""
    return path == folder or folder in path.parents


def check_output_folder(text: str) -> Path:
    """``OUTDIR`` as given, refused when it is empty or an existing file, or cannot be created or written."""
    if not str(text).strip():
        raise UMLInputError("the output folder (-o/--output) is empty: give the folder to write into (e.g. -o results)")
    outdir = Path(text)
    if outdir.exists():
        if not outdir.is_dir():
            raise UMLInputError(f"output folder {outdir} is a file, not a folder: choose another -o")
        if not os.access(outdir, os.W_OK | os.X_OK):
            raise UMLInputError(f"output folder {outdir} is not writable: choose another -o or fix its permissions")
        return outdir
    ancestor = outdir.absolute().parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise UMLInputError(f"cannot create output folder {outdir}: {ancestor} is a file, not a folder: choose another -o")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise UMLInputError(f"cannot create output folder {outdir}: {ancestor} is not writable: choose another -o")
    return outdir


def refuse_inputs(inputs: Sequence[os.PathLike], outdir: Path, targets: dict[str, Path]) -> None:
    """Refuse outputs that would replace, contain or lie inside an input (resolved through symbolic links)."""
    out = _resolved(outdir)
    for given in inputs:
        source = _resolved(given)
        if Path(given).is_dir() and _within(out, source):
            raise UMLInputError(f"output folder {outdir} lies inside the input folder {given}: uml never writes into "
                                "an input; choose an -o outside it")
        for case, target in targets.items():
            place = _resolved(target)
            if _within(source, place) or _within(place, source):
                raise UMLInputError(
                    f"the output of case {case!r} ({target}) {'is' if place == source else 'would hold'} the input "
                    f"{given}: uml never replaces or writes into an input; choose another -o (or rename the input)")


def _marked(folder: Path) -> bool:
    """Whether ``folder`` is a case folder that ``uml predict`` wrote (its :data:`MARKER` says so)."""
    marker = folder / MARKER
    if folder.is_symlink() or not folder.is_dir() or marker.is_symlink() or not marker.is_file():
        return False
    try:
        return json.loads(marker.read_text()).get("written_by") == WRITTEN_BY
    except (OSError, ValueError, AttributeError):
        return False


def check_targets(targets: dict[str, Path], overwrite: bool) -> None:
    """Refuse a case folder that exists unless ``overwrite`` is given and uml wrote it (it holds :data:`MARKER`)."""
    for case, target in targets.items():
        if not (target.exists() or target.is_symlink()):
            continue
        if not _marked(target):
            raise UMLInputError(f"output {target} exists and was not written by uml (it has no {MARKER} mark): uml "
                                "replaces only its own outputs; choose another -o, or move it away yourself")
        if not overwrite:
            raise UMLInputError(f"output {target} already exists: pass --overwrite to replace it, or choose another -o")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def os_error_message(exc: OSError, what: str) -> str:
    """One line for a failed write of ``what``: a full disk and a refused permission say what to do."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return f"no space left on the device while writing {what}: free some space or choose another -o"
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"cannot write {what} ({exc.strerror}): choose another -o or fix its permissions"
    return f"cannot write {what} ({exc.strerror or exc}): check the output folder, or choose another -o"


class OutputClaim:
    """The case folders of one run: claimed, staged, committed together or not at all.

    Use as a context manager: on entry the output folder is created, stale locks and staging folders of runs that
    no longer exist are removed, each case folder is locked and checked (:func:`check_targets`), and a staging
    folder made; :meth:`folder` gives a case's staging folder (with :data:`MARKER` in it), :meth:`commit` moves every
    case into place. Leaving the block by an exception removes what this run wrote and restores what it replaced.
    """

    def __init__(self, outdir: Path, targets: dict[str, Path], overwrite: bool) -> None:
        self.outdir, self.targets, self.overwrite = outdir, targets, overwrite
        self.created: list[Path] = []
        self.locks: list[Path] = []
        self.staging: Path | None = None
        self.committed: list[tuple[Path, Path | None]] = []

    def __enter__(self) -> "OutputClaim":
        try:
            self._makedirs()
            self._clean_stale()
            for case in self.targets:
                self._lock(case)
            check_targets(self.targets, self.overwrite)  # again, now that no other run can write them
            self.staging = Path(tempfile.mkdtemp(prefix=f"{_STAGING}{os.getpid()}-", dir=self.outdir))
        except BaseException:
            self._release(failed=True)
            raise
        return self

    def __exit__(self, kind, value, tb) -> None:
        self._release(failed=kind is not None)

    def folder(self, case: str) -> Path:
        """The staging folder of ``case`` (created, marked)."""
        folder = self.staging / case
        folder.mkdir()
        (folder / MARKER).write_text(json.dumps({"written_by": WRITTEN_BY, "case": case, "pid": os.getpid(),
                                                 "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}) + "\n")
        return folder

    def commit(self) -> None:
        """Move every staged case folder into place (a replaced one aside first, deleted at the end)."""
        for case, target in self.targets.items():
            old = None
            if target.exists() or target.is_symlink():
                old = self.staging / f".old-{case}"
                os.replace(target, old)
            self.committed.append((target, old))
            os.replace(self.staging / case, target)

    # ------------------------------------------------------------------------------------------ internals

    def _makedirs(self) -> None:
        p = self.outdir.absolute()
        missing = []
        while not p.exists():
            missing.append(p)
            p = p.parent
        for d in reversed(missing):
            d.mkdir()
            self.created.insert(0, d)  # deepest first

    def _clean_stale(self) -> None:
        """Remove the locks and staging folders of runs whose process is gone (killed, crashed)."""
        for entry in self.outdir.iterdir():
            name = entry.name
            pid = None
            if name.startswith(_STAGING) and entry.is_dir():
                pid = name[len(_STAGING):].split("-", 1)[0]
            elif name.startswith(".") and name.endswith(".uml-lock") and entry.is_file():
                with contextlib.suppress(OSError):
                    pid = entry.read_text().strip()
            if pid is None:
                continue
            # a lock left empty is one whose run was killed between creating and writing it
            try:
                empty_and_old = pid == "" and time.time() - entry.stat().st_mtime > 60
            except OSError:  # removed meanwhile by another run
                continue
            if empty_and_old or (pid.isdigit() and int(pid) not in (0, os.getpid()) and not _alive(int(pid))):
                if entry.is_dir():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    with contextlib.suppress(OSError):
                        entry.unlink()

    def _lock(self, case: str) -> None:
        lock = self.outdir / _LOCK.format(case)
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            with contextlib.suppress(OSError):
                other = lock.read_text().strip()
                raise UMLInputError(f"another uml run (process {other}) is writing {self.targets[case]}: wait for it to "
                                    "finish, or choose another -o") from None
            raise UMLInputError(f"another uml run is writing {self.targets[case]}: wait for it, or choose another -o") from None
        with os.fdopen(fd, "w") as f:
            f.write(f"{os.getpid()}\n")
        self.locks.append(lock)

    def _release(self, failed: bool) -> None:
        if failed:
            for target, old in reversed(self.committed):  # roll back a commit that failed half-way
                with contextlib.suppress(OSError):
                    if target.exists():
                        shutil.rmtree(target)
                    if old is not None and old.exists():
                        os.replace(old, target)
        if self.staging is not None:
            shutil.rmtree(self.staging, ignore_errors=True)
        for lock in self.locks:
            with contextlib.suppress(OSError):
                lock.unlink()
        if failed:
            for d in self.created:  # deepest first; only folders this run created
                with contextlib.suppress(OSError):
                    d.rmdir()
