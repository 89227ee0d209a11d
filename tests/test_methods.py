"""The methods table: rows run in their own processes from the seed's shared source-only model, methods.json's schema,
the cost ratio measured against source-only, finished rows skipped on a second run, rows claimed by a live process
left to it, and a row that waits for the row it starts from."""
import json, os, socket, subprocess, sys, time

from conftest import run_cli

TINY = ["--set", "schedule.iters=4", "--set", "warmup.iters=3", "--set", "optim.batch_size=4", "--set", "data.synthcity_n=16",
        "--set", "data.max_val=4", "--set", "run.tensorboard=false", "--set", "run.log_every=2"]


def test_methods_table_runs_skips_and_reports(tmp_path):
    out = tmp_path / "methods"
    args = ["--out", out, "--seeds", "0", "1", "--rows", "adabn,adaptsegnet", *TINY]
    r = run_cli(*args, launcher=(sys.executable, "-m", "proda_nb.methods"))
    res = json.loads((out / "methods.json").read_text())
    assert set(res) == {"benchmark", "seeds", "rows", "cost"} and res["seeds"] == [0, 1]
    assert [row["name"] for row in res["rows"]] == ["source_only", "adabn", "adaptsegnet"]    # source-only: always, first
    for row in res["rows"]:
        assert {"name", "miou_mean", "miou_std", "per_seed", "step_seconds_ratio", "peak_rss_mb"} <= set(row)
        assert set(row["per_seed"]) == {"0", "1"} and row["peak_rss_mb"] > 0
    src, ada, adv = res["rows"]
    assert src["step_seconds_ratio"] == 1.0 and ada["step_seconds_ratio"] is None       # AdaBN trains no step
    assert adv["step_seconds_ratio"] > 1.0                    # a warm-up step: two passes and a discriminator
    assert adv["published"][1] == 42.4 and "AdaptSegNet" in r.stdout
    # the adapted rows started from the seed's source-only model
    ck = json.loads((out / "seed0" / "adaptsegnet" / "warmup" / "config.json").read_text())
    assert ck["warmup"]["init"] == str(out / "seed0" / "source_only" / "source_only" / "checkpoint.pt")
    before = {p: p.stat().st_mtime for p in out.rglob("row.json")}
    run_cli(*args, "--cost", "--cost-steps", "1", "--cost-rounds", "1", launcher=(sys.executable, "-m", "proda_nb.methods"))
    assert {p: p.stat().st_mtime for p in out.rglob("row.json")} == before                      # everything finished: skipped
    cost, res = json.loads((out / "cost.json").read_text()), json.loads((out / "methods.json").read_text())
    assert set(cost["ratio"]) == {"source_only", "adaptsegnet"} and cost["ratio"]["source_only"] == 1.0
    assert cost["ratio"]["adaptsegnet"] > 1.0                 # measured in one run: the warm-up step still costs more
    rows = {r["name"]: r for r in res["rows"]}
    assert rows["adaptsegnet"]["step_seconds_ratio"] == cost["ratio"]["adaptsegnet"] and res["cost"]["how"] == "measured in one run"


def test_methods_rows_claimed_by_a_live_process_are_left_to_it(tmp_path):
    out = tmp_path / "methods"
    args = ["--out", out, "--seeds", "0", "--rows", "adabn", *TINY]
    run_cli(*args, launcher=(sys.executable, "-m", "proda_nb.methods"))
    host = socket.gethostname()
    (out / "seed0" / "adabn" / "row.json").unlink()
    (out / "seed0" / "adabn" / "row.lock").write_text(f"{host} pid {os.getpid()}")   # this live test process
    r = run_cli(*args, launcher=(sys.executable, "-m", "proda_nb.methods"))
    assert "adabn: being trained by" in r.stdout and not (out / "seed0" / "adabn" / "row.json").exists()
    assert [row["name"] for row in json.loads((out / "methods.json").read_text())["rows"]] == ["source_only"]
    dead = subprocess.Popen([sys.executable, "-c", "pass"]); dead.wait()
    (out / "seed0" / "adabn" / "row.lock").write_text(f"{host} pid {dead.pid}")                 # its process died: stale
    run_cli(*args, launcher=(sys.executable, "-m", "proda_nb.methods"))
    assert (out / "seed0" / "adabn" / "row.json").is_file() and not (out / "seed0" / "adabn" / "row.lock").exists()


def test_a_row_that_begins_with_a_finished_row_starts_from_its_stages(tmp_path):
    "proda after proda_stage1 copies its warm-up and stage 1 and ends with the weights proda trained alone ends with."
    import torch
    shared, alone = tmp_path / "shared", tmp_path / "alone"
    lock = shared / "seed0" / "proda_stage1" / "row.lock"                 # proda_stage1 claimed by this live process
    lock.parent.mkdir(parents=True); lock.write_text(f"{socket.gethostname()} pid {os.getpid()}")
    proc = subprocess.Popen([sys.executable, "-m", "proda_nb.methods", "--out", str(shared), "--seeds", "0", "--rows", "proda_stage1,proda", *TINY],
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while not (shared / "seed0" / "source_only" / "row.json").is_file() and time.time() < deadline: time.sleep(0.5)
    time.sleep(3)
    assert not (shared / "seed0" / "proda").exists()                      # proda waits for the row it starts from ...
    lock.unlink()                                                         # ... whose claim goes: this process trains it
    log = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0, log[-3000:]
    assert "seed 0 proda: waiting for proda_stage1" in log, log
    run_cli("--out", alone, "--seeds", "0", "--rows", "proda", *TINY, launcher=(sys.executable, "-m", "proda_nb.methods"))
    row = json.loads((shared / "seed0" / "proda" / "row.json").read_text())
    assert row["shared_from"] == "proda_stage1" and "shared_from" not in json.loads((alone / "seed0" / "proda" / "row.json").read_text())
    assert json.loads((shared / "seed0" / "proda" / "shared.json").read_text())["stages"] == ["warmup", "stage1"]
    a, b = (torch.load(r / "seed0" / "proda" / "stage3" / "checkpoint.pt", weights_only=True)["model"] for r in (shared, alone))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert row["steps"] == json.loads((alone / "seed0" / "proda" / "row.json").read_text())["steps"]   # the copied stages' steps count
