"""The class-wise memory bank (`proda_nb.memory_bank`): the memory contrast against a hand example with and without
quality scores, a memory that keeps the highest-scored features (not the public code's lowest), the teacher's
candidates (right and confident), the memory filled from them by a training step, the settings and the recipe, and
`--stage memory_bank` after a SIGKILL, under `--gpus 2` and with the real presets (DeepLab-R101) on fixture folders."""
import json, math
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from conftest import SMALL_REAL_RUN, TINY_RUN, kill_and_resume, max_diff, run_cli
from test_real_data_training import make_root
from proda_nb.engine import get_config, get_stage, mix_seed, Trainer
from proda_nb.memory_bank import (ClassMemory, ClassSelectors, MemoryBank, MemoryBankConfig, check_memory_bank_settings,
                                  memory_candidates, memory_contrast_loss, quality_weights, ranked_candidates)
from proda_nb.models import SegOutput
from proda_nb.pipeline import get_recipe


def ck(out):
    return torch.load(Path(out) / "checkpoint.pt", weights_only=True)


# student features: p0 = (1,0), p1 = (0,1) of class 0, p2 = (1,0) of class 1, and an ignored pixel;
# memory: class 0 {(1,0), (0,1)}, class 1 {(-1,0)}, class 2 {(1,1)} (no student feature of class 2: no part)
P = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.3, 0.3]])
Y = torch.tensor([0, 0, 1, 255])
MEMORY = {0: torch.tensor([[1.0, 0.0], [0.0, 1.0]]), 1: torch.tensor([[-1.0, 0.0]]), 2: torch.tensor([[1.0, 1.0]])}


def test_memory_contrast_by_hand_without_scores():
    # class 0: 1 - cos = [[0, 1], [1, 0]] -> mean 0.5; class 1: 1 - cos((1,0), (-1,0)) = 2; loss (0.5 + 2) / 2 = 1.25
    assert math.isclose(memory_contrast_loss(P, Y, MEMORY).item(), 1.25, rel_tol=1e-6)
    assert math.isclose(memory_contrast_loss(4 * P, Y, {c: 0.5 * z for c, z in MEMORY.items()}).item(), 1.25, rel_tol=1e-6)
    assert memory_contrast_loss(P, torch.full((4,), 255), MEMORY).item() == 0.0


def test_memory_contrast_by_hand_with_scores():
    # feature scores 0.75, 0.25 (class 0) -> w = 2 * (0.75, 0.25) / 1.0 = (1.5, 0.5); 0.5 (class 1, alone) -> w = 1
    # memory scores 0.2, 0.6 (class 0) -> w = 2 * (0.2, 0.6) / 0.8 = (0.5, 1.5); 0.9 (class 1, alone) -> w = 1
    # class 0: D = [[1.5*0.5*0, 1.5*1.5*1], [0.5*0.5*1, 0.5*1.5*0]] = [[0, 2.25], [0.25, 0]] -> mean 0.625
    # class 1: D = 1 * 1 * 2 = 2; loss = (0.625 + 2) / 2 = 1.3125
    scores = torch.tensor([0.75, 0.25, 0.5, 0.01])
    memory_scores = {0: torch.tensor([0.2, 0.6]), 1: torch.tensor([0.9]), 2: torch.tensor([0.3])}
    assert math.isclose(memory_contrast_loss(P, Y, MEMORY, scores, memory_scores).item(), 1.3125, rel_tol=1e-6)
    assert torch.allclose(quality_weights(torch.tensor([0.2, 0.6])), torch.tensor([0.5, 1.5]))
    # scores only on one side: class 0 = (1.5*1 + 0.5*1) / 4 = 0.5 (the weights average 1 over a row of 0/1 distances)
    assert math.isclose(memory_contrast_loss(P, Y, MEMORY, scores).item(), (0.5 + 2) / 2, rel_tol=1e-6)


def test_memory_keeps_the_highest_scored_newest_first():
    memory = ClassMemory(num_classes=2, dim=1, size=3, per_update=2)
    memory.add(torch.tensor([[1.0], [2.0], [3.0], [4.0], [8.0]]), torch.tensor([0, 0, 0, 0, 255]),
               torch.tensor([0.1, 0.9, 0.5, 0.7, 1.0]))
    assert memory[0].flatten().tolist() == [2.0, 4.0]                        # scores 0.9 and 0.7, not 0.1 and 0.5
    memory.add(torch.tensor([[5.0], [6.0], [7.0]]), torch.tensor([0, 0, 1]), torch.tensor([0.2, 0.3, 0.4]))
    assert memory[0].flatten().tolist() == [6.0, 5.0, 2.0]                   # new ones first; size 3 drops the oldest
    assert memory[1].flatten().tolist() == [7.0] and sorted(memory.as_dict()) == [0, 1]
    again = ClassMemory(2, 1, 3, 2); again.load_state_dict(memory.state_dict())
    assert torch.equal(again[0], memory[0])
    f, s = ranked_candidates(torch.arange(5.0)[:, None], torch.tensor([1, 1, 1, 0, 255]), torch.tensor([0.2, 0.8, 0.5, 0.1, 0.9]), 2, 2)
    assert f[..., 0].tolist() == [[3.0, 0.0], [1.0, 2.0]] and torch.allclose(s, torch.tensor([[0.1, -1.0], [0.8, 0.5]]))


def test_teacher_candidates_are_right_and_confident():
    # cells (1,0), (0,1), (1,1) labelled 0; the teacher: class 0 at e^4/(e^4+1) = 0.98 (kept), class 1 at 0.98 (wrong),
    # class 0 at e/(e+1) = 0.73 (unsure)
    feats = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]]).view(1, 2, 1, 3)
    logits = torch.tensor([[4.0, 0.0, 1.0], [0.0, 4.0, 0.0]]).view(1, 2, 1, 3)
    f, c = memory_candidates(SegOutput(feats, logits), nn.Identity(), torch.zeros(1, 1, 3, dtype=torch.long), 0.95)
    assert f.tolist() == [[1.0, 0.0]] and c.tolist() == [0]
    f, c = memory_candidates(SegOutput(feats, logits), nn.Identity(), None, 0.95)          # target: labelled by the teacher
    assert c.tolist() == [0, 1]
    f, c = memory_candidates(SegOutput(feats, logits), nn.Identity(), torch.zeros(1, 1, 3, dtype=torch.long), 0.5)
    assert c.tolist() == [0, 0]


def test_selectors_score_in_unit_interval_and_weights_average_one():
    torch.manual_seed(0)
    sel = ClassSelectors(3, 8)
    x, y = torch.randn(7, 8), torch.tensor([0, 0, 0, 2, 2, 1, 255])
    s = sel.score(x, y)
    assert ((s > 0) & (s < 1)).all() and s[5] == 0.5 and s[6] == 0.5       # a lone class-1 feature, the ignore label
    assert math.isclose(quality_weights(s[:3]).mean().item(), 1.0, rel_tol=1e-6)


def tiny_trainer(out, init, **settings):
    cfg = get_config("synthcity"); cfg.stage = "memory_bank"
    cfg.optim.batch_size, cfg.data.synthcity_n, cfg.data.max_val = 4, 8, 2
    cfg.run.out, cfg.run.progress, cfg.run.tensorboard, cfg.run.ckpt_every = str(out), False, False, 0
    cfg.memory_bank.init, cfg.memory_bank.iters = str(init), 2
    for k, v in settings.items(): setattr(cfg.memory_bank, k, v)
    return Trainer(cfg)


def test_a_step_fills_the_memory_with_the_teachers_best_candidates(random_init, tmp_path):
    tr = tiny_trainer(tmp_path, random_init, memory_threshold=0.0, per_update=4)
    src, tgt = (next(iter(tr._loader(k, i))) for i, k in enumerate(("source", "target")))
    torch.manual_seed(mix_seed(tr.cfg.run.seed, 0, 0))
    f, s = tr.stage.step_candidates({"source": src, "target": tgt})          # the teacher before the step, the same batch
    teacher = tr.stage.teacher(src["image"])
    z = tr.stage.teacher_projector(teacher.features)
    tr.train_step(src, tgt)
    memory = tr.stage.memory
    for c in range(19):
        n = int((s[c] >= 0).sum())
        assert memory.counts[c] == n <= 4
        assert torch.allclose(memory[c], f[c, :n])
        if n: assert (s[c, :n][:-1] >= s[c, :n][1:]).all()                     # best first
    # every stored feature is the teacher's projection of a source pixel it predicted as its label
    stored = torch.cat([memory[c] for c in range(19) if memory.counts[c]])
    flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
    assert len(stored) > 0 and all(((flat - x).abs().max(1).values < 1e-6).any() for x in stored)


# -- settings, registration, recipe -----------------------------------------------------------------------------------
def test_settings_presets_and_bad_values():
    s, r = get_config("synthcity").memory_bank, get_config("gta5_to_cityscapes").memory_bank
    assert (s.iters, s.memory_size, s.per_update) == (500, 64, 16)
    assert (r.source_weight, r.target_weight, r.memory_size, r.memory_threshold, r.proj_dim, r.bn_stats) == (0.2, 0.2, 256, 0.95, 256, "all")
    assert get_stage("memory_bank") is MemoryBank and MemoryBank.init == "required"
    for bad, match in (({"per_update": 500}, "memory_bank.per_update=500"), ({"pseudo_threshold": -1}, "memory_bank.pseudo_threshold"),
                       ({"source_weight": 0, "target_weight": 0}, "both 0"), ({"proj_dim": 0}, "memory_bank.proj_dim")):
        with pytest.raises(ValueError, match=match): check_memory_bank_settings(MemoryBankConfig(**bad))
    rec = get_recipe("memory_bank")
    assert rec.stages == ("memory_bank",) and rec.family == "contrastive" and rec.published is None


def test_cli_bad_value_is_one_line(random_init, tmp_path):
    r = run_cli("--stage", "memory_bank", "--memory_bank.init", random_init, "--memory_bank.memory_size", "8", *TINY_RUN,
                "--out", tmp_path, ok=False)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("error: memory_bank.per_update=16 must be <=")


TINY_MEMORY = [*TINY_RUN, "--memory_bank.iters", "3", "--run.ckpt_every", "0", "--memory_bank.memory_threshold", "0",
               "--memory_bank.pseudo_threshold", "0", "--memory_bank.memory_from_target", "true"]


def test_resumes_exactly_after_a_kill(random_init, tmp_path):
    args = ["--stage", "memory_bank", "--memory_bank.init", random_init, *TINY_RUN, "--memory_bank.iters", "30",
            "--run.ckpt_every", "5", "--memory_bank.memory_threshold", "0"]
    full, killed = kill_and_resume(args, tmp_path, iters=30)
    a, b = ck(full), ck(killed)
    assert b["iteration"] == 30 and max_diff(a["model"], b["model"]) == 0.0
    sa, sb = a["stage"]["state"], b["stage"]["state"]
    for key in ("ema_model", "projector", "predictor", "selectors", "teacher_projector", "memory"):
        assert max_diff(sa[key], sb[key]) == 0.0, key
    assert sa["memory"]["counts"].sum() > 0


def test_two_processes_train_as_one_with_two_micro_batches(random_init, tmp_path):
    args = ["--stage", "memory_bank", "--memory_bank.init", random_init, *TINY_MEMORY]
    run_cli(*args, "--gpus", "2", "--out", tmp_path / "two")
    run_cli(*args, "--optim.accum_steps", "2", "--out", tmp_path / "one")
    a, b = ck(tmp_path / "two"), ck(tmp_path / "one")
    assert (a["world_size"], b["world_size"]) == (2, 1)
    same = lambda x, y: max_diff(x, y, counters=False)
    sa, sb = a["stage"]["state"], b["stage"]["state"]
    assert same(a["model"], b["model"]) <= 1e-5
    for key in ("ema_model", "projector", "predictor", "selectors", "teacher_projector"):
        assert same(sa[key], sb[key]) <= 1e-5, key
    assert torch.equal(sa["memory"]["counts"], sb["memory"]["counts"]) and sa["memory"]["counts"].sum() > 0
    assert same(sa["memory"], sb["memory"]) <= 1e-5


@pytest.mark.parametrize("config,source", [("gta5_to_cityscapes", "gta5"), ("synthia_to_cityscapes", "synthia")])
def test_real_presets_on_fixture_folders(tmp_path, config, source):
    "Source-only, then the memory bank from it, on GTA5 / SYNTHIA -> Cityscapes fixture folders with the preset's DeepLab-R101."
    make_root(tmp_path / "data", source)
    out = tmp_path / "out"
    common = ["--config", config, "--data-root", tmp_path / "data", "--out", out, *SMALL_REAL_RUN, "--run.log_every", "1"]
    run_cli(*common, "--stage", "source_only", "--schedule.iters", "1")
    r = run_cli(*common, "--stage", "memory_bank", "--memory_bank.iters", "2", "--memory_bank.memory_threshold", "0")
    assert "target val mIoU" in r.stdout
    cfg = json.loads((out / "memory_bank" / "config.json").read_text())
    assert cfg["model"]["name"] == "deeplab_r101" and cfg["memory_bank"]["memory_size"] == 256 and cfg["memory_bank"]["bn_stats"] == "all"
    log = [json.loads(l) for l in (out / "memory_bank" / "log.jsonl").read_text().splitlines() if '"loss"' in l]
    assert log[-1]["memory_classes"] > 0 and math.isfinite(log[-1]["loss_memory_source"])
    state = ck(out / "memory_bank")["stage"]["state"]
    K = 16 if source == "synthia" else 19
    assert state["memory"]["features"].shape == (K, 256, 256) and len(state["selectors"]) > 0
