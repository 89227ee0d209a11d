"""CBST's self-training rounds (`--stage cbst`): the portion and learning-rate schedule, one round's labels against a
hand-built example (class-balanced and global thresholds), the spatial prior by hand, the round reports, and the
command line: alone, in a chain after source-only, stopped inside a round and resumed to the same weights, under
`--gpus 2`, and with the real presets on fixture folders."""
import json, math
from collections import namedtuple
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from conftest import SMALL_REAL_RUN, SYNTHCITY_NET, TINY_RUN, max_diff, run_cli
from test_real_data_training import make_root
from proda_nb.cbst import (Cbst, CbstConfig, apply_spatial_prior, cbst_paper, check_cbst_settings, label_round,
                           policy_shares, round_lr_factor, round_of, round_portion, round_statistics, round_thresholds,
                           spatial_prior)
from proda_nb.engine import get_config, get_stage
from proda_nb.labels import IGNORE_INDEX as I
from proda_nb.pseudo_labels import VALUE_MAX, cbst_labels

Out = namedtuple("Out", "features logits")


class FixedLogits(nn.Module):
    "Returns the logits stored for each image (the images hold their index in every pixel)."
    def __init__(self, logits): super().__init__(); self.table = logits
    def forward(self, x): return Out(None, self.table[x[:, 0, 0, 0].long()])


# eight pixels, three classes (two images of 1x4): the example worked by hand in the notebook
EXAMPLE = torch.tensor([[0.9, 0.05, 0.05], [0.8, 0.1, 0.1], [0.7, 0.2, 0.1], [0.6, 0.3, 0.1],
                        [0.1, 0.85, 0.05], [0.3, 0.65, 0.05], [0.2, 0.3, 0.5], [0.3, 0.25, 0.45]]).view(2, 1, 4, 3).permute(0, 3, 1, 2)
IMAGES = [{"image": torch.full((3, 2, 2), float(i)), "name": f"img{i}"} for i in range(2)]


# -- the schedule ---------------------------------------------------------------------------------------------------
def test_portion_schedule():
    assert [round_portion(r) for r in range(7)] == [0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5]
    assert round_portion(12) == 0.5                                           # capped
    assert [round_portion(r, start=0.15) for r in (0, 1, 5, 7, 8)] == [0.15, 0.2, 0.4, 0.5, 0.5]
    assert [round_of(i, 10, 3) for i in (0, 9, 10, 29, 30, 31)] == [0, 0, 1, 2, 2, 2]
    assert [round(round_lr_factor(r), 6) for r in range(3)] == [1.0, 0.707107, 0.5]
    stage = Cbst(); stage.settings = CbstConfig(rounds=3, round_iters=10)
    assert [stage.lr_factor(i) for i in (0, 9, 10, 20, 30)] == [1.0, 1.0, 2 ** -0.5, 0.5, 0.5]


def test_settings_fill_iters_and_refuse_bad_values():
    cfg = get_config("synthcity")
    s = Cbst().bind(cfg)
    assert (s.rounds, s.round_iters, s.iters, cfg.cbst.iters) == (3, 100, 300, 300)
    with pytest.raises(ValueError, match="cbst.iters=7"): check_cbst_settings(CbstConfig(iters=7))
    with pytest.raises(ValueError, match="cbst.policy"): check_cbst_settings(CbstConfig(policy="median"))
    with pytest.raises(ValueError, match="cbst.rounds"): check_cbst_settings(CbstConfig(rounds=0))
    r, y = get_config("gta5_to_cityscapes").cbst, get_config("synthia_to_cityscapes").cbst
    assert (r.portion_start, r.portion_step, r.portion_max, r.rounds) == (0.15, 0.05, 0.5, 6)
    assert y.portion_start == 0.2
    assert get_stage("cbst") is Cbst and Cbst.init == "required"
    assert [cbst_paper(CbstConfig(policy=p, spatial_prior=sp)).miou
            for p, sp in (("global", False), ("cbst", False), ("cbst", True))] == [41.5, 45.2, 46.2]


def test_recipes():
    from proda_nb.pipeline import get_recipe
    for name, options, miou in (("st", {"cbst.policy": "global"}, 41.5), ("cbst", {"cbst.policy": "cbst"}, 45.2),
                                ("cbst_sp", {"cbst.policy": "cbst", "cbst.spatial_prior": True}, 46.2)):
        rec = get_recipe(name)
        assert rec.stages == ("cbst",) and rec.options == options and rec.family == "pseudo labels"
        assert (rec.published.miou, rec.published.network) == (miou, "ResNet-38")


# -- one round, by hand -------------------------------------------------------------------------------------------
def test_thresholds_and_labels_by_hand():
    # CBST: k = (0.8, 0.85, 0.5), the floor(0.5 N_c)-th largest confidence of each class; global: 0.7, the 4th of 8
    assert torch.allclose(round_thresholds(EXAMPLE, 0.5, "cbst"), torch.tensor([0.8, 0.85, 0.5]))
    assert torch.allclose(round_thresholds(EXAMPLE, 0.5, "global"), torch.full((3,), 0.7))
    shares = policy_shares(EXAMPLE, 0.5)
    assert shares["cbst"].tolist() == [0.5, 0.5, 0.5] and shares["global"].tolist() == [0.75, 0.5, 0.0]


@pytest.mark.parametrize("policy,expected", [("cbst", [[[0, 0, I, I]], [[1, I, 2, I]]]),
                                             ("global", [[[0, 0, 0, I]], [[1, I, I, I]]])])
def test_one_round_labels_against_a_hand_built_example(tmp_path, policy, expected):
    store, k = label_round(FixedLogits(EXAMPLE.log()), IMAGES, tmp_path / "round.bin", "hand", 0.5, policy, top_k=3)
    hand = [0.8, 0.85, 0.5] if policy == "cbst" else [0.7] * 3
    assert torch.allclose(k, torch.tensor(hand), atol=1 / VALUE_MAX)           # the store's 11-bit confidences
    assert cbst_labels(store[[0, 1]], k).tolist() == expected
    truth = torch.tensor([[[0, 0, 1, 0]], [[1, 1, 2, 1]]], dtype=torch.uint8)
    st = round_statistics(store, {policy: k}, truth)
    assert st["predicted"] == [4, 2, 2] and st["pixels"] == 8
    assert st["labelled"][policy] == ([2, 1, 1] if policy == "cbst" else [3, 1, 0])
    assert st["correct"][policy] == ([2, 1, 1] if policy == "cbst" else [2, 1, 0])


def test_spatial_prior_by_hand(tmp_path):
    prior = spatial_prior([torch.tensor([[0, 1]]), torch.tensor([[0, 0]]), torch.tensor([[I, I]])], 2, (1, 2))
    assert torch.allclose(prior[:, 0, 0], torch.tensor([0.75, 0.25])) and torch.allclose(prior[:, 0, 1], torch.tensor([0.5, 0.5]))
    p = torch.tensor([0.4, 0.6]).view(1, 2, 1, 1).expand(1, 2, 1, 2)
    assert torch.allclose(apply_spatial_prior(p, prior)[0, :, 0, 0], torch.tensor([2 / 3, 1 / 3]))
    # through the round: the store holds p * q renormalised, and the left pixel's label flips to class 0
    store, k = label_round(FixedLogits(p.log()), IMAGES[:1], tmp_path / "sp.bin", "sp", 1.0, "cbst", prior=prior, top_k=2)
    assert torch.allclose(store[0][0, :, 0, 0], torch.tensor([2 / 3, 1 / 3]), atol=1 / VALUE_MAX)
    assert store.argmax(0).tolist() == [[[0, 1]]]


# -- the command line ---------------------------------------------------------------------------------------------
def cbst_args(init, rounds=2, round_iters=2, *extra):
    return ["--stage", "cbst", "--cbst.init", init, "--cbst.rounds", str(rounds), "--cbst.round_iters", str(round_iters),
            *TINY_RUN, "--run.log_every", "1", *extra]


def read_log(out):
    return [json.loads(l) for l in (Path(out) / "log.jsonl").read_text().splitlines()]


def test_cli_alone(tmp_path, random_init):
    out = tmp_path / "alone"
    r = run_cli(*cbst_args(random_init), "--run.ckpt_every", "0", "--out", out)
    assert "[cbst, 4 steps" in r.stdout
    config = json.loads((out / "config.json").read_text())
    assert config["cbst"]["iters"] == 4 and config["schedule"]["iters"] == 4
    log = read_log(out)
    reports = [x for x in log if "round" in x]
    assert [(x["round"], x["iteration"], x["portion"]) for x in reports] == [(0, 0, 0.2), (1, 2, 0.25)]
    assert all(len(x["thresholds"]) == 19 and 0 <= x["pseudo_label_accuracy"] <= 1 for x in reports)
    lrs = [x["lr"] for x in log if "lr" in x]                              # after step i: the lr of step i + 1
    assert math.isclose(lrs[1] / lrs[0], ((1 - 2 / 4) / (1 - 1 / 4)) ** 0.9 / math.sqrt(2), rel_tol=1e-6)
    state = torch.load(out / "checkpoint.pt", weights_only=True)["stage"]["state"]
    assert state["round"] == 1 and state["thresholds"].shape == (19,) and "round 1" in state["store"]
    assert (out / "cbst_labels_round1.bin").is_file()
    bad = run_cli(*cbst_args(random_init), "--cbst.iters", "5", "--out", tmp_path / "bad", ok=False)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith("error: cbst.iters=5")


def test_cli_in_a_chain_after_source_only(tmp_path):
    out = tmp_path / "chain"
    r = run_cli("--run.pipeline", "source_only,cbst", "--schedule.iters", "3", "--cbst.rounds", "2", "--cbst.round_iters", "1",
                "--cbst.policy", "global", *TINY_RUN, "--run.ckpt_every", "0", "--out", out)
    res = json.loads((out / "results.json").read_text())
    assert [s["name"] for s in res["stages"]] == ["source_only", "cbst"]
    assert res["stages"][1]["paper"][1] == 41.5 and "CBST (self-training rounds)" in r.stdout   # the ST row
    ck = torch.load(out / "cbst" / "checkpoint.pt", weights_only=True)
    assert ck["config"]["cbst"]["init"] == str(out / "source_only" / "checkpoint.pt")
    reports = [x for x in read_log(out / "cbst") if "round" in x]
    assert [x["policy"] for x in reports] == ["global", "global"]
    assert all(x["labelled_share"] == sum(x["labelled_global"]) / x["pixels"] for x in reports)   # the active policy's


@pytest.mark.parametrize("ckpt_every,stop_after", [(2, 4), (3, 3)])
def test_cli_stopped_inside_a_round_resumes_to_the_same_weights(tmp_path, random_init, ckpt_every, stop_after):
    "Rounds of 3 steps: stopped at 4 (inside round 1, whose store is on disk) or at 3 (the round boundary)."
    args = cbst_args(random_init, 2, 3, "--cbst.spatial_prior", "true", "--run.ckpt_every", str(ckpt_every))
    run_cli(*args, "--out", tmp_path / "full")
    run_cli(*args, "--stop-after", str(stop_after), "--out", tmp_path / "cut")
    state = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)["stage"]["state"]
    assert state["round"] == (1 if stop_after == 4 else 0) and state["prior"].shape == (19, 64, 128)
    run_cli(*args, "--resume", "--out", tmp_path / "cut")
    a, b = (torch.load(tmp_path / d / "checkpoint.pt", weights_only=True) for d in ("full", "cut"))
    assert b["iteration"] == 6 and max_diff(a["model"], b["model"]) == 0.0
    assert torch.equal(a["stage"]["state"]["thresholds"], b["stage"]["state"]["thresholds"])
    assert torch.equal(a["stage"]["state"]["prior"], b["stage"]["state"]["prior"])
    reports = [x["round"] for x in read_log(tmp_path / "cut") if "round" in x]
    assert reports == [0, 1]                  # inside a round the resume reopened its store, it did not relabel


def test_cli_two_processes_equal_one_with_two_micro_batches(tmp_path, random_init):
    args = cbst_args(random_init, 2, 2, "--cbst.spatial_prior", "true", "--run.ckpt_every", "0")
    run_cli(*args, "--gpus", "2", "--out", tmp_path / "two")
    run_cli(*args, "--optim.accum_steps", "2", "--out", tmp_path / "one")
    a, b = (torch.load(tmp_path / d / "checkpoint.pt", weights_only=True) for d in ("two", "one"))
    assert (a["world_size"], b["world_size"]) == (2, 1)
    skip = lambda sd: {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}
    assert max_diff(skip(a["model"]), skip(b["model"])) <= 1e-5
    assert torch.allclose(a["stage"]["state"]["thresholds"], b["stage"]["state"]["thresholds"], atol=1e-6)


@pytest.mark.parametrize("config,source,portion", [("gta5_to_cityscapes", "gta5", 0.15), ("synthia_to_cityscapes", "synthia", 0.2)])
def test_real_presets_on_fixture_folders(tmp_path, config, source, portion):
    "Source-only, then CBST from it, on GTA5 / SYNTHIA -> Cityscapes fixture folders with the preset's CBST settings."
    make_root(tmp_path / "data", source)
    out = tmp_path / "out"
    common = ["--config", config, "--data-root", tmp_path / "data", "--out", out, *SMALL_REAL_RUN, *SYNTHCITY_NET,
              "--optim.lr", "0.01"]
    # two single-stage runs
    run_cli(*common, "--stage", "source_only", "--schedule.iters", "2")
    r = run_cli(*common, "--stage", "cbst", "--cbst.rounds", "2", "--cbst.round_iters", "1", "--cbst.crop", "48,24",
                "--cbst.spatial_prior", "true", "--cbst.prior_size", "32,16")
    assert "target val mIoU" in r.stdout
    config_json = json.loads((out / "cbst" / "config.json").read_text())
    assert config_json["cbst"]["portion_start"] == portion and config_json["data"]["target"] == "cityscapes"
    reports = [x for x in read_log(out / "cbst") if "round" in x]
    K = 16 if source == "synthia" else 19
    assert [x["portion"] for x in reports] == [portion, round(portion + 0.05, 10)]
    assert all(len(x["thresholds"]) == K and "pseudo_label_accuracy" not in x for x in reports)   # grade off: no target labels read
