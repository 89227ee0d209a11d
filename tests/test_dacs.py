"""DACS (`proda_nb.dacs`): ClassMix by hand (pasted pixels carry the source label, the others the teacher's), the
confidence weight, the weighted CE, the augmentation, the extension points, and `--stage dacs` alone, in a chain after
source-only, after a SIGKILL, and under `--gpus 2`. (The real presets' fixture folders: tests/test_mean_teacher.py.)"""
import json, math
from pathlib import Path

import pytest
import torch

from conftest import TINY_RUN, kill_and_resume, max_diff, run_cli
from proda_nb.dacs import (choose_classes, class_mask, class_mix, confident_share, mix_weights, weighted_ce, dacs_augment,
                           DACS, MixedBatch)
from proda_nb.engine import get_config, Trainer
from proda_nb.pipeline import get_recipe

TINY_DACS = [*TINY_RUN, "--dacs.iters", "3", "--run.ckpt_every", "0"]


def ck(out):
    return torch.load(Path(out) / "checkpoint.pt", weights_only=True)


def tiny_trainer(out, init, iters=1, stage=None):
    cfg = get_config("synthcity"); cfg.stage = "dacs"
    cfg.optim.batch_size, cfg.data.synthcity_n, cfg.data.max_val = 4, 8, 2
    cfg.run.out, cfg.run.progress, cfg.run.tensorboard, cfg.run.ckpt_every = str(out), False, False, 0
    cfg.dacs.init, cfg.dacs.iters = str(init), iters
    return Trainer(cfg, stage=stage)


# -- ClassMix -------------------------------------------------------------------------------------------------------
def test_classmix_pasted_pixels_carry_the_source_label_the_others_the_teachers():
    source_label = torch.tensor([[[0, 0, 1, 1], [2, 2, 3, 255]]])
    teacher_label = torch.tensor([[[7, 7, 8, 8], [9, 9, 9, 9]]])
    mask = class_mask(source_label, torch.tensor([1, 3]))
    assert mask.tolist() == [[[False, False, True, True], [False, False, True, False]]]
    mixed = class_mix(source_label, teacher_label, mask)
    assert mixed.tolist() == [[[7, 7, 1, 1], [9, 9, 3, 9]]]
    src_img, tgt_img = torch.full((1, 3, 2, 4), 0.8), torch.full((1, 3, 2, 4), 0.1)
    img = class_mix(src_img, tgt_img, mask)
    assert torch.equal(img[:, :, mask[0]], src_img[:, :, mask[0]]) and torch.equal(img[:, :, ~mask[0]], tgt_img[:, :, ~mask[0]])


def test_half_of_the_present_classes_are_drawn_reproducibly():
    label = torch.tensor([[0, 0, 4, 4], [9, 9, 255, 13]])                     # 4 classes and an ignored pixel
    torch.manual_seed(3); a = choose_classes(label)
    torch.manual_seed(3); b = choose_classes(label)
    assert torch.equal(a, b) and len(a) == 2 and set(a.tolist()) <= {0, 4, 9, 13}
    draws = set()
    for seed in range(30):
        torch.manual_seed(seed); draws.add(tuple(sorted(choose_classes(label).tolist())))
    assert len(draws) > 3                                                     # different halves under different seeds


def test_confidence_weight_and_weighted_ce_by_hand():
    conf = torch.tensor([[[0.99, 0.5], [0.968, 0.2]], [[0.1, 0.1], [0.1, 0.97]]])
    share = confident_share(conf)
    assert torch.allclose(share, torch.tensor([0.5, 0.25]))                 # >= 0.968, as the release's ge
    mask = torch.tensor([[[True, False], [False, False]], [[False, False], [False, True]]])
    w = mix_weights(mask, share)
    assert w.tolist() == [[[1.0, 0.5], [0.5, 0.5]], [[0.25, 0.25], [0.25, 1.0]]]
    logits = torch.tensor([[math.log(3), 0.0], [0.0, 0.0]]).view(1, 2, 1, 2)  # pixel 1: p(0) = 3/4; pixel 2: ignored
    assert math.isclose(weighted_ce(logits, torch.tensor([[[0, 255]]]), torch.tensor([[[0.5, 1.0]]])).item(),
                        0.5 * -math.log(0.75) / 2, rel_tol=1e-6)


def test_augmentation_is_photometric_and_seeded():
    x = torch.rand(3, 3, 32, 64)
    torch.manual_seed(0); a = dacs_augment(x)
    torch.manual_seed(0); b = dacs_augment(x)
    assert torch.equal(a, b) and a.shape == x.shape and 0 <= a.min() and a.max() <= 1
    assert torch.equal(dacs_augment(x, jitter_p=0, blur_p=0), x)


# -- the stage ------------------------------------------------------------------------------------------------------
def test_the_stages_mixed_batch(random_init, tmp_path):
    tr = tiny_trainer(tmp_path, random_init)
    batch = {k: next(iter(tr._loader(k, i))) for i, k in enumerate(("source", "target"))}
    torch.manual_seed(0); mix = tr.stage.mixed_batch(batch["source"], batch["target"])
    assert isinstance(mix, MixedBatch) and mix.images.shape == batch["target"]["image"].shape
    assert torch.equal(mix.labels[mix.mask], batch["source"]["label"][mix.mask])
    assert torch.equal(mix.labels[~mix.mask], mix.pseudo_labels[~mix.mask])
    with torch.no_grad():
        teacher = torch.nn.functional.interpolate(tr.stage.teacher(batch["target"]["image"]).logits, size=(64, 128),
                                                  mode="bilinear", align_corners=False).argmax(1)
    assert torch.equal(mix.pseudo_labels, teacher)                            # the EMA teacher's argmax on the target
    for b in range(len(mix.mask)):                                           # about half of each image's classes pasted
        present = batch["source"]["label"][b].unique(); present = present[present != 255]
        pasted = batch["source"]["label"][b][mix.mask[b]].unique()
        assert len(pasted) == (len(present) + 1) // 2
    s = tr.stage.settings
    with pytest.raises(ValueError, match="needs one crop size"):
        tr.stage.mixed_batch(batch["source"], {"image": batch["target"]["image"][..., :32, :64]})
    assert (s.ema_momentum, s.threshold) == (0.99, 0.968)


def test_extension_points(random_init, tmp_path):
    class WithExtra(DACS):
        def loss_terms(self, batch):
            terms = super().loss_terms(batch)
            assert self.outputs.source.features.shape[1] == 64 and self.outputs.mix.teacher_probs.shape[1] == 19
            terms["extra"] = self.outputs.mixed.logits.pow(2).mean()
            self.step_logs["extra_seen"] = 1.0
            return terms
        def term_weights(self): return {**super().term_weights(), "extra": 0.5}
    tr = tiny_trainer(tmp_path, random_init, stage=WithExtra())
    batch = {k: next(iter(tr._loader(k, i))) for i, k in enumerate(("source", "target"))}
    loss, logs = tr.stage.compute_loss(batch)
    assert {"loss_source_ce", "loss_mixed_ce", "loss_extra", "confident_share", "extra_seen"} <= set(logs)
    assert math.isclose(loss.item(), (logs["loss_source_ce"] + logs["loss_mixed_ce"] + 0.5 * logs["loss_extra"]).item(), rel_tol=1e-5)
    assert tr.stage.outputs is None


def test_recipe():
    r = get_recipe("dacs")
    assert r.stages == ("dacs",) and r.family == "teacher-student" and tuple(r.published) == ("DACS", 52.1, "DeepLabv2 ResNet-101")


# -- the command line -----------------------------------------------------------------------------------------------
def test_cli_alone(random_init, tmp_path):
    out = tmp_path / "alone"
    r = run_cli("--stage", "dacs", "--dacs.init", random_init, "--dacs.threshold", "0.9", *TINY_DACS, "--run.log_every", "1",
                "--out", out)
    assert "[dacs, 3 steps" in r.stdout
    c = ck(out)
    assert c["stage"]["name"] == "dacs" and c["config"]["dacs"]["threshold"] == 0.9
    assert max_diff(c["model"], c["stage"]["state"]["ema_model"]) > 0
    log = [json.loads(l) for l in (out / "log.jsonl").read_text().splitlines() if "confident_share" in l]
    assert len(log) == 3 and all(0 <= r["confident_share"] <= 1 and r["pasted_share"] > 0 for r in log)


def test_cli_in_a_chain_after_source_only(tmp_path):
    out = tmp_path / "chain"
    r = run_cli("--run.pipeline", "source_only,dacs", "--schedule.iters", "3", *TINY_DACS, "--out", out)
    assert [s["name"] for s in json.loads((out / "results.json").read_text())["stages"]] == ["source_only", "dacs"]
    assert ck(out / "dacs")["config"]["dacs"]["init"] == str(out / "source_only" / "checkpoint.pt")
    assert "52.1" in r.stdout                                                 # the paper's row beside it


def test_resumes_exactly_after_a_kill(random_init, tmp_path):
    args = ["--stage", "dacs", "--dacs.init", random_init, *TINY_RUN, "--dacs.iters", "30", "--run.ckpt_every", "5"]
    full, killed = kill_and_resume(args, tmp_path, iters=30)
    a, b = ck(full), ck(killed)
    assert b["iteration"] == 30 and max_diff(a["model"], b["model"]) == 0.0
    assert max_diff(a["stage"]["state"]["ema_model"], b["stage"]["state"]["ema_model"]) == 0.0


def test_two_processes_train_as_one_with_two_micro_batches(random_init, tmp_path):
    args = ["--stage", "dacs", "--dacs.init", random_init, *TINY_DACS]
    run_cli(*args, "--gpus", "2", "--out", tmp_path / "two")
    run_cli(*args, "--optim.accum_steps", "2", "--out", tmp_path / "one")
    a, b = ck(tmp_path / "two"), ck(tmp_path / "one")
    assert (a["world_size"], b["world_size"]) == (2, 1)
    same = lambda x, y: max_diff(x, y, counters=False)
    assert same(a["model"], b["model"]) <= 1e-5
    assert same(a["stage"]["state"]["ema_model"], b["stage"]["state"]["ema_model"]) <= 1e-5
