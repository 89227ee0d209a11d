"""Symmetric cross-entropy against independent computations: PyTorch's cross-entropy and a NumPy RCE formula."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from proda_nb.sce import SymmetricCrossEntropy, corrupt_labels, sce_curves, sce_terms, symmetric_cross_entropy

IGNORE = 255


def random_batch(shape=(3, 6, 9, 11), ignore_frac=0.25, scale=3.0, seed=0):
    "Random logits (B,K,H,W) and labels (B,H,W) with about `ignore_frac` of the pixels ignored."
    g = torch.Generator().manual_seed(seed)
    b, k, h, w = shape
    logits = scale * torch.randn(shape, generator=g, dtype=torch.float64)
    target = torch.randint(0, k, (b, h, w), generator=g)
    target[torch.rand((b, h, w), generator=g) < ignore_frac] = IGNORE
    return logits, target


def numpy_rce(logits, target, label_clamp=1e-4, prob_clamp=1e-7):
    "RCE = -sum_k p_k log q_k with a clamped one-hot, written directly in NumPy, mean over valid pixels."
    z = logits.detach().double().numpy()
    z = np.moveaxis(z, 1, -1).reshape(-1, z.shape[1]) if z.ndim == 4 else z
    y = target.numpy().reshape(-1)
    keep = y != IGNORE
    z, y = z[keep], y[keep]
    p = np.exp(z - z.max(1, keepdims=True))
    p = np.clip(p / p.sum(1, keepdims=True), prob_clamp, 1.0)
    q = np.clip(np.eye(z.shape[1])[y], label_clamp, 1.0)
    return float((-(p * np.log(q)).sum(1)).mean())


def test_ce_part_equals_torch_cross_entropy():
    logits, target = random_batch()
    ce, _ = sce_terms(logits, target)
    expected = F.cross_entropy(logits, target, ignore_index=IGNORE)
    assert torch.allclose(ce.double(), expected, atol=1e-5)
    # alpha=1, beta=0 is plain CE
    loss = symmetric_cross_entropy(logits, target, alpha=1.0, beta=0.0)
    assert torch.allclose(loss.double(), expected, atol=1e-5)


def test_rce_part_equals_numpy_formula():
    logits, target = random_batch(seed=1)
    _, rce = sce_terms(logits, target)
    assert rce.item() == pytest.approx(numpy_rce(logits, target), rel=1e-5)


def test_full_loss_weighted_sum():
    logits, target = random_batch(seed=2)
    alpha, beta = 0.3, 2.5
    expected = alpha * F.cross_entropy(logits, target, ignore_index=IGNORE).item() + beta * numpy_rce(logits, target)
    assert symmetric_cross_entropy(logits, target, alpha, beta).item() == pytest.approx(expected, rel=1e-5)
    assert SymmetricCrossEntropy(alpha, beta)(logits, target).item() == pytest.approx(expected, rel=1e-5)


def test_rce_is_scaled_one_minus_p_y_without_clamping():
    logits, target = random_batch(scale=1.0, seed=3)        # moderate logits: no probability below 1e-7
    _, rce = sce_terms(logits, target)
    p = logits.softmax(1)
    valid = target != IGNORE
    p_y = p.gather(1, target.masked_fill(~valid, 0).unsqueeze(1)).squeeze(1)[valid]
    assert rce.item() == pytest.approx(-math.log(1e-4) * (1 - p_y).mean().item(), rel=1e-5)


def test_ignored_pixels_do_not_matter():
    logits, target = random_batch(seed=4)
    changed = logits.clone()
    changed.permute(0, 2, 3, 1)[target == IGNORE] = torch.tensor([100.0, -100.0, 0.0, 5.0, -5.0, 50.0],
                                                                 dtype=logits.dtype)
    assert symmetric_cross_entropy(changed, target).item() == pytest.approx(
        symmetric_cross_entropy(logits, target).item(), rel=1e-6)


def test_mean_is_over_valid_pixels_only():
    # two identical valid pixels and one ignored: the loss equals that of one pixel alone
    one = torch.tensor([[2.0, 0.0, -1.0]])
    three = one.repeat(3, 1)
    t1 = torch.tensor([1])
    t3 = torch.tensor([1, IGNORE, 1])
    assert symmetric_cross_entropy(three, t3).item() == pytest.approx(symmetric_cross_entropy(one, t1).item(), rel=1e-6)


def test_two_dimensional_case_matches_map_case():
    logits, target = random_batch(seed=5)
    flat_logits = logits.permute(0, 2, 3, 1).reshape(-1, logits.shape[1])
    flat_target = target.reshape(-1)
    assert symmetric_cross_entropy(flat_logits, flat_target).item() == pytest.approx(
        symmetric_cross_entropy(logits, target).item(), rel=1e-6)
    expected = 0.1 * F.cross_entropy(flat_logits, flat_target, ignore_index=IGNORE).item() + numpy_rce(flat_logits, flat_target)
    assert symmetric_cross_entropy(flat_logits, flat_target).item() == pytest.approx(expected, rel=1e-5)


def test_gradients_finite_at_extreme_logits():
    logits = torch.tensor([[1e4, -1e4, 0.0], [-1e4, 1e4, 0.0], [3e4, 3e4, -3e4], [0.0, 0.0, 0.0]],
                          requires_grad=True)
    target = torch.tensor([1, 1, 2, IGNORE])               # confidently wrong, confidently right, hopeless, ignored
    loss = symmetric_cross_entropy(logits, target)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()
    assert torch.equal(logits.grad[3], torch.zeros(3))
    # half-precision logits are computed in float32 and stay finite
    half = (torch.randn(2, 4, 5, 5) * 30).half().requires_grad_()
    out = symmetric_cross_entropy(half, torch.randint(0, 4, (2, 5, 5)))
    out.backward()
    assert out.dtype == torch.float32 and torch.isfinite(half.grad.float()).all()


def test_gradient_matches_finite_differences():
    logits, target = random_batch(shape=(1, 4, 2, 3), scale=1.0, seed=6)
    logits.requires_grad_()
    assert torch.autograd.gradcheck(lambda z: symmetric_cross_entropy(z, target, 0.4, 1.3), (logits,))


def test_all_ignored_returns_zero_with_gradient_path():
    logits = torch.randn(2, 5, 4, 4, requires_grad=True)
    loss = symmetric_cross_entropy(logits, torch.full((2, 4, 4), IGNORE))
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))


def test_bad_inputs_raise_clear_errors():
    logits = torch.randn(2, 5, 4, 4)
    with pytest.raises(ValueError, match="upsample the logits"):
        symmetric_cross_entropy(logits, torch.zeros(2, 8, 8, dtype=torch.long))
    with pytest.raises(ValueError, match=r"outside the classes 0..4"):
        symmetric_cross_entropy(logits, torch.full((2, 4, 4), 5))
    with pytest.raises(ValueError, match=r"outside the classes 0..4"):
        symmetric_cross_entropy(logits, torch.full((2, 4, 4), -1))
    with pytest.raises(TypeError, match="integer class ids"):
        symmetric_cross_entropy(logits, torch.zeros(2, 4, 4))
    with pytest.raises(ValueError, match=r"\(N,K\) or \(B,K,H,W\)"):
        symmetric_cross_entropy(torch.randn(2, 5, 4), torch.zeros(2, 4, dtype=torch.long))


def test_custom_ignore_index():
    logits, target = random_batch(seed=7)
    t250 = target.masked_fill(target == IGNORE, 250)         # ProDA's release uses 250
    expected = symmetric_cross_entropy(logits, target).item()
    assert symmetric_cross_entropy(logits, t250, ignore_index=250).item() == pytest.approx(expected, rel=1e-6)


def test_sce_curves_against_closed_forms():
    p = np.array([0.1, 0.5, 0.8])
    c = sce_curves(p, alpha=0.2, beta=3.0)
    a = math.log(1e4)
    assert np.allclose(c["ce"], [-math.log(x) for x in p])
    assert np.allclose(c["rce"], [a * (1 - x) for x in p])
    assert np.allclose(c["sce"], [0.2 * -math.log(x) + 3.0 * a * (1 - x) for x in p])
    assert np.allclose(c["grad_rce"], [a * x * (1 - x) for x in p])
    with pytest.raises(ValueError, match="p_y"):
        sce_curves([0.0, 0.5])


@pytest.mark.parametrize("mode", ["pixel", "region"])
@pytest.mark.parametrize("rate", [0.2, 0.4])
def test_corrupt_labels_rate_and_invariants(mode, rate):
    g = torch.Generator().manual_seed(0)
    # blocky label maps: many regions of several sizes
    coarse = torch.randint(0, 6, (4, 8, 16), generator=g)
    label = coarse.repeat_interleave(8, 1).repeat_interleave(8, 2)
    label[:, :4] = IGNORE
    noisy = corrupt_labels(label, rate, mode, classes=range(6), seed=1)
    valid = label != IGNORE
    assert torch.equal(noisy == IGNORE, ~valid)
    assert noisy.dtype == label.dtype and noisy.shape == label.shape
    assert set(noisy.unique().tolist()) <= set(range(6)) | {IGNORE}
    flipped = (noisy != label)[valid].float().mean().item()
    assert abs(flipped - rate) < 0.05, flipped
    assert torch.equal(corrupt_labels(label, rate, mode, classes=range(6), seed=1), noisy)   # deterministic
    if mode == "region":   # every 8x8 block lies in one region, so it keeps a single label
        blocks = noisy[:, 8:].reshape(4, 7, 8, 16, 8).permute(0, 1, 3, 2, 4).reshape(4, 7, 16, 64)
        assert (blocks == blocks[..., :1]).all()


def test_corrupt_labels_bad_arguments():
    label = torch.zeros(4, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="rate"):
        corrupt_labels(label, 1.5)
    with pytest.raises(ValueError, match="mode"):
        corrupt_labels(label, 0.2, mode="blocks")
