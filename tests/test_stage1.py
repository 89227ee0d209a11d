"Integration tests of ProDA stage 1 (proda_nb.stage1): switches, CLI, missing init, two-process DDP."
import dataclasses, os, subprocess, sys, textwrap
from pathlib import Path

import pytest
import torch

from proda_nb.engine import get_config, Trainer, atomic_save, load_checkpoint
from proda_nb.models import build_model
from proda_nb.stage1 import Stage1
from conftest import default_network, run_cli

REPO = Path(__file__).resolve().parents[1]
TINY = ["--data.synthcity_n", "8", "--data.max_val", "4", "--optim.batch_size", "4", "--run.progress", "false",
        "--run.tensorboard", "false", "--run.threads", "1"]


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    return env


@pytest.fixture(scope="module")
def init_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("init") / "checkpoint.pt"
    torch.manual_seed(0)
    atomic_save({"model": default_network().state_dict()}, path)
    return path


def _trainer(tmp, init, **overrides):
    cfg = get_config("synthcity")
    cfg.stage = "stage1"
    cfg.data.synthcity_n, cfg.data.max_val, cfg.optim.batch_size = 8, 4, 4
    cfg.run.out, cfg.run.progress, cfg.run.tensorboard, cfg.run.threads = str(tmp), False, False, 1
    cfg.stage1.init, cfg.stage1.iters = str(init), 2
    return Trainer(cfg, stage=Stage1(**overrides))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, init_ckpt):
    tr = _trainer(tmp_path_factory.mktemp("run"), init_ckpt)
    dl = lambda k: next(iter(torch.utils.data.DataLoader(tr.datasets[k], batch_size=2)))
    return tr, {"source": dl("source"), "target": dl("target")}


def _loss(tr, batch, **settings):
    st = tr.stage
    settings = {"source_backward": "joint", **settings}          # the loss returned holds every term
    st.settings, protos = dataclasses.replace(st.settings, **settings), st.prototypes.clone()
    torch.manual_seed(123)
    try: return st.compute_loss(batch)
    finally: st.prototypes = protos         # every call starts from the same prototypes


def test_switches_change_the_loss_as_expected(tiny):
    tr, batch = tiny
    full, logs = _loss(tr, batch, gamma1=10.0, gamma2=0.1, sce=True, denoise=True)
    assert logs["loss_kl"] > 0 and logs["loss_reg"] > 0
    parts = logs["loss_source_ce"] + logs["loss_target"] + 10 * logs["loss_kl"] + 0.1 * logs["loss_reg"]
    assert abs(full.item() - parts.item()) < 1e-4
    # gamma1 = 0 removes exactly the KL term (same views: same seed), gamma2 = 0 the regulariser
    no_kl, l2 = _loss(tr, batch, gamma1=0.0, gamma2=0.1, sce=True, denoise=True)
    assert l2["loss_kl"].item() == 0.0
    assert abs(no_kl.item() - (full.item() - 10 * logs["loss_kl"].item())) < 1e-3
    no_reg, l3 = _loss(tr, batch, gamma1=0.0, gamma2=0.0, sce=True, denoise=True)
    assert l3["loss_reg"].item() == 0.0 and abs(no_reg.item() - (no_kl.item() - 0.1 * l2["loss_reg"].item())) < 1e-3
    # sce=False is plain cross-entropy: equal to SCE with alpha=1, beta=0, different from the default SCE
    ce, l4 = _loss(tr, batch, gamma1=0.0, gamma2=0.0, sce=False, denoise=True)
    sce10, l5 = _loss(tr, batch, gamma1=0.0, gamma2=0.0, sce=True, sce_alpha=1.0, sce_beta=0.0, denoise=True)
    assert abs(l4["loss_target"].item() - l5["loss_target"].item()) < 1e-5
    assert abs(l4["loss_target"].item() - l3["loss_target"].item()) > 1e-3


def test_denoise_switch_rectifies_labels(tiny):
    tr, batch = tiny
    st, images, idx = tr.stage, batch["target"]["image"], batch["target"]["index"]
    st.settings = dataclasses.replace(st.settings, denoise=False)
    feats, _, plain = st.teacher_labels(images, idx)
    soft = st.store.get(idx)
    assert soft.shape[-2:] == feats.shape[-2:]
    assert torch.equal(plain, soft.argmax(1))
    st.settings = dataclasses.replace(st.settings, denoise=True, tau=1.0)
    _, _, rect = st.teacher_labels(images, idx)
    # by hand: weights = softmax_k(-||f - eta_k||) over the classes that have a prototype
    protos = st.prototypes
    ok = torch.isfinite(protos).all(1)
    f = feats.permute(0, 2, 3, 1).reshape(-1, feats.shape[1]).double()
    d = torch.cdist(f, protos[ok].double())                                  # (N, K')
    w = torch.zeros(f.shape[0], protos.shape[0], dtype=torch.float64)
    w[:, ok] = torch.softmax(-d, 1)
    p = soft.permute(0, 2, 3, 1).reshape(-1, soft.shape[1]).double()
    expected = (w * p).argmax(1).view(plain.shape)
    assert (rect == expected).float().mean() > 0.999
    st.settings = dataclasses.replace(st.settings, denoise=True)


def test_prototype_update_follows_the_loss(tiny, monkeypatch):
    "The KL term sees the step's old prototypes; afterwards they are updated with the teacher's argmax labels."
    import proda_nb.stage1 as stage1
    from proda_nb.prototypes import has_prototype, update_prototypes
    tr, batch = tiny
    st, images, idx = tr.stage, batch["target"]["image"], batch["target"]["index"]
    settings, old, seen = st.settings, st.prototypes.clone(), []
    st.settings = dataclasses.replace(st.settings, gamma1=10.0, denoise=True)
    kl = stage1.prototype_kl
    monkeypatch.setattr(stage1, "prototype_kl", lambda s, t, protos, *a, **k: seen.append(protos.clone()) or kl(s, t, protos, *a, **k))
    try:
        torch.manual_seed(0)
        st.compute_loss(batch)
        assert len(seen) == 1 and torch.equal(seen[0], old[has_prototype(old)])
        torch.manual_seed(0)
        feats, logits, _ = st.teacher_labels(images, idx)
        expected = update_prototypes(old, feats, logits.argmax(1), st.settings.proto_momentum, min_pixels=st.settings.proto_min_pixels)
        ok = has_prototype(old)
        assert not torch.equal(st.prototypes[ok], old[ok])
        torch.testing.assert_close(st.prototypes, expected, atol=1e-6, rtol=0, equal_nan=True)
    finally: st.settings, st.prototypes = settings, old


def test_missing_init_says_which_command_to_run(tmp_path):
    r = run_cli("--stage", "stage1", "--out", tmp_path / "nothing", *TINY, ok=False)
    assert r.returncode == 2, r.stderr[-2000:]
    assert str(tmp_path / "nothing" / "warmup" / "checkpoint.pt") in r.stderr and str(tmp_path / "nothing" / "checkpoint.pt") in r.stderr
    assert f"python -m proda_nb.train --stage warmup --out {tmp_path / 'nothing'}" in r.stderr
    assert "--stage1.init" in r.stderr and "Traceback" not in r.stderr and not (tmp_path / "nothing").exists()


def test_end_to_end_cli(tmp_path, init_ckpt):
    out = tmp_path / "s1"
    r = subprocess.run([sys.executable, "-m", "proda_nb.train", "--stage", "stage1", "--stage1.init", str(init_ckpt),
                        "--stage1.iters", "3", "--stage1.proto_momentum", "0.5", "--out", str(out), *TINY],
                       capture_output=True, text=True, cwd=REPO, env=_env(), timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "target val mIoU" in r.stdout
    ck = load_checkpoint(out / "checkpoint.pt")
    assert ck["iteration"] == 3 and ck["stage"]["name"] == "stage1"
    state = ck["stage"]["state"]                                      # the stage's own state: EMA model, prototypes
    assert state["prototypes"].shape == (19, 64) and state["ema_model"].keys() == ck["model"].keys()
    init = load_checkpoint(init_ckpt)["model"]
    w = "classifier.weight"
    # the EMA moved (a little) from the init towards the student: 0 < |ema - init| < |student - init|
    d_ema, d_student = (state["ema_model"][w] - init[w]).norm(), (ck["model"][w] - init[w]).norm()
    assert 0 < d_ema < d_student
    assert list(init_ckpt.parent.glob("soft_labels_*.bin")), "the store is written beside the init checkpoint"


WORKER = textwrap.dedent("""
    import sys, torch
    from proda_nb.engine import get_config, Trainer, init_distributed
    out, init = sys.argv[1], sys.argv[2]
    cfg = get_config("synthcity"); cfg.stage = "stage1"
    cfg.data.synthcity_n, cfg.data.max_val, cfg.optim.batch_size = 8, 4, 4
    cfg.run.out, cfg.run.progress, cfg.run.tensorboard, cfg.run.threads = out, False, False, 1
    cfg.stage1.init, cfg.stage1.iters, cfg.stage1.proto_momentum = init, 3, 0.5
    env = init_distributed("cpu")
    tr = Trainer(cfg, env=env)
    start = tr.stage.prototypes.clone()
    tr.fit()
    torch.save({"prototypes": tr.stage.prototypes, "start": start, "ema": tr.stage.ema_model.state_dict(),
                "model": tr.raw_model.state_dict()}, f"{out}/rank{env.rank}.pt")
""")


def test_two_processes_keep_identical_prototypes_and_ema(tmp_path, init_ckpt):
    script = tmp_path / "worker.py"; script.write_text(WORKER)
    out = tmp_path / "ddp"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
                        str(out), str(init_ckpt)], capture_output=True, text=True, cwd=REPO, env=_env(), timeout=600)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    a, b = (torch.load(out / f"rank{i}.pt", weights_only=True) for i in (0, 1))
    ok = torch.isfinite(a["prototypes"]).all(1)
    assert ok.any() and torch.equal(ok, torch.isfinite(b["prototypes"]).all(1))
    assert not torch.allclose(a["prototypes"][ok], a["start"][ok]), "the prototypes must have moved"
    assert torch.allclose(a["prototypes"][ok], b["prototypes"][ok], atol=1e-6)
    for k in a["ema"]:
        assert torch.allclose(a["ema"][k].float(), b["ema"][k].float(), atol=1e-6), k
    for k in a["model"]:
        assert torch.allclose(a["model"][k].float(), b["model"][k].float(), atol=1e-6), k


def test_checkpoint_of_the_previous_format_still_resumes(tmp_path, init_ckpt):
    "A checkpoint that kept the EMA model and the prototypes beside the stage's state (format 1) resumes to the same run."
    from proda_nb.engine import atomic_save
    base = ["--stage", "stage1", "--stage1.init", str(init_ckpt), "--stage1.iters", "4", "--run.ckpt_every", "2", *TINY]
    run_cli(*base, "--out", tmp_path / "full")
    run_cli(*base, "--out", tmp_path / "cut", "--stop-after", "2")
    ck = load_checkpoint(tmp_path / "cut" / "checkpoint.pt")
    state = ck["stage"]["state"]
    ck.update(format="proda_nb.checkpoint/1", ema_model=state.pop("ema_model"), prototypes=state.pop("prototypes"))
    atomic_save(ck, tmp_path / "cut" / "checkpoint.pt")
    run_cli(*base, "--out", tmp_path / "cut", "--resume")
    a, b = (load_checkpoint(tmp_path / d / "checkpoint.pt") for d in ("full", "cut"))
    assert b["iteration"] == 4 and all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    torch.testing.assert_close(a["stage"]["state"]["prototypes"], b["stage"]["state"]["prototypes"], rtol=0, atol=0, equal_nan=True)


def _same(a, b):
    "Equal rows where both have a prototype, NaN rows in the same places."
    from proda_nb.prototypes import has_prototype
    assert torch.equal(has_prototype(a), has_prototype(b))
    torch.testing.assert_close(a[has_prototype(a)], b[has_prototype(b)], rtol=1e-5, atol=1e-5)


def test_true_class_means_as_frozen_prototypes(tmp_path, init_ckpt):
    "init_prototypes=target_labels starts from the true class means of the init model; momentum 1 keeps them."
    from proda_nb.models import network_from_checkpoint
    from proda_nb.prototypes import true_class_means, has_prototype
    tr = _trainer(tmp_path, init_ckpt, init_prototypes="target_labels", proto_momentum=1.0)
    means = true_class_means(network_from_checkpoint(tr.cfg.model, init_ckpt), tr.datasets["target"])
    _same(tr.stage.prototypes, means)
    start = tr.stage.prototypes.clone()
    tr.fit()
    kept = has_prototype(start)                        # a class with no true pixel may take a batch mean once
    torch.testing.assert_close(tr.stage.prototypes[kept], start[kept], rtol=0, atol=0)


def test_confident_portion_uses_cbst_thresholds_of_the_offline_labels(tmp_path, init_ckpt):
    from proda_nb.models import network_from_checkpoint
    from proda_nb.prototypes import initial_prototypes
    from proda_nb.pseudo_labels import cbst_thresholds
    tr = _trainer(tmp_path, init_ckpt, proto_init_portion=0.5)
    model, target = network_from_checkpoint(tr.cfg.model, init_ckpt), tr.datasets["target"]
    _same(tr.stage.prototypes, initial_prototypes(model, target, thresholds=cbst_thresholds(tr.stage.store, 0.5)))
    every_pixel = initial_prototypes(model, target)
    assert not torch.allclose(tr.stage.prototypes.nan_to_num(), every_pixel.nan_to_num())


def test_prototype_choices_refuse_what_they_cannot_do(tmp_path, init_ckpt):
    from proda_nb.engine import build_datasets
    with pytest.raises(ValueError, match="proto_init_portion must be in"): _trainer(tmp_path / "a", init_ckpt, proto_init_portion=0.0)
    with pytest.raises(ValueError, match="init_prototypes=checkpoint computes none"):
        _trainer(tmp_path / "b", init_ckpt, proto_init_portion=0.5, init_prototypes="checkpoint")

    class Unlabelled(torch.utils.data.Dataset):
        def __init__(self, ds): self.ds = ds
        def __len__(self): return len(self.ds)
        def __getitem__(self, i): return {**self.ds[i], "label": torch.full_like(self.ds[i]["label"], 255)}
    cfg = _trainer(tmp_path / "c", init_ckpt).cfg
    data = build_datasets(cfg, target_augment="plain")
    data["target"] = Unlabelled(data["target"])
    cfg.run.out = str(tmp_path / "d")
    with pytest.raises(ValueError, match="target training images have no labels"):
        Trainer(cfg, stage=Stage1(init_prototypes="target_labels"), datasets=data)


def test_cli_refuses_a_bad_portion_in_one_line(tmp_path, init_ckpt):
    r = run_cli("--stage", "stage1", "--stage1.init", init_ckpt, "--stage1.proto_init_portion", "1.5", "--out", tmp_path,
                *TINY, ok=False)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "stage1.proto_init_portion" in r.stderr.strip().splitlines()[-1]
