"""The real presets against the authors' release, and the release's checkpoints.

The release's checkpoint layout is written here from its documentation (the key table of the release's DeepLab:
torchvision's ResNet-101 block names, `layer5.*` for the head, `bn_pretrain.*` for the stage-2/3 students' extra BN),
not from this project's model; the release's forward pass is written here too, functionally, from the same key
names, and the project's model must give its outputs exactly."""
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision

from proda_nb.engine import apply_stage_schedule, get_config, get_stage, load_checkpoint
from proda_nb.models import DeepLab, WeightLoadError, load_release_checkpoint, network_from_checkpoint
from conftest import run_cli


def release_layout(num_classes: int, extra_bn: bool) -> dict:
    "Key -> shape of a checkpoint of the release's DeepLab (the layout its documentation gives)."
    backbone = torchvision.models.resnet101(weights=None).state_dict()
    keys = {k: tuple(v.shape) for k, v in backbone.items() if not k.startswith("fc.")}   # torchvision block names
    for i, k in enumerate((1, 3, 3, 3, 3)):                       # the 1x1 branch, then dilations 6 / 12 / 18 / 24
        keys |= {f"layer5.conv2d_list.{i}.0.weight": (256, 2048, k, k), f"layer5.conv2d_list.{i}.0.bias": (256,),
                 f"layer5.conv2d_list.{i}.1.weight": (256,), f"layer5.conv2d_list.{i}.1.bias": (256,)}   # conv, GroupNorm
    keys |= {"layer5.bottleneck.0.se.0.weight": (80, 1280), "layer5.bottleneck.0.se.0.bias": (80,),
             "layer5.bottleneck.0.se.2.weight": (1280, 80), "layer5.bottleneck.0.se.2.bias": (1280,),
             "layer5.bottleneck.1.weight": (256, 1280, 3, 3), "layer5.bottleneck.1.bias": (256,),
             "layer5.bottleneck.2.weight": (256,), "layer5.bottleneck.2.bias": (256,),
             "layer5.head.1.weight": (num_classes, 256, 1, 1)}
    if extra_bn:
        keys |= {"bn_pretrain.weight": (2048,), "bn_pretrain.bias": (2048,), "bn_pretrain.running_mean": (2048,),
                 "bn_pretrain.running_var": (2048,), "bn_pretrain.num_batches_tracked": ()}
    return keys


def random_state(layout: dict, seed: int = 0) -> dict:
    "Random tensors of the layout's shapes; BN variances positive, weights small, so that outputs stay finite."
    g = torch.Generator().manual_seed(seed)
    state = {}
    for k, shape in layout.items():
        if k.endswith("num_batches_tracked"): state[k] = torch.tensor(7)
        elif k.endswith("running_var"): state[k] = 0.5 + torch.rand(shape, generator=g)
        elif k.endswith("running_mean"): state[k] = 0.1 * torch.randn(shape, generator=g)
        elif len(shape) == 4: state[k] = torch.randn(shape, generator=g) * math.sqrt(1.0 / (shape[1] * shape[2] * shape[3]))
        else: state[k] = 1.0 + 0.1 * torch.randn(shape, generator=g) if k.endswith("weight") else 0.1 * torch.randn(shape, generator=g)
    return state


def save_as_the_release(path: Path, state: dict, num_classes: int):
    "What the release's train.py writes."
    torch.save({"ResNet101": {"model_state": state, "objective_vectors": torch.randn(num_classes, 256)},
                "iter": 4000, "best_iou": np.float64(0.537)}, path)


def release_forward(s: dict, x: torch.Tensor) -> tuple:
    "The release's DeepLab in eval mode, from its checkpoint's keys alone: (256-d features, logits) at 1/8."
    bn = lambda x, p: F.batch_norm(x, s[p + ".running_mean"], s[p + ".running_var"], s[p + ".weight"], s[p + ".bias"], False, 0.0, 1e-5)
    x = F.relu(bn(F.conv2d(x, s["conv1.weight"], stride=2, padding=3), "bn1"))
    x = F.max_pool2d(x, 3, stride=2, padding=1, ceil_mode=True)
    for layer, blocks, stride, dilation in (("layer1", 3, 1, 1), ("layer2", 4, 2, 1), ("layer3", 23, 1, 2), ("layer4", 3, 1, 4)):
        for b in range(blocks):
            p = f"{layer}.{b}"
            out = F.relu(bn(F.conv2d(x, s[p + ".conv1.weight"], stride=stride if b == 0 else 1), p + ".bn1"))   # stride on the 1x1
            out = F.relu(bn(F.conv2d(out, s[p + ".conv2.weight"], padding=dilation, dilation=dilation), p + ".bn2"))
            out = bn(F.conv2d(out, s[p + ".conv3.weight"]), p + ".bn3")
            short = bn(F.conv2d(x, s[p + ".downsample.0.weight"], stride=stride), p + ".downsample.1") if b == 0 else x
            x = F.relu(out + short)
    if "bn_pretrain.weight" in s: x = bn(x, "bn_pretrain")
    branches = []
    for i, d in enumerate((1, 6, 12, 18, 24)):
        p = f"layer5.conv2d_list.{i}"
        y = F.conv2d(x, s[p + ".0.weight"], s[p + ".0.bias"], padding=0 if i == 0 else d, dilation=d)
        branches.append(F.relu(F.group_norm(y, 32, s[p + ".1.weight"], s[p + ".1.bias"])))
    y = torch.cat(branches, 1)
    gate = torch.sigmoid(F.linear(F.relu(F.linear(y.mean((2, 3)), s["layer5.bottleneck.0.se.0.weight"], s["layer5.bottleneck.0.se.0.bias"])),
                                  s["layer5.bottleneck.0.se.2.weight"], s["layer5.bottleneck.0.se.2.bias"]))
    y = F.conv2d(y * gate[:, :, None, None], s["layer5.bottleneck.1.weight"], s["layer5.bottleneck.1.bias"], padding=1)
    feat = F.group_norm(y, 32, s["layer5.bottleneck.2.weight"], s["layer5.bottleneck.2.bias"])
    return feat, F.conv2d(feat, s["layer5.head.1.weight"])


@pytest.fixture(scope="module")
def release_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("release")
    files = {}
    for K, extra in ((19, False), (16, True)):
        layout = release_layout(K, extra)
        state = random_state(layout, seed=K)
        path = root / f"release_{K}.pkl"
        save_as_the_release(path, state, K)
        files[K] = (path, layout, state)
    return files


@pytest.mark.parametrize("K,extra", [(19, False), (16, True)])
def test_release_checkpoint_loads_every_key(release_files, K, extra):
    path, layout, state = release_files[K]
    model = load_release_checkpoint(path)
    assert (model.num_classes, model.extra_bn is not None, model.layout, model.training) == (K, extra, "release", False)
    from proda_nb.models import rename_key
    mine = {rename_key(k, to_project=False): v for k, v in model.state_dict().items()}
    assert set(mine) == set(layout)                                            # every key, none more
    for k, shape in layout.items():
        assert tuple(mine[k].shape) == shape, k                                # every shape
        assert torch.equal(mine[k], state[k]), k                               # every value
    x = torch.rand(1, 3, 65, 97)                                               # an image in [0, 1], RGB, no mean/std
    with torch.no_grad():
        out = model(x)
        feat, logits = release_forward(state, x)
    assert out.logits.shape == logits.shape == (1, K, 9, 13)
    torch.testing.assert_close(out.logits, logits, rtol=1e-4, atol=1e-4)     # the release's logits ...
    torch.testing.assert_close(out.features, feat, rtol=1e-4, atol=1e-4)     # ... and 256-d features
    with torch.device("meta"):                                                 # the release's output size
        assert tuple(model.to("meta")(torch.empty(1, 3, 1024, 2048)).logits.shape) == (1, K, 129, 257)


def test_release_checkpoint_with_a_wrong_key_is_refused(release_files, tmp_path):
    path, layout, state = release_files[19]
    bad = dict(state); bad["layer5.head.1.bias"] = torch.zeros(19); del bad["layer4.2.bn3.weight"]
    save_as_the_release(tmp_path / "bad.pkl", bad, 19)
    with pytest.raises(WeightLoadError, match=r"missing keys \(1\) layer4.2.bn3.weight.*unexpected keys \(1\) layer5.head.1.bias"):
        load_release_checkpoint(tmp_path / "bad.pkl")
    torch.save({"model": {}}, tmp_path / "not_release.pt")
    with pytest.raises(WeightLoadError, match="not a checkpoint of the ProDA release"):
        load_release_checkpoint(tmp_path / "not_release.pt")


def test_release_checkpoint_as_eval_only_and_as_an_init(release_files, tmp_path):
    "`--eval-only --checkpoint release.pkl` on fixture folders; the same file rebuilds as a network and as an init."
    from test_real_data_training import make_root
    path, _, state = release_files[19]
    make_root(tmp_path / "data", "gta5")
    r = run_cli("--config", "gta5_to_cityscapes", "--data-root", tmp_path / "data", "--eval-only", "--checkpoint", path,
                "--data.num_workers", "0", "--run.device", "cpu", "--run.progress", "false")
    assert "mIoU19 (all 19 classes)" in r.stdout and "mIoU (all 19 classes)" in r.stdout
    net = network_from_checkpoint(get_config("gta5_to_cityscapes").model, path)
    assert torch.equal(net.head.classifier.weight, state["layer5.head.1.weight"])
    stage = get_stage("stage1")(init_prototypes="checkpoint")
    stage.bind(get_config("gta5_to_cityscapes"))
    model = DeepLab(19, head="proda", layout="release")
    stage.load_init(model, load_checkpoint(path), path)                                           # the released warm-up model as stage 1's init
    assert torch.equal(model.backbone.layer4[2].conv3.weight, state["layer4.2.conv3.weight"])
    assert stage.init_prototypes.shape == (19, 256)                            # its objective_vectors: the initial prototypes


# -- each preset value against the release's --------------------------------------------------------------------------
def test_stage1_optimiser_is_one_group_at_1e4():
    "The release trains stage 1 with one SGD group at 1e-4 for every parameter (no 10x head); the warm-up has the 10x head."
    with torch.device("meta"): model = DeepLab(19, head="proda", layout="release")
    cfg = get_config("gta5_to_cityscapes")
    stage = get_stage("stage1")(); stage.bind(cfg); apply_stage_schedule(cfg, stage)
    assert {g["lr"] for g in model.param_groups(cfg.optim.lr, cfg.optim.head_lr_mult)} == {1e-4}
    cfg = get_config("gta5_to_cityscapes")
    warm = get_stage("warmup")(); warm.bind(cfg); apply_stage_schedule(cfg, warm)
    assert [g["lr"] for g in model.param_groups(cfg.optim.lr, cfg.optim.head_lr_mult)] == [2.5e-4, 2.5e-3]


def test_structure_learning_weight_is_the_releases():
    "The release's KL: kl_div(log student, teacher) * mask summed, / mask.sum(), the mask having one channel per class."
    from proda_nb.consistency import prototype_kl
    s = get_config("gta5_to_cityscapes").stage1
    assert (s.gamma1, s.kl_per_class) == (10.0, True)
    g = torch.Generator().manual_seed(0)
    K, D = 19, 8
    student, teacher, protos = torch.randn(2, D, 5, 6, generator=g), torch.randn(2, D, 5, 6, generator=g), torch.randn(K, D, generator=g)
    dist = lambda f: (f[:, None] - protos[None, :, :, None, None]).norm(dim=2)               # (B,K,h,w)
    log_student = F.log_softmax(-dist(student), 1); teacher_p = F.softmax(-dist(teacher), 1)
    mask = torch.ones_like(teacher_p); mask[0, :, 1:3, 2:4] = 0                               # pixels a view cut out
    release = (F.kl_div(log_student, teacher_p, reduction="none") * mask).sum() / mask.sum()
    ours = prototype_kl(student, teacher, protos, valid=mask[:, 0] > 0) / K                  # what stage 1 does with kl_per_class
    torch.testing.assert_close(ours, release, rtol=1e-5, atol=1e-6)
    assert get_config("synthcity").stage1.kl_per_class in (True, False)                      # SynthCity says which (notebook 12)


def test_synthia_is_a_16_class_model_with_terrain_truck_train_ignored(tmp_path):
    from proda_nb.data import dataset_from_config, save_png
    from PIL import Image
    cfg = get_config("synthia_to_cityscapes")
    assert (cfg.model.num_classes, cfg.data.label_set, cfg.eval.classes, cfg.stage1.gamma2) == (16, "synthia16", "16", 0.0)
    root = tmp_path / "cityscapes"
    for split in ("train", "val"):
        (root / "leftImg8bit" / split / "ulm").mkdir(parents=True); (root / "gtFine" / split / "ulm").mkdir(parents=True)
        Image.fromarray(np.zeros((4, 8, 3), np.uint8)).save(root / "leftImg8bit" / split / "ulm" / "ulm_0_0_leftImg8bit.png")
        ids = np.array([[7, 8, 22, 27, 31, 26, 33, 0]] * 4, np.uint8)      # road, sidewalk, terrain, truck, train, car, bicycle, void
        Image.fromarray(ids).save(root / "gtFine" / split / "ulm" / "ulm_0_0_gtFine_labelIds.png")
    cfg.data.root = str(tmp_path)
    label = dataset_from_config(cfg.data, "target", "val", None)[0]["label"][0]
    assert label.tolist() == [0, 1, 255, 255, 255, 12, 15, 255]            # 16-class indices; terrain, truck, train ignored


def test_weak_view_scale_range_is_the_releases():
    s = get_config("gta5_to_cityscapes")
    assert (s.data.long_side, s.stage1.weak_crop, s.stage1.weak_scale) == (2200, (896, 512), (0.5, 1.5))
    assert s.stage2.weak_scale == (0.5, 1.5) and s.stage1.proto_update == "image"


def test_teacher_labels_come_from_the_full_image():
    "Stage 2's teacher labels the whole image (flip-averaged, > 0.95); the labels reach the student's view through its geometry."
    from proda_nb.distillation import Distillation, labels_from_probs, teacher_probs
    from proda_nb.consistency import warp
    from proda_nb.models import SegOutput
    assert Distillation.target_augment == "plain"                          # the trainer hands it whole images

    class Stub(torch.nn.Module):                                            # logits from the pixel's own colour
        def forward(self, x):
            logits = torch.stack([20 * (x[:, 0] - 0.5), torch.zeros_like(x[:, 0])], 1)
            return SegOutput(logits, logits)
    stage = Distillation(weak_crop=(16, 8), weak_scale=(1.0, 1.5), kd_teacher="strong_view")
    cfg = get_config("synthcity"); cfg.model.num_classes = 2
    stage.bind(cfg); stage.teacher = Stub()
    full = torch.rand(2, 3, 12, 24)
    torch.manual_seed(0)
    x, geometry, labels, soft = stage.targets(full)
    assert labels.shape == (2, 12, 24) and soft is None                     # on the full image's grid
    assert torch.equal(labels, labels_from_probs(teacher_probs(Stub(), full), 0.95))
    carried, valid = warp(labels, geometry)
    assert carried.shape == (2, 8, 16) and x.shape == (2, 3, 8, 16)
