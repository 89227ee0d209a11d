"""proda_nb.metrics against torchmetrics and scikit-learn, batch accumulation, and a two-process all_reduce."""
import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from proda_nb.labels import CLASSES, SYNTHIA_13, SYNTHIA_16
from proda_nb.metrics import ConfusionMatrix, confusion_matrix, iou_per_class, mean_iou

K = 19


def reference_iou(pred, target):
    "torchmetrics' per-class IoU in percent, ignoring label 255 (imported here: the spawned ranks stay light)."
    from torchmetrics.classification import MulticlassJaccardIndex
    return MulticlassJaccardIndex(num_classes=K, ignore_index=255, average=None)(pred, target) * 100


def random_batch(seed, shape=(3, 24, 40), ignore_rate=0.15, num_classes=K):
    "Random labels with ignored pixels and predictions that agree with them 60% of the time."
    g = torch.Generator().manual_seed(seed)
    target = torch.randint(0, num_classes, shape, generator=g)
    pred = torch.where(torch.rand(shape, generator=g) < 0.6, target, torch.randint(0, num_classes, shape, generator=g))
    target[torch.rand(shape, generator=g) < ignore_rate] = 255
    return pred, target


def reference_matrix(pred, target, num_classes=K):
    "scikit-learn's confusion matrix over the non-ignored pixels (ground truth on rows)."
    from sklearn.metrics import confusion_matrix as sk_confusion_matrix
    keep = target.flatten() != 255
    return torch.from_numpy(sk_confusion_matrix(target.flatten()[keep].numpy(), pred.flatten()[keep].numpy(),
                                                labels=list(range(num_classes))))


def test_confusion_matrix_matches_sklearn():
    pred, target = random_batch(0)
    cm = confusion_matrix(pred, target)
    assert cm.dtype == torch.int64 and cm.shape == (K, K)
    assert torch.equal(cm, reference_matrix(pred, target))
    assert int(cm.sum()) == int((target != 255).sum())


def test_iou_matches_torchmetrics():
    pred, target = random_batch(1)
    reference = reference_iou(pred, target)
    ours = iou_per_class(confusion_matrix(pred, target))
    torch.testing.assert_close(ours, reference.double(), atol=1e-4, rtol=0)
    assert math.isclose(mean_iou(confusion_matrix(pred, target)), reference.mean().item(), abs_tol=1e-4)


def test_subsets_are_means_over_the_listed_classes():
    pred, target = random_batch(2)
    reference = reference_iou(pred, target)
    cm = confusion_matrix(pred, target)
    for subset in (SYNTHIA_16, SYNTHIA_13, [0, 13]):
        assert math.isclose(mean_iou(cm, subset), reference[list(subset)].mean().item(), abs_tol=1e-4)


def test_accumulation_equals_one_call_on_the_concatenation():
    batches = [random_batch(seed, shape=(2, 16, 16 + 8 * seed)) for seed in range(3)]  # different image sizes
    acc = ConfusionMatrix()
    for pred, target in batches: acc.update(pred, target)
    flat_pred = torch.cat([p.flatten() for p, _ in batches])
    flat_target = torch.cat([t.flatten() for _, t in batches])
    assert torch.equal(acc.matrix, reference_matrix(flat_pred, flat_target))
    reference = reference_iou(flat_pred, flat_target)
    assert math.isclose(acc.miou(), reference.mean().item(), abs_tol=1e-4)


def test_logits_are_upsampled_to_the_label_size():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, K, 6, 10, generator=g)
    _, target = random_batch(4, shape=(2, 24, 40))
    expected_pred = F.interpolate(logits, size=(24, 40), mode="bilinear", align_corners=False).argmax(1)
    acc = ConfusionMatrix().update(logits, target)
    assert torch.equal(acc.matrix, reference_matrix(expected_pred, target))
    # logits already at the label size are used as they are
    same = ConfusionMatrix().update(logits, target[:, :6, :10])
    assert torch.equal(same.matrix, reference_matrix(logits.argmax(1), target[:, :6, :10]))


def test_absent_class_is_nan_and_skipped():
    target = torch.tensor([[0, 0, 1, 1]])
    pred = torch.tensor([[0, 0, 1, 0]])
    iou = iou_per_class(confusion_matrix(pred, target, num_classes=3))
    assert iou[0].item() == pytest.approx(200 / 3) and iou[1].item() == pytest.approx(50)
    assert math.isnan(iou[2].item())
    assert mean_iou(confusion_matrix(pred, target, num_classes=3)) == pytest.approx((200 / 3 + 50) / 2)


def test_table_lists_classes_and_labelled_means():
    pred, target = random_batch(5)
    acc = ConfusionMatrix().update(pred, target)
    reference = reference_iou(pred, target)
    lines = acc.table().splitlines()
    for name, value in zip(CLASSES, reference.tolist()):
        row = next(l for l in lines if f" {name} " in l)
        assert f"{value:.2f}" in row
    assert lines[-3].startswith("mIoU19") and f"{reference.mean().item():.2f}" in lines[-3]
    assert lines[-2].startswith("mIoU16") and f"{reference[list(SYNTHIA_16)].mean().item():.2f}" in lines[-2]
    assert lines[-1].startswith("mIoU13") and f"{reference[list(SYNTHIA_13)].mean().item():.2f}" in lines[-1]


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="250"):
        confusion_matrix(torch.tensor([0, 1]), torch.tensor([0, 250]))
    with pytest.raises(ValueError, match="same shape"):
        confusion_matrix(torch.zeros(2, 3, dtype=torch.long), torch.zeros(3, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="channels"):
        ConfusionMatrix().update(torch.randn(1, 5, 4, 4), torch.zeros(1, 8, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="classes"):
        mean_iou(torch.eye(3, dtype=torch.long), [0, 3])


def test_all_reduce_without_process_group_is_a_no_op():
    pred, target = random_batch(6)
    acc = ConfusionMatrix().update(pred, target)
    assert torch.equal(acc.all_reduce().matrix, reference_matrix(pred, target))


def _all_reduce_worker(rank, world_size, init_method, out_dir):
    "One rank: count its own batch, all_reduce, save the result."
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world_size)
    try:
        pred, target = random_batch(100 + rank)
        acc = ConfusionMatrix().update(pred, target)
        torch.save(acc.matrix.clone(), f"{out_dir}/local{rank}.pt")
        acc.all_reduce()
        torch.save(acc.matrix, f"{out_dir}/reduced{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_all_reduce_sums_two_ranks(tmp_path):
    init_method = f"file://{tmp_path}/rendezvous"
    mp.spawn(_all_reduce_worker, args=(2, init_method, str(tmp_path)), nprocs=2, join=True)
    batches = [random_batch(100 + rank) for rank in range(2)]
    expected = sum(reference_matrix(p, t) for p, t in batches)
    for rank in range(2):
        assert torch.equal(torch.load(tmp_path / f"local{rank}.pt"), reference_matrix(*batches[rank]))
        assert torch.equal(torch.load(tmp_path / f"reduced{rank}.pt"), expected)
