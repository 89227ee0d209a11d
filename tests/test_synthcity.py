"Integration tests of the SynthCity benchmark: determinism, labels, appearance gap, layout statistics, dataset, cache."
import numpy as np
import pytest
import torch

import proda_nb.synthcity as sc
from proda_nb.labels import CLASSES
from proda_nb.synthcity import (SOURCE_LAYOUT, SPLITS, SYNTHCITY_CLASSES, TARGET_LAYOUT, SynthCity, generate_split,
                                load_split)

N = 200  # images per split in these tests: enough for every class, fast enough for two cores

# the classes the benchmark promises, by name (independent of the module's constants)
PROMISED = {"road", "sidewalk", "building", "fence", "pole", "traffic sign", "vegetation", "terrain", "sky",
            "person", "car"}


@pytest.fixture(scope="module")
def splits():
    "Version 1: the game and photograph renderers themselves (v2 adds lighting and confusions on top, tested below)."
    return {s: generate_split(s, seed=0, n=N, version=1) for s in SPLITS}


@pytest.fixture(scope="module")
def splits_v2():
    return {s: generate_split(s, seed=0, n=N, version=2) for s in ("source_train", "target_train")}


def test_declared_classes_are_the_promised_ones():
    assert {CLASSES[c] for c in SYNTHCITY_CLASSES} == PROMISED


@pytest.mark.parametrize("split", ["source_val", "target_val"])
def test_same_seed_same_arrays_other_seed_other_arrays(split):
    a_img, a_lab = generate_split(split, seed=5, n=30)
    b_img, b_lab = generate_split(split, seed=5, n=30)
    c_img, c_lab = generate_split(split, seed=6, n=30)
    assert np.array_equal(a_img, b_img) and np.array_equal(a_lab, b_lab)
    assert not np.array_equal(a_img, c_img) and not np.array_equal(a_lab, c_lab)


def test_splits_differ_from_each_other(splits):
    assert not np.array_equal(splits["source_train"][1][:50], splits["source_val"][1][:50])
    assert not np.array_equal(splits["target_train"][1][:50], splits["target_val"][1][:50])


def test_shapes_and_dtypes(splits):
    for split, (images, labels) in splits.items():
        assert images.shape == (N, 64, 128, 3) and images.dtype == np.uint8, split
        assert labels.shape == (N, 64, 128) and labels.dtype == np.uint8, split


def test_labels_are_declared_train_ids_and_every_class_occurs(splits):
    for split, (_, labels) in splits.items():
        present = {CLASSES[c] for c in np.unique(labels).tolist()}   # raises IndexError on ids >= 19 (incl. 255)
        assert present == PROMISED, f"{split}: missing {PROMISED - present}, unexpected {present - PROMISED}"


def _interior(labels, train_id):
    "Pixels of class train_id whose 4 neighbours are of the same class (no region borders)."
    m = labels == train_id
    inner = m.copy()
    inner[:, 1:-1, 1:-1] &= m[:, :-2, 1:-1] & m[:, 2:, 1:-1] & m[:, 1:-1, :-2] & m[:, 1:-1, 2:]
    inner[:, [0, -1]] = False
    inner[:, :, [0, -1]] = False
    return inner


def _local_variation(images, mask):
    "Mean absolute difference between a pixel and its right neighbour (grey levels 0-255) inside mask."
    grey = images.astype(np.float64).mean(-1)
    diff = np.zeros_like(grey)
    diff[:, :, :-1] = np.abs(grey[:, :, 1:] - grey[:, :, :-1])
    m = mask.copy()
    m[:, :, -1] = False
    return diff[m].mean()


def _saturation(images, mask):
    "Mean HSV saturation inside mask."
    img = images.astype(np.float64)
    mx, mn = img.max(-1), img.min(-1)
    return ((mx - mn) / np.maximum(mx, 1))[mask].mean()


@pytest.mark.parametrize("name", ["road", "sidewalk", "vegetation", "sky"])  # facades have windows in both
def test_target_regions_are_textured_source_regions_flat(splits, name):
    train_id = CLASSES.index(name)
    (s_img, s_lab), (t_img, t_lab) = splits["source_train"], splits["target_train"]
    source = _local_variation(s_img, _interior(s_lab, train_id))
    target = _local_variation(t_img, _interior(t_lab, train_id))
    assert target > 2 * source + 1, (name, source, target)


@pytest.mark.parametrize("name", ["vegetation", "sky", "car"])
def test_target_colours_are_greyer(splits, name):
    train_id = CLASSES.index(name)
    (s_img, s_lab), (t_img, t_lab) = splits["source_train"], splits["target_train"]
    assert _saturation(t_img, _interior(t_lab, train_id)) < 0.9 * _saturation(s_img, _interior(s_lab, train_id))


def _ground_start(labels):
    "Per image, the first row holding road or sidewalk: the horizon (the ground starts just below it)."
    ground = np.isin(labels, [CLASSES.index("road"), CLASSES.index("sidewalk")]).any(-1)
    return ground.argmax(1)


def test_horizons_follow_the_stated_ranges(splits):
    H = 64
    starts = {}
    for split, stats in [("source_train", SOURCE_LAYOUT), ("target_train", TARGET_LAYOUT)]:
        rows = _ground_start(splits[split][1])
        lo, hi = stats.horizon
        inside = (rows >= np.floor(lo * H)) & (rows <= np.ceil(hi * H) + 3)
        assert inside.mean() > 0.97, (split, rows.min(), rows.max())
        # a uniform horizon spreads over (almost) the whole stated range
        assert rows.min() <= lo * H + 2 and rows.max() >= hi * H - 1, (split, rows.min(), rows.max())
        starts[split] = rows.mean() / H
    expected = np.mean(TARGET_LAYOUT.horizon) - np.mean(SOURCE_LAYOUT.horizon)
    assert abs((starts["target_train"] - starts["source_train"]) - expected) < 0.02


def test_target_has_more_cars_and_fewer_fences(splits):
    car, fence = CLASSES.index("car"), CLASSES.index("fence")
    s_lab, t_lab = splits["source_train"][1], splits["target_train"][1]
    assert (t_lab == car).mean() > 1.3 * (s_lab == car).mean()
    assert (t_lab == fence).mean() < (s_lab == fence).mean()
    # images without any car exist in the source (0 to 5 cars) but not in the target (at least one car)
    assert (~(s_lab == car).any((1, 2))).any()


def test_dataset_sample_format():
    ds = SynthCity("target_val", n=20)
    assert len(ds) == 20
    s = ds[3]
    assert set(s) == {"image", "label", "index", "name"}
    assert s["image"].dtype == torch.float32 and s["image"].shape == (3, 64, 128)
    assert 0 <= s["image"].min() and s["image"].max() <= 1
    assert s["label"].dtype == torch.int64 and s["label"].shape == (64, 128)
    assert s["index"] == 3 and s["name"] == "target_val_00003"
    images, labels = generate_split("target_val", n=20)
    assert torch.equal(s["label"], torch.from_numpy(labels[3]).long())
    assert torch.equal((s["image"] * 255).round().byte().permute(1, 2, 0), torch.from_numpy(images[3]))


def test_dataset_augmentation_keeps_size_and_flips_with_labels():
    plain = SynthCity("source_val", n=10)
    aug = SynthCity("source_val", n=10, augment=True, aug_seed=1)
    flips = 0
    for i in range(10):
        a, p = aug[i], plain[i]
        assert a["image"].shape == (3, 64, 128) and a["label"].shape == (64, 128)
        if torch.equal(a["label"], p["label"].flip(-1)) and not torch.equal(a["label"], p["label"]):
            flips += 1
            assert torch.allclose(a["image"], p["image"].flip(-1))
    again = SynthCity("source_val", n=10, augment=True, aug_seed=1)
    assert torch.equal(again[4]["image"], aug[4]["image"])   # seeded draws repeat
    assert set(torch.cat([aug[i]["label"].unique() for i in range(10)]).tolist()) <= set(SYNTHCITY_CLASSES)


def test_make_dataset_knows_synthcity():
    from proda_nb.data import make_dataset
    ds = make_dataset("synthcity", split="source_val", n=5)
    assert isinstance(ds, SynthCity) and len(ds) == 5


def test_bad_split_and_size_are_named():
    with pytest.raises(ValueError, match="source_train"):
        SynthCity("train")
    with pytest.raises(ValueError, match="size"):
        generate_split("source_val", size=(8, 8), n=5)


def test_cache_file_is_written_and_reused(tmp_path, monkeypatch):
    sc._MEMORY_CACHE.clear()
    first = load_split("source_val", seed=3, n=15, cache_dir=tmp_path)
    files = list(tmp_path.glob("*.npz"))
    assert len(files) == 1 and "seed3" in files[0].name and "64x128" in files[0].name
    sc._MEMORY_CACHE.clear()

    def no_generation(*args, **kwargs):
        raise AssertionError("generated again although the cache file exists")
    monkeypatch.setattr(sc, "generate_split", no_generation)
    second = load_split("source_val", seed=3, n=15, cache_dir=tmp_path)     # from the file
    assert np.array_equal(first[0], second[0]) and np.array_equal(first[1], second[1])
    assert load_split("source_val", seed=3, n=15, cache_dir=tmp_path) is sc._MEMORY_CACHE[("source_val", 3, (64, 128), 15, 2, sc.SYNTHCITY_VERSION)]
    with pytest.raises(AssertionError, match="generated again"):          # another seed is another file
        load_split("source_val", seed=4, n=15, cache_dir=tmp_path)
    sc._MEMORY_CACHE.clear()


# -- version 2 --------------------------------------------------------------------------------------------------------
def _region_means(images, labels, train_id):
    "Per image that has the class, the mean RGB (0-1) of its interior pixels: (images, 3)."
    mask = _interior(labels, train_id)
    keep = mask.any((1, 2))
    img = images.astype(np.float64) / 255
    return np.stack([img[i][mask[i]].mean(0) for i in np.flatnonzero(keep)])


def test_v2_source_lighting_varies_per_image(splits, splits_v2):
    "The same kind of scene under many lightings: the spread of per-image brightness grows well beyond v1's."
    spread = lambda images: (images.astype(np.float64).mean((1, 2, 3)) / 255).std()
    assert spread(splits_v2["source_train"][0]) > 1.5 * spread(splits["source_train"][0])


def test_v2_target_sidewalks_look_like_road(splits, splits_v2):
    "Mean colour distance between target sidewalk and road regions: far smaller in v2 (grey paving) than in v1."
    def gap(images, labels):
        return np.linalg.norm(_region_means(images, labels, CLASSES.index("sidewalk")).mean(0)
                              - _region_means(images, labels, CLASSES.index("road")).mean(0))
    assert gap(*splits_v2["target_train"]) < 0.5 * gap(*splits["target_train"])


def test_v2_target_terrain_looks_like_vegetation_and_skies_are_greyer(splits, splits_v2):
    "Terrain drawn towards lush grass: closer in colour to the vegetation than v1's; overcast skies: less blue than v1's."
    terrain, vegetation, sky = (CLASSES.index(n) for n in ("terrain", "vegetation", "sky"))
    def terrain_gap(images, labels):
        return np.linalg.norm(_region_means(images, labels, terrain).mean(0) - _region_means(images, labels, vegetation).mean(0))
    def blueness(images, labels):
        m = _region_means(images, labels, sky)
        return (m[:, 2] - m[:, 0]).mean()
    assert terrain_gap(*splits_v2["target_train"]) < 0.7 * terrain_gap(*splits["target_train"])
    assert blueness(*splits_v2["target_train"]) < 0.7 * blueness(*splits["target_train"])


def test_v2_is_deterministic_and_v1_is_kept():
    a, b = generate_split("target_val", n=20, version=2), generate_split("target_val", n=20, version=2)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    v1 = generate_split("target_val", n=20, version=1)
    assert not np.array_equal(a[0], v1[0])
    assert SynthCity("target_val", n=5).version == 2 and SynthCity("target_val", n=5, version=1).version == 1
    with pytest.raises(ValueError, match="data.synthcity_version"):
        generate_split("target_val", n=5, version=3)
