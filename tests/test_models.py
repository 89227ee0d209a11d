"Integration tests for proda_nb.models: DeepLab shapes and heads, backbone weight files, frozen BN, SynthCityNet."
import math

import pytest
import torch
import torch.nn.functional as F
import torchvision

from proda_nb.models import (DeepLab, SegOutput, SynthCityNet, WeightLoadError, build_model,
                             load_backbone_weights)

H, W = 65, 97   # odd sizes: the feature map must be ceil(H/8) x ceil(W/8) = 9 x 13


@pytest.fixture(scope="module")
def aspp():
    torch.manual_seed(0)
    return DeepLab(head="aspp").eval()


@pytest.fixture(scope="module")
def proda():
    torch.manual_seed(1)
    return DeepLab(head="proda").eval()


@pytest.fixture(scope="module")
def torchvision_state(tmp_path_factory):
    "A randomly initialised torchvision ResNet-101 state dict (with fc) and the file it was saved to."
    torch.manual_seed(2)
    state = torchvision.models.resnet101(weights=None).state_dict()
    path = tmp_path_factory.mktemp("weights") / "resnet101_imagenet.pth"
    torch.save(state, path)
    yield state, path
    path.unlink()   # 170 MB: do not leave it to pytest's kept temporary directories


# --- DeepLab ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("head,feature_dim", [("aspp", 2048), ("proda", 256)])
def test_deeplab_shapes(head, feature_dim, aspp, proda):
    model = {"aspp": aspp, "proda": proda}[head]
    with torch.no_grad(): out = model(torch.rand(1, 3, H, W))
    assert isinstance(out, SegOutput)
    feats, logits = out
    assert feats.shape == (1, feature_dim, math.ceil(H / 8), math.ceil(W / 8)) == (1, feature_dim, 9, 13)
    assert logits.shape == (1, 19, 9, 13)
    assert model.feature_dim == feature_dim and model.num_classes == 19


def test_head_selection(aspp, proda):
    assert type(aspp.head).__name__ == "ASPPClassifier" and type(proda.head).__name__ == "ProDAHead"
    # DeepLabv2's classifier: four dilated 3x3 convs 2048 -> 19, summed
    assert [c.dilation for c in aspp.head.convs] == [(6, 6), (12, 12), (18, 18), (24, 24)]
    assert sum(p.numel() for p in aspp.head.parameters()) == 4 * (2048 * 9 * 19 + 19)
    assert any(isinstance(m, torch.nn.GroupNorm) for m in proda.head.modules())
    with pytest.raises(ValueError, match="head="):
        DeepLab(head="unet")


def test_output_stride_16_and_bad_stride():
    with torch.device("meta"):
        model = DeepLab(output_stride=16)
        assert model(torch.empty(1, 3, H, W)).logits.shape[2:] == (math.ceil(H / 16), math.ceil(W / 16))
    with pytest.raises(ValueError, match="output_stride"):
        DeepLab(output_stride=4)


def test_param_groups(proda):
    groups = proda.param_groups(1e-3)
    assert [g["lr"] for g in groups] == [1e-3, pytest.approx(1e-2)]
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(proda.parameters()))
    assert {id(p) for p in groups[1]["params"]} == {id(p) for p in proda.head.parameters()}


def test_input_norm_changes_what_the_backbone_sees():
    x = torch.full((1, 3, 2, 2), 0.5)
    from proda_nb.models import InputNorm
    assert torch.equal(InputNorm("none")(x), x)
    assert torch.allclose(InputNorm("imagenet")(x)[0, :, 0, 0],
                          torch.tensor([(0.5 - 0.485) / 0.229, (0.5 - 0.456) / 0.224, (0.5 - 0.406) / 0.225]))
    # Caffe: BGR order, 0..255, mean subtracted: channel 0 is blue = 127.5 - 104.008
    assert torch.allclose(InputNorm("caffe")(x)[0, :, 0, 0], torch.tensor([23.492, 10.831, 4.825]), atol=1e-3)
    with pytest.raises(ValueError, match="input_norm"):
        DeepLab(input_norm="mmseg")


# --- frozen BatchNorm -------------------------------------------------------------------------------------------

def _bn_buffers(model):
    return {k: v.clone() for k, v in model.state_dict().items() if "running_" in k}


def test_freeze_bn_keeps_running_stats(proda):
    x = torch.rand(2, 3, 33, 49)
    try:
        proda.freeze_batchnorm(True).train()
        before = _bn_buffers(proda)
        with torch.no_grad(): proda(x)
        after = _bn_buffers(proda)
        assert all(torch.equal(before[k], after[k]) for k in before)
        assert not proda.backbone.bn1.weight.requires_grad and not proda.backbone.bn1.training
        assert proda.head.dropout.training   # the rest of the model is still in training mode
        # without freezing, the same forward pass moves the statistics (so the check above can fail)
        proda.freeze_batchnorm(False).train()
        with torch.no_grad(): proda(x)
        moved = _bn_buffers(proda)
        assert not torch.equal(before["backbone.bn1.running_mean"], moved["backbone.bn1.running_mean"])
        assert proda.backbone.bn1.weight.requires_grad
    finally:
        proda.freeze_batchnorm(False).eval()


def test_freeze_bn_constructor_flag():
    with torch.device("meta"):
        model = DeepLab(freeze_bn=True, extra_bn=True).train()
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(bns) == 105   # 104 in ResNet-101 (1 + 3*(3+4+23+3) + 4 shortcut BNs) + the extra BN
    assert all(not bn.training and not bn.weight.requires_grad for bn in bns)
    assert all(p.requires_grad for g in model.param_groups(1.0) for p in g["params"])


# --- backbone weights -------------------------------------------------------------------------------------------

def test_load_torchvision_layout(aspp, torchvision_state):
    state, path = torchvision_state
    assert not torch.equal(aspp.backbone.layer2[1].conv2.weight, state["layer2.1.conv2.weight"])
    load_backbone_weights(aspp, path, kind="imagenet")
    assert torch.equal(aspp.backbone.layer2[1].conv2.weight, state["layer2.1.conv2.weight"])
    assert torch.equal(aspp.backbone.layer4[2].bn3.running_var, state["layer4.2.bn3.running_var"])
    assert torch.equal(aspp.backbone.conv1.weight, state["conv1.weight"])


@pytest.mark.parametrize("wrapper,prefix", [("resnet", "module."), ("state_dict", "backbone."),
                                            ("state_dict", "module.backbone.")])
def test_load_simclrv2_wrapped_and_prefixed(proda, torchvision_state, tmp_path, wrapper, prefix):
    state, _ = torchvision_state
    scaled = {k: (v * 2 if v.is_floating_point() else v) for k, v in state.items() if not k.startswith("fc.")}
    path = tmp_path / "simclrv2_r101_1x_sk0.pth"
    torch.save({wrapper: {prefix + k: v for k, v in scaled.items()}, "head": {"linear.weight": torch.zeros(3)}}, path)
    load_backbone_weights(proda, path, kind="simclrv2")
    path.unlink()
    assert torch.equal(proda.backbone.layer3[7].conv1.weight, scaled["layer3.7.conv1.weight"])
    assert torch.equal(proda.backbone.bn1.bias, scaled["bn1.bias"])


def test_mismatched_state_dict_lists_keys(aspp, torchvision_state, tmp_path):
    state, _ = torchvision_state
    bad = dict(state)
    bad["layer2.0.conv_x.weight"] = bad.pop("layer2.0.conv2.weight")
    del bad["layer3.4.bn1.running_mean"]
    bad["layer4.0.downsample.1.weight"] = torch.ones(7)
    path = tmp_path / "bad.pth"
    torch.save(bad, path)
    before = aspp.backbone.layer1[0].conv1.weight.clone()
    with pytest.raises(WeightLoadError) as info:
        load_backbone_weights(aspp, path)
    path.unlink()
    message = str(info.value)
    for key in ("layer2.0.conv2.weight", "layer3.4.bn1.running_mean", "layer2.0.conv_x.weight",
                "layer4.0.downsample.1.weight", str(path)):
        assert key in message
    assert "missing keys (2)" in message and "unexpected keys (1)" in message and "mismatches, file vs model (1)" in message
    assert sorted(info.value.missing) == ["layer2.0.conv2.weight", "layer3.4.bn1.running_mean"]
    assert torch.equal(aspp.backbone.layer1[0].conv1.weight, before)   # nothing was loaded


def test_many_mismatches_are_counted(aspp, tmp_path):
    path = tmp_path / "other_net.pth"
    torch.save({f"encoder.block{i}.weight": torch.zeros(1) for i in range(30)}, path)
    with pytest.raises(WeightLoadError, match=r"unexpected keys \(30\): encoder\.block0\.weight.*\(20 more\)"):
        load_backbone_weights(aspp, path)


def test_missing_and_unreadable_files(aspp, tmp_path):
    with pytest.raises(FileNotFoundError, match="no_such_resnet.pth"):
        load_backbone_weights(aspp, tmp_path / "no_such_resnet.pth")
    broken = tmp_path / "broken.pth"
    broken.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightLoadError, match="broken.pth"):
        load_backbone_weights(aspp, broken)
    with pytest.raises(ValueError, match="kind"):
        load_backbone_weights(aspp, broken, kind="moco")
    with pytest.raises(TypeError, match="SynthCityNet"):
        load_backbone_weights(SynthCityNet(), broken)


# --- SynthCityNet and the factory -------------------------------------------------------------------------------

def test_synthcity_net_shapes_and_gradient():
    torch.manual_seed(0)
    net = SynthCityNet(num_classes=19).train()
    feats, logits = net(torch.rand(4, 3, 64, 128))
    assert feats.shape == (4, net.feature_dim, 16, 32) and logits.shape == (4, 19, 16, 32)
    target = torch.randint(0, 19, (4, 64, 128))
    F.cross_entropy(F.interpolate(logits, size=(64, 128), mode="bilinear", align_corners=False), target).backward()
    first = net.stem[0][0].weight
    assert first.grad is not None and first.grad.abs().sum() > 0
    groups = net.param_groups(0.1)
    assert sum(len(g["params"]) for g in groups) == len(list(net.parameters()))


def test_build_model():
    net = build_model("synthcity_net", num_classes=16, width=16)
    assert isinstance(net, SynthCityNet) and net.num_classes == 16
    with torch.device("meta"):
        deeplab = build_model("deeplab_r101", head="proda")
    assert isinstance(deeplab, DeepLab) and deeplab.head_name == "proda" and deeplab.feature_dim == 256
    with pytest.raises(ValueError, match="synthcity_net"):
        build_model("segformer")
