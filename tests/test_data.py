"""Integration tests of proda_nb.data on tiny dataset folders written in the real formats.

Every expected train id below is worked out by hand from the ids written, using the published tables
(Cityscapes label id -> train id: 7 road 0, 8 sidewalk 1, 11 building 2, 12 wall 3, 17 pole 5, 19 light 6,
20 sign 7, 21 vegetation 8, 23 sky 10, 24 person 11, 26 car 13, 31 train 16, 33 bicycle 18, others ignored;
SYNTHIA id -> train id: 3 road 0, 4 sidewalk 1, 2 building 2, 21 wall 3, 1 sky 10, 11 bicycle 18, 0/13 ignored).
"""
import os, struct, subprocess, sys, zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from proda_nb.data import (GTA5, Cityscapes, DatasetLayoutError, SegAugment, Synthia, UnreadableFileError,
                           augment_preset, check_dataset, main, make_dataset, read_png, read_synthia_label)

REPO = Path(__file__).resolve().parents[1]
IGNORE = 255

# ---------------------------------------------------------------- writers independent of proda_nb

def write_png16(path: Path, samples: np.ndarray):
    "Minimal 16-bit RGB/RGBA PNG encoder (filter type 0 on every row), independent of the code under test."
    samples = np.asarray(samples, dtype=">u2")
    h, w, c = samples.shape
    raw = b"".join(b"\x00" + samples[y].tobytes() for y in range(h))
    def chunk(kind, data): return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", w, h, 16, {3: 2, 4: 6}[c], 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))

def write_palette_label(path: Path, ids: np.ndarray):
    "A palette ('P' mode) PNG whose palette indices are `ids`, as GTA5 stores its labels."
    im = Image.fromarray(ids.astype(np.uint8))
    im.putpalette(np.random.default_rng(1).integers(0, 256, 768).astype(np.uint8).tolist())
    im.save(path)
    with Image.open(path) as check: assert check.mode == "P"

def random_image(h, w, seed):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)

# ---------------------------------------------------------------- hand-made label blocks (2x4) and their train ids

GTA_IDS = np.array([[7, 8, 11, 12], [26, 33, 0, 24]])
GTA_TRAIN = np.array([[0, 1, 2, 3], [13, 18, IGNORE, 11]])
CS_IDS = np.array([[7, 9, 23, 21], [17, 19, 20, 31]])
CS_TRAIN = np.array([[0, IGNORE, 10, 8], [5, 6, 7, 16]])
SYN_RED = np.array([[3, 4, 2, 21], [1, 0, 13, 11]])
SYN_TRAIN = np.array([[0, 1, 2, 3], [10, IGNORE, IGNORE, 18]])
SYN_GREEN = np.array([[8, 3, 1, 10], [6, 2, 15, 5000]])   # junk: valid-looking ids of other classes
SYN_BLUE = np.array([[4, 4, 3, 3], [8, 8, 1, 1]])

def tile(block, reps=(3, 2)): return np.tile(block, reps)   # 6x8 label

@pytest.fixture
def gta5_root(tmp_path):
    root = tmp_path / "gta5"
    (root / "images").mkdir(parents=True); (root / "labels").mkdir()
    for i in (1, 2, 3):
        Image.fromarray(random_image(6, 8, i)).save(root / "images" / f"{i:05d}.png")
    write_palette_label(root / "labels" / "00001.png", tile(GTA_IDS))
    write_palette_label(root / "labels" / "00002.png", tile(GTA_IDS[::-1]))
    write_palette_label(root / "labels" / "00003.png", np.full((7, 8), 7))   # 7 rows: size mismatch
    return root

@pytest.fixture
def synthia_root(tmp_path):
    root = tmp_path / "synthia"
    (root / "RGB").mkdir(parents=True); (root / "GT" / "LABELS").mkdir(parents=True)
    rgb = np.stack([tile(SYN_RED), tile(SYN_GREEN), tile(SYN_BLUE)], axis=-1)
    rgba = np.concatenate([rgb, np.full((6, 8, 1), 65535)], axis=-1)
    for i, samples in enumerate([rgb, rgba]):
        Image.fromarray(random_image(6, 8, 10 + i)).save(root / "RGB" / f"{i:07d}.png")
        write_png16(root / "GT" / "LABELS" / f"{i:07d}.png", samples)
    return root

@pytest.fixture
def cityscapes_root(tmp_path):
    root = tmp_path / "cityscapes"
    for split, city in [("train", "aachen"), ("val", "frankfurt")]:
        (root / "leftImg8bit" / split / city).mkdir(parents=True)
        (root / "gtFine" / split / city).mkdir(parents=True)
        for frame in (19, 20):
            stem = f"{city}_000000_{frame:06d}"
            Image.fromarray(random_image(6, 8, frame)).save(root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png")
            Image.fromarray(tile(CS_IDS).astype(np.uint8)).save(root / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png")
            # the colour label beside it must not be picked up
            Image.fromarray(random_image(6, 8, 0)).save(root / "gtFine" / split / city / f"{stem}_gtFine_color.png")
    return root

# ---------------------------------------------------------------- decoding

def test_gta5_train_ids_and_mismatched_pair_skipped(gta5_root):
    with pytest.warns(UserWarning) as record:
        ds = GTA5(gta5_root)
    messages = [str(w.message) for w in record if "GTA5" in str(w.message)]
    assert len(messages) == 1 and "00003" in messages[0] and "8x6" in messages[0] and "8x7" in messages[0]
    assert len(ds) == 2 and [it.name for it in ds.items] == ["00001", "00002"]
    sample = ds[0]
    assert sample["name"] == "00001" and sample["index"] == 0
    assert sample["label"].dtype == torch.int64 and sample["image"].dtype == torch.float32
    np.testing.assert_array_equal(sample["label"].numpy(), tile(GTA_TRAIN))
    np.testing.assert_array_equal(ds[1]["label"].numpy(), tile(GTA_TRAIN[::-1]))
    expected_image = torch.from_numpy(random_image(6, 8, 1)).permute(2, 0, 1).float() / 255
    torch.testing.assert_close(sample["image"], expected_image)

def test_gta5_split_file(gta5_root, tmp_path):
    (tmp_path / "list.txt").write_text("00002.png\n")
    ds = GTA5(gta5_root, split_file=tmp_path / "list.txt")
    assert [it.name for it in ds.items] == ["00002"]
    (tmp_path / "bad.txt").write_text("00002\n00009\n")
    with pytest.raises(DatasetLayoutError, match="00009.png"):
        GTA5(gta5_root, split_file=tmp_path / "bad.txt")

@pytest.mark.parametrize("decoder", ["numpy", "opencv"])
def test_synthia_reads_red_channel(synthia_root, decoder):
    if decoder == "opencv": pytest.importorskip("cv2")
    ds = Synthia(synthia_root, decoder=decoder)
    assert len(ds) == 2
    for i in range(2):   # RGB and RGBA 16-bit labels
        np.testing.assert_array_equal(ds[i]["label"].numpy(), tile(SYN_TRAIN))
    np.testing.assert_array_equal(read_synthia_label(ds.items[0].label, decoder), tile(SYN_RED))

def test_cityscapes_names_labels_and_label_options(cityscapes_root):
    val = Cityscapes(cityscapes_root, "val")
    assert [it.name for it in val.items] == ["frankfurt_000000_000019", "frankfurt_000000_000020"]
    np.testing.assert_array_equal(val[1]["label"].numpy(), tile(CS_TRAIN))
    train = Cityscapes(cityscapes_root, "train")          # target split: labels read when present
    np.testing.assert_array_equal(train[0]["label"].numpy(), tile(CS_TRAIN))
    no_labels = Cityscapes(cityscapes_root, "train", labels=False)
    assert no_labels.items[0].label is None
    assert (no_labels[0]["label"] == IGNORE).all() and no_labels[0]["label"].shape == (6, 8)

def test_cityscapes_train_without_gtfine_but_val_needs_it(cityscapes_root):
    import shutil
    shutil.rmtree(cityscapes_root / "gtFine")
    assert (Cityscapes(cityscapes_root, "train")[0]["label"] == IGNORE).all()
    with pytest.raises(DatasetLayoutError) as err:
        Cityscapes(cityscapes_root, "val")
    assert str(cityscapes_root / "gtFine" / "val") in str(err.value)

def test_read_png_matches_independent_decoders(tmp_path):
    photo = random_image(37, 53, 5)
    Image.fromarray(photo).save(tmp_path / "pil.png", optimize=True)   # PIL picks its own row filters
    np.testing.assert_array_equal(read_png(tmp_path / "pil.png"), photo)
    cv2 = pytest.importorskip("cv2")
    samples = (np.random.default_rng(2).integers(0, 300, (37, 53, 3)) * 200).astype(np.uint16)
    samples[:10] = 7                                             # smooth rows make libpng pick other filters
    cv2.imwrite(str(tmp_path / "cv.png"), samples[..., ::-1].copy())   # OpenCV writes BGR
    np.testing.assert_array_equal(read_png(tmp_path / "cv.png"), samples)

# ---------------------------------------------------------------- bad input

def test_missing_root_and_subfolder(tmp_path, gta5_root):
    with pytest.raises(FileNotFoundError) as err:
        GTA5(tmp_path / "nowhere")
    assert isinstance(err.value, DatasetLayoutError)
    assert str(tmp_path / "nowhere") in str(err.value) and "labels/" in str(err.value)
    (gta5_root / "labels").rename(gta5_root / "gt")
    with pytest.raises(DatasetLayoutError) as err:
        GTA5(gta5_root)
    assert str(gta5_root / "labels") in str(err.value)
    with pytest.raises(DatasetLayoutError, match="GT/LABELS"):
        Synthia(gta5_root)

def test_image_without_label(synthia_root):
    (synthia_root / "GT" / "LABELS" / "0000001.png").unlink()
    with pytest.raises(DatasetLayoutError) as err:
        Synthia(synthia_root)
    assert "0000001.png" in str(err.value) and "RGB" in str(err.value)

def truncate(path: Path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])

def test_truncated_image_names_file(gta5_root):
    truncate(gta5_root / "images" / "00002.png")
    ds = GTA5(gta5_root, check_sizes=False)
    ds[0]
    with pytest.raises(UnreadableFileError) as err:
        ds[1]
    assert "00002.png" in str(err.value) and isinstance(err.value, OSError)

def test_truncated_palette_label_names_file(gta5_root):
    truncate(gta5_root / "labels" / "00001.png")
    ds = GTA5(gta5_root, check_sizes=False)
    with pytest.raises(UnreadableFileError, match="labels.00001.png"):
        ds[0]

@pytest.mark.parametrize("decoder", ["numpy", "opencv"])
def test_truncated_synthia_label_names_file(synthia_root, decoder):
    if decoder == "opencv": pytest.importorskip("cv2")
    truncate(synthia_root / "GT" / "LABELS" / "0000000.png")
    with pytest.raises(UnreadableFileError, match="0000000.png"):
        Synthia(synthia_root, decoder=decoder)[0]

# ---------------------------------------------------------------- augmentation

def column_pair(h=30, w=40):
    "Label holding its own column (label[y, x] = x) and an image whose red channel holds it too."
    columns = torch.arange(w, dtype=torch.uint8).expand(h, w).contiguous()
    image = torch.stack([columns, torch.full_like(columns, 9), torch.full_like(columns, 200)])
    return image, columns.clone().long()

@pytest.mark.parametrize("seed", range(8))
def test_crop_and_flip_keep_alignment(seed):
    image, label = column_pair()
    aug = SegAugment(crop=(24, 16), hflip=0.5)
    params = aug.sample(30, 40, torch.Generator().manual_seed(seed))
    img, lbl = aug.apply(image, label, params)
    assert lbl.shape == (16, 24) and img.shape == (3, 16, 24)
    torch.testing.assert_close(img[0].long(), lbl)
    top, left, _, _ = params.crop
    expected_cols = torch.arange(left, left + 24)
    if params.flip: expected_cols = expected_cols.flip(0)
    assert lbl[0].tolist() == expected_cols.tolist()

def test_crop_larger_than_image_pads_with_ignore():
    image, label = column_pair(10, 12)
    img, lbl = SegAugment(crop=(16, 14))(image, label, torch.Generator().manual_seed(0))
    assert lbl.shape == (14, 16)
    assert (lbl[10:] == IGNORE).all() and (lbl[:, 12:] == IGNORE).all()
    assert (img[:, 10:] == 0).all() and (img[:, :, 12:] == 0).all()
    assert lbl[:10, :12].tolist() == label.tolist()

def test_resize_nearest_label_by_hand():
    label = torch.tensor([[0] * 4 + [1] * 4] * 2 + [[2] * 4 + [3] * 4] * 2)     # 4x8, four blocks
    image = torch.zeros(3, 4, 8, dtype=torch.uint8)
    img, lbl = SegAugment(resize=(4, 2))(image, label)                          # (width, height)
    assert lbl.tolist() == [[0, 0, 1, 1], [2, 2, 3, 3]] and img.shape == (3, 2, 4)

def test_scaled_crop_stays_roughly_aligned():
    image, label = column_pair(60, 80)
    aug = SegAugment(long_side=120, scale_range=(0.5, 1.5), crop=(32, 24), hflip=0.5)
    for seed in range(5):
        img, lbl = aug(image.float(), label, torch.Generator().manual_seed(seed))
        valid = lbl != IGNORE
        assert (img[0][valid] - lbl[valid].float()).abs().max() <= 1.5    # bilinear vs nearest: within a column

def test_proda_preset_sizes_and_range():
    aug = augment_preset("proda")
    assert (aug.crop, aug.long_side, aug.scale_range, aug.hflip) == ((896, 512), 2200, (0.5, 1.5), 0.5)
    longs = [max(aug.sample(1052, 1914, torch.Generator().manual_seed(s)).size) for s in range(100)]
    assert 1100 <= min(longs) < 1400 and 3000 < max(longs) <= 3300

def test_seeded_dataset_is_deterministic(gta5_root):
    aug = SegAugment(crop=(5, 4), hflip=0.5)
    a = GTA5(gta5_root, augment=aug, seed=7, check_sizes=False)
    b = GTA5(gta5_root, augment=aug, seed=7, check_sizes=False)
    draws = [(a[1]["label"], b[1]["label"])]
    assert all(torch.equal(x, y) for x, y in draws)
    outs = set()
    for epoch in range(6):
        a.set_epoch(epoch)
        outs.add(tuple(a[0]["label"].flatten().tolist()))
    assert len(outs) > 1

def test_dataloader_batches(cityscapes_root):
    ds = make_dataset("cityscapes", cityscapes_root, "val", augment=SegAugment(crop=(4, 4)), seed=0)
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=2)))
    assert batch["image"].shape == (2, 3, 4, 4) and batch["label"].shape == (2, 4, 4)
    assert batch["name"] == ["frankfurt_000000_000019", "frankfurt_000000_000020"]

def test_make_dataset_errors(gta5_root):
    with pytest.raises(ValueError, match="unknown dataset"):
        make_dataset("kitti", gta5_root)
    with pytest.raises(ValueError, match="split_file"):
        make_dataset("gta5", gta5_root, "val")
    assert len(make_dataset("gta5", gta5_root, "train", check_sizes=False)) == 3

# ---------------------------------------------------------------- the check report and its CLI

def run_check(*args):
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-m", "proda_nb.data", "check", *map(str, args)],
                          capture_output=True, text=True, cwd=REPO, env=env, timeout=120)

def test_check_cli_reports_counts(gta5_root):
    result = run_check(gta5_root, "--dataset", "gta5")
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "images: 3" in out and "labels: 3" in out and "pairs: 3" in out
    assert "8x6: 3" in out                                  # image sizes
    assert "00003 (image 8x6, label 8x7)" in out            # the bad pair, named
    assert "8-bit palette: 3" in out

def test_check_cli_fails_on_broken_root(tmp_path):
    result = run_check(tmp_path / "nowhere", "--dataset", "cityscapes")
    assert result.returncode != 0 and str(tmp_path / "nowhere") in result.stdout

def test_check_fails_on_truncated_label(gta5_root, capsys):
    truncate(gta5_root / "labels" / "00002.png")
    assert main(["check", str(gta5_root), "--dataset", "gta5"]) == 1     # the CLI's entry point, in process
    out = capsys.readouterr().out
    assert "labels/00002.png" in out and "FAILED" in out

def test_make_dataset_synthcity_is_imported_lazily():
    pytest.importorskip("proda_nb.synthcity")
    ds = make_dataset("synthcity", split="source_train")
    sample = ds[0]
    assert sample["image"].shape[0] == 3 and sample["label"].dtype == torch.int64
    with pytest.raises(ValueError, match="no root"):
        make_dataset("synthcity", "/some/root", "source_train")

def test_check_class_share_and_wrong_channel(synthia_root):
    report = check_dataset(synthia_root, "synthia")
    assert report.ok, report.errors
    # tile(SYN_RED) has 48 pixels: 6 each of train ids 0, 1, 2, 3, 10, 18 and 12 ignored, in both labels
    np.testing.assert_allclose(report.class_share[[0, 1, 2, 3, 10, 18]], 100 * 6 / 48)
    np.testing.assert_allclose(report.class_share[-1], 100 * 12 / 48)
    swapped = np.stack([tile(SYN_GREEN), tile(SYN_RED), tile(SYN_BLUE)], axis=-1)
    write_png16(synthia_root / "GT" / "LABELS" / "0000001.png", swapped)
    report = check_dataset(synthia_root, "synthia")
    assert not report.ok and "0000001.png" in report.errors[0] and "5000" in report.errors[0]
