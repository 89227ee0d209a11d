"""Integration tests of proda_nb.engine on a tiny in-test dataset (CPU, seconds): exact resume, NaN stop, atomic
checkpoints, one SGD step against a hand computation, the global-batch data order."""
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from proda_nb.engine import (Config, GlobalBatchSampler, NonFiniteLossError, SourceOnly, Trainer, atomic_save,
                             get_config, load_checkpoint, poly_factor, set_option)
from proda_nb.models import SegOutput, SynthCityNet
from conftest import max_diff, tiny_synthcity_config


class Blobs(torch.utils.data.Dataset):
    "Tiny segmentation set: the class of a pixel is read from its red channel; training samples flip at random."
    def __init__(self, n=16, seed=0, train=True, size=(24, 48)):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.rand(n, 3, *size, generator=g)
        self.y = (self.x[:, 0] * 3).long().clamp(max=2)
        self.y[:, :2] = 255                                   # some ignored pixels
        self.train = train
    def __len__(self): return len(self.x)
    def __getitem__(self, i):
        x, y = self.x[i], self.y[i]
        if self.train and torch.rand(()) < 0.5: x, y = x.flip(-1), y.flip(-1)   # torch's global RNG, as SegAugment
        return {"image": x, "label": y, "index": i, "name": f"blob{i}"}


def tiny_config(out, **overrides) -> Config:
    cfg = tiny_synthcity_config(out, **{"schedule.iters": 12, "optim.lr": 0.05, "run.ckpt_every": 4, "run.log_every": 4})
    for k, v in overrides.items(): set_option(cfg, k, v)
    return cfg


def tiny_trainer(cfg, stage=None) -> Trainer:
    torch.manual_seed(cfg.run.seed)
    model = SynthCityNet(width=8, feature_dim=16)
    return Trainer(cfg, stage=stage, model=model,
                   datasets={"source": Blobs(16, 0), "target": None, "val": Blobs(4, 1, train=False)})


def params(trainer):
    return {k: v.detach().clone() for k, v in trainer.raw_model.state_dict().items()}


def test_resume_equals_uninterrupted_run(tmp_path):
    full = tiny_trainer(tiny_config(tmp_path / "full"))
    m_full = full.fit()
    cut = tiny_trainer(tiny_config(tmp_path / "cut", **{"run.stop_after": 4}))
    assert cut.fit() is None                                    # stopped as if killed after step 4's checkpoint
    ck = load_checkpoint(tmp_path / "cut" / "checkpoint.pt")
    assert ck["iteration"] == 4 and ck["loaders"]["source"] == {"epoch": 1, "batch": 0, "seed": ck["loaders"]["source"]["seed"]}
    assert ck["format"] == "proda_nb.checkpoint/2" and ck["stage"] == {"name": "source_only", "state": {}}
    resumed = tiny_trainer(tiny_config(tmp_path / "cut"))
    m_res = resumed.fit(resume=tmp_path / "cut" / "checkpoint.pt")
    assert resumed.iteration == 12
    assert max_diff(params(full), params(resumed)) == 0.0
    assert torch.equal(resumed.confusion.matrix, full.confusion.matrix)
    assert m_res["iou"] == m_full["iou"] and m_res["miou"] == m_full["miou"]
    # and the run really changed the weights, so the comparison means something
    fresh = tiny_trainer(tiny_config(tmp_path / "fresh"))
    assert max_diff(params(fresh), params(full)) > 1e-3


def test_resume_refuses_a_different_run(tmp_path):
    tiny_trainer(tiny_config(tmp_path / "a", **{"run.stop_after": 4})).fit()
    other = tiny_trainer(tiny_config(tmp_path / "a", **{"optim.batch_size": 8}))
    with pytest.raises(ValueError, match="optim.batch_size"):
        other.fit(resume=tmp_path / "a" / "checkpoint.pt")


class NaNAt(SourceOnly):
    "Source CE, but NaN at optimizer step `bad` (0-based)."
    def __init__(self, bad): self.bad = bad
    def compute_loss(self, batch):
        loss, logs = super().compute_loss(batch)
        if self.trainer.iteration == self.bad: loss = loss * float("nan")
        return loss, logs


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    cfg = tiny_config(tmp_path / "nan", **{"run.ckpt_every": 2})
    tr = tiny_trainer(cfg, stage=NaNAt(bad=4))               # steps 0-3 fine (checkpoints at 2 and 4), step 4 NaN
    good = None
    with pytest.raises(NonFiniteLossError, match=r"iteration 5 \(0-based step 4\)") as e:
        orig = tr.save_checkpoint
        def spy(*a, **k):
            nonlocal good
            p = orig(*a, **k); good = params(tr); return p
        tr.save_checkpoint = spy
        tr.fit()
    assert "checkpoint.pt" in str(e.value)
    ck = load_checkpoint(tmp_path / "nan" / "checkpoint.pt")
    assert ck["iteration"] == 4
    assert all(torch.isfinite(v.double()).all() for v in ck["model"].values())
    assert max_diff(ck["model"], good) == 0.0                      # exactly the state written after step 4
    assert max_diff(params(tr), good) == 0.0                       # the bad step did not touch the weights
    assert [p.name for p in (tmp_path / "nan").glob(".*.tmp")] == []


def test_atomic_save_leaves_no_partial_file(tmp_path, monkeypatch):
    target = tmp_path / "checkpoint.pt"
    atomic_save({"w": torch.arange(3.)}, target)
    before = target.read_bytes()
    def broken_save(obj, f, *a, **k):
        f.write(b"half a checkpoint"); raise OSError("No space left on device")
    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="No space"):
        atomic_save({"w": torch.zeros(3)}, target)
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]


class Linear1x1(nn.Module):
    "A 1x1 convolution: one SGD step on it can be worked out by hand."
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
    def forward(self, x):
        lg = self.conv(x)
        return SegOutput(x, lg)


def test_one_step_matches_hand_computed_sgd(tmp_path):
    cfg = tiny_config(tmp_path / "sgd", **{"schedule.iters": 2, "optim.weight_decay": 0.01, "optim.momentum": 0.9,
                                           "optim.lr": 0.1, "run.ckpt_every": 0})
    cfg.model.num_classes = 3
    torch.manual_seed(0)
    model = Linear1x1(); w0 = {k: v.detach().clone() for k, v in model.state_dict().items()}
    data = Blobs(4, 0, train=False)
    tr = Trainer(cfg, model=model, datasets={"source": data, "target": None, "val": data})
    tr.fit()
    # by hand: the whole dataset is the global batch (4 images), two steps of SGD with momentum and weight decay
    ref = nn.Conv2d(3, 3, 1); ref.load_state_dict({k.split(".")[-1]: v for k, v in w0.items()})
    x, y = data.x, data.y
    bufs = {}
    for step in range(2):
        # each step sees the same 4 images (one global batch = one epoch), in some order: the mean CE does not care
        loss = F.cross_entropy(ref(x), y, ignore_index=255)
        grads = torch.autograd.grad(loss, list(ref.parameters()))
        lr = 0.1 * (1 - step / 2) ** 0.9
        with torch.no_grad():
            for (name, p), g in zip(ref.named_parameters(), grads):
                d = g + 0.01 * p
                bufs[name] = d if step == 0 else 0.9 * bufs[name] + d
                p -= lr * bufs[name]
    got = tr.raw_model.conv
    assert torch.allclose(got.weight, ref.weight, atol=1e-6) and torch.allclose(got.bias, ref.bias, atol=1e-6)
    assert tr.optimizer.param_groups[0]["lr"] == pytest.approx(0.0)   # poly factor at the horizon
    assert poly_factor(1, 2) == pytest.approx(0.5 ** 0.9)


def test_accumulation_is_the_global_batch_split_in_two(tmp_path):
    "One process with 2 micro-batches of 2 == the rank blocks that 2 processes would take."
    ds = Blobs(16)
    one = list(GlobalBatchSampler(ds, 4, 1, 0, seed=5))
    halves = [list(GlobalBatchSampler(ds, 4, 2, r, seed=5)) for r in (0, 1)]
    for k in range(4):
        assert one[4 * k: 4 * k + 2] == halves[0][2 * k: 2 * k + 2]
        assert one[4 * k + 2: 4 * k + 4] == halves[1][2 * k: 2 * k + 2]
    with pytest.raises(ValueError, match="divisible"):
        tiny_trainer(tiny_config(tmp_path / "x", **{"optim.batch_size": 6, "optim.accum_steps": 4}))




def test_hooks_are_called_in_order_once_per_step(tmp_path):
    "before_step(i) runs once per optimizer step before its forward passes, outside autocast; after_step(i + 1) after it."
    calls = []
    class Recording(SourceOnly):
        def before_step(self, iteration):
            calls.append(("before", iteration, self.trainer.iteration, torch.is_autocast_enabled()))
        def compute_loss(self, batch):
            calls.append(("loss", self.trainer.iteration))
            return super().compute_loss(batch)
        def after_step(self, iteration):
            calls.append(("after", iteration))
    tr = tiny_trainer(tiny_config(tmp_path / "hooks", **{"schedule.iters": 3, "optim.accum_steps": 2}), stage=Recording())
    tr.fit()
    expected = []
    for i in range(3): expected += [("before", i, i, False), ("loss", i), ("loss", i), ("after", i + 1)]
    assert calls == expected
