"""The `python -m proda_nb.train` command on tiny SynthCity settings (CPU): the no-argument table, option errors,
DDP with two gloo processes (torchrun and --gpus self-launch) against one process, --stop-after/--resume, --eval-only."""
import json, os, subprocess, sys
from pathlib import Path

import pytest
import torch

from proda_nb.train import build_parser, parse_args
from conftest import default_network, REPO, TINY_RUN, max_diff, run_cli

TINY = ["--stage", "source_only", "--schedule.iters", "6", "--run.ckpt_every", "3", "--run.log_every", "3", *TINY_RUN]


def cli(args, launcher=(sys.executable, "-m", "proda_nb.train"), timeout=300):
    return run_cli(*args, launcher=launcher, timeout=timeout)


def weights(out):
    return torch.load(Path(out) / "checkpoint.pt", weights_only=True)


@pytest.fixture(scope="module")
def synthcity():
    pytest.importorskip("proda_nb.synthcity")


def test_unknown_option_lists_valid_ones(capsys):
    with pytest.raises(SystemExit) as e: parse_args(["--optim.learning_rate", "0.1"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "unknown option '--optim.learning_rate'" in err
    for valid in ("--optim.lr", "--schedule.iters", "--data.crop", "--gpus", "--resume"): assert valid in err
    with pytest.raises(SystemExit): parse_args(["--optim.lr", "fast"])
    assert "optim.lr" in capsys.readouterr().err


def test_no_flag_is_a_prefix_of_a_torchrun_option():
    from torch.distributed.run import get_args_parser
    torchrun = [o for a in get_args_parser()._actions for o in a.option_strings if o.startswith("--")]
    ours = [o for a in build_parser()._actions for o in a.option_strings if o.startswith("--") and o != "--help"]
    assert len(ours) > 40
    assert [(o, t) for o in ours for t in torchrun if t.startswith(o)] == []


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, synthcity):
    "One process, the global batch of 4 as two micro-batches of 2 (BatchNorm statistics per half, as under DDP)."
    out = tmp_path_factory.mktemp("one")
    r = cli([*TINY, "--optim.accum_steps", "2", "--out", str(out)])
    return out, r


def test_cli_prints_the_table(one_process):
    out, r = one_process
    assert "mIoU19 (all 19 classes)" in r.stdout and "road" in r.stdout and "sidewalk" in r.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert f"{metrics['miou19']:6.2f}" in r.stdout
    assert weights(out)["iteration"] == 6 and (out / "log.jsonl").exists()


def test_torchrun_two_processes_match_one_process(one_process, tmp_path):
    # two gloo processes started by torchrun, each with half of the global batch
    cli([*TINY, "--out", str(tmp_path / "ddp")],
        launcher=("torchrun", "--standalone", "--nproc_per_node=2", "-m", "proda_nb.train"))
    a, b = weights(one_process[0]), weights(tmp_path / "ddp")
    assert (a["world_size"], b["world_size"]) == (1, 2)
    assert max_diff(a["model"], b["model"]) <= 1e-5
    ma, mb = (json.loads((d / "metrics.json").read_text()) for d in (one_process[0], tmp_path / "ddp"))
    assert abs(ma["miou"] - mb["miou"]) <= 1e-6
    # the comparison means something: 6 steps moved the weights well beyond the tolerance
    from proda_nb.models import build_model
    torch.manual_seed(0)                                   # the engine seeds run.seed (0) before building the model
    init = default_network().state_dict()
    assert b["iteration"] == 6 and max_diff(init, b["model"]) > 1e-3


def test_gpus_self_launch_runs_ddp(one_process, tmp_path):
    r = cli([*TINY, "--gpus", "2", "--out", str(tmp_path / "two")])
    assert "2 process(es)" in r.stdout
    a, b = weights(one_process[0]), weights(tmp_path / "two")
    assert b["world_size"] == 2 and max_diff(a["model"], b["model"]) <= 1e-5


def test_stop_after_then_resume_equals_full_run(one_process, tmp_path):
    cut = tmp_path / "cut"
    stopped = cli([*TINY, "--optim.accum_steps", "2", "--out", str(cut), "--stop-after", "3"])
    assert "continue with --resume" in stopped.stdout and weights(cut)["iteration"] == 3
    assert not (cut / "metrics.json").exists()
    cli([*TINY, "--optim.accum_steps", "2", "--out", str(cut), "--resume"])
    a, b = weights(one_process[0]), weights(cut)
    assert b["iteration"] == 6 and max_diff(a["model"], b["model"]) == 0.0
    ma, mb = (json.loads((d / "metrics.json").read_text()) for d in (one_process[0], cut))
    assert ma["miou"] == mb["miou"] and ma["iou"] == mb["iou"]


def test_eval_only_reproduces_the_final_table(one_process):
    out, r = one_process
    ev = cli([*TINY, "--eval-only", "--checkpoint", str(out / "checkpoint.pt")])
    table = r.stdout[r.stdout.index(" id  class"):r.stdout.index("mIoU13")]
    assert table in ev.stdout



def test_setup_errors_are_one_clear_line(tmp_path, capsys):
    from proda_nb.train import main
    with pytest.raises(SystemExit, match=r"batch_size=6 .*divisible by the number of processes \(4\)"):
        main(["--optim.batch_size", "6", "--gpus", "4"])
    assert main(["--config", "gta5_to_cityscapes", "--data-root", str(tmp_path), "--run.progress", "false"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(tmp_path / "gta5") in err


def test_killed_run_resumes_to_the_same_result(tmp_path):
    "SIGKILL a real run once a checkpoint is on disk; `--resume` must end exactly where an uninterrupted run ends."
    import signal, time
    args = [*TINY, "--schedule.iters", "40", "--run.ckpt_every", "5"]
    full = tmp_path / "full"; cli([*args, "--out", str(full)])
    killed = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "proda_nb.train", *args, "--out", str(killed)], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (killed / "checkpoint.pt").exists() and proc.poll() is None and time.time() < deadline: time.sleep(0.05)
    proc.send_signal(signal.SIGKILL); proc.wait()
    at_kill = weights(killed)["iteration"]
    assert at_kill < 40, "the run finished before it could be killed; make it longer"
    cli([*args, "--out", str(killed), "--resume"])
    a, b = weights(full), weights(killed)
    assert b["iteration"] == 40 and max_diff(a["model"], b["model"]) == 0.0
    ma, mb = (json.loads((d / "metrics.json").read_text()) for d in (full, killed))
    assert ma["miou"] == mb["miou"] and ma["iou"] == mb["iou"]


def test_progress_on_a_log_file_is_a_few_lines(tmp_path):
    "With stderr redirected (not a terminal) the progress is a plain line every 5 %, not carriage-return redraws."
    r = cli([*TINY, "--schedule.iters", "40", "--run.progress", "true", "--out", str(tmp_path / "p")])
    lines = [l for l in r.stderr.splitlines() if l.startswith("source_only: ")]
    assert "\r" not in r.stderr and 0 < len(lines) <= 21
    assert lines[-1].startswith("source_only: 40/40 (100%)")
