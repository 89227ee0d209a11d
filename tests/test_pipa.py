"""PiPa (`proda_nb.pipa`): the pixel contrast against hand-computed examples (scale invariance, ignored pixels), the
half-hard half-easy anchor sampling, the two views and their shared cells by hand, the patch contrast by hand, the
patch term's gradient reaching the student's encoder, the settings, the recipes, and `--stage pipa` in a chain after
source-only, after a SIGKILL, under `--gpus 2` and with the real presets (DeepLab-R101) on fixture folders."""
import json, math
from pathlib import Path

import pytest
import torch

from conftest import SMALL_REAL_RUN, TINY_RUN, kill_and_resume, max_diff, run_cli
from test_real_data_training import make_root
from proda_nb.engine import get_config, get_stage, Trainer
from proda_nb.pipa import (PiPa, PiPaConfig, ViewPair, check_pipa_settings, cut_views, overlap_cells, overlapping_views,
                           patch_contrast_loss, pixel_contrast_loss, pixel_contrast_terms, sample_anchors, split_hard_easy,
                           unflip, view_iou)
from proda_nb.pipeline import get_recipe


def softplus(x):
    "-log(e^a / (e^a + e^b)) = log(1 + e^(b - a)), written as a function of b - a."
    return math.log(1 + math.exp(x))


def ck(out):
    return torch.load(Path(out) / "checkpoint.pt", weights_only=True)


def tiny_trainer(out, init, iters=1, **settings):
    cfg = get_config("synthcity"); cfg.stage = "pipa"
    cfg.optim.batch_size, cfg.data.synthcity_n, cfg.data.max_val = 4, 8, 2
    cfg.run.out, cfg.run.progress, cfg.run.tensorboard, cfg.run.ckpt_every = str(out), False, False, 0
    cfg.pipa.init, cfg.pipa.iters = str(init), iters
    for k, v in settings.items(): setattr(cfg.pipa, k, v)
    return Trainer(cfg)


# -- the pixel contrast -----------------------------------------------------------------------------------------------
def test_pixel_contrast_four_pixels_two_classes_by_hand():
    # z0 = (1,0), z1 = (0,1) of class 0; z2 = (-1,0), z3 = (0,-1) of class 1; T = 0.5.
    # cosines: s01 = 0, s02 = -1, s03 = 0, s12 = 0, s13 = -1, s23 = 0.
    # anchor 0: one positive (z1, s = 0), negatives z2 (s = -1) and z3 (s = 0):
    #   l0 = -log(e^0 / (e^0 + e^(-1/T) + e^0)) = log(2 + e^-2); by symmetry every anchor gives the same,
    #   so the loss is log(2 + e^-2) = 0.7587...
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])
    y = torch.tensor([0, 0, 1, 1])
    assert math.isclose(pixel_contrast_loss(z, y, 0.5).item(), math.log(2 + math.exp(-2)), rel_tol=1e-6)
    # three of class 0, one of class 1: z0 = (1,0), z1 = (0.6,0.8), z2 = (0,1), z3 = (-1,0); T = 0.5, so s/T:
    # s01 = 1.2, s02 = 0, s12 = 1.6, s03 = -2, s13 = -1.2, s23 = 0. Pixel 3 has no positive: no anchor.
    #   l0 = [log(1 + e^(-2 - 1.2)) + log(1 + e^(-2 - 0))] / 2
    #   l1 = [log(1 + e^(-1.2 - 1.2)) + log(1 + e^(-1.2 - 1.6))] / 2
    #   l2 = [log(1 + e^(0 - 0)) + log(1 + e^(0 - 1.6))] / 2
    z = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0], [-1.0, 0.0]])
    y = torch.tensor([0, 0, 0, 1])
    hand = [(softplus(-3.2) + softplus(-2.0)) / 2, (softplus(-2.4) + softplus(-2.8)) / 2, (softplus(0.0) + softplus(-1.6)) / 2]
    terms = pixel_contrast_terms(z, y, 0.5)
    assert torch.allclose(terms[:3], torch.tensor(hand), atol=1e-6) and terms[3].isnan()
    assert math.isclose(pixel_contrast_loss(z, y, 0.5).item(), sum(hand) / 3, rel_tol=1e-6)


def test_pixel_contrast_is_invariant_to_feature_scale():
    torch.manual_seed(0)
    z, y = torch.randn(40, 16), torch.randint(0, 4, (40,))
    scales = torch.rand(40, 1) * 10 + 0.1                                   # each feature its own scale
    a, b = pixel_contrast_loss(z, y), pixel_contrast_loss(z * scales, y)
    assert math.isclose(a.item(), b.item(), rel_tol=1e-5)


def test_ignored_pixels_take_no_part():
    torch.manual_seed(1)
    z, y = torch.randn(12, 8), torch.randint(0, 3, (12,))
    extra = torch.randn(5, 8, requires_grad=True)
    zz = torch.cat([z, extra]); yy = torch.cat([y, torch.full((5,), 255)])
    assert math.isclose(pixel_contrast_loss(zz, yy).item(), pixel_contrast_loss(z, y).item(), rel_tol=1e-6)
    pixel_contrast_loss(zz, yy).backward()
    assert torch.count_nonzero(extra.grad) == 0                               # not an anchor, positive or negative
    assert pixel_contrast_terms(zz, yy)[12:].isnan().all()
    assert pixel_contrast_loss(z[:1], y[:1]).item() == 0.0                     # no anchor at all


def test_anchors_half_hard_half_easy_per_image_and_class():
    assert [split_hard_easy(h, e, 10) for h, e in ((20, 20), (3, 20), (20, 3))] == [(5, 5), (3, 7), (7, 3)]
    labels = torch.zeros(2, 4, 8, dtype=torch.long); labels[:, :, 4:] = 1; labels[1, 0, 0] = 255
    preds = labels.clone(); preds[:, 0, :4] = 1                                # image b: 4 wrong class-0 pixels
    preds[1, 0, 0] = 0
    torch.manual_seed(0)
    idx = sample_anchors(labels, preds, per_class=6, max_total=1000, min_pixels=10)
    y, p = labels.reshape(-1), preds.reshape(-1)
    b = idx // 32
    for image in (0, 1):
        for c in (0, 1):
            picked = idx[(b == image) & (y[idx] == c)]
            assert len(picked) == 6
            hard = int((p[picked] != c).sum())
            assert hard == (3 if c == 0 else 0)                             # half of 6 hard where there are hard ones
    assert (y[idx] != 255).all()
    assert len(sample_anchors(labels, preds, per_class=6, max_total=8, min_pixels=10)) == 4 * 2   # 8 // 4 groups


# -- the views and the patch contrast ---------------------------------------------------------------------------------
def test_views_and_their_shared_cells_by_hand():
    # an 8x16 image, views of 8x12 at stride 4 (grids 2x3), corners (0,0) and (0,4): they share image columns 4..11,
    # which are columns 1,2 of view 1 and 0,1 of view 2, in both rows: flat indices {1,2,4,5} and {0,1,3,4}
    pair = ViewPair(torch.tensor([[[0, 0], [0, 4]]]), (8, 12), torch.tensor([[False, True]]))
    (first, second), = overlap_cells(pair, (2, 3), 4)
    assert first.tolist() == [1, 2, 4, 5] and second.tolist() == [0, 1, 3, 4]
    image = torch.arange(16.0).expand(1, 1, 8, 16)                            # each pixel holds its column
    views = unflip(cut_views(image, pair), pair)
    assert views[0, 0, 0, 4:].tolist() == views[1, 0, 0, :8].tolist() == list(range(4, 12))
    assert math.isclose(view_iou((0, 0), (0, 4), (8, 12)), 64 / 128)
    torch.manual_seed(0)
    v = overlapping_views(32, (64, 128), (48, 96), 4, min_iou=0.6)
    assert (v.corners % 4 == 0).all() and all(view_iou(a, b, v.size) >= 0.6 for a, b in v.corners)


def test_patch_contrast_by_hand():
    # T = 1. anchor (1,0), positive (0.6,0.8): s_pos = 0.6; its negative (-1,0) of class 1: s = -1 -> log(1 + e^(-1.6)).
    # anchor (0,1), positive (0,1): s_pos = 1; negative (-1,0): s = 0 -> log(1 + e^(-1)). (0,1) of class 0 is the
    # anchors' own class and (1,0) is ignored: neither is a negative.
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]]); p = torch.tensor([[0.6, 0.8], [0.0, 1.0]])
    n, ny = torch.tensor([[-1.0, 0.0], [0.0, 1.0], [1.0, 0.0]]), torch.tensor([1, 0, 255])
    loss = patch_contrast_loss(a, p, torch.tensor([0, 0]), n, ny, 1.0)
    assert math.isclose(loss.item(), (softplus(-1.6) + softplus(-1.0)) / 2, rel_tol=1e-6)
    assert patch_contrast_loss(a, p, torch.tensor([255, 1]), n, torch.tensor([1, 1, 255]), 1.0).item() == 0.0


def test_the_patch_terms_gradient_reaches_the_encoder(random_init, tmp_path):
    tr = tiny_trainer(tmp_path, random_init)
    batch = {k: next(iter(tr._loader(k, i))) for i, k in enumerate(("source", "target"))}
    images = batch["target"]["image"]
    with torch.no_grad():
        probs = torch.nn.functional.interpolate(tr.stage.teacher(images).logits, size=images.shape[-2:], mode="bilinear", align_corners=False).softmax(1)
    tr.stage.before_step(0)
    torch.manual_seed(0)
    loss = tr.stage.patch_term(images, probs.argmax(1), torch.ones(len(images), *images.shape[-2:]))
    assert loss.item() > 0
    loss.backward()
    model = tr.raw_model
    for name in ("stem.0.0.weight", "down.0.0.weight", "fuse.0.weight"):          # the encoder, first to last
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name
    assert model.classifier.weight.grad is None                               # the patch term does not use the classifier
    assert all(p.grad is not None for p in tr.stage.projector.parameters())


# -- settings, registration, recipes ----------------------------------------------------------------------------------
def test_settings_presets_and_bad_values():
    s, real = get_config("synthcity").pipa, get_config("gta5_to_cityscapes")
    assert (s.iters, s.temperature, s.proj_dim, s.pixel_weight) == (500, 0.1, 256, 0.1)
    r = real.pipa
    assert (r.bn_stats, r.per_class, r.max_anchors, r.min_pixels, r.bank_per_view, r.bank_steps, r.patch_threshold,
            r.min_iou, r.temperature) == ("all", 100, 1024, 100, 1600, 3, 0.9, 0.1, 0.1)
    assert real.model.name == "deeplab_r101" and get_config("synthia_to_cityscapes").pipa.bn_stats == "all"
    assert get_stage("pipa") is PiPa and PiPa.init == "required"
    for bad, match in (({"temperature": -1}, "pipa.temperature"), ({"min_iou": 2}, "pipa.min_iou"),
                       ({"bank_per_view": 0}, "pipa.bank_per_view"), ({"pixel": False, "patch": False}, "both off")):
        with pytest.raises(ValueError, match=match): check_pipa_settings(PiPaConfig(**bad))


def test_recipes_and_paper_rows():
    for name, options, published in (("pipa_pixel", {"pipa.patch": False}, 2.3), ("pipa_patch", {"pipa.pixel": False}, 1.4),
                                     ("pipa", {}, 75.6)):
        r = get_recipe(name)
        assert r.stages == ("pipa",) and r.options == options and r.family == "contrastive" and r.published.miou == published
    assert "gain" in get_recipe("pipa_pixel").published.row and "gain" not in get_recipe("pipa").published.row
    from proda_nb.pipa import pipa_paper
    assert pipa_paper(PiPaConfig()).miou == 75.6 and pipa_paper(PiPaConfig(patch=False)) is None


# -- the command line -------------------------------------------------------------------------------------------------
TINY_PIPA = [*TINY_RUN, "--pipa.iters", "3", "--run.ckpt_every", "0", "--pipa.patch_threshold", "0"]


def test_cli_bad_value_is_one_line(random_init, tmp_path):
    r = run_cli("--stage", "pipa", "--pipa.init", random_init, "--pipa.view_scale", "0", *TINY_PIPA, "--out", tmp_path, ok=False)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("error: pipa.view_scale must be in (0, 1]")


def test_cli_pixel_only_in_a_chain_after_source_only(tmp_path):
    out = tmp_path / "chain"
    r = run_cli("--run.pipeline", "source_only,pipa", "--schedule.iters", "3", "--pipa.patch", "false", *TINY_PIPA,
                "--run.log_every", "1", "--out", out)
    assert [s["name"] for s in json.loads((out / "results.json").read_text())["stages"]] == ["source_only", "pipa"]
    log = [json.loads(l) for l in (out / "pipa" / "log.jsonl").read_text().splitlines() if '"loss"' in l]
    assert all("loss_pixel" in x and "loss_patch" not in x and x["pixel_anchors"] > 0 for x in log)
    assert ck(out / "pipa")["stage"]["state"]["bank"]["features"] == []          # no patch term: no bank
    assert "PiPa" in r.stdout


def test_resumes_exactly_after_a_kill(random_init, tmp_path):
    args = ["--stage", "pipa", "--pipa.init", random_init, *TINY_RUN, "--pipa.iters", "30", "--run.ckpt_every", "5",
            "--pipa.patch_threshold", "0"]
    full, killed = kill_and_resume(args, tmp_path, iters=30)
    a, b = ck(full), ck(killed)
    assert b["iteration"] == 30 and max_diff(a["model"], b["model"]) == 0.0
    sa, sb = a["stage"]["state"], b["stage"]["state"]
    assert max_diff(sa["ema_model"], sb["ema_model"]) == 0.0 and max_diff(sa["projector"], sb["projector"]) == 0.0
    assert all(torch.equal(x, y) for x, y in zip(sa["bank"]["features"], sb["bank"]["features"]))
    assert len(sa["bank"]["labels"]) == 3


def test_two_processes_train_as_one_with_two_micro_batches(random_init, tmp_path):
    args = ["--stage", "pipa", "--pipa.init", random_init, *TINY_PIPA]
    run_cli(*args, "--gpus", "2", "--out", tmp_path / "two")
    run_cli(*args, "--optim.accum_steps", "2", "--out", tmp_path / "one")
    a, b = ck(tmp_path / "two"), ck(tmp_path / "one")
    assert (a["world_size"], b["world_size"]) == (2, 1)
    same = lambda x, y: max_diff(x, y, counters=False)
    sa, sb = a["stage"]["state"], b["stage"]["state"]
    assert same(a["model"], b["model"]) <= 1e-5 and same(sa["ema_model"], sb["ema_model"]) <= 1e-5
    assert same(sa["projector"], sb["projector"]) <= 1e-5
    fa, fb = torch.cat(sa["bank"]["features"]), torch.cat(sb["bank"]["features"])      # the bank: the global batch, in order
    assert fa.shape == fb.shape == (3 * 4 * 2 * 48, 256) and (fa - fb).abs().max() <= 1e-5
    assert torch.equal(torch.cat(sa["bank"]["labels"]), torch.cat(sb["bank"]["labels"]))


@pytest.mark.parametrize("config,source", [("gta5_to_cityscapes", "gta5"), ("synthia_to_cityscapes", "synthia")])
def test_real_presets_on_fixture_folders(tmp_path, config, source):
    "Source-only, then PiPa from it, on GTA5 / SYNTHIA -> Cityscapes fixture folders: the preset's DeepLab-R101 (release layout) and PiPa settings."
    make_root(tmp_path / "data", source)
    out = tmp_path / "out"
    common = ["--config", config, "--data-root", tmp_path / "data", "--out", out, *SMALL_REAL_RUN, "--run.log_every", "1"]
    run_cli(*common, "--stage", "source_only", "--schedule.iters", "1")
    r = run_cli(*common, "--stage", "pipa", "--pipa.iters", "1", "--pipa.min_pixels", "2", "--pipa.patch_threshold", "0")
    assert "target val mIoU" in r.stdout
    cfg = json.loads((out / "pipa" / "config.json").read_text())
    assert cfg["model"]["name"] == "deeplab_r101" and cfg["model"]["layout"] == "release" and cfg["pipa"]["bn_stats"] == "all"
    assert (cfg["pipa"]["bank_per_view"], cfg["pipa"]["per_class"], cfg["pipa"]["temperature"]) == (1600, 100, 0.1)
    log = [json.loads(l) for l in (out / "pipa" / "log.jsonl").read_text().splitlines() if '"loss"' in l]
    assert log[0]["pixel_anchors"] > 0 and log[0]["patch_anchors"] > 0 and math.isfinite(log[0]["loss_patch"])
    state = ck(out / "pipa")["stage"]["state"]
    assert state["projector"]["net.3.weight"].shape[:2] == (256, 256)           # 256-d projections of the head's 256 features
