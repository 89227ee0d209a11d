"Tests of ProDA stages 2 and 3 (proda_nb.distillation): the KL term, the teacher's labels, the stages and the CLI."
import math, os, subprocess, sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from conftest import default_network

from proda_nb.engine import get_config, Trainer, atomic_save, load_checkpoint
from proda_nb.models import build_model, SegOutput
from proda_nb.engine import missing_init_message
from proda_nb.distillation import (kd_loss, distill_kl, release_kd_value, teacher_labels, teacher_probs,
                                   labels_from_probs, Distillation)

REPO = Path(__file__).resolve().parents[1]
TINY = ["--data.synthcity_n", "32", "--data.max_val", "16", "--optim.batch_size", "4", "--run.progress", "false",
        "--run.tensorboard", "false", "--run.threads", "1"]


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))


def _train(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "proda_nb.train", *map(str, args), *TINY], capture_output=True,
                          text=True, cwd=REPO, env=_env(), timeout=timeout)


# -- the KL term ------------------------------------------------------------------------------------------------------
def test_kd_loss_hand_values():
    t = torch.tensor([math.log(3), 0.0]).view(1, 2, 1, 1)          # teacher (0.75, 0.25)
    s = torch.zeros(1, 2, 1, 1)                                      # student (0.5, 0.5)
    kl1 = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    assert abs(kd_loss(s, t).item() - kl1) < 1e-6 and abs(kl1 - 0.130812) < 1e-6
    a = math.sqrt(3) / (math.sqrt(3) + 1)                            # T = 2: softmax(ln 3 / 2, 0)
    kl2 = a * math.log(2 * a) + (1 - a) * math.log(2 * (1 - a))
    assert abs(kd_loss(s, t, T=2).item() - kl2) < 1e-6
    assert abs(kd_loss(t, t).item()) < 1e-7 and abs(kd_loss(t, t, T=3).item()) < 1e-7
    # two pixels, one equal to the teacher: half the KL; gradient (q_s - q_t) / T / pixels
    s2 = torch.tensor([[0.0, math.log(3)], [0.0, 0.0]]).view(1, 2, 1, 2).requires_grad_()
    t2 = torch.tensor([[math.log(3), math.log(3)], [0.0, 0.0]]).view(1, 2, 1, 2)
    kd_loss(s2, t2, T=2).backward()
    qs, qt = 0.5, a
    assert torch.allclose(s2.grad[0, :, 0, 0], torch.tensor([(qs - qt), (qt - qs)]) / 2 / 2, atol=1e-6)
    assert torch.allclose(s2.grad[0, :, 0, 1], torch.zeros(2), atol=1e-7)
    valid = torch.tensor([[[True, False]]])
    assert abs(kd_loss(s2.detach(), t2, valid=valid).item() - kl1) < 1e-6


def test_kd_loss_resizes_the_teacher_bilinearly():
    t = torch.tensor([[math.log(3), 0.0], [0.0, 0.0]]).view(1, 2, 1, 2)   # 1x2 teacher grid
    w = torch.tensor([1.0, 0.75, 0.25, 0.0])                               # align_corners=False weights onto 1x4
    q = 3 ** w / (3 ** w + 1)
    expected = (math.log(2) + q * q.log() + (1 - q) * (1 - q).log()).mean()
    assert abs(kd_loss(torch.zeros(1, 2, 1, 4), t).item() - expected.item()) < 1e-6
    with pytest.raises(ValueError, match="same shape"): distill_kl(torch.zeros(1, 2, 1, 4), torch.zeros(1, 2, 1, 2))


def test_release_value_is_not_a_kl():
    t = torch.tensor([math.log(3), 0.0]).view(1, 2, 1, 1)
    # identical distributions: -H(q) - |q|^2, divided by K = 2
    h = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert abs(release_kd_value(t, t).item() - (-h - 0.625) / 2) < 1e-6
    assert release_kd_value(t, t).item() < 0 and abs(kd_loss(t, t).item()) < 1e-7


# -- the teacher's labels -------------------------------------------------------------------------------------------
class Stub(torch.nn.Module):
    "class-0 logit = 10 * red + column index, class-1 logit = 0 (not flip-equivariant)."
    def forward(self, x):
        col = torch.arange(x.shape[-1], dtype=x.dtype).expand_as(x[:, 0])
        logits = torch.stack([10 * x[:, 0] + col, torch.zeros_like(x[:, 0])], 1)
        return SegOutput(logits, logits)


def test_teacher_labels_flip_average_and_threshold():
    img = torch.zeros(1, 3, 1, 4); img[0, 0, 0] = torch.tensor([0.3, 0.1, 0.0, 0.5])
    sig = lambda v: 1 / (1 + math.exp(-v))
    direct, mirrored = (3, 2, 2, 8), (6, 3, 1, 5)          # 10 r_j + j and 10 r_j + (3 - j)
    expected = torch.tensor([(sig(a) + sig(b)) / 2 for a, b in zip(direct, mirrored)])
    labels, probs = teacher_labels(Stub(), img, threshold=0.95)
    assert torch.allclose(probs[0, 0, 0], expected, atol=1e-6)
    assert labels[0, 0].tolist() == [0, 255, 255, 0]
    _, nf = teacher_labels(Stub(), img, flip=False)
    assert torch.allclose(nf[0, 0, 0], torch.tensor([sig(a) for a in direct]), atol=1e-6)
    assert teacher_labels(Stub(), img, threshold=0.96, flip=False)[0][0, 0].tolist() == [255, 255, 255, 0]
    assert teacher_labels(Stub(), img, threshold=0.9, ignore_index=250)[0][0, 0].tolist() == [0, 0, 250, 0]
    edge = torch.tensor([0.75, 0.25]).view(1, 2, 1, 1)
    assert labels_from_probs(edge, 0.75).item() == 255 and labels_from_probs(edge, 0.7499).item() == 0
    # at temperature T the average is of the softened softmaxes
    pT = teacher_probs(Stub(), img, True, T=2.0)
    assert torch.allclose(pT[0, 0, 0], torch.tensor([(sig(a / 2) + sig(b / 2)) / 2 for a, b in zip(direct, mirrored)]), atol=1e-6)


# -- the stages -----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("chain") / "stage1" / "checkpoint.pt"
    torch.manual_seed(123)                                   # not the engine's seed: scratch differs from it
    atomic_save({"model": default_network().state_dict()}, path)
    return path


def _trainer(tmp, init, stage=Distillation, **overrides):
    cfg = get_config("synthcity")
    cfg.stage = stage.name
    cfg.data.synthcity_n, cfg.data.max_val, cfg.optim.batch_size = 8, 4, 4
    cfg.run.out, cfg.run.progress, cfg.run.tensorboard, cfg.run.threads = str(tmp), False, False, 1
    getattr(cfg, stage.name).init = str(init)
    getattr(cfg, stage.name).iters = 2
    return Trainer(cfg, stage=stage(**overrides))


def test_teacher_frozen_student_inits_and_loss(tmp_path, teacher_ckpt):
    ref = load_checkpoint(teacher_ckpt)["model"]
    tr = _trainer(tmp_path / "a", teacher_ckpt, student_init="teacher", beta=0.0)
    st = tr.stage
    assert not st.teacher.training and not any(p.requires_grad for p in st.teacher.parameters())
    for k, v in tr.raw_model.state_dict().items(): assert torch.equal(v, ref[k]), k
    dl = lambda k: next(iter(torch.utils.data.DataLoader(tr.datasets[k], batch_size=4)))
    batch = {"source": dl("source"), "target": dl("target")}
    torch.manual_seed(1)
    loss, logs = st.compute_loss(batch)
    assert logs["loss_kd"].item() == 0.0
    assert abs(loss.item() - (logs["loss_source_ce"] + logs["loss_target_ce"]).item()) < 1e-5
    st.settings.beta = 1.0
    torch.manual_seed(1)                                      # same strong view
    loss1, logs1 = st.compute_loss(batch)
    assert logs1["loss_kd"].item() > 0
    assert abs(loss1.item() - loss.item() - logs1["loss_kd"].item()) < 1e-4
    tr.fit()
    for k, v in st.teacher.state_dict().items(): assert torch.equal(v, ref[k]), k   # never trained
    assert not torch.equal(tr.raw_model.state_dict()["classifier.weight"], ref["classifier.weight"])
    # scratch: the engine's own initialisation, not the teacher's
    tr2 = _trainer(tmp_path / "b", teacher_ckpt, student_init="scratch")
    assert not torch.equal(tr2.raw_model.state_dict()["classifier.weight"], ref["classifier.weight"])


def test_simclr_and_supervised_inits(tmp_path, teacher_ckpt):
    from proda_nb.simclr import SIMCLR_FORMAT, SimCLRSettings
    torch.manual_seed(5)
    ssl = default_network().state_dict()
    f = tmp_path / "simclr.pt"
    atomic_save({"format": SIMCLR_FORMAT, "model": ssl, "settings": asdict(SimCLRSettings()), "data_seed": 0,
                 "synthcity_version": 2, "norm": "gn"}, f)
    tr = _trainer(tmp_path / "s", teacher_ckpt, student_init="simclr", student_weights=str(f))
    got = tr.raw_model.state_dict()
    for k, v in ssl.items():
        if not k.startswith("classifier."): assert torch.equal(got[k], v), k
    longer = tmp_path / "simclr_2000_steps.pt"          # as `python -m proda_nb.simclr --steps 2000` writes it
    atomic_save({"format": SIMCLR_FORMAT, "model": ssl, "settings": asdict(SimCLRSettings(steps=2000)), "data_seed": 0,
                 "synthcity_version": 2, "norm": "gn"}, longer)
    content = longer.read_bytes()
    tr = _trainer(tmp_path / "l", teacher_ckpt, student_init="simclr", student_weights=str(longer))
    assert longer.read_bytes() == content                # used as it is, not pretrained again with the defaults
    for k, v in ssl.items():
        if not k.startswith("classifier."): assert torch.equal(tr.raw_model.state_dict()[k], v), k
    with pytest.raises(FileNotFoundError, match="source_only"):
        _trainer(tmp_path / "u", teacher_ckpt, student_init="supervised")
    src = teacher_ckpt.parent.parent / "source_only" / "checkpoint.pt"
    torch.manual_seed(6)
    sup = default_network().state_dict()
    atomic_save({"model": sup}, src)
    try:
        tr = _trainer(tmp_path / "v", teacher_ckpt, student_init="supervised")
        for k, v in sup.items(): assert torch.equal(tr.raw_model.state_dict()[k], v), k
    finally: src.unlink()
    with pytest.raises(ValueError, match="student_init"):
        _trainer(tmp_path / "w", teacher_ckpt, student_init="imagenet")


def test_missing_teacher_says_which_command_to_run(tmp_path):
    r = _train("--stage", "stage2", "--out", tmp_path / "nothing")
    assert r.returncode == 2, r.stderr[-2000:]
    assert str(tmp_path / "nothing" / "stage1" / "checkpoint.pt") in r.stderr and "Traceback" not in r.stderr
    assert "python -m proda_nb.train --stage stage1" in r.stderr and "--stage2.init" in r.stderr
    cfg = get_config(); cfg.run.out = "R"
    msg = missing_init_message(cfg, "stage3")
    assert "--stage stage2" in msg and "--stage3.init" in msg and "R/stage2/checkpoint.pt" in msg


def test_cli_stage2_then_stage3(tmp_path, teacher_ckpt):
    out = teacher_ckpt.parent.parent                       # R holds R/stage1/checkpoint.pt
    before = load_checkpoint(teacher_ckpt)["model"]
    r = _train("--stage", "stage2", "--out", out, "--stage2.iters", "3", "--stage2.student_init", "scratch")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "target val mIoU" in r.stdout and f"-> {out / 'stage2'}" in r.stdout
    ck2 = load_checkpoint(out / "stage2" / "checkpoint.pt")
    assert ck2["iteration"] == 3 and ck2["stage"]["name"] == "stage2"
    assert ck2["stage"]["state"]["settings"]["student_init"] == "scratch"
    r = _train("--stage", "stage3", "--out", out, "--stage3.iters", "3")   # teacher = R/stage2, student = its copy
    assert r.returncode == 0, r.stderr[-3000:]
    ck3 = load_checkpoint(out / "stage3" / "checkpoint.pt")
    assert ck3["iteration"] == 3 and ck3["stage"]["name"] == "stage3"
    assert ck3["config"]["stage3"]["student_init"] == "teacher"
    w = "classifier.weight"
    assert not torch.equal(ck3["model"][w], ck2["model"][w])              # stage 3 trained from stage 2's weights
    assert torch.equal(load_checkpoint(teacher_ckpt)["model"][w], before[w])   # the teachers' files are untouched
