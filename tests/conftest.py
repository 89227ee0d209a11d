"""Shared fixtures: the command line in a subprocess, tiny SynthCity configurations and trainers, a random initial
checkpoint, and the comparisons the tests make (weights, directory snapshots)."""
import hashlib, os, signal, subprocess, sys, time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

# a few steps on a few images: the tests check the machinery, not the accuracy
TINY_RUN = ["--optim.batch_size", "4", "--data.synthcity_n", "16", "--data.max_val", "4", "--run.progress", "false",
            "--run.tensorboard", "false"]
TINY_CHAIN = [*TINY_RUN, "--schedule.iters", "3", "--warmup.iters", "2", "--stage1.iters", "2", "--stage2.iters", "2",
              "--stage3.iters", "2", "--stage2.student_init", "teacher", "--run.ckpt_every", "0"]
# a real preset (GTA5 / SYNTHIA -> Cityscapes) on a fixture folder, at a size the CPU trains in seconds ...
SMALL_REAL_RUN = ["--data.crop", "64,32", "--data.long_side", "64", "--data.num_workers", "0", "--optim.batch_size", "2",
                  "--schedule.poly_iters", "0", "--run.progress", "false", "--run.tensorboard", "false",
                  "--run.device", "cpu", "--run.ckpt_every", "0"]
# ... and with SynthCityNet in place of the preset's ResNet-101 (its classifier at the body's learning rate)
SYNTHCITY_NET = ["--model.name", "synthcity_net", "--model.layout", "torchvision", "--optim.head_lr_mult", "1"]


def run_cli(*args, ok=True, launcher=(sys.executable, "-m", "proda_nb.train"), timeout=600, env=None):
    "Run the command line (one OpenMP thread per process); with `ok`, fail the test unless it exits 0."
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    r = subprocess.run([*launcher, *map(str, args)], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if ok: assert r.returncode == 0, f"exit {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


def kill_and_resume(args, tmp_path, iters:int, timeout:float=300):
    """Train the command line `args` uninterrupted into tmp_path/full, and again into tmp_path/killed, SIGKILLed as
    soon as its first checkpoint exists and then resumed with --resume. Returns the two folders."""
    full, killed = Path(tmp_path) / "full", Path(tmp_path) / "killed"
    run_cli(*args, "--out", full)
    proc = subprocess.Popen([sys.executable, "-m", "proda_nb.train", *map(str, args), "--out", str(killed)], cwd=REPO,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    while not (killed / "checkpoint.pt").exists() and proc.poll() is None and time.time() < deadline: time.sleep(0.05)
    proc.send_signal(signal.SIGKILL); proc.wait()
    assert torch.load(killed / "checkpoint.pt", weights_only=True)["iteration"] < iters, \
        "the run finished before it could be killed; make it longer"
    run_cli(*args, "--out", killed, "--resume")
    return full, killed


def max_diff(a: dict, b: dict, counters:bool=True) -> float:
    """Largest absolute difference between two state dicts with the same keys; with `counters=False`, BatchNorm's
    `num_batches_tracked` are left out (they count forward passes: two processes make half as many as one)."""
    keys = [k for k in a if counters or not k.endswith("num_batches_tracked")]
    return max((a[k].double() - b[k].double()).abs().max().item() for k in keys)


def checkpoint_weights(out) -> dict:
    "The model weights of OUT/checkpoint.pt."
    return torch.load(Path(out) / "checkpoint.pt", weights_only=True)["model"]


def snapshot(folder) -> dict:
    "Every file under `folder` -> its sha256: compare two snapshots to see that nothing was written."
    folder = Path(folder)
    if not folder.exists(): return {}
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def tiny_synthcity_config(out, stage="source_only", **options):
    "The synthcity preset cut down to seconds: 16 images per domain, batch 4, 4 val images, no bars or TensorBoard."
    from proda_nb.engine import get_config, set_option
    cfg = get_config("synthcity")
    cfg.stage = stage
    cfg.optim.batch_size, cfg.data.synthcity_n, cfg.data.max_val = 4, 16, 4
    cfg.run.out, cfg.run.progress, cfg.run.tensorboard, cfg.run.threads = str(out), False, False, 1
    for key, value in options.items(): set_option(cfg, key, value)
    return cfg


def default_network():
    "A randomly initialised network as the default preset builds it (SynthCity's GroupNorm SynthCityNet)."
    from proda_nb.engine import get_config
    from proda_nb.models import build_network
    return build_network(get_config().model)


@pytest.fixture(scope="session")
def random_init(tmp_path_factory):
    "A checkpoint of a randomly initialised SynthCityNet (seed 0), in the engine's layout: an init for any stage."
    from proda_nb.engine import atomic_save
    path = tmp_path_factory.mktemp("init") / "checkpoint.pt"
    torch.manual_seed(0)
    atomic_save({"model": default_network().state_dict()}, path)
    return path


@pytest.fixture(autouse=True)
def one_thread():
    "Tests run in-process on one thread (the machine has two cores; parallel runs would fight over them)."
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
