"Integration tests of proda_nb.pseudo_labels: the soft-label store file, its precision and errors, and CBST."
import math

import numpy as np
import pytest
import torch

from proda_nb.labels import IGNORE_INDEX
from proda_nb.pseudo_labels import (SoftLabelStore, build_soft_label_store, cbst_labels, cbst_thresholds,
                                    checkpoint_id, confidence_threshold_labels, peaky_softmax)

torch.set_num_threads(1)
K = 19


class TableModel(torch.nn.Module):
    "A 'model' whose logits for image i are row i of a table (images carry their index in every pixel)."
    def __init__(self, probs):
        super().__init__()
        self.logits = probs.clamp_min(1e-12).log()
    def forward(self, x):
        return self.logits[x[:, 0, 0, 0].round().long()]


def dataset_for(n):
    return [{"image": torch.full((3, 8, 8), float(i)), "label": torch.zeros(8, 8, dtype=torch.long),
             "index": i, "name": f"frame_{i:03d}"} for i in range(n)]


@pytest.fixture(scope="module")
def probs():
    return peaky_softmax(6, K, 32, 64, seed=0)


@pytest.fixture(scope="module")
def store(tmp_path_factory, probs):
    path = tmp_path_factory.mktemp("store") / "soft.pls"
    return build_soft_label_store(TableModel(probs), dataset_for(len(probs)), path, "ckpt-warmup", batch_size=4)


def test_round_trip_within_quantisation_step(store, probs):
    assert len(store) == 6 and store.names == [f"frame_{i:03d}" for i in range(6)]
    decoded = store[list(range(6))]
    assert decoded.shape == probs.shape and decoded.dtype == torch.float32
    top_values, top_classes = probs.topk(store.top_k, 1)
    # the stored classes come back within half a step of 1/2047
    assert (decoded.gather(1, top_classes) - top_values).abs().max() <= 0.5 / 2047 + 1e-6
    # every other class: the true value and the decoded one are both below the k-th largest
    kth = top_values[:, -1:]
    rest = torch.ones_like(probs, dtype=torch.bool).scatter_(1, top_classes, False)
    assert (probs[rest] <= kth.expand_as(probs)[rest] + 1e-6).all()
    assert (decoded[rest] <= kth.expand_as(probs)[rest] + 1e-3).all()
    assert torch.allclose(decoded.sum(1), torch.ones(6, 32, 64), atol=store.top_k / 2047)
    assert (store.argmax(slice(0, 6)) == probs.argmax(1)).all()
    assert torch.equal(store[2], decoded[2:3])                        # an int index -> a batch of one


def test_rectified_label_agreement(tmp_path):
    p = peaky_softmax(3, K, 128, 256, seed=1)                             # ProDA's size: 19 x 128 x 256
    s = build_soft_label_store(TableModel(p), dataset_for(3), tmp_path / "proda_size.pls", "c")
    q = s[:]
    for seed in (0, 1):
        weights = torch.randn(p.shape, generator=torch.Generator().manual_seed(seed)).softmax(1)
        agree = ((weights * p).argmax(1) == (weights * q).argmax(1)).float().mean().item()
        assert agree >= 0.999, f"rectified labels agree on {agree:.5f} of the pixels"


def test_rectified_label_agreement_with_prototype_weights(tmp_path):
    prototypes = pytest.importorskip("proda_nb.prototypes")
    p = peaky_softmax(3, K, 128, 256, seed=2)
    q = build_soft_label_store(TableModel(p), dataset_for(3), tmp_path / "s.pls", "c")[:]
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(K, 16, generator=g)                      # features near random class centres
    features = centres[p.argmax(1)].permute(0, 3, 1, 2) + 3 * torch.randn(3, 16, 128, 256, generator=g)
    weights = prototypes.prototype_weights(features, centres)
    rect_f32, rect_store = (prototypes.rectify_pseudo_labels(p, weights), prototypes.rectify_pseudo_labels(q, weights))
    changed = (rect_f32 != p.argmax(1)).float().mean()
    assert changed > 0.01, changed                                   # the weights do change labels
    agree = (rect_f32 == rect_store).float().mean()
    assert agree >= 0.999, agree


def test_bytes_per_image(store, tmp_path):
    float32_bytes = 4 * K * 32 * 64
    assert store.bytes_per_image <= float32_bytes / 8
    # the file really is that small: codes + a footer of names
    assert store.path.stat().st_size <= 6 * float32_bytes / 8 + 64 + 2000


def test_foreign_checkpoint_refused(store, tmp_path):
    with pytest.raises(ValueError) as e:
        SoftLabelStore.open(store.path, expected_checkpoint="ckpt-other")
    assert "ckpt-warmup" in str(e.value) and "ckpt-other" in str(e.value) and str(store.path) in str(e.value)
    assert SoftLabelStore.open(store.path, expected_checkpoint="ckpt-warmup").checkpoint_id == "ckpt-warmup"


def test_checkpoint_file_id(tmp_path, probs):
    a, b = tmp_path / "a.pt", tmp_path / "b.pt"
    torch.save({"w": torch.ones(3)}, a); torch.save({"w": torch.zeros(3)}, b)
    import hashlib
    assert checkpoint_id(a) == hashlib.sha256(a.read_bytes()).hexdigest() != checkpoint_id(b)
    s = build_soft_label_store(TableModel(probs[:1]), dataset_for(1), tmp_path / "s.pls", checkpoint_id(a))
    assert SoftLabelStore.open(s.path, expected_checkpoint=a).checkpoint_id == checkpoint_id(a)   # a file works too
    with pytest.raises(ValueError, match=checkpoint_id(b)):
        SoftLabelStore.open(s.path, expected_checkpoint=b)
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        checkpoint_id(tmp_path / "missing.pt")


def test_missing_and_corrupted_files_are_named(store, tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.pls"):
        SoftLabelStore.open(tmp_path / "nowhere.pls")
    data = store.path.read_bytes()
    truncated = tmp_path / "truncated.pls"; truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated.pls"):
        SoftLabelStore.open(truncated)
    garbage = tmp_path / "garbage.pls"; garbage.write_bytes(b"not a store at all" * 10)
    with pytest.raises(ValueError, match="garbage.pls"):
        SoftLabelStore.open(garbage)
    footer = data.rindex(b"{")
    bad_footer = tmp_path / "bad_footer.pls"; bad_footer.write_bytes(data[:footer] + b"{oops" + data[footer + 5:])
    with pytest.raises(ValueError, match="bad_footer.pls"):
        SoftLabelStore.open(bad_footer)
    bad_codes = tmp_path / "bad_codes.pls"
    raw = bytearray(data); raw[64:66] = (31 << 11).to_bytes(2, "little"); bad_codes.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="bad_codes.pls"):
        SoftLabelStore.open(bad_codes)[0]


def test_write_is_atomic(tmp_path, probs):
    class Crash(torch.nn.Module):
        def forward(self, x): raise RuntimeError("model failed")
    path = tmp_path / "store.pls"
    build_soft_label_store(TableModel(probs[:2]), dataset_for(2), path, "old")
    with pytest.raises(RuntimeError, match="model failed"):
        build_soft_label_store(Crash(), dataset_for(2), path, "new")
    assert SoftLabelStore.open(path).checkpoint_id == "old"               # the old store is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store.pls"]    # no temporary file left behind


def cbst_reference(probs, portion):
    "CBST written directly in numpy: per class, sort the confidences of its predicted pixels decreasingly, take the n-th, n = floor(p N_c)."
    p = probs.numpy().transpose(1, 0, 2, 3).reshape(probs.shape[1], -1)
    conf, pred = p.max(0), p.argmax(0)
    k = np.full(p.shape[0], np.inf)
    for c in range(p.shape[0]):
        v = np.sort(conf[pred == c])[::-1]
        n = int(math.floor(portion * len(v)))
        if n: k[c] = v[n - 1]
    ratio = p / k[:, None]
    labels = np.where(ratio.max(0) >= 1, ratio.argmax(0), IGNORE_INDEX)
    return k, labels.reshape(probs.shape[0], *probs.shape[2:])


@pytest.mark.parametrize("portion", [0.0, 0.2, 0.5, 0.9, 1.0])
def test_cbst_against_numpy(probs, store, portion):
    k_ref, labels_ref = cbst_reference(probs, portion)
    k = cbst_thresholds(probs, portion)
    np.testing.assert_allclose(k.numpy(), k_ref, rtol=1e-6)
    assert (cbst_labels(probs, k).numpy() == labels_ref).all()
    # from the store: the same computation on its (11-bit) confidences
    k_store_ref, _ = cbst_reference(store[:], portion)
    finite = np.isfinite(k_store_ref)
    np.testing.assert_allclose(cbst_thresholds(store, portion, batch_size=4).numpy()[finite], k_store_ref[finite], atol=1e-6)


def test_cbst_balances_classes():
    # class 0 confident everywhere it is predicted, class 1 never above 0.6: a global threshold drops class 1
    p0 = torch.tensor([0.99, 0.98, 0.97, 0.96, 0.45, 0.42, 0.40, 0.41])
    probs = torch.stack([p0, 1 - p0]).view(1, 2, 1, 8)
    assert (confidence_threshold_labels(probs, 0.9) == 1).sum() == 0
    labels = cbst_labels(probs, cbst_thresholds(probs, 0.5))
    assert (labels == 1).sum() == 2 and (labels == 0).sum() == 2     # floor(0.5 * 4) of each class


def test_pickles_as_a_reference(store):
    import pickle
    blob = pickle.dumps(store)
    assert len(blob) < 4000                                           # the path and header, not the codes
    again = pickle.loads(blob)
    assert torch.equal(again[[1, 3]], store[[1, 3]]) and again.checkpoint_id == store.checkpoint_id
