"""Bad input ends with one line `error: ...` that names the file or option, a non-zero exit, no traceback, and no
file changed: garbage or truncated checkpoints (at --eval-only, as an init, on --resume), a checkpoint path that is a
folder, --resume with nothing to resume, a corrupt results.json, and --resume PATH for a chain."""
import json, shutil
from pathlib import Path

import pytest

from conftest import TINY_CHAIN, TINY_RUN, run_cli, snapshot

ONE = ["--stage", "source_only", "--schedule.iters", "2", *TINY_RUN]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    "A finished one-stage run, a truncated copy of its checkpoint, a garbage file and a folder."
    root = tmp_path_factory.mktemp("bad")
    run_cli(*ONE, "--out", root / "good")
    good = (root / "good" / "checkpoint.pt").read_bytes()
    (root / "truncated.pt").write_bytes(good[: len(good) // 2])
    (root / "garbage.pt").write_bytes(b"this is not a checkpoint\n" * 40)
    (root / "a_folder").mkdir()
    return root


def assert_clean_error(r, names, out=None, before=None):
    "Non-zero exit, no traceback, a last line `error: ...` naming `names`; `out` unchanged when a snapshot is given."
    assert r.returncode != 0, r.stdout[-2000:]
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    last = r.stderr.strip().splitlines()[-1]
    assert "error: " in last, r.stderr[-2000:]
    assert str(names) in last, (names, last)
    assert "weights_only=False" not in r.stderr.replace("never loaded with weights_only=False", "")
    if out is not None: assert snapshot(out) == before, "a file was written or changed"


@pytest.mark.parametrize("bad", ["garbage.pt", "truncated.pt", "a_folder"])
def test_bad_checkpoint_at_eval_only(files, bad):
    before = snapshot(files)
    r = run_cli(*ONE, "--eval-only", "--checkpoint", files / bad, ok=False)
    assert_clean_error(r, files / bad, files, before)


@pytest.mark.parametrize("bad", ["garbage.pt", "truncated.pt", "a_folder"])
def test_bad_checkpoint_as_an_init(files, tmp_path, bad):
    out = tmp_path / "run"
    r = run_cli("--stage", "stage1", "--stage1.init", files / bad, "--stage1.iters", "2", *TINY_RUN, "--out", out, ok=False)
    assert_clean_error(r, files / bad)
    assert not out.exists()


@pytest.mark.parametrize("bad", ["garbage.pt", "truncated.pt"])
def test_bad_checkpoint_on_resume(files, tmp_path, bad):
    out = tmp_path / "run"; out.mkdir()
    shutil.copy(files / bad, out / "checkpoint.pt")
    before = snapshot(out)
    r = run_cli(*ONE, "--out", out, "--resume", ok=False)
    assert_clean_error(r, out / "checkpoint.pt", out, before)
    r = run_cli(*ONE, "--out", out, "--resume", files / bad, ok=False)               # --resume PATH
    assert_clean_error(r, files / bad, out, before)


def test_resume_path_that_is_a_folder(files, tmp_path):
    r = run_cli(*ONE, "--out", tmp_path / "run", "--resume", files / "a_folder", ok=False)
    assert_clean_error(r, files / "a_folder")
    assert not (tmp_path / "run").exists()


def test_resume_with_nothing_to_resume(tmp_path):
    out = tmp_path / "empty"; out.mkdir()
    r = run_cli(*ONE, "--out", out, "--resume", ok=False)
    assert_clean_error(r, out / "checkpoint.pt", out, {})


def test_corrupt_results_json(files, tmp_path):
    out = tmp_path / "chain"; out.mkdir()
    (out / "results.json").write_text('{"benchmark": "synthcity", "stages": [{"name": "source_')   # cut off
    before = snapshot(out)
    for args in (["--resume"], ["--stage", "stage3"]):
        r = run_cli(*TINY_CHAIN, "--out", out, *args, ok=False)
        assert_clean_error(r, out / "results.json", out, before)


def test_resume_path_for_a_chain_is_refused(files, tmp_path):
    r = run_cli(*TINY_CHAIN, "--out", tmp_path / "c", "--resume", files / "good" / "checkpoint.pt", ok=False)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "--resume" in r.stderr.strip().splitlines()[-1] and "one stage" in r.stderr
    assert not (tmp_path / "c").exists()


def test_bad_plugin_is_one_line(tmp_path):
    broken = tmp_path / "broken.py"; broken.write_text("def oops(:\n")
    for spec, says in ((tmp_path / "missing.py", "no such file"), (broken, "SyntaxError"), ("no_such_module_xyz", "no such file or module")):
        r = run_cli("--plugin", spec, ok=False)
        assert r.returncode == 2 and "Traceback" not in r.stderr
        last = r.stderr.strip().splitlines()[-1]
        assert f"--plugin {spec}" in last and says in last, last
