"""`python -m proda_nb.train` without --stage: every stage of the chain on tiny SynthCity settings, results.json,
the figures, rerunning one stage of a finished chain, resuming an interrupted chain, and bad `run.pipeline` values."""
import json
from pathlib import Path

import pytest

from proda_nb.engine import get_config, load_checkpoint, stage_init, stage_output
from proda_nb.pipeline import pipeline_stages, stage_config, results_table
from conftest import TINY_CHAIN as TINY, run_cli as cli

PIPELINE_ORDER = ("source_only", "warmup", "stage1", "stage2", "stage3")          # the synthcity preset's chain


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    out = tmp_path_factory.mktemp("chain")
    return out, cli(*TINY, "--out", str(out))


def test_every_stage_runs_and_lands_in_results_json(chain):
    out, r = chain
    res = json.loads((out / "results.json").read_text())
    assert {"benchmark", "seed", "stages", "total_seconds"} <= set(res)
    assert (res["benchmark"], res["seed"]) == ("synthcity", 0)
    assert [s["name"] for s in res["stages"]] == list(PIPELINE_ORDER)
    for s in res["stages"]:
        assert 0.0 <= s["miou"] <= 100.0 and s["seconds"] > 0
        metrics = json.loads((out / s["name"] / "metrics.json").read_text())
        assert abs(metrics["miou"] - s["miou"]) < 1e-9                     # the row is the stage's own evaluation
    assert res["total_seconds"] >= sum(s["seconds"] for s in res["stages"]) - 0.05      # (rounded to 0.01 s)
    assert (out / "per_class_iou.png").stat().st_size > 0 and (out / "predictions.png").stat().st_size > 0
    for s in res["stages"]: assert f"{s['miou']:6.1f}" in r.stdout          # the printed table
    assert "paper GTA5->CS" in r.stdout and "57.5" in r.stdout


def test_each_stage_starts_from_the_previous_checkpoint(chain):
    out, _ = chain
    for prev, name in zip(PIPELINE_ORDER, PIPELINE_ORDER[1:]):
        ck = load_checkpoint(out / name / "checkpoint.pt")
        assert ck["config"][name]["init"] == str(out / prev / "checkpoint.pt")
        assert ck["stage"]["name"] == name


def test_rerun_one_stage_of_a_finished_chain(chain, tmp_path):
    import shutil
    out = tmp_path / "copy"; shutil.copytree(chain[0], out)                  # leave the shared chain as it was
    before = json.loads((out / "results.json").read_text())
    r = cli(*TINY, "--out", str(out), "--stage", "stage3", "--stage3.iters", "3")
    after = json.loads((out / "results.json").read_text())
    assert [s["name"] for s in after["stages"]] == list(PIPELINE_ORDER)
    assert after["stages"][:4] == before["stages"][:4]                       # the other rows are kept
    assert load_checkpoint(out / "stage3" / "checkpoint.pt")["iteration"] == 3
    assert "stage 3" in r.stdout


def test_interrupted_chain_resumes(tmp_path):
    out = tmp_path / "cut"
    cli(*TINY, "--out", str(out), "--run.pipeline", "source_only,warmup")
    done = json.loads((out / "results.json").read_text())
    r = cli(*TINY, "--out", str(out), "--run.pipeline", "source_only,warmup,stage1", "--resume")
    res = json.loads((out / "results.json").read_text())
    assert [s["name"] for s in res["stages"]] == ["source_only", "warmup", "stage1"]
    assert res["stages"][:2] == done["stages"]                               # finished stages were not retrained
    assert "== source_only" not in r.stdout and "== stage1" in r.stdout


def test_bad_pipeline_is_a_clear_error():
    r = cli("--run.pipeline", "source_only,stage1,source_only", ok=False)
    assert r.returncode == 2 and "each stage once" in r.stderr
    r = cli("--run.pipeline", "source_only,stage9", ok=False)
    assert r.returncode == 2 and "stage9" in r.stderr


def test_stage_config_chains_init_and_output():
    cfg = get_config()
    assert pipeline_stages(cfg) == list(PIPELINE_ORDER)
    c = stage_config(cfg, "stage1", "/r", "warmup")
    assert (c.stage, c.run.out, c.stage1.init) == ("stage1", "/r/stage1", "/r/warmup/checkpoint.pt")
    cfg.stage1.init = "/my/own.pt"
    assert stage_config(cfg, "stage1", "/r", "warmup").stage1.init == "/my/own.pt"   # an explicit init wins


def test_results_table_steps():
    res = {"benchmark": "synthcity", "seed": 1, "total_seconds": 3.0,
           "stages": [{"name": "source_only", "miou": 20.0, "seconds": 1.0},
                      {"name": "stage1", "miou": 31.5, "seconds": 2.0, "paper": ["ProDA stage 1", 53.7]}]}
    text = results_table(res)
    assert "+11.5" in text and "53.7" in text and "seed 1" in text


def test_two_processes_run_the_same_chain(tmp_path):
    "`--gpus 2` (two gloo processes, half of every batch each) trains the chain as one process with 2 micro-batches."
    import torch
    one, two = tmp_path / "one", tmp_path / "two"
    cli(*TINY, "--optim.accum_steps", "2", "--out", str(one))
    cli(*TINY, "--gpus", "2", "--out", str(two))
    for name in PIPELINE_ORDER:
        a, b = (torch.load(d / name / "checkpoint.pt", weights_only=True) for d in (one, two))
        assert (a["world_size"], b["world_size"]) == (1, 2)
        diff = max((a["model"][k].double() - b["model"][k].double()).abs().max().item()
                   for k in a["model"] if not k.endswith("num_batches_tracked"))
        assert diff <= 1e-3, (name, diff)                     # float reductions differ; the training does not
    first, last = (torch.load(one / n / "checkpoint.pt", weights_only=True)["model"] for n in ("source_only", "stage3"))
    assert max((first[k].double() - last[k].double()).abs().max().item() for k in first) > 1e-2   # the chain trained
    ra, rb = (json.loads((d / "results.json").read_text()) for d in (one, two))
    for sa, sb in zip(ra["stages"], rb["stages"]): assert abs(sa["miou"] - sb["miou"]) <= 0.5, (sa, sb)


def test_single_stage_runs_chain_through_out(tmp_path):
    "`--stage source_only --out OUT` then `--stage warmup --out OUT`: the warm-up starts from OUT/checkpoint.pt, writes OUT/warmup."
    cfg = get_config(); cfg.run.out = str(tmp_path)
    assert stage_init(cfg, "warmup") is None                                  # nothing there: the preset's initialisation
    (tmp_path / "checkpoint.pt").touch()
    init = stage_init(cfg, "warmup")
    assert init == tmp_path / "checkpoint.pt" and stage_output(cfg, "warmup", init) == tmp_path / "warmup"
    c = stage_config(cfg, "stage1", tmp_path, None)                           # a chain that starts at stage 1
    assert c.stage1.init == str(tmp_path / "checkpoint.pt") and c.run.out == str(tmp_path / "stage1")


def test_stop_after_in_a_chain_stops_like_a_killed_run(tmp_path):
    "`--stop-after N` stops the chain's first stage after step N: no table, no figures; `--resume` finishes the chain."
    out = tmp_path / "stop"
    r = cli(*TINY, "--out", str(out), "--run.pipeline", "source_only,warmup", "--stop-after", "2", "--run.ckpt_every", "1")
    assert "stopped after step 2 of source_only; continue with --resume" in r.stdout
    assert "paper GTA5->CS" not in r.stdout and not (out / "per_class_iou.png").exists()
    assert load_checkpoint(out / "source_only" / "checkpoint.pt")["iteration"] == 2
    cli(*TINY, "--out", str(out), "--run.pipeline", "source_only,warmup", "--resume")
    res = json.loads((out / "results.json").read_text())
    assert [s["name"] for s in res["stages"]] == ["source_only", "warmup"]
    assert load_checkpoint(out / "source_only" / "checkpoint.pt")["iteration"] == 3


def test_total_seconds_counts_one_commands_overhead(chain, tmp_path):
    "After `--stage X` on a finished chain, total = the rows' seconds + that command's own overhead, not the earlier one's."
    import shutil, time
    out = tmp_path / "copy"; shutil.copytree(chain[0], out)
    t0 = time.time()
    cli(*TINY, "--out", str(out), "--stage", "stage3")
    wall = time.time() - t0
    after = json.loads((out / "results.json").read_text())
    rows = sum(s["seconds"] for s in after["stages"])
    stage3 = next(s for s in after["stages"] if s["name"] == "stage3")["seconds"]
    assert 0 <= after["total_seconds"] - rows <= wall - stage3 + 0.05
