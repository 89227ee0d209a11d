"""The real recipe's command (`--config gta5_to_cityscapes` / `synthia_to_cityscapes --data-root ROOT`) trains and
evaluates on small dataset folders written in the published formats: GTA5 palette labels holding Cityscapes ids,
SYNTHIA 16-bit labels with the class in the red channel, Cityscapes `labelIds`. The ResNet-101 is swapped for the
small network (`--model.name synthcity_net`) so that the test takes seconds; everything else is the preset."""
import json, os, struct, subprocess, sys, zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]

# Cityscapes label ids drawn in the fixtures and the train ids they must become (uda_reference: 7 road, 8 sidewalk,
# 11 building, 21 vegetation, 23 sky, 26 car; SYNTHIA: 3 road, 4 sidewalk, 2 building, 6 vegetation, 1 sky, 8 car).
CS_IDS, TRAIN_IDS, SYNTHIA_IDS = [7, 8, 11, 21, 23, 26], [0, 1, 2, 8, 10, 13], [3, 4, 2, 6, 1, 8]


def stripes(ids, h, w):
    "A label map of horizontal stripes, one per id."
    return np.repeat(np.array(ids), -(-h // len(ids)))[:h, None].repeat(w, 1)


def image_for(label_rows, seed):
    "An image whose colour depends on the stripe (so the network can learn it) plus noise."
    rng = np.random.default_rng(seed)
    palette = rng.integers(0, 256, (256, 3))
    return np.clip(palette[label_rows] + rng.normal(0, 10, label_rows.shape + (3,)), 0, 255).astype(np.uint8)


def write_png16_rgb(path, samples):
    "16-bit RGB PNG written by hand (independent of the package's reader)."
    samples = np.asarray(samples, dtype=">u2"); h, w, _ = samples.shape
    raw = b"".join(b"\x00" + samples[y].tobytes() for y in range(h))
    def chunk(kind, data): return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def make_root(root: Path, source: str):
    h, w = 32, 64
    cs_label = stripes(CS_IDS, h, w)
    if source == "gta5":
        (root / "gta5/images").mkdir(parents=True); (root / "gta5/labels").mkdir(parents=True)
        for i in range(1, 5):
            Image.fromarray(image_for(cs_label, i)).save(root / f"gta5/images/{i:05d}.png")
            lab = Image.fromarray(cs_label.astype(np.uint8)); lab.putpalette(list(range(256)) * 3)
            lab.save(root / f"gta5/labels/{i:05d}.png")
    else:
        (root / "synthia/RGB").mkdir(parents=True); (root / "synthia/GT/LABELS").mkdir(parents=True)
        syn = stripes(SYNTHIA_IDS, h, w)
        for i in range(4):
            Image.fromarray(image_for(cs_label, i)).save(root / f"synthia/RGB/{i:07d}.png")
            write_png16_rgb(root / f"synthia/GT/LABELS/{i:07d}.png", np.stack([syn, syn * 7 + 3, np.full_like(syn, 999)], -1))
    for split in ("train", "val"):
        (root / f"cityscapes/leftImg8bit/{split}/ulm").mkdir(parents=True)
        (root / f"cityscapes/gtFine/{split}/ulm").mkdir(parents=True)
        for f in range(2):
            stem = f"ulm_000000_{f:06d}"
            Image.fromarray(image_for(cs_label, 10 + f)).save(root / f"cityscapes/leftImg8bit/{split}/ulm/{stem}_leftImg8bit.png")
            Image.fromarray(cs_label.astype(np.uint8)).save(root / f"cityscapes/gtFine/{split}/ulm/{stem}_gtFine_labelIds.png")


def cli(*args):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "proda_nb.train", *args], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, f"exit {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r.stdout


@pytest.mark.parametrize("config,source,headline,labels", [
    ("gta5_to_cityscapes", "gta5", "all 19 classes", "19"),
    ("synthia_to_cityscapes", "synthia", "SYNTHIA's 16 classes", "synthia16"),
    ("synthia_to_cityscapes_19", "synthia", "SYNTHIA's 16 classes of a 19-class model: not the paper's protocol", "19")])
def test_real_recipe_trains_and_evaluates_on_fixture_folders(tmp_path, config, source, headline, labels):
    from proda_nb.labels import label_set_indices
    make_root(tmp_path / "data", source)
    out = tmp_path / "out"
    small = ["--model.name", "synthcity_net", "--model.layout", "torchvision", "--data.crop", "64,32", "--data.long_side", "64",
             "--data.num_workers", "0", "--optim.batch_size", "2", "--optim.lr", "0.01", "--optim.head_lr_mult", "1",
             "--run.progress", "false", "--run.tensorboard", "false", "--run.device", "cpu"]
    text = cli("--config", config, "--stage", "source_only", "--data-root", str(tmp_path / "data"), "--out", str(out),
               "--schedule.iters", "3", "--schedule.poly_iters", "0", *small)
    assert f"target val mIoU ({headline})" in text
    metrics = json.loads((out / "metrics.json").read_text())
    iou = metrics["iou"]
    assert len(iou) == (16 if labels == "synthia16" else 19)
    # every class drawn in the val labels was read and mapped to its class: it has an IoU (not "absent")
    assert all(iou[k] is not None for k in label_set_indices(labels, TRAIN_IDS)), iou
    if labels == "synthia16": assert "miou19" not in metrics and {"miou16", "miou13"} <= set(metrics)
    # evaluating the saved checkpoint again gives the same table
    again = cli("--config", config, "--data-root", str(tmp_path / "data"), "--eval-only",
                "--checkpoint", str(out / "checkpoint.pt"), *small)
    table = lambda t: t[t.index(" id  class"):t.index("target val mIoU") if "target val mIoU" in t else None].strip()
    assert table(text) in again


def test_real_recipe_chain_on_fixture_folders(tmp_path):
    "Without --stage the real preset chains warm-up -> stage 1 -> stage 2 -> stage 3 on GTA5 / Cityscapes folders."
    make_root(tmp_path / "data", "gta5")
    out = tmp_path / "chain"
    tiny = ["--model.name", "synthcity_net", "--model.layout", "torchvision", "--data.crop", "64,32", "--data.long_side", "64", "--data.num_workers", "0",
            "--optim.batch_size", "2", "--optim.head_lr_mult", "1", "--schedule.poly_iters", "0",
            "--warmup.iters", "2", "--warmup.lr", "0.01", "--stage1.iters", "2", "--stage1.weak_crop", "48,24",
            "--stage2.iters", "2", "--stage3.iters", "2", "--stage2.student_init", "teacher",
            "--stage2.weak_crop", "48,24", "--stage3.weak_crop", "48,24",
            "--run.progress", "false", "--run.tensorboard", "false", "--run.device", "cpu", "--run.ckpt_every", "0"]
    text = cli("--config", "gta5_to_cityscapes", "--data-root", str(tmp_path / "data"), "--out", str(out), *tiny)
    res = json.loads((out / "results.json").read_text())
    assert res["benchmark"] == "gta5_to_cityscapes"
    assert [s["name"] for s in res["stages"]] == ["warmup", "stage1", "stage2", "stage3"]   # the method, no source-only
    assert "target val mIoU (all 19 classes)" in text and "57.5" in text
    # stage 1 read the Cityscapes training images whole (resized to data.long_side) and stored one soft label map each
    stores = list((out / "warmup").glob("soft_labels_*.bin"))
    assert len(stores) == 1
    ck = json.loads((out / "stage1" / "config.json").read_text())
    assert ck["stage1"]["init"] == str(out / "warmup" / "checkpoint.pt") and ck["data"]["target"] == "cityscapes"


def test_synthia16_chain_draws_its_pictures(tmp_path):
    "A 16-class model's run draws its per-class bars (16 classes, by name) and prediction maps (in train-id colours)."
    from PIL import Image as PILImage
    make_root(tmp_path / "data", "synthia")
    out = tmp_path / "s16"
    cli("--config", "synthia_to_cityscapes", "--data-root", str(tmp_path / "data"), "--out", str(out),
        "--run.pipeline", "source_only", "--schedule.iters", "2", "--model.name", "synthcity_net", "--model.layout", "torchvision",
        "--data.crop", "64,32", "--data.long_side", "64", "--data.num_workers", "0", "--optim.batch_size", "2",
        "--optim.head_lr_mult", "1", "--schedule.poly_iters", "0", "--run.progress", "false", "--run.tensorboard", "false",
        "--run.device", "cpu", "--run.ckpt_every", "0")
    res = json.loads((out / "results.json").read_text())
    assert len(res["stages"][0]["iou"]) == 16
    for name in ("per_class_iou.png", "predictions.png"):
        assert PILImage.open(out / name).size[0] > 100, name
