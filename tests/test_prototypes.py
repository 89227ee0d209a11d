"""proda_nb.prototypes against independent computations: explicit loops in NumPy (float64) for the weights, the
rectified labels, the momentum update and the initial prototypes; ignored pixels and absent classes; the
distributed update and initialisation with two gloo processes against one process on the whole batch."""
import math

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

from proda_nb.prototypes import (class_feature_sums, has_prototype, initial_prototypes, prototype_distances,
                                 prototype_weights, rectify_pseudo_labels, resize_labels, update_prototypes)

IGNORE = 255


def random_batch(seed, B=2, D=5, H=3, W=4, K=4, absent=(2,), ignore_share=0.2):
    "Features (B,D,H,W), labels (B,H,W) in 0..K-1 without the `absent` classes, some pixels IGNORE."
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(B, D, H, W, generator=g) * 2 + 1
    allowed = torch.tensor([k for k in range(K) if k not in absent])
    labels = allowed[torch.randint(len(allowed), (B, H, W), generator=g)]
    labels[torch.rand(B, H, W, generator=g) < ignore_share] = IGNORE
    return feats, labels


def reference_weights(feats, protos, tau):
    "Softmax over classes of -distance / tau, one pixel and one class at a time (float64)."
    f, p = feats.double().numpy(), protos.double().numpy()
    B, D, H, W = f.shape
    out = np.zeros((B, len(p), H, W))
    for b in range(B):
        for y in range(H):
            for x in range(W):
                d = np.array([math.sqrt(sum((f[b, c, y, x] - p[k, c]) ** 2 for c in range(D))) for k in range(len(p))])
                e = np.exp(-(d - d.min()) / tau)
                out[b, :, y, x] = e / e.sum()
    return out


def reference_update(protos, feats, labels, momentum, ignore=IGNORE):
    "The EMA update written with a loop over classes and pixels (float64)."
    p, f, y = protos.double().numpy().copy(), feats.double().numpy(), labels.numpy()
    for k in range(len(p)):
        pixels = [f[b, :, i, j] for b, i, j in zip(*np.nonzero(y == k))]
        if pixels: p[k] = momentum * p[k] + (1 - momentum) * np.mean(pixels, axis=0)
    return p


def test_weights_match_explicit_loops():
    feats, _ = random_batch(0)
    protos = torch.randn(4, 5, generator=torch.Generator().manual_seed(1))
    for tau in (0.3, 1.0, 5.0):
        w = prototype_weights(feats, protos, tau)
        assert w.shape == (2, 4, 3, 4)
        np.testing.assert_allclose(w.numpy(), reference_weights(feats, protos, tau), atol=1e-5)


def test_distances_are_accurate_far_from_the_origin():
    g = torch.Generator().manual_seed(2)
    centre = torch.full((8,), 3e3)
    protos = centre + torch.randn(3, 8, generator=g)
    feats = (centre[None, :, None, None] + torch.randn(1, 8, 4, 4, generator=g))
    expected = torch.cdist(feats.double().permute(0, 2, 3, 1).reshape(-1, 8), protos.double(),
                           compute_mode="donot_use_mm_for_euclid_dist").T.reshape(1, 3, 4, 4)
    np.testing.assert_allclose(prototype_distances(feats, protos).double().numpy(), expected.numpy(), atol=2e-3)


def test_missing_prototype_gets_zero_weight_and_gradient_is_finite():
    feats, _ = random_batch(3)
    protos = torch.randn(4, 5, generator=torch.Generator().manual_seed(4))
    protos_nan = protos.clone(); protos_nan[1] = float("nan")
    w = prototype_weights(feats, protos_nan)
    assert torch.all(w[:, 1] == 0)
    kept = [0, 2, 3]
    np.testing.assert_allclose(w[:, kept].numpy(), reference_weights(feats, protos[kept], 1.0), atol=1e-5)
    f = feats.clone().requires_grad_()
    prototype_weights(f, protos).max(1).values.sum().backward()
    assert torch.isfinite(f.grad).all() and f.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="every prototype is NaN"):
        prototype_weights(feats, torch.full((4, 5), float("nan")))


def test_rectify_matches_loop_and_refuses_other_sizes():
    g = torch.Generator().manual_seed(5)
    soft = torch.rand(2, 4, 3, 5, generator=g).softmax(1)
    w = torch.rand(2, 4, 3, 5, generator=g).softmax(1)
    s, ww = soft.numpy(), w.numpy()
    expected = np.array([[[int(np.argmax([s[b, k, i, j] * ww[b, k, i, j] for k in range(4)])) for j in range(5)]
                          for i in range(3)] for b in range(2)])
    out = rectify_pseudo_labels(soft, w)
    assert out.dtype == torch.int64
    np.testing.assert_array_equal(out.numpy(), expected)
    with pytest.raises(ValueError, match="F.interpolate"):
        rectify_pseudo_labels(soft, w[..., :4])


def test_update_matches_loop_ignored_and_absent_unchanged():
    feats, labels = random_batch(6, absent=(2,))
    protos = torch.randn(4, 5, generator=torch.Generator().manual_seed(7))
    new = update_prototypes(protos, feats, labels, momentum=0.7)
    np.testing.assert_allclose(new.double().numpy(), reference_update(protos, feats, labels, 0.7), atol=1e-5)
    assert torch.equal(new[2], protos[2])                          # absent class: bit for bit unchanged
    # changing the features of ignored pixels changes nothing
    feats2 = feats.clone()
    feats2.permute(0, 2, 3, 1)[labels == IGNORE] = 1e6
    assert torch.equal(update_prototypes(protos, feats2, labels, momentum=0.7), new)
    # all pixels ignored: nothing moves
    assert torch.equal(update_prototypes(protos, feats, torch.full_like(labels, IGNORE), 0.7), protos)


def test_update_min_pixels_and_missing_prototypes():
    feats, labels = random_batch(8, B=1, H=4, W=4, K=3, absent=(), ignore_share=0.0)
    labels[:] = 0
    labels[0, 0, 0] = 1                                            # class 1: one pixel; class 2: none
    protos = torch.tensor([[1.0] * 5, [float("nan")] * 5, [2.0] * 5])
    new = update_prototypes(protos, feats, labels, momentum=0.9)
    np.testing.assert_allclose(new[1].numpy(), feats[0, :, 0, 0].numpy(), atol=1e-6)   # first sighting: the mean
    assert torch.equal(new[2], protos[2])
    skipped = update_prototypes(protos, feats, labels, momentum=0.9, min_pixels=2)
    assert torch.isnan(skipped[1]).all()
    assert not has_prototype(skipped)[1] and has_prototype(skipped)[0]


def test_class_sums_and_errors():
    feats, labels = random_batch(9)
    sums, counts = class_feature_sums(feats, labels, 4)
    for k in range(4):
        mask = labels == k
        assert counts[k] == mask.sum()
        np.testing.assert_allclose(sums[k].numpy(), feats.permute(0, 2, 3, 1)[mask].sum(0).numpy(), atol=1e-4)
    with pytest.raises(ValueError, match="resize_labels"):
        update_prototypes(torch.zeros(4, 5), feats, labels[:, :2], 0.9)
    bad = labels.clone(); bad[0, 0, 0] = 7
    with pytest.raises(ValueError, match="0..3"):
        update_prototypes(torch.zeros(4, 5), feats, bad, 0.9)
    bad[0, 0, 0] = -3                                               # below the classes, with no pixel ignored too
    with pytest.raises(ValueError, match="-3"):
        class_feature_sums(feats, bad.masked_fill(bad == IGNORE, 0), 4)
    clean = random_batch(9, ignore_share=0.0)[1]                     # no ignored pixel at all: the same sums
    sums, counts = class_feature_sums(feats, clean, 4)
    for k in range(4):
        np.testing.assert_allclose(sums[k].numpy(), feats.permute(0, 2, 3, 1)[clean == k].sum(0).numpy(), atol=1e-4)
    assert counts.sum() == clean.numel()
    with pytest.raises(ValueError, match="momentum"):
        update_prototypes(torch.zeros(4, 5), feats, labels, 1.5)
    with pytest.raises(ValueError, match="D=5"):
        update_prototypes(torch.zeros(4, 6), feats, labels, 0.9)
    np.testing.assert_array_equal(resize_labels(labels, (6, 8))[:, ::2, ::2].numpy(), labels.numpy())


class TinyNet(nn.Module):
    "A random 3x3 conv as feature extractor (stride 2) and a 1x1 classifier: (features, logits)."
    num_classes = 4
    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.features = nn.Conv2d(3, 6, 3, stride=2, padding=1)
        self.classifier = nn.Conv2d(6, 4, 1)
    def forward(self, x):
        f = self.features(x)
        return f, self.classifier(f) * 5


def tiny_dataset(n=6, seed=10):
    g = torch.Generator().manual_seed(seed)
    return [{"image": torch.rand(3, 12, 16, generator=g)} for _ in range(n)]


def reference_initial(model, dataset, min_pixels):
    "Per image and class with >= min_pixels predicted pixels, the mean feature; mean over images; NaN if none."
    K = model.num_classes
    per_class = [[] for _ in range(K)]
    with torch.no_grad():
        for s in dataset:
            f, logits = model(s["image"][None])
            f, pred = f[0].double().numpy(), logits[0].argmax(0).numpy()
            for k in range(K):
                if (pred == k).sum() >= min_pixels: per_class[k].append(f[:, pred == k].mean(1))
    return np.array([np.mean(m, 0) if m else np.full(f.shape[0], np.nan) for m in per_class]), [len(m) for m in per_class]


def test_initial_prototypes_match_loop():
    model, data = TinyNet(), tiny_dataset()
    for min_pixels in (1, 10, 30):
        expected, counts = reference_initial(model, data, min_pixels)
        protos, got_counts = initial_prototypes(model, data, batch_size=4, min_pixels=min_pixels, return_counts=True)
        np.testing.assert_allclose(protos.numpy(), expected, atol=1e-5)   # NaN where expected NaN
        assert got_counts.tolist() == counts
    assert model.training                                               # mode restored


def _distributed_worker(rank, world_size, init_method, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world_size)
    try:
        feats, labels = random_batch(20, B=4)
        protos = torch.randn(4, 5, generator=torch.Generator().manual_seed(21))
        protos[3] = float("nan")
        part = slice(2 * rank, 2 * rank + 2)
        out = protos
        for step in range(3):                                       # a few steps: ranks must not drift apart
            out = update_prototypes(out, feats[part] + step, labels[part], momentum=0.6, distributed=True)
        torch.save(out, f"{out_dir}/update{rank}.pt")
        torch.save(initial_prototypes(TinyNet(), tiny_dataset(5), batch_size=2, distributed=True), f"{out_dir}/init{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_distributed_update_identical_on_ranks_and_equal_to_one_process(tmp_path):
    mp.spawn(_distributed_worker, args=(2, f"file://{tmp_path}/rendezvous", str(tmp_path)), nprocs=2, join=True)
    feats, labels = random_batch(20, B=4)
    protos = torch.randn(4, 5, generator=torch.Generator().manual_seed(21))
    protos[3] = float("nan")
    single = protos
    for step in range(3):
        single = update_prototypes(single, feats + step, labels, momentum=0.6)
    r0, r1 = torch.load(tmp_path / "update0.pt"), torch.load(tmp_path / "update1.pt")
    assert torch.equal(r0, r1)
    assert not torch.allclose(r0, protos, equal_nan=True)                # it did move
    torch.testing.assert_close(r0, single, equal_nan=True, atol=1e-5, rtol=1e-5)
    i0, i1 = torch.load(tmp_path / "init0.pt"), torch.load(tmp_path / "init1.pt")
    assert torch.equal(i0.nan_to_num(-1), i1.nan_to_num(-1))
    expected, _ = reference_initial(TinyNet(), tiny_dataset(5), 10)
    np.testing.assert_allclose(i0.numpy(), expected, atol=1e-5)
