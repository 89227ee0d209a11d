"""The warm-up stage (AdaptSegNet output-space adversarial training): discriminator steps, loss signs, shapes,
checkpointed discriminator state, and `python -m proda_nb.train --stage warmup` on tiny SynthCity settings."""
import json, math, os, subprocess, sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from proda_nb.engine import get_config, get_stage, set_option, Trainer, load_checkpoint
from proda_nb.warmup import (Warmup, AdaptSegNetDiscriminator, ReleaseDiscriminator, build_discriminator,
                             discriminator_loss, adversarial_loss, gan_loss)

REPO = Path(__file__).resolve().parents[1]
TINY = ["--schedule.iters", "4", "--warmup.iters", "4", "--optim.batch_size", "4", "--data.max_val", "2", "--data.synthcity_n", "8",
        "--run.ckpt_every", "2", "--run.log_every", "1", "--run.progress", "false", "--run.tensorboard", "false"]


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads(); torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def fixed_maps(seed=0, n=4, K=19, size=(32, 64)):
    "Source maps: confident (one class per pixel); target maps: soft. Easy to tell apart."
    g = torch.Generator().manual_seed(seed)
    src = F.one_hot(torch.randint(0, K, (n, *size), generator=g), K).permute(0, 3, 1, 2).float() * 0.9 + 0.1 / K
    tgt = torch.rand(n, K, *size, generator=g).softmax(1)
    return src, tgt


# -- shapes ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind,size,expected", [("release", (64, 128), (4, 8)), ("release", (65, 130), (5, 9)),
                                                ("adaptsegnet", (64, 128), (2, 4)), ("adaptsegnet", (96, 160), (3, 5))])
def test_discriminator_shapes(kind, size, expected):
    d = build_discriminator(kind, num_classes=7, width=8)
    assert d(torch.rand(3, 7, *size)).shape == (3, 1, *expected)


def test_discriminator_layers_as_published():
    rel = ReleaseDiscriminator(19, 64)
    convs = [m for m in rel.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.stride) for c in convs] == [
        (19, 64, (3, 3), (2, 2)), (64, 128, (3, 3), (2, 2)), (128, 256, (3, 3), (2, 2)), (256, 512, (3, 3), (2, 2)),
        (512, 1, (1, 1), (1, 1))]
    acts = [m for m in rel.modules() if isinstance(m, (nn.ReLU, nn.LeakyReLU))]
    assert [type(a).__name__ for a in acts] == ["ReLU", "ReLU", "ReLU", "LeakyReLU"] and acts[-1].negative_slope == 0.2
    asn = AdaptSegNetDiscriminator(19, 64)
    convs = [m for m in asn.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.out_channels, c.kernel_size, c.stride) for c in convs] == [
        (64, (4, 4), (2, 2)), (128, (4, 4), (2, 2)), (256, (4, 4), (2, 2)), (512, (4, 4), (2, 2)), (1, (4, 4), (2, 2))]
    assert all(isinstance(m, nn.LeakyReLU) and m.negative_slope == 0.2
               for m in asn.modules() if isinstance(m, (nn.ReLU, nn.LeakyReLU)))


# -- losses against hand formulas -----------------------------------------------------------------------------------
def test_losses_match_formulas():
    d = torch.tensor([-1.0, 0.5, 2.0]).view(1, 1, 1, 3)
    sig = 1 / (1 + torch.exp(-d))
    assert torch.allclose(gan_loss(d, 1.0, "vanilla"), -torch.log(sig).mean())
    assert torch.allclose(gan_loss(d, 0.0, "vanilla"), -torch.log(1 - sig).mean())
    assert math.isclose(gan_loss(d, 1.0, "ls").item(), ((-2) ** 2 + 0.5 ** 2 + 1 ** 2) / 3, rel_tol=1e-6)
    assert math.isclose(discriminator_loss(d, d, "ls").item(), 0.5 * ((1 + .25 + 4) / 3 + (4 + .25 + 1) / 3), rel_tol=1e-6)
    assert math.isclose(adversarial_loss(d, "ls").item(), (1 + .25 + 4) / 3, rel_tol=1e-6)   # source label 0


# -- the discriminator learns ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("gan", ["ls", "vanilla"])
@pytest.mark.parametrize("kind", ["release", "adaptsegnet"])
def test_discriminator_steps_lower_its_loss(gan, kind):
    torch.manual_seed(0)
    d = build_discriminator(kind, 19, 8)
    opt = torch.optim.Adam(d.parameters(), lr=1e-4, betas=(0.9, 0.99))
    src, tgt = fixed_maps(size=(64, 64))
    loss = lambda: discriminator_loss(d(src), d(tgt), gan)
    before = loss().item()
    opt.zero_grad(); loss().backward(); opt.step()           # one step at the release's settings
    after = loss().item()
    assert after < before, (before, after)
    for g in opt.param_groups: g["lr"] = 1e-3
    for _ in range(20):
        opt.zero_grad(); loss().backward(); opt.step()
    assert loss().item() < after - 1e-2
    with torch.no_grad():                      # and it separates the domains in the right direction: source 0, target 1
        assert d(tgt).mean() > d(src).mean()


def test_stage_discriminator_step_lowers_loss():
    "The stage's own discriminator_step on kept maps (the path the loop uses)."
    torch.manual_seed(0)
    st = Warmup(width=8)
    st.bind(get_config("synthcity"))
    st.discriminator = build_discriminator("release", 19, 8)
    st.d_optimizer = torch.optim.Adam(st.discriminator.parameters(), lr=1e-4, betas=(0.9, 0.99))
    st.trainer = type("T", (), {"autocast": staticmethod(lambda: torch.autocast("cpu", enabled=False)),
                                "sync_gradients": staticmethod(lambda params: None)})()       # one process
    src, tgt = fixed_maps(size=(64, 64))
    losses = []
    for _ in range(8):
        st.kept = [{"source": src, "target": tgt}]
        losses.append(st.discriminator_step())
    assert losses[-1] < losses[0] - 1e-3 and st.kept == []


# -- the sign of the segmenter's adversarial gradient ------------------------------------------------------------------
@pytest.mark.parametrize("gan", ["ls", "vanilla"])
def test_adversarial_gradient_makes_target_look_like_source(gan):
    "Train D to separate, freeze it, then a few steps on L_adv alone: D's output on target maps falls towards 0 (source)."
    torch.manual_seed(0)
    K = 5
    d = build_discriminator("release", K, 8)
    opt = torch.optim.Adam(d.parameters(), lr=1e-3)
    src, _ = fixed_maps(K=K, size=(32, 64))
    tgt_logits = torch.zeros(4, K, 32, 64).normal_(0, 0.1).requires_grad_(True)   # soft target maps
    for _ in range(30):
        opt.zero_grad(); discriminator_loss(d(src), d(tgt_logits.detach().softmax(1)), gan).backward(); opt.step()
    d.requires_grad_(False)
    frozen = [p.clone() for p in d.parameters()]
    score = lambda: (torch.sigmoid(d(tgt_logits.softmax(1))) if gan == "vanilla" else d(tgt_logits.softmax(1))).mean().item()
    before = score()
    seg_opt = torch.optim.Adam([tgt_logits], lr=0.05)          # Adam: the direction matters, not the tiny scale
    for _ in range(10):
        seg_opt.zero_grad(); adversarial_loss(d(tgt_logits.softmax(1)), gan).backward(); seg_opt.step()
    after = score()
    assert after < before - 1e-3, (before, after)          # D's "target" answer drops: target looks more like source
    assert all(torch.equal(a, b) for a, b in zip(frozen, d.parameters()))   # and D did not move


def test_compute_loss_leaves_discriminator_without_gradients(tmp_path):
    torch.manual_seed(0)
    cfg = tiny_cfg(tmp_path)
    tr = Trainer(cfg, stage=Warmup())
    src = next(iter(tr._loader("source", 0))); tgt = next(iter(tr._loader("target", 1)))
    loss, logs = tr.stage.compute_loss({"source": src, "target": tgt})
    loss.backward()
    assert all(p.grad is None for p in tr.stage.discriminator.parameters())
    assert all(p.requires_grad for p in tr.stage.discriminator.parameters())
    ce, adv = logs["loss_source_ce"].item(), logs["loss_adv"].item()
    assert math.isclose(loss.item(), ce + 0.01 * adv, rel_tol=1e-5)
    kept = tr.stage.kept[0]
    assert kept["target"].shape == (4, 19, 64, 128) and not kept["target"].requires_grad
    assert torch.allclose(kept["source"].sum(1), torch.ones(4, 64, 128), atol=1e-5)


# -- settings ---------------------------------------------------------------------------------------------------------
def test_defaults_and_options():
    w = get_config("gta5_to_cityscapes").warmup
    assert (w.discriminator, w.gan, w.lambda_adv, w.d_lr, w.d_betas, w.source_label, w.target_label, w.freeze_bn) == \
        ("release", "ls", 0.01, 1e-4, (0.9, 0.99), 0.0, 1.0, True)
    cfg = get_config("synthcity")
    for name, value in (("warmup.gan", "vanilla"), ("warmup.lambda_adv", "0.001"), ("warmup.d_betas", "0.5,0.9")):
        set_option(cfg, name, value)
    assert (cfg.warmup.gan, cfg.warmup.lambda_adv, cfg.warmup.d_betas) == ("vanilla", 0.001, (0.5, 0.9))
    with pytest.raises(KeyError, match="warmup.lambda_adv"): set_option(cfg, "warmup.lamda_adv", "1")
    with pytest.raises(ValueError, match="ls"): Warmup(gan="wgan").bind(get_config("synthcity"))
    with pytest.raises(ValueError, match="adaptsegnet"): Warmup(discriminator="patch").bind(get_config("synthcity"))


def test_stage_is_registered():
    assert get_stage("warmup") is Warmup and Warmup.uses_target


# -- checkpoints --------------------------------------------------------------------------------------------------------
def tiny_cfg(out, iters=4):
    cfg = get_config("synthcity")
    cfg.schedule.iters = cfg.warmup.iters = iters
    cfg.optim.batch_size = 4
    cfg.data.synthcity_n, cfg.data.max_val = 8, 2
    cfg.run.out, cfg.run.progress, cfg.run.tensorboard, cfg.run.ckpt_every, cfg.run.log_every = str(out), False, False, 2, 1
    return cfg


@pytest.mark.parametrize("multi_level", [False, True])
def test_discriminator_state_survives_checkpoint(tmp_path, multi_level):
    torch.manual_seed(0)
    opts = dict(width=8, multi_level=multi_level)
    full = Trainer(tiny_cfg(tmp_path / "full"), stage=Warmup(**opts)); full.fit()
    cfg = tiny_cfg(tmp_path / "part"); cfg.run.stop_after = 2
    part = Trainer(cfg, stage=Warmup(**opts)); part.fit()
    ck = load_checkpoint(tmp_path / "part" / "checkpoint.pt")
    st = ck["stage"]["state"]
    assert ck["stage"]["name"] == "warmup" and ck["iteration"] == 2
    assert set(st["discriminator"]) == set(part.stage.discriminator.state_dict())
    assert len(st["d_optimizer"]["state"]) == sum(1 for d in part.stage._discriminators() for _ in d.parameters())
    assert ("aux_head" in st) == multi_level
    fresh = Trainer(tiny_cfg(tmp_path / "part"), stage=Warmup(**opts))
    before = {k: v.clone() for k, v in fresh.stage.discriminator.state_dict().items()}
    fresh.load_checkpoint(tmp_path / "part" / "checkpoint.pt")
    for k, v in fresh.stage.discriminator.state_dict().items():
        assert torch.equal(v, st["discriminator"][k])
    assert any(not torch.equal(before[k], v) for k, v in fresh.stage.discriminator.state_dict().items())
    fresh.fit(resume=tmp_path / "part" / "checkpoint.pt")          # resumed run = uninterrupted run
    for k, v in full.stage.discriminator.state_dict().items():
        assert torch.allclose(v, fresh.stage.discriminator.state_dict()[k], atol=1e-6), k
    for k, v in full.raw_model.state_dict().items():
        assert torch.allclose(v.double(), fresh.raw_model.state_dict()[k].double(), atol=1e-5), k


def test_resume_with_other_settings_is_refused(tmp_path):
    cfg = tiny_cfg(tmp_path); cfg.run.stop_after = 2
    Trainer(cfg, stage=Warmup(width=8)).fit()
    other = Trainer(tiny_cfg(tmp_path), stage=Warmup(width=8, gan="vanilla"))
    with pytest.raises(ValueError, match="gan"): other.load_checkpoint(tmp_path / "checkpoint.pt")


def test_init_from_source_only_weights(tmp_path):
    src_cfg = tiny_cfg(tmp_path / "src"); src_cfg.stage = "source_only"
    Trainer(src_cfg).fit()
    path = tmp_path / "src" / "checkpoint.pt"
    tr = Trainer(tiny_cfg(tmp_path / "wu"), stage=Warmup(width=8, init=str(path)))
    saved = load_checkpoint(path)["model"]
    for k, v in tr.raw_model.state_dict().items(): assert torch.equal(v, saved[k]), k
    torch.save({"not": torch.zeros(1)}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="bad.pt"): Trainer(tiny_cfg(tmp_path / "wu2"), stage=Warmup(init=str(tmp_path / "bad.pt")))


# -- the command line ---------------------------------------------------------------------------------------------------
def test_cli_stage_warmup(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    opts = ["--warmup.width", "8", "--warmup.discriminator", "adaptsegnet", "--warmup.gan", "vanilla"]
    r = subprocess.run([sys.executable, "-m", "proda_nb.train", "--stage", "warmup", *TINY, *opts, "--out", str(tmp_path)],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    log = [json.loads(l) for l in (tmp_path / "log.jsonl").read_text().splitlines()]
    steps = [x for x in log if "loss_adv" in x]
    assert [x["iteration"] for x in steps] == [1, 2, 3, 4]
    assert all(math.isfinite(x["loss_adv"]) and x["loss_adv"] > 0 for x in steps)
    assert math.isfinite(json.loads((tmp_path / "metrics.json").read_text())["miou"])
    ck = load_checkpoint(tmp_path / "checkpoint.pt")
    assert ck["stage"]["name"] == "warmup" and ck["stage"]["state"]["settings"]["gan"] == "vanilla"
    assert "net.0.weight" in ck["stage"]["state"]["discriminator"]      # AdaptSegNet's discriminator was used
    bad = subprocess.run([sys.executable, "-m", "proda_nb.train", "--stage", "warmup", *TINY, "--warmup.lamda_adv", "1",
                          "--out", str(tmp_path / "b")], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "--warmup.lambda_adv" in bad.stderr


def test_two_processes_equal_one_process(tmp_path):
    "DDP (2 gloo processes, 2 images each) = 1 process with 2 accumulated micro-batches: same segmenter, same discriminator."
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for name, extra in (("two", ["--gpus", "2"]), ("one", ["--optim.accum_steps", "2"])):
        extra = [*extra, "--warmup.width", "8"]
        r = subprocess.run([sys.executable, "-m", "proda_nb.train", "--stage", "warmup", *TINY, *extra,
                            "--out", str(tmp_path / name)], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    a, b = (load_checkpoint(tmp_path / n / "checkpoint.pt") for n in ("two", "one"))
    for k, v in a["stage"]["state"]["discriminator"].items():
        assert torch.allclose(v, b["stage"]["state"]["discriminator"][k], atol=1e-6), k
    init = Trainer(tiny_cfg(tmp_path / "init"), stage=Warmup(width=8)).stage.discriminator.state_dict()
    assert any(not torch.allclose(v, init[k]) for k, v in a["stage"]["state"]["discriminator"].items())   # it trained
    for k, v in a["model"].items():
        if not k.endswith("num_batches_tracked"): assert torch.allclose(v, b["model"][k], atol=1e-5), k
