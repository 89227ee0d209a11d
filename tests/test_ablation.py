"`python -m proda_nb.ablation` (notebook 16): the table's file, rows chosen by name, resuming after a kill."
import json, os, signal, subprocess, sys, time

import torch

from conftest import REPO, max_diff, run_cli
from proda_nb.ablation import ROW, ablation_table

ABLATION = (sys.executable, "-m", "proda_nb.ablation")
# the synthcity preset cut down to seconds, for every row
TINY = [arg for option in ("schedule.iters=3", "warmup.iters=2", "dann.iters=2", "pipa.iters=2", "stage1.iters=6", "optim.batch_size=4",
                           "data.synthcity_n=16", "data.max_val=4", "run.tensorboard=false", "run.ckpt_every=1",
                           "run.log_every=1")
        for arg in ("--set", option)]


def test_writes_the_table_and_resumes_a_killed_row(tmp_path):
    args = ["--seeds", "0", "--rows", "st_sce", *TINY]
    r = run_cli("--out", tmp_path / "full", *args, launcher=ABLATION)
    table = json.loads((tmp_path / "full" / "ablation.json").read_text())
    names = [row["name"] for row in table["rows"]]
    assert table["benchmark"] == "synthcity" and table["seeds"] == [0]
    assert names == ["source_only", "warmup", "st_sce"]                  # the row and the rows it starts from, in order
    for row in table["rows"]:
        own = json.loads((tmp_path / "full" / "seed0" / row["name"] / "metrics.json").read_text())["miou"]
        assert row["per_seed"] == {"0": own} and row["miou_mean"] == own and row["miou_std"] == 0.0
    assert "[st_sce]" in r.stdout and "[warmup]" in r.stdout

    killed = tmp_path / "killed"                                         # killed while st_sce trains, then resumed
    proc = subprocess.Popen([*ABLATION, "--out", str(killed), *args], cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoint, deadline = killed / "seed0" / "st_sce" / "checkpoint.pt", time.time() + 300
    while not checkpoint.exists() and proc.poll() is None and time.time() < deadline: time.sleep(0.05)
    proc.send_signal(signal.SIGKILL); proc.wait()
    assert torch.load(checkpoint, weights_only=True)["iteration"] < 6, "st_sce finished before it could be killed"
    warmup = (killed / "seed0" / "warmup" / "checkpoint.pt").stat().st_mtime_ns
    run_cli("--out", killed, *args, launcher=ABLATION)
    assert (killed / "seed0" / "warmup" / "checkpoint.pt").stat().st_mtime_ns == warmup   # a finished row: not trained again
    logged = [json.loads(l)["iteration"] for l in (killed / "seed0" / "st_sce" / "log.jsonl").read_text().splitlines()]
    assert logged.count(1) == 1 and max(logged) == 6                     # resumed from its checkpoint, not restarted
    a, b = (torch.load(root / "seed0" / "st_sce" / "checkpoint.pt", weights_only=True)
            for root in (tmp_path / "full", killed))
    assert b["iteration"] == 6 and max_diff(a["model"], b["model"]) == 0.0
    assert json.loads((killed / "ablation.json").read_text()) == table


def test_the_dann_start_chain_and_bad_input(tmp_path):
    r = run_cli("--out", tmp_path, "--seeds", "0", "--rows", "dann_st_sce", *TINY, launcher=ABLATION)
    results = json.loads((tmp_path / "ablation.json").read_text())
    table = {row["name"]: row for row in results["rows"]}
    assert list(table) == ["source_only", "dann", "dann_st_sce"]             # the row and the rows it starts from
    printed = ablation_table(results, "parent")
    assert printed.to_string() in r.stdout                              # what was printed is the file's table
    step = printed.loc[f"{ROW['dann_st_sce'].title} [dann_st_sce]", "step"]     # the step from its parent, DANN's model
    assert abs(step - (table["dann_st_sce"]["miou_mean"] - table["dann"]["miou_mean"])) <= 0.051
    config = json.loads((tmp_path / "seed0" / "dann_st_sce" / "config.json").read_text())
    assert config["stage1"]["init"] == str(tmp_path / "seed0" / "dann" / "checkpoint.pt")     # DANN's model is its start
    assert (config["stage1"]["denoise"], config["stage1"]["sce"], config["stage1"]["gamma1"]) == (False, True, 0.0)
    bad = run_cli("--out", tmp_path, "--rows", "dann_st", launcher=ABLATION, ok=False)
    assert bad.returncode == 2 and bad.stderr.strip() == f"error: unknown row dann_st; the rows are {', '.join(ROW)}"
    bad = run_cli("--out", tmp_path, "--set", "dann.iters", launcher=ABLATION, ok=False)
    assert bad.returncode == 2 and bad.stderr.strip() == "error: --set dann.iters: expected SECTION.FIELD=VALUE"
    dann = ["--out", tmp_path, "--seeds", "0", "--rows", "dann", *TINY]
    bad = run_cli(*dann, "--set", "dann.iters=x", launcher=ABLATION, ok=False)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1
    assert bad.stderr.startswith("error: option dann.iters:")
    other = run_cli(*dann, "--set", "dann.lr=0.5", launcher=ABLATION, ok=False)
    assert other.returncode == 2 and "were made with other settings (dann.lr)" in other.stderr     # one root, one benchmark


def test_the_pipa_start_chain(tmp_path):
    run_cli("--out", tmp_path, "--seeds", "0", "--rows", "pipa_pixel_st_sce", *TINY, launcher=ABLATION)
    start = json.loads((tmp_path / "seed0" / "pipa_pixel" / "config.json").read_text())
    assert (start["stage"], start["pipa"]["patch"], start["pipa"]["pixel"]) == ("pipa", False, True)   # the pixel contrast only
    assert start["pipa"]["init"] == str(tmp_path / "seed0" / "source_only" / "checkpoint.pt")
    config = json.loads((tmp_path / "seed0" / "pipa_pixel_st_sce" / "config.json").read_text())
    assert config["stage1"]["init"] == str(tmp_path / "seed0" / "pipa_pixel" / "checkpoint.pt")   # PiPa's model is its start


def test_the_bound_row_keeps_the_true_class_means(tmp_path):
    "st_sce_pd_true_prototypes starts stage 1 from the warm-up's true class means on the target, and momentum 1 keeps them."
    from proda_nb.ablation import ablation_base
    from proda_nb.data import dataset_from_config
    from proda_nb.models import network_from_checkpoint
    from proda_nb.prototypes import has_prototype, true_class_means
    run_cli("--out", tmp_path, "--seeds", "0", "--rows", "st_sce_pd_true_prototypes", *TINY, launcher=ABLATION)
    seed0 = tmp_path / "seed0"
    config = json.loads((seed0 / "st_sce_pd_true_prototypes" / "config.json").read_text())["stage1"]
    assert (config["init_prototypes"], config["proto_momentum"], config["denoise"]) == ("target_labels", 1.0, True)
    state = torch.load(seed0 / "st_sce_pd_true_prototypes" / "checkpoint.pt", weights_only=True)["stage"]["state"]
    base = ablation_base(TINY[1::2])
    warmup = network_from_checkpoint(base.model, seed0 / "warmup" / "checkpoint.pt")
    means = true_class_means(warmup, dataset_from_config(base.data, "target", "train", "plain"))
    known = has_prototype(means)
    torch.testing.assert_close(state["start_prototypes"][known], means[known], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(state["prototypes"][known], means[known], rtol=1e-5, atol=1e-5)
