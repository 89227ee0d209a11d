"""SimCLR pretraining: NT-Xent against a hand-computed value and a NumPy loop, views, training, weight files."""
import math

import numpy as np
import pytest
import torch

from proda_nb.models import SynthCityNet, WeightLoadError
from proda_nb.simclr import (ProjectionHead, SimCLRSettings, ensure_simclr_weights, load_simclr_weights, main,
                             nt_xent, pretrain_simclr, read_simclr_file, simclr_views)
from proda_nb.synthcity import SynthCity

TINY = SimCLRSettings(steps=3, batch_size=4, images=8, warmup=1)


def numpy_nt_xent(z1, z2, temperature):
    "NT-Xent written as the formula, anchor by anchor, in float64 NumPy."
    z = np.concatenate([z1, z2]).astype(np.float64)
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    n2 = len(z)
    losses = []
    for i in range(n2):
        j = (i + n2 // 2) % n2
        sims = np.array([z[i] @ z[k] / temperature for k in range(n2) if k != i])
        losses.append(-(z[i] @ z[j] / temperature) + np.log(np.exp(sims).sum()))
    return float(np.mean(losses))


def test_nt_xent_hand_value():
    # a1=(1,0), a2=(0,1), b1=(1,1)/sqrt2, b2=(-1,0); tau=0.5: per-anchor losses 0.2437, 1.8105, 0.7223, 0.3210
    z1, z2 = torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([[1.0, 1.0], [-1.0, 0.0]])
    e = math.exp(math.sqrt(2))
    hand = [math.log(e + 1 + math.exp(-2)) - math.sqrt(2), math.log(2 + e),
            math.log(2 * e + 1 / e) - math.sqrt(2), math.log(1 + math.exp(-2) + 1 / e)]
    assert nt_xent(z1, z2, 0.5).item() == pytest.approx(sum(hand) / 4, abs=1e-5)
    assert nt_xent(z1, z2, 0.5).item() == pytest.approx(0.7744, abs=1e-4)


def test_nt_xent_symmetric_and_matches_loop():
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    for t in (0.1, 0.5, 2.0):
        assert nt_xent(z1, z2, t).item() == pytest.approx(nt_xent(z2, z1, t).item(), abs=1e-5)
        assert nt_xent(z1, z2, t).item() == pytest.approx(numpy_nt_xent(z1.numpy(), z2.numpy(), t), rel=1e-5)
    perm = torch.randperm(6, generator=g)
    assert nt_xent(z1[perm], z2[perm]).item() == pytest.approx(nt_xent(z1, z2).item(), abs=1e-5)
    # positives aligned and negatives orthogonal: the loss falls as the positives agree
    assert nt_xent(torch.eye(4), torch.eye(4)) < nt_xent(torch.eye(4), torch.eye(4).roll(1, 0))


def test_nt_xent_gradient_flows_and_rejects_bad_shapes():
    z1 = torch.randn(4, 8, requires_grad=True)
    nt_xent(z1, torch.randn(4, 8)).backward()
    assert torch.isfinite(z1.grad).all() and z1.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="must both be"): nt_xent(torch.randn(4, 8), torch.randn(3, 8))
    with pytest.raises(ValueError, match="at least 2"): nt_xent(torch.randn(1, 8), torch.randn(1, 8))


def test_views_shapes_range_and_differences():
    images = torch.rand(6, 3, 64, 128)
    v1, v2 = simclr_views(images, torch.Generator().manual_seed(0))
    assert v1.shape == v2.shape == images.shape
    for v in (v1, v2): assert v.min() >= 0 and v.max() <= 1 and v.dtype == torch.float32
    assert (v1 - v2).abs().flatten(1).mean(1).min() > 1e-3        # every image's two views differ
    w1, w2 = simclr_views(images, torch.Generator().manual_seed(0))
    assert torch.equal(v1, w1) and torch.equal(v2, w2)
    s1, _ = simclr_views(images, size=(32, 64))
    assert s1.shape == (6, 3, 32, 64)
    # different images in a batch get different crops: a batch of identical images gives different views
    same = torch.rand(1, 3, 64, 128).expand(4, -1, -1, -1)
    u, _ = simclr_views(same, torch.Generator().manual_seed(1))
    assert (u[0] - u[1:]).abs().flatten(1).mean(1).min() > 1e-3
    with pytest.raises(ValueError, match="B, 3, H, W"): simclr_views(torch.rand(3, 64, 128))


def test_views_identity_when_augmentations_are_off():
    images = torch.rand(5, 3, 32, 48)
    v, _ = simclr_views(images, torch.Generator().manual_seed(2), scale=(1, 1), ratio=(1, 1), p_jitter=0, p_gray=0)
    err = torch.minimum((v - images).abs().amax((1, 2, 3)), (v - images.flip(-1)).abs().amax((1, 2, 3)))
    assert err.max() < 1e-5


def test_projection_head_pools():
    head = ProjectionHead(16, 32, 8).eval()
    x = torch.randn(3, 16, 5, 7)
    assert torch.allclose(head(x), head(x.mean((2, 3))), atol=1e-6)
    assert head(x).shape == (3, 8)


def test_pretraining_lowers_the_loss_on_a_fixed_batch():
    torch.manual_seed(0)
    model, head = SynthCityNet(), ProjectionHead(64)
    data = SynthCity("target_train", n=8)
    images = torch.stack([data[i]["image"] for i in range(8)])
    x1, x2 = simclr_views(images, torch.Generator().manual_seed(0), size=(32, 64))   # one fixed batch of views
    opt = torch.optim.Adam([*model.parameters(), *head.parameters()], 1e-3)
    losses = []
    for _ in range(8):
        z = head(model(torch.cat([x1, x2])).features)
        loss = nt_xent(z[:8], z[8:])
        opt.zero_grad(); loss.backward(); opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses


def test_pretrain_simclr_history_and_classifier_untouched():
    torch.manual_seed(0)
    model = SynthCityNet()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    h = pretrain_simclr(model, SynthCity("target_train", n=8), TINY)
    assert len(h["loss"]) == len(h["accuracy"]) == len(h["lr"]) == TINY.steps and h["seconds"] > 0
    assert all(math.isfinite(x) for x in h["loss"])
    after = model.state_dict()
    assert torch.equal(before["classifier.weight"], after["classifier.weight"])   # no gradient reaches it
    assert not torch.equal(before["stem.0.0.weight"], after["stem.0.0.weight"])


def test_ensure_caches_rebuilds_and_refuses_foreign_files(tmp_path):
    path = tmp_path / "w.pt"
    assert ensure_simclr_weights(path, settings=TINY) == path
    saved = read_simclr_file(path)
    assert saved["format"] == "proda_nb.simclr/1" and saved["data_seed"] == 0
    assert saved["settings"]["steps"] == TINY.steps and len(saved["history"]["loss"]) == TINY.steps
    stamp = path.stat().st_mtime_ns
    ensure_simclr_weights(path, settings=TINY)
    assert path.stat().st_mtime_ns == stamp                               # same settings and world: reused
    other = SimCLRSettings(steps=2, batch_size=4, images=8, warmup=1)
    ensure_simclr_weights(path, settings=other)
    assert read_simclr_file(path)["settings"]["steps"] == 2              # other settings: rebuilt
    ensure_simclr_weights(path, data_seed=1, settings=other)
    assert read_simclr_file(path)["data_seed"] == 1                      # other SynthCity world: rebuilt
    ensure_simclr_weights(path, data_seed=1, settings=other, norm="bn")
    assert read_simclr_file(path)["norm"] == "bn"                        # another network: rebuilt
    ensure_simclr_weights(path, data_seed=1, settings=other, norm="bn", version=1)
    assert read_simclr_file(path)["synthcity_version"] == 1              # another SynthCity version: rebuilt
    content = path.read_bytes()
    assert ensure_simclr_weights(path, data_seed=1, norm="bn", version=1) == path   # no settings: any pretraining of that world
    assert path.read_bytes() == content
    with pytest.raises(ValueError, match=r"w\.pt holds a SimCLR pretraining of SynthCity v1 world 1 \(bn\), not of v2 world 0 \(gn\)"):
        ensure_simclr_weights(path, replace=False)                        # a file the user gave is never replaced
    assert path.read_bytes() == content
    with pytest.raises(ValueError, match=r"world 1 \(bn\), but with other settings than this run asks for: give another file"):
        ensure_simclr_weights(path, data_seed=1, norm="bn", version=1, settings=TINY, replace=False)
    assert path.read_bytes() == content
    foreign = tmp_path / "foreign.pt"
    torch.save({"model": SynthCityNet().state_dict()}, foreign)
    content = foreign.read_bytes()
    with pytest.raises(FileExistsError, match=r"foreign\.pt.*not a SimCLR weight file.*refusing to overwrite"):
        ensure_simclr_weights(foreign, settings=TINY)
    assert foreign.read_bytes() == content
    garbage = tmp_path / "garbage.pt"; garbage.write_text("not a torch file")
    with pytest.raises(FileExistsError, match="garbage.pt"): ensure_simclr_weights(garbage, settings=TINY)


def test_load_leaves_the_classifier_fresh_and_refuses_misfits(tmp_path):
    path = ensure_simclr_weights(tmp_path / "w.pt", settings=TINY)
    saved = read_simclr_file(path)["model"]
    model = SynthCityNet(norm="gn")                                        # as ensure_simclr_weights builds it
    with torch.no_grad(): model.classifier.weight.fill_(7.0)               # as if trained before
    load_simclr_weights(model, path)
    sd = model.state_dict()
    for k, v in saved.items():
        if not k.startswith("classifier."): assert torch.equal(sd[k], v), k
    w = model.classifier.weight
    assert not torch.equal(w, saved["classifier.weight"]) and (w != 7.0).all()   # re-initialised
    bound = 1 / math.sqrt(w.shape[1])                                          # Conv2d's default init range
    assert w.abs().max() <= bound
    load_simclr_weights(SynthCityNet(num_classes=11, norm="gn"), path)       # the classifier size is free
    with pytest.raises(WeightLoadError, match="unexpected keys"):             # a BatchNorm network does not fit
        load_simclr_weights(SynthCityNet(), path)
    with pytest.raises(WeightLoadError, match=r"w\.pt does not fit SynthCityNet"):
        load_simclr_weights(SynthCityNet(width=16, norm="gn"), path)
    with pytest.raises(WeightLoadError, match="not a SimCLR weight file"):
        torch.save(SynthCityNet().state_dict(), tmp_path / "plain.pt")
        load_simclr_weights(SynthCityNet(), tmp_path / "plain.pt")
    with pytest.raises(FileNotFoundError, match="missing.pt"): load_simclr_weights(SynthCityNet(), tmp_path / "missing.pt")


def test_command_line(tmp_path, capsys):
    out = tmp_path / "cli.pt"
    assert main(["--out", str(out), "--steps", "2", "--batch-size", "4", "--images", "8"]) == 0
    assert "wrote" in capsys.readouterr().out
    assert main(["--out", str(out), "--steps", "2", "--batch-size", "4", "--images", "8"]) == 0
    assert "reused" in capsys.readouterr().out
    assert read_simclr_file(out)["settings"]["steps"] == 2
