"""Self-ensembling (`proda_nb.mean_teacher`): the consistency loss by hand, the ramp-up and the teacher's momentum,
perturbations, the EMA teacher, translated source from a tgcf generator, the recipes, and `--stage mean_teacher` alone,
in chains after source-only (and after tgcf), after a SIGKILL, under `--gpus 2`, and on the real presets' fixture folders."""
import json, math
from pathlib import Path

import pytest
import torch

from conftest import SMALL_REAL_RUN, SYNTHCITY_NET, TINY_RUN, kill_and_resume, max_diff, run_cli
from proda_nb.mean_teacher import (consistency_loss, sigmoid_rampup, ema_momentum_at, gaussian_noise, feature_dropout,
                                   classifier_of, MeanTeacher)
from proda_nb.models import SynthCityNet, DeepLab
from proda_nb.pipeline import get_recipe
from test_real_data_training import make_root

TINY_MT = [*TINY_RUN, "--mean_teacher.iters", "3", "--run.ckpt_every", "0"]


def ck(out):
    return torch.load(Path(out) / "checkpoint.pt", weights_only=True)


# -- the loss and its schedule --------------------------------------------------------------------------------------
def test_consistency_loss_on_a_hand_example_and_zero_for_equal_logits():
    # pixel 1: student (0, 0) -> (1/2, 1/2), teacher (ln 3, 0) -> (3/4, 1/4): 1/16 + 1/16 = 1/8; pixel 2: equal -> 0
    student = torch.zeros(1, 2, 1, 2, requires_grad=True)
    teacher = torch.tensor([[math.log(3), 0.0], [0.0, 0.0]]).view(1, 2, 1, 2)
    loss = consistency_loss(student, teacher)
    assert math.isclose(loss.item(), 0.0625, rel_tol=1e-6)
    loss.backward()
    assert torch.allclose(student.grad.view(2, 2).T, torch.tensor([[-0.125, 0.125], [0.0, 0.0]]), atol=1e-7)
    g = torch.Generator().manual_seed(0)
    z = 5 * torch.randn(2, 19, 4, 6, generator=g)
    assert consistency_loss(z, z.clone()).item() == 0.0
    assert consistency_loss(z, -z).item() <= 2.0                              # two probability vectors: at most 2 apart (squared)


def test_consistency_loss_gives_the_teacher_no_gradient():
    s, t = torch.randn(1, 3, 2, 2, requires_grad=True), torch.randn(1, 3, 2, 2, requires_grad=True)
    consistency_loss(s, t).backward()
    assert s.grad is not None and t.grad is None


def test_rampup_and_momentum_warmup():
    assert math.isclose(sigmoid_rampup(0, 10), math.exp(-5)) and sigmoid_rampup(10, 10) == 1.0 == sigmoid_rampup(99, 10)
    assert math.isclose(sigmoid_rampup(5, 10), math.exp(-1.25))
    assert [ema_momentum_at(t, 0.99) for t in (1, 3, 99, 100, 5000)] == [0.5, 0.75, 0.99, 0.99, 0.99]


def test_perturbations_are_seeded_and_differ_between_draws():
    net = SynthCityNet(num_classes=19).eval()
    x = torch.rand(1, 3, 64, 128)
    with torch.no_grad():
        torch.manual_seed(0)
        with feature_dropout(net, 0.3): a = net(gaussian_noise(x, 0.02)).logits
        with feature_dropout(net, 0.3): b = net(gaussian_noise(x, 0.02)).logits    # another draw: student vs teacher
        torch.manual_seed(0)
        with feature_dropout(net, 0.3): a2 = net(gaussian_noise(x, 0.02)).logits
    assert torch.equal(a, a2) and not torch.equal(a, b)
    assert classifier_of(DeepLab(19, head="proda")) is not None and classifier_of(net) is net.classifier


# -- the stage ------------------------------------------------------------------------------------------------------
def test_teacher_is_an_ema_of_the_student(random_init, tmp_path):
    from proda_nb.engine import get_config, Trainer
    cfg = get_config("synthcity"); cfg.stage = "mean_teacher"
    cfg.optim.batch_size, cfg.data.synthcity_n, cfg.data.max_val = 4, 8, 2
    cfg.run.out, cfg.run.progress, cfg.run.tensorboard, cfg.run.ckpt_every = str(tmp_path), False, False, 0
    cfg.mean_teacher.init, cfg.mean_teacher.iters = str(random_init), 1
    tr = Trainer(cfg)
    teacher0 = {k: v.clone() for k, v in tr.stage.teacher.state_dict().items()}
    tr.fit()
    student, teacher = tr.raw_model.state_dict(), tr.stage.teacher.state_dict()
    for k, v in teacher.items():                                             # after step 1: alpha_1 = 1/2
        if "running" in k or "num_batches" in k: assert torch.equal(v, student[k]), k   # buffers copied
        else: assert torch.allclose(v, 0.5 * teacher0[k] + 0.5 * student[k], atol=1e-6), k
    assert tr.stage.eval_model() is tr.stage.teacher and not tr.stage.teacher.training


def test_bad_settings_and_generator_files_are_one_line_errors(random_init, tmp_path):
    r = run_cli("--stage", "mean_teacher", "--mean_teacher.init", random_init, "--mean_teacher.dropout", "1.5", *TINY_MT,
                "--out", tmp_path / "a", ok=False)
    assert r.returncode != 0 and "mean_teacher.dropout must be in [0, 1)" in r.stderr
    r = run_cli("--stage", "mean_teacher", "--mean_teacher.init", random_init, "--mean_teacher.generator", random_init,
                *TINY_MT, "--out", tmp_path / "b", ok=False)
    assert r.returncode != 0 and "holds no TGCF-DA generator" in r.stderr


def test_recipes():
    assert get_recipe("se").stages == ("mean_teacher",) and get_recipe("se").options == {"mean_teacher.generator": "none"}
    assert get_recipe("tgcf").stages == ("tgcf", "mean_teacher") and get_recipe("tgcf").options["mean_teacher.consistency_weight"] == 0
    assert get_recipe("tgcf_se").stages == ("tgcf", "mean_teacher") and get_recipe("tgcf_se").published.miou == 50.0
    assert {get_recipe(n).family for n in ("se", "tgcf", "tgcf_se")} == {"teacher-student"}


# -- the command line -----------------------------------------------------------------------------------------------
def test_cli_alone(random_init, tmp_path):
    out = tmp_path / "alone"
    r = run_cli("--stage", "mean_teacher", "--mean_teacher.init", random_init, "--mean_teacher.consistency_weight", "5",
                *TINY_MT, "--run.log_every", "1", "--out", out)
    assert "[mean_teacher, 3 steps" in r.stdout
    c = ck(out)
    assert c["stage"]["name"] == "mean_teacher" and c["config"]["mean_teacher"]["consistency_weight"] == 5.0
    assert max_diff(c["model"], c["stage"]["state"]["ema_model"]) > 0             # the teacher is not the student
    log = [json.loads(l) for l in (out / "log.jsonl").read_text().splitlines() if "loss_consistency" in l]
    assert len(log) == 3 and all(r["loss_translated_ce"] == 0.0 for r in log)   # no generator: no translated term
    assert [round(r["consistency_weight"], 5) for r in log] == [round(5 * sigmoid_rampup(t, 0.25 * 3), 5) for t in range(3)]


def test_cli_in_chains_after_source_only_and_after_tgcf(tmp_path):
    out = tmp_path / "chain"
    run_cli("--run.pipeline", "source_only,tgcf,mean_teacher", "--schedule.iters", "3", "--tgcf.iters", "2",
            "--tgcf.width", "8", *TINY_MT, "--run.log_every", "1", "--out", out)
    res = json.loads((out / "results.json").read_text())
    assert [s["name"] for s in res["stages"]] == ["source_only", "tgcf", "mean_teacher"]
    c = ck(out / "mean_teacher")
    assert c["config"]["mean_teacher"]["init"] == str(out / "tgcf" / "checkpoint.pt")
    log = [json.loads(l) for l in (out / "mean_teacher" / "log.jsonl").read_text().splitlines() if "loss_translated_ce" in l]
    assert all(r["loss_translated_ce"] > 0 for r in log)                        # the tgcf generator was handed over
    out2 = tmp_path / "se"
    run_cli("--run.pipeline", "source_only,mean_teacher", "--schedule.iters", "3", *TINY_MT, "--out", out2)
    assert ck(out2 / "mean_teacher")["config"]["mean_teacher"]["init"] == str(out2 / "source_only" / "checkpoint.pt")


def test_resumes_exactly_after_a_kill(random_init, tmp_path):
    args = ["--stage", "mean_teacher", "--mean_teacher.init", random_init, *TINY_RUN, "--mean_teacher.iters", "30",
            "--run.ckpt_every", "5"]
    full, killed = kill_and_resume(args, tmp_path, iters=30)
    a, b = ck(full), ck(killed)
    assert b["iteration"] == 30 and max_diff(a["model"], b["model"]) == 0.0
    assert max_diff(a["stage"]["state"]["ema_model"], b["stage"]["state"]["ema_model"]) == 0.0


def test_two_processes_train_as_one_with_two_micro_batches(tmp_path):
    "With a generator (from a tgcf chain) so that every term of the loss takes part."
    base = tmp_path / "base"
    run_cli("--run.pipeline", "source_only,tgcf", "--schedule.iters", "2", "--tgcf.iters", "2", "--tgcf.width", "8",
            *TINY_RUN, "--run.ckpt_every", "0", "--out", base)
    args = ["--stage", "mean_teacher", "--mean_teacher.init", base / "tgcf" / "checkpoint.pt", *TINY_MT,
            "--mean_teacher.rampup", "0"]
    run_cli(*args, "--gpus", "2", "--out", tmp_path / "two")
    run_cli(*args, "--optim.accum_steps", "2", "--out", tmp_path / "one")
    a, b = ck(tmp_path / "two"), ck(tmp_path / "one")
    assert (a["world_size"], b["world_size"]) == (2, 1)
    same = lambda x, y: max_diff(x, y, counters=False)
    assert same(a["model"], b["model"]) <= 1e-5
    assert same(a["stage"]["state"]["ema_model"], b["stage"]["state"]["ema_model"]) <= 1e-5


SMALL = [*SMALL_REAL_RUN, *SYNTHCITY_NET]
REAL_ITERS = ["--schedule.iters", "2", "--tgcf.iters", "2", "--mean_teacher.iters", "2", "--dacs.iters", "2"]


def test_real_preset_chain_on_fixture_folders(tmp_path):
    "source-only -> tgcf -> mean_teacher -> dacs on GTA5 and Cityscapes folders in their published formats."
    make_root(tmp_path / "data", "gta5")
    out = tmp_path / "real"
    text = run_cli("--config", "gta5_to_cityscapes", "--data-root", tmp_path / "data", "--run.pipeline",
                   "source_only,tgcf,mean_teacher,dacs", *REAL_ITERS, *SMALL, "--out", out).stdout
    res = json.loads((out / "results.json").read_text())
    assert [s["name"] for s in res["stages"]] == ["source_only", "tgcf", "mean_teacher", "dacs"]
    assert res["benchmark"] == "gta5_to_cityscapes" and "52.1" in text               # DACS's published row in the table
    for stage in ("mean_teacher", "dacs"):
        c = ck(out / stage)
        assert c["config"][stage]["bn_stats"] == "all" and len(c["metrics"]["iou"]) == 19   # the real presets' value


def test_real_synthia_preset_stage_by_stage(tmp_path):
    "SYNTHIA's 16-class preset, one stage per command."
    make_root(tmp_path / "data", "synthia")
    out, common = tmp_path / "real", ["--config", "synthia_to_cityscapes", "--data-root", tmp_path / "data", *REAL_ITERS, *SMALL]
    run_cli("--stage", "source_only", *common, "--out", out)
    run_cli("--stage", "tgcf", *common, "--out", out)                                  # from OUT/checkpoint.pt -> OUT/tgcf
    mt = tmp_path / "mt"                                                               # an init outside OUT: it writes OUT itself
    run_cli("--stage", "mean_teacher", "--mean_teacher.init", out / "tgcf" / "checkpoint.pt", *common, "--out", mt)
    text = run_cli("--stage", "dacs", *common, "--out", out).stdout                   # from OUT/checkpoint.pt -> OUT/dacs
    assert "target val mIoU (SYNTHIA's 16 classes)" in text
    for folder in (mt, out / "dacs"):
        c = ck(folder)
        assert len(c["metrics"]["iou"]) == 16 and c["config"]["model"]["num_classes"] == 16
