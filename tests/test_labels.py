"""Label tables of proda_nb.labels checked against cityscapesscripts (the official Cityscapes label table) and
against the SYNTHIA-RAND-CITYSCAPES class map of the field."""
import numpy as np
import pytest
import torch
from cityscapesscripts.helpers.labels import labels as CS_LABELS

from proda_nb.labels import (CLASSES, IGNORE_INDEX, NUM_CLASSES, PALETTE, SYNTHIA_13, SYNTHIA_16, colorize,
                             id_to_train_id, synthia_id_to_train_id, train_id_to_id)


def reference_train_id(label):
    "The reference's trainId, with its ignored values (255 and -1) as 255."
    return 255 if label.trainId in (255, -1) else label.trainId


TRAINED = sorted((l for l in CS_LABELS if 0 <= l.trainId < 255), key=lambda l: l.trainId)


def test_constants():
    assert IGNORE_INDEX == 255
    assert NUM_CLASSES == 19 == len(TRAINED)


@pytest.mark.parametrize("label", CS_LABELS, ids=[l.name for l in CS_LABELS])
def test_every_cityscapes_id_numpy_and_torch(label):
    expected = reference_train_id(label)
    assert id_to_train_id(np.array([label.id])).tolist() == [expected]
    assert id_to_train_id(torch.tensor([label.id])).tolist() == [expected]


def test_label_map_against_reference_lookup():
    rng = np.random.default_rng(1)
    ids = rng.integers(-1, 34, size=(37, 53))
    by_id = {l.id: reference_train_id(l) for l in CS_LABELS}
    expected = np.vectorize(by_id.__getitem__)(ids)
    for dtype in (np.int16, np.int32, np.int64):
        out = id_to_train_id(ids.astype(dtype))
        assert isinstance(out, np.ndarray) and out.shape == ids.shape
        np.testing.assert_array_equal(out, expected)
    out = id_to_train_id(torch.from_numpy(ids))
    assert isinstance(out, torch.Tensor) and out.dtype == torch.int64
    np.testing.assert_array_equal(out.numpy(), expected)
    non_negative = ids.clip(0).astype(np.uint8)  # the uint8 path (GTA5 palette PNGs, labelIds PNGs)
    np.testing.assert_array_equal(id_to_train_id(non_negative), np.vectorize(by_id.__getitem__)(non_negative))
    np.testing.assert_array_equal(id_to_train_id(torch.from_numpy(non_negative)).numpy(),
                                  np.vectorize(by_id.__getitem__)(non_negative))


def test_unknown_ids_are_ignored():
    ids = np.array([34, 100, 250, 255, 256, 1000, 65535, -2, -1000])
    assert (id_to_train_id(ids) == 255).all()
    assert (id_to_train_id(torch.from_numpy(ids)) == 255).all()


def test_non_integer_ids_are_refused():
    with pytest.raises(TypeError, match="integer"):
        id_to_train_id(np.array([7.0]))
    with pytest.raises(TypeError, match="integer"):
        id_to_train_id(torch.tensor([7.0]))


def test_names_and_colours_in_train_id_order():
    assert CLASSES == tuple(l.name for l in TRAINED)
    assert PALETTE.dtype == np.uint8 and PALETTE.shape == (19, 3)
    assert [tuple(c) for c in PALETTE.tolist()] == [l.color for l in TRAINED]


def test_inverse_map_gives_reference_ids():
    train_ids = np.array([l.trainId for l in TRAINED] + [255])
    assert train_id_to_id(train_ids).tolist() == [l.id for l in TRAINED] + [0]


def test_colorize_uses_reference_colours():
    train_ids = torch.tensor([[l.trainId for l in TRAINED] + [255, 19]])
    rgb = colorize(train_ids)
    assert isinstance(rgb, np.ndarray) and rgb.dtype == np.uint8 and rgb.shape == (1, 21, 3)
    assert [tuple(c) for c in rgb[0, :19].tolist()] == [l.color for l in TRAINED]
    assert rgb[0, 19:].tolist() == [[0, 0, 0], [0, 0, 0]]
    assert colorize(np.zeros((2, 3, 4), dtype=np.int64)).shape == (2, 3, 4, 3)  # batches too


# SYNTHIA-RAND-CITYSCAPES: SYNTHIA id -> Cityscapes class name (terrain, truck and train do not exist in SYNTHIA)
SYNTHIA_NAMES = {3: "road", 4: "sidewalk", 2: "building", 21: "wall", 5: "fence", 7: "pole", 15: "traffic light",
                 9: "traffic sign", 6: "vegetation", 1: "sky", 10: "person", 17: "rider", 8: "car", 19: "bus",
                 12: "motorcycle", 11: "bicycle"}


@pytest.mark.parametrize("synthia_id,name", sorted(SYNTHIA_NAMES.items()))
def test_synthia_ids(synthia_id, name):
    reference = {l.name: l.trainId for l in TRAINED}
    assert synthia_id_to_train_id(np.array([synthia_id])).tolist() == [reference[name]]
    assert synthia_id_to_train_id(torch.tensor([synthia_id], dtype=torch.int32)).tolist() == [reference[name]]


def test_synthia_other_ids_are_ignored():
    others = [i for i in range(0, 300) if i not in SYNTHIA_NAMES] + [-1, 65535]
    assert (synthia_id_to_train_id(np.array(others)) == 255).all()
    # 16-bit label maps, as read from SYNTHIA's PNGs
    ids = np.array([[3, 8], [0, 22]], dtype=np.uint16)
    assert synthia_id_to_train_id(ids).tolist() == [[0, 13], [255, 255]]


def test_evaluation_subsets():
    by_name = {l.name: l.trainId for l in TRAINED}
    assert sorted(SYNTHIA_16) == sorted(by_name[n] for n in SYNTHIA_NAMES.values())
    assert set(range(19)) - set(SYNTHIA_16) == {by_name["terrain"], by_name["truck"], by_name["train"]}
    assert set(SYNTHIA_16) - set(SYNTHIA_13) == {by_name["wall"], by_name["fence"], by_name["pole"]}
    assert len(SYNTHIA_16) == 16 and len(SYNTHIA_13) == 13
