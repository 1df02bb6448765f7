"""umlcore.outputs: outputs never touch an input, only uml's own outputs are replaced, one run per output folder,
killed runs' leftovers are cleaned, a failed run leaves nothing."""

import errno
import os
import subprocess
import sys
import time

import pytest

from umlcore.errors import UMLInputError
from umlcore.outputs import MARKER, OutputClaim, check_output_folder, check_targets, os_error_message, refuse_inputs


def test_an_output_that_is_holds_or_lies_inside_an_input_is_refused(tmp_path):
    data = tmp_path / "data"
    (data / "case01").mkdir(parents=True)
    scan = data / "case01" / "case01.nrrd"
    scan.write_bytes(b"scan")
    dicom = data / "case02"
    dicom.mkdir()
    (dicom / "1.dcm").write_bytes(b"dicom")
    link = tmp_path / "link"
    link.symlink_to(data)
    for inputs, outdir, targets, phrase in (
            ([scan], data, {"case01": data / "case01"}, "would hold the input"),      # -o data: data/case01 holds it
            ([dicom], data, {"case02": data / "case02"}, "is the input"),             # a DICOM folder as its own output
            ([dicom], dicom / "out", {"case02": dicom / "out" / "case02"}, "lies inside the input folder"),
            ([link / "case01" / "case01.nrrd"], data, {"case01": data / "case01"}, "would hold the input")):  # symlinks
        with pytest.raises(UMLInputError, match=phrase + ".*uml never"):
            refuse_inputs(inputs, outdir, targets)
    refuse_inputs([scan], data, {"case01": tmp_path / "results" / "case01"})  # beside the input: fine
    refuse_inputs([scan], data / "case01", {"case01": data / "case01" / "case01"})  # OUTDIR holds the input: fine


def test_only_uml_s_own_outputs_are_replaced(tmp_path):
    ours, foreign, missing = tmp_path / "ours", tmp_path / "foreign", tmp_path / "missing"
    ours.mkdir()
    (ours / MARKER).write_text('{"written_by": "uml predict"}')
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("mine")
    for i, marker in enumerate(("{}", "not json", '{"written_by": "UML Slicer folder mode"}', "[]")):
        other = tmp_path / f"other{i}"  # another writer's marker (Slicer's folder mode), or a damaged one
        other.mkdir()
        (other / MARKER).write_text(marker)
        with pytest.raises(UMLInputError, match="was not written by uml"):
            check_targets({"x": other}, overwrite=True)
    check_targets({"m": missing}, overwrite=False)
    check_targets({"o": ours}, overwrite=True)
    with pytest.raises(UMLInputError, match="already exists: pass --overwrite"):
        check_targets({"o": ours}, overwrite=False)
    for target in (foreign, tmp_path / "file"):
        target.touch() if not target.exists() else None
        with pytest.raises(UMLInputError, match="was not written by uml"):
            check_targets({"x": target}, overwrite=True)


def test_the_output_folder_must_be_named_and_usable(tmp_path):
    for text in ("", "  "):
        with pytest.raises(UMLInputError, match="the output folder .* is empty"):
            check_output_folder(text)
    (tmp_path / "f").touch()
    with pytest.raises(UMLInputError, match="is a file, not a folder"):
        check_output_folder(str(tmp_path / "f"))
    assert check_output_folder(str(tmp_path / "new" / "deeper")) == tmp_path / "new" / "deeper"


def test_a_claim_commits_all_cases_together_and_cleans_up(tmp_path):
    outdir = tmp_path / "out" / "deep"
    targets = {"a": outdir / "a", "b": outdir / "b"}
    with OutputClaim(outdir, targets, overwrite=False) as claim:
        for case in targets:
            (claim.folder(case) / "result.txt").write_text(case)
        assert sorted(p.name for p in outdir.iterdir() if p.name.startswith(".")) == [
            ".a.uml-lock", ".b.uml-lock", claim.staging.name]
        claim.commit()
    assert sorted(p.name for p in outdir.iterdir()) == ["a", "b"]  # no lock, no staging left
    assert (outdir / "a" / MARKER).is_file() and (outdir / "b" / "result.txt").read_text() == "b"
    # a failure rolls back: nothing new, the replaced folder restored, the created folders removed
    fresh = tmp_path / "fresh"
    with pytest.raises(RuntimeError):
        with OutputClaim(fresh, {"c": fresh / "c"}, overwrite=False) as claim:
            claim.folder("c")
            raise RuntimeError("disk on fire")
    assert not fresh.exists()
    with pytest.raises(RuntimeError):
        with OutputClaim(outdir, {"a": outdir / "a"}, overwrite=True) as claim:
            (claim.folder("a") / "result.txt").write_text("new")
            claim.commit()
            raise RuntimeError("after the commit")
    assert (outdir / "a" / "result.txt").read_text() == "a" and sorted(p.name for p in outdir.iterdir()) == ["a", "b"]


def test_a_second_run_is_refused_while_the_first_writes(tmp_path):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / ".a.uml-lock").write_text(f"{sleeper.pid}\n")  # a live run holds case a
        with pytest.raises(UMLInputError, match=f"another uml run \\(process {sleeper.pid}\\) is writing"):
            with OutputClaim(tmp_path, {"a": tmp_path / "a"}, overwrite=False):
                pass
        assert (tmp_path / ".a.uml-lock").read_text() == f"{sleeper.pid}\n"  # its lock is left alone
    finally:
        sleeper.kill()
        sleeper.wait()


def test_the_leftovers_of_a_killed_run_are_removed_by_the_next(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()  # a process id that has just ended
    (tmp_path / f".uml-tmp-{dead}-x1y2").mkdir()
    (tmp_path / f".uml-tmp-{dead}-x1y2" / "half.nii.gz").write_bytes(b"half")
    (tmp_path / ".a.uml-lock").write_text(f"{dead}\n")
    (tmp_path / ".uml-tmp-notapid").mkdir()  # not ours to judge: left alone
    with OutputClaim(tmp_path, {"a": tmp_path / "a"}, overwrite=False) as claim:
        claim.folder("a")
        claim.commit()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".uml-tmp-notapid", "a"]


def test_os_errors_become_one_line_with_the_fix():
    assert "no space left on the device while writing X: free some space" in os_error_message(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), "X")
    assert "cannot write X (Permission denied): choose another -o" in os_error_message(OSError(errno.EACCES, os.strerror(errno.EACCES)), "X")


def test_an_empty_lock_is_stale_only_when_old(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    lock = out / ".a.uml-lock"
    lock.write_text("")
    with pytest.raises(UMLInputError, match="another uml run"):
        with OutputClaim(out, {"a": out / "a"}, overwrite=False):
            pass
    os.utime(lock, (time.time() - 120, time.time() - 120))
    with OutputClaim(out, {"a": out / "a"}, overwrite=False) as claim:
        claim.folder("a")
        claim.commit()
    assert not lock.exists() and (out / "a" / MARKER).is_file()
