"""Environment faults as one-line errors that name the file and what to do, with nothing else touched:
a corrupted store, read-only or file --out, an over-long suite name, a suite YAML that is not UTF-8;
and repeats in a grid, which run once and never clear a finished trial's folder."""

from __future__ import annotations

import os
import shutil
import subprocess
from contextlib import contextmanager
from pathlib import Path

import pytest

from peftbench.cli import main as cli_main

TINY = ["--methods", "lora", "--seeds", "1", "--max-steps", "2", "--train-limit", "16", "--eval-limit", "8",
        "--test-limit", "8", "--quiet"]


def _one_line_error(capsys, *needles: str) -> str:
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err
    return err


@contextmanager
def read_only(*paths: Path):
    """``paths`` unwritable: modes 555/444, and for root (whom modes do not stop) the immutable flag."""
    modes = {p: p.stat().st_mode for p in paths}
    for p in paths:
        p.chmod(0o555 if p.is_dir() else 0o444)
    immutable = os.geteuid() == 0 and shutil.which("chattr") is not None
    if immutable:
        subprocess.run(["chattr", "+i", *map(str, paths)], check=True)
    try:
        probe = paths[0] / ".probe"
        try:
            probe.write_text("x")
        except OSError:
            pass
        else:
            probe.unlink()
            pytest.skip("this machine cannot make a folder read-only for this user")
        yield
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", *map(str, paths)], check=True)
        for p, mode in modes.items():
            p.chmod(mode)


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    """One tiny real run: (out folder, suite folder)."""
    out = tmp_path_factory.mktemp("env") / "out"
    assert cli_main(["run", *TINY, "--suite", "tiny", "--out", str(out)]) == 0
    return out, out / "tiny"


def test_repeats_run_once_and_a_finished_trials_folder_stays(suite, capsys):
    out, folder = suite
    (trial,) = [p for p in (folder / "trials").iterdir() if p.is_dir()]
    (trial / "marker.txt").write_text("kept")
    capsys.readouterr()
    argv = ["run", *TINY, "--methods", "lora", "--budget", "0.1%,0.10 %", "--suite", "tiny", "--out", str(out)]
    assert cli_main(argv) == 0
    captured = capsys.readouterr()
    assert "note: method 'lora' is listed twice; it runs once" in captured.err
    assert "note: budget 0.1% is listed twice; it runs once" in captured.err  # "0.10 %" is 0.1%
    assert "1 skipped" in captured.out and (trial / "marker.txt").read_text() == "kept"


def test_corrupted_store_stops_run_and_report_touching_nothing(suite, tmp_path, capsys):
    _, folder = suite
    broken = tmp_path / "out" / "tiny"
    broken.mkdir(parents=True)
    shutil.copy(folder / "suite.json", broken / "suite.json")
    (broken / "results.sqlite").write_bytes(os.urandom(4096))
    before = {p.name: p.read_bytes() for p in broken.iterdir()}
    for argv in (["run", *TINY, "--suite", "tiny", "--out", str(tmp_path / "out")],
                 ["run", *TINY, "--suite", "tiny", "--out", str(tmp_path / "out"), "--dry-run"],
                 ["report", "tiny", "--out", str(tmp_path / "out")]):
        capsys.readouterr()
        code = cli_main(argv)
        if "--dry-run" in argv:  # the plan is shown, with the reason a real run would stop
            assert code == 0 and "a real run would stop here" in capsys.readouterr().out
        else:
            assert code == 2
            _one_line_error(capsys, f"{broken / 'results.sqlite'} is not a readable peftbench results store",
                            "file is not a database", "nothing was changed")
        assert {p.name: p.read_bytes() for p in broken.iterdir()} == before


def test_read_only_suite_reports_elsewhere_and_refuses_in_place(suite, tmp_path, capsys):
    out, folder = suite
    files = [p for p in folder.iterdir() if p.is_file()]
    with read_only(folder, *files):
        capsys.readouterr()
        assert cli_main(["report", "tiny", "--out", str(out)]) == 2
        _one_line_error(capsys, f"{folder} is read-only", f"render it elsewhere with: peftbench report {folder} --out DIR")
        assert cli_main(["run", *TINY, "--suite", "tiny", "--out", str(out)]) == 2
        _one_line_error(capsys, f"{folder} is read-only", "nothing was changed", "give --out a writable folder")
        assert cli_main(["report", str(folder), "--out", str(tmp_path / "elsewhere")]) == 0
    report = tmp_path / "elsewhere" / "tiny" / "report.md"
    assert "lora" in report.read_text() and (report.parent / "plots").is_dir()


def test_read_only_or_file_out_and_long_names(tmp_path, capsys):
    (tmp_path / "ro").mkdir()
    with read_only(tmp_path / "ro"):
        assert cli_main(["run", *TINY, "--out", str(tmp_path / "ro")]) == 2
        _one_line_error(capsys, f"{tmp_path / 'ro'} is read-only", "give --out a writable folder")
    (tmp_path / "file").write_text("not a folder")
    assert cli_main(["run", *TINY, "--out", str(tmp_path / "file")]) == 2
    _one_line_error(capsys, f"--out is a file, not a folder: {tmp_path / 'file'}")
    assert cli_main(["run", *TINY, "--out", str(tmp_path / "o"), "--suite", "a" * 300]) == 2
    _one_line_error(capsys, "suite name is 300 characters long", "at most 100 allowed")
    assert not (tmp_path / "o").exists()


def test_suite_yaml_that_is_not_utf8(tmp_path, capsys):
    config = tmp_path / "latin1.yaml"
    config.write_bytes("seeds: 1\n# café\n".encode("latin-1"))
    assert cli_main(["run", "--config", str(config), "--dry-run"]) == 2
    _one_line_error(capsys, f"suite config {config} is not UTF-8 text (byte 0xe9 at offset 14); save it as UTF-8")
