"""Integration tests of proda_nb.consistency: views replayed on label and feature maps, the losses, the EMA.

References are independent of the code under test: slicing and flipping by index, whole-pixel shifts by slicing,
torchvision's own rotate/affine, analytic functions of the coordinates, losses recomputed from explicit
differences, values worked out by hand."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from torchvision.transforms import InterpolationMode

from proda_nb.consistency import (GEOMETRIC_OPS, GRAY, PHOTOMETRIC_OPS, ViewGeometry, compose,
                                  create_ema_model, crop_matrix, entropy_regularizer, ema_update, hflip_matrix,
                                  map_pixel_centres, prototype_kl, rotate_matrix, shear_matrix, strong_view, translate_matrix, warp,
                                  weak_view)
from proda_nb.labels import IGNORE_INDEX

torch.set_num_threads(1)


def blocky_labels(batch=2, size=(48, 96), block=6, seed=0):
    "Label maps made of `block`-sized squares of random classes: large regions, boundaries on a known grid."
    g = torch.Generator().manual_seed(seed)
    h, w = size
    small = torch.randint(0, 19, (batch, -(-h // block), -(-w // block)), generator=g)
    return small.repeat_interleave(block, 1).repeat_interleave(block, 2)[:, :h, :w].contiguous()


def as_image(labels):
    "A label map as a 3-channel float image (value / 255), so that image views can be applied to it."
    return (labels.float() / 255)[:, None].expand(-1, 3, -1, -1).contiguous()


def from_image(images):
    return (images[:, 0] * 255).round().long()


def boundary(labels):
    "Pixels with a differently labelled 8-neighbour (or next to the image edge)."
    x = F.pad(labels[:, None].float(), (1, 1, 1, 1), value=-1.0)
    nb = F.unfold(x, 3).view(len(labels), 9, *labels.shape[-2:])
    return (nb != labels[:, None].float()).any(1)


def shift(labels, dx, dy):
    "Whole-pixel shift by slicing: picture moves dx right, dy down; uncovered pixels IGNORE_INDEX."
    out = torch.full_like(labels, IGNORE_INDEX)
    H, W = labels.shape[-2:]
    out[..., max(dy, 0):H + min(dy, 0), max(dx, 0):W + min(dx, 0)] = \
        labels[..., max(-dy, 0):H + min(-dy, 0), max(-dx, 0):W + min(-dx, 0)]
    return out


# --- weak view: crop and flip -----------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", [0, 1, 2])
def test_weak_view_label_carried_exactly(seed):
    labels = blocky_labels(4, (40, 72), block=1, seed=seed)  # every pixel its own random class
    crops, geo = weak_view(as_image(labels), (24, 40), torch.Generator().manual_seed(seed))
    carried, valid = warp(labels, geo)
    assert valid.all()
    assert torch.equal(carried, from_image(crops))


def test_crop_and_flip_matrices_against_slicing():
    labels = blocky_labels(1, (30, 50), block=1, seed=5)
    for top, left, flip in [(0, 0, False), (7, 11, True), (10, 20, False), (10, 20, True)]:
        m = crop_matrix(torch.tensor([top]), torch.tensor([left]), (20, 30), (30, 50)) @ hflip_matrix(torch.tensor([flip]))
        carried, _ = warp(labels, ViewGeometry.from_matrix(m, (20, 30), (30, 50)))
        expected = labels[:, top:top + 20, left:left + 30]
        assert torch.equal(carried, expected.flip(-1) if flip else expected)


def test_weak_view_rejects_large_crop():
    with pytest.raises(ValueError, match="larger than the images"):
        weak_view(torch.rand(1, 3, 20, 20), (24, 16))


# --- strong view: translation, rotation, shear ----------------------------------------------------------------------

@pytest.mark.parametrize("dx,dy", [(3, 0), (-5, 2), (0, -7), (11, 4)])
def test_translation_matrix_whole_pixels_exact(dx, dy):
    labels = blocky_labels(1, (24, 40), block=1, seed=dx + 10 * dy)
    m = translate_matrix(torch.tensor([float(dx)]), torch.tensor([float(dy)]), (24, 40))
    carried, valid = warp(labels, ViewGeometry.from_matrix(m, (24, 40), (24, 40)))
    expected = shift(labels, dx, dy)
    assert torch.equal(carried, expected)
    assert torch.equal(valid, expected != IGNORE_INDEX)


@pytest.mark.parametrize("seed", range(4))
def test_strong_view_translation_label_exact(seed):
    labels = blocky_labels(4, (48, 96), block=1, seed=seed)
    strong, geo = strong_view(as_image(labels), torch.Generator().manual_seed(seed),
                              ops=("translate_x", "translate_y"), apply_prob=1.0)
    carried, valid = warp(labels, geo)
    assert torch.equal(carried[valid], from_image(strong)[valid])
    assert (carried[~valid] == IGNORE_INDEX).all()
    # the gray fill and the Cutout are exactly the invalid pixels
    assert torch.allclose(strong[:, 0][~valid], torch.full_like(strong[:, 0][~valid], GRAY))


@pytest.mark.parametrize("seed", range(4))
def test_strong_view_rotation_and_shear_agree_away_from_boundaries(seed):
    labels = blocky_labels(4, (48, 96), block=8, seed=seed)
    strong, geo = strong_view(as_image(labels), torch.Generator().manual_seed(seed), ops=GEOMETRIC_OPS,
                              apply_prob=1.0, cutout=False)
    assert not torch.allclose(geo.matrix, torch.eye(3).expand(4, 3, 3))
    carried, valid = warp(labels, geo)
    interior = valid & ~boundary(carried) & ~boundary(from_image(strong))
    agree = (carried == from_image(strong))[interior].float().mean()
    assert agree >= 0.98, f"only {agree:.3f} agreement"
    assert interior.float().mean() > 0.3


@pytest.mark.parametrize("degrees", [9.0, -17.0, 27.0])
def test_rotation_matches_torchvision(degrees):
    labels = blocky_labels(1, (48, 96), block=8, seed=int(degrees) % 7)
    carried, valid = warp(labels, ViewGeometry.from_matrix(rotate_matrix(torch.tensor([degrees]), (48, 96)), (48, 96), (48, 96)))
    ref = TF.rotate(labels[:, None].to(torch.uint8) + 1, degrees, interpolation=InterpolationMode.NEAREST, fill=0)[:, 0]
    ref = ref.long() - 1
    keep = valid & (ref >= 0) & ~boundary(carried)
    assert (carried == ref)[keep].float().mean() >= 0.98
    # torchvision fills exactly the pixels that the validity mask rejects, up to edge pixels
    assert ((ref < 0) == ~valid).float().mean() >= 0.98


def test_shear_matches_torchvision():
    labels = blocky_labels(1, (48, 96), block=8, seed=3)
    k = 0.2
    carried, valid = warp(labels, ViewGeometry.from_matrix(shear_matrix(torch.tensor([k]), torch.tensor([0.0]), (48, 96)), (48, 96), (48, 96)))
    ref = TF.affine(labels[:, None].to(torch.uint8) + 1, angle=0.0, translate=[0, 0], scale=1.0,
                    shear=[math.degrees(math.atan(k)), 0.0], interpolation=InterpolationMode.NEAREST, fill=0)[:, 0].long() - 1
    keep = valid & (ref >= 0) & ~boundary(carried)
    assert (carried == ref)[keep].float().mean() >= 0.98


# --- composition and resolution -------------------------------------------------------------------------------------

def test_compose_equals_two_steps_and_excludes_outside_weak_crop():
    labels = blocky_labels(2, (40, 80), block=1, seed=9)
    g = torch.Generator().manual_seed(0)
    weak, to_weak = weak_view(as_image(labels), (32, 64), g)
    to_strong = ViewGeometry.from_matrix(translate_matrix(torch.tensor([10.0, -6.0]), torch.tensor([3.0, 0.0]), (32, 64)),
                                         (32, 64), (32, 64))
    direct, valid = warp(labels, compose(to_weak, to_strong))
    two_steps, _ = warp(from_image(weak), to_strong)
    assert torch.equal(direct, two_steps)
    # pixels shifted in from outside the weak crop exist in the full image but must be invalid
    assert (~valid[0, :, :10]).all() and (~valid[0, :3]).all() and (~valid[1, :, -6:]).all()
    assert valid[0, 3:, 10:].all() and valid[1, :, :-6].all()


def test_compose_checks_sizes():
    a = ViewGeometry.identity(1, (8, 8))
    b = ViewGeometry.identity(1, (4, 4))
    with pytest.raises(ValueError, match="cannot compose"):
        compose(a, b)


def linear_field(size, coef=(0.7, -1.3, 0.2)):
    "A 1-channel map whose value is a linear function of normalised pixel-centre coordinates."
    h, w = size
    y = (2 * torch.arange(h) + 1) / h - 1
    x = (2 * torch.arange(w) + 1) / w - 1
    return (coef[0] * x[None, :] + coef[1] * y[:, None] + coef[2])[None, None]


def test_full_resolution_to_quarter_agrees_with_downsample_then_carry():
    H, W = 64, 128
    g = torch.Generator().manual_seed(4)
    _, to_weak = weak_view(torch.rand(1, 3, H, W), (48, 96), g)
    _, to_strong = strong_view(torch.rand(1, 3, 48, 96), g, ops=("rotate", "shear_x"), apply_prob=1.0)
    chain = compose(to_weak, to_strong)
    field = linear_field((H, W))
    # carry at full resolution, then downsample 4x4; or downsample, then carry onto the 1/4 grid
    full_then_down = F.avg_pool2d(warp(field, chain)[0], 4)
    down_then_carry, valid4 = warp(F.avg_pool2d(field, 4), chain, size=(12, 24))
    block_valid = F.avg_pool2d(chain.valid_mask()[:, None].float(), 4)[:, 0] == 1  # whole 4x4 block valid
    # stay a pixel away from the full image's edge, where border padding takes over from extrapolation
    inner = ViewGeometry.from_matrix(torch.diag(torch.tensor([1.15, 1.15, 1.0]))[None] @ chain.matrix, (48, 96), (H, W))
    keep = valid4 & block_valid & inner.valid_mask((12, 24))
    assert keep.float().mean() > 0.4
    assert torch.allclose(full_then_down[:, 0][keep], down_then_carry[:, 0][keep], atol=1e-4)
    # and both equal the field evaluated where the 1/4 pixel centres land in the full image
    y = (2 * torch.arange(12) + 1) / 12 - 1
    x = (2 * torch.arange(24) + 1) / 24 - 1
    p = torch.stack([x[None].expand(12, -1), y[:, None].expand(-1, 24), torch.ones(12, 24)], -1)
    q = p @ chain.matrix[0].T
    analytic = 0.7 * q[..., 0] - 1.3 * q[..., 1] + 0.2
    assert torch.allclose(down_then_carry[0, 0][keep[0]], analytic[keep[0]], atol=1e-4)


# --- photometric ops, cutout, determinism --------------------------------------------------------------------------

@pytest.mark.parametrize("op", list(PHOTOMETRIC_OPS))
def test_photometric_ops_never_move_pixels(op):
    labels = blocky_labels(2, (48, 96), block=8, seed=1)
    palette = torch.rand(19, 3, generator=torch.Generator().manual_seed(0)) * 0.8 + 0.1
    image = palette[labels].permute(0, 3, 1, 2).contiguous()
    out, geo = strong_view(image, torch.Generator().manual_seed(2), ops=(op,), num_ops=1, apply_prob=1.0,
                           flip_prob=0.0, cutout=False)
    assert torch.equal(geo.matrix, torch.eye(3).expand(2, 3, 3)) and geo.valid_mask().all()
    # a pixel whose 3x3 neighbourhood is one class keeps a colour that depends on its class only
    interior = ~boundary(labels)
    for b in range(2):
        for k in labels[b].unique():
            sel = interior[b] & (labels[b] == k)
            if sel.sum() == 0: continue
            colours = out[b].permute(1, 2, 0)[sel]
            assert (colours - colours[0]).abs().max() < 1e-5, f"{op} changed pixels of class {k} differently"
    if op != "identity":  # and the op did something
        assert not torch.allclose(out, image)


def test_cutout_excluded_from_valid():
    image = torch.full((3, 3, 48, 96), 0.2)
    for seed in range(3):
        out, geo = strong_view(image, torch.Generator().manual_seed(seed), ops=("identity",), flip_prob=0.0)
        valid = geo.valid_mask()
        cut = (out[:, 0] - GRAY).abs() < 1e-6
        assert torch.equal(~valid, cut)
        for b in range(3):  # an axis-aligned square of side min(48, 96) // 3 = 16, clipped at the edges
            rows, cols = cut[b].any(1).nonzero()[:, 0], cut[b].any(0).nonzero()[:, 0]
            assert cut[b].sum() == len(rows) * len(cols)
            assert len(rows) <= 16 and len(cols) <= 16
            assert len(rows) == 16 or rows.min() == 0 or rows.max() == 47
            assert len(cols) == 16 or cols.min() == 0 or cols.max() == 95


def test_views_deterministic_under_seeded_generator():
    image = torch.rand(4, 3, 64, 128)
    def run(seed):
        g = torch.Generator().manual_seed(seed)
        weak, w = weak_view(image, (48, 96), g)
        strong, s = strong_view(weak, g)
        return weak, strong, compose(w, s).matrix
    a, b, c = run(0), run(0), run(1)
    for x, y in zip(a, b): assert torch.equal(x, y)
    assert not torch.equal(a[2], c[2])


def test_strong_view_rejects_unknown_op():
    with pytest.raises(ValueError, match="unknown ops"):
        strong_view(torch.rand(3, 16, 16), ops=("rotate", "mixup"))


def test_warp_rejects_bilinear_labels_and_batch_mismatch():
    geo = ViewGeometry.identity(2, (4, 4))
    with pytest.raises(ValueError, match="nearest"):
        warp(torch.zeros(2, 4, 4, dtype=torch.long), geo, mode="bilinear")
    with pytest.raises(ValueError, match="B=2"):
        warp(torch.zeros(3, 1, 4, 4), geo)


# --- losses and EMA ---------------------------------------------------------------------------------------------------

def reference_kl(student, teacher, prototypes, tau, valid):
    "KL from explicit (B,K,D,h,w) differences and a direct sum, float64."
    def log_z(f):
        d = (f.double()[:, None] - prototypes.double()[None, :, :, None, None]).pow(2).sum(2).sqrt()
        return torch.log_softmax(-d / tau, 1)
    lt, ls = log_z(teacher), log_z(student)
    kl = (lt.exp() * (lt - ls)).sum(1)
    return kl[valid].mean()


def test_prototype_kl_matches_reference_and_grads_flow_to_student_only():
    g = torch.Generator().manual_seed(0)
    student = torch.randn(2, 8, 5, 6, generator=g).requires_grad_()
    teacher = torch.randn(2, 8, 5, 6, generator=g).requires_grad_()
    prototypes = torch.randn(4, 8, generator=g).requires_grad_()
    valid = torch.rand(2, 5, 6, generator=g) > 0.3
    loss = prototype_kl(student, teacher, prototypes, tau=0.7, valid=valid)
    assert abs(loss.item() - reference_kl(student.detach(), teacher.detach(), prototypes.detach(), 0.7, valid).item()) < 1e-5
    loss.backward()
    assert teacher.grad is None and prototypes.grad is None
    assert student.grad is not None and student.grad.abs().sum() > 0
    # invalid pixels get no gradient
    assert (student.grad.abs().sum(1)[~valid] == 0).all()
    # same features -> zero loss
    assert prototype_kl(teacher.detach(), teacher.detach(), prototypes.detach()).abs() < 1e-6


def test_prototype_kl_shape_errors():
    with pytest.raises(ValueError, match="same grid"):
        prototype_kl(torch.zeros(1, 4, 3, 3), torch.zeros(1, 4, 2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="prototypes must be"):
        prototype_kl(torch.zeros(1, 4, 3, 3), torch.zeros(1, 4, 3, 3), torch.zeros(2, 5))


def test_entropy_regularizer_against_direct_formula():
    logits = torch.randn(2, 5, 3, 4, generator=torch.Generator().manual_seed(1))
    p = torch.softmax(logits.double(), 1)
    expected = -(p.log().sum(1) / 5).mean()
    assert abs(entropy_regularizer(logits).item() - expected.item()) < 1e-6


def test_ema_update_closed_form_and_buffers():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    ema = create_ema_model(model)
    assert all(not p.requires_grad for p in ema.parameters())
    w0 = ema[0].weight.detach().clone()
    targets = [torch.randn_like(w0) for _ in range(3)]
    for t in targets:
        with torch.no_grad(): model[0].weight.copy_(t)
        model(torch.rand(2, 3, 8, 8))  # train mode: BN running stats move
        ema_update(ema, model, momentum=0.9)
    expected = 0.9 ** 3 * w0 + 0.1 * (0.9 ** 2 * targets[0] + 0.9 * targets[1] + targets[2])
    assert torch.allclose(ema[0].weight, expected, atol=1e-6)
    assert torch.equal(ema[1].running_mean, model[1].running_mean)
    assert ema[1].num_batches_tracked.item() == 3
    with pytest.raises(ValueError, match="momentum"):
        ema_update(ema, model, momentum=1.5)


def test_ema_update_equals_per_tensor_loop_and_checks_names():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 2, 1), nn.BatchNorm2d(2))
    ema, ref = create_ema_model(model), create_ema_model(model)
    for step in range(3):
        with torch.no_grad():
            for p in model.parameters(): p.add_(torch.randn_like(p))
        model(torch.rand(2, 3, 6, 6))
        ema_update(ema, model, momentum=0.8)
        with torch.no_grad():                                       # the definition, one tensor at a time
            for (_, e), (_, p) in zip(ref.named_parameters(), model.named_parameters()): e.lerp_(p, 0.2)
            for (_, e), (_, b) in zip(ref.named_buffers(), model.named_buffers()): e.copy_(b)
    for a, b in zip(ema.state_dict().values(), ref.state_dict().values()): assert torch.equal(a, b)
    with pytest.raises(ValueError, match="differ"):
        ema_update(ema, nn.Sequential(nn.Conv2d(3, 8, 3)), momentum=0.8)


def test_map_pixel_centres_against_affine_grid_and_formula():
    maps = torch.randn(3, 2, 3, 3)
    qx, qy = map_pixel_centres(maps, (5, 7))
    x = (2 * torch.arange(7) + 1) / 7 - 1
    y = ((2 * torch.arange(5) + 1) / 5 - 1)[:, None]
    m = maps[..., None, None]
    assert torch.equal(qx, m[..., 0, 0, :, :] * x + m[..., 0, 1, :, :] * y + m[..., 0, 2, :, :])
    assert torch.equal(qy, m[..., 1, 0, :, :] * x + m[..., 1, 1, :, :] * y + m[..., 1, 2, :, :])
    grid = F.affine_grid(maps[:, 0, :2], (3, 1, 5, 7), align_corners=False)
    assert torch.allclose(torch.stack([qx[:, 0], qy[:, 0]], -1), grid, atol=1e-5)
