"""DANN (`--stage dann`): the gradient-reversal layer and Ganin's schedule on hand-computed values, the signs of the
domain loss's gradients, one step of the stage, and the command line: alone, in a chain after source-only, resumed
after a stop, under `--gpus 2`, and with the real presets on fixture folders."""
import json, math

import pytest
import torch
import torch.nn as nn

from conftest import SMALL_REAL_RUN, SYNTHCITY_NET, TINY_RUN, max_diff, run_cli, tiny_synthcity_config
from test_real_data_training import make_root
from proda_nb.dann import (Dann, DannConfig, PixelDomainClassifier, domain_accuracy, domain_loss, grad_reverse,
                           grl_coefficient)
from proda_nb.engine import Trainer, get_config, get_stage
from proda_nb.models import SynthCityNet

ONE = ["--stage", "dann", "--dann.iters", "4", *TINY_RUN]


# -- the layer and the schedule, by hand --------------------------------------------------------------------------
def test_grl_forward_is_the_identity_and_backward_reverses():
    x = torch.tensor([1.0, -2.0], requires_grad=True)
    z = grad_reverse(x, 0.5)
    assert z.tolist() == [1.0, -2.0]
    (3 * z[0] + z[1] ** 2).backward()                    # dl/dz = (3, 2 z1) = (3, -4)
    assert torch.allclose(x.grad, torch.tensor([-1.5, 2.0]))
    y = torch.tensor([0.25, 4.0], requires_grad=True)
    grad_reverse(y, 2.0).sum().backward()                # dl/dz = (1, 1): -2 each
    assert y.grad.tolist() == [-2.0, -2.0]


def test_grl_coefficient_hand_values():
    assert grl_coefficient(0.0) == 0.0                                          # 2 / 2 - 1
    assert math.isclose(grl_coefficient(0.5), (math.e ** 5 - 1) / (math.e ** 5 + 1), rel_tol=1e-12)   # tanh(2.5)
    assert math.isclose(grl_coefficient(0.5), 0.986614, abs_tol=1e-6)
    assert math.isclose(grl_coefficient(1.0), 0.999909, abs_tol=1e-6)          # tanh(5)
    assert math.isclose(grl_coefficient(1.0, alpha=2.0), 2 / (1 + math.exp(-2)) - 1, rel_tol=1e-12)


def test_domain_loss_and_accuracy_by_hand():
    z = torch.zeros(1, 1, 2, 2)
    assert math.isclose(domain_loss(z, z).item(), math.log(2), rel_tol=1e-6)
    s, t = torch.tensor([3.0, -1.0]).view(1, 1, 1, 2), torch.tensor([-2.0, -0.5]).view(1, 1, 1, 2)
    assert domain_accuracy(s, t).item() == 0.75                                # source 1 of 2 right, target 2 of 2


# -- signs: D learns, the encoder unlearns ------------------------------------------------------------------------
def test_domain_loss_sign_classifier_learns_encoder_is_reversed():
    torch.manual_seed(0)
    net, d = SynthCityNet(), PixelDomainClassifier(64, hidden=16, layers=1)
    x_s, x_t = torch.rand(2, 3, 32, 64), torch.rand(2, 3, 32, 64) * 0.5 + 0.5   # the target is brighter
    net.eval()                                            # fixed BN: the same features in every pass
    encoder = [p for n, p in net.named_parameters() if not n.startswith("classifier")]   # what the features depend on
    def loss(coeff):
        rev = (lambda f: f) if coeff is None else (lambda f: grad_reverse(f, coeff))
        return domain_loss(d(rev(net(x_s).features)), d(rev(net(x_t).features)))
    def grads(coeff):
        net.zero_grad(); d.zero_grad(); loss(coeff).backward()
        return [p.grad.clone() for p in encoder], [p.grad.clone() for p in d.parameters()]
    (enc_plain, d_plain), (enc_rev, d_rev) = grads(None), grads(0.8)
    for a, b in zip(d_rev, d_plain): assert torch.allclose(a, b, atol=1e-7)          # D: the un-reversed gradient
    for a, b in zip(enc_rev, enc_plain): assert torch.allclose(a, -0.8 * b, atol=1e-7)   # encoder: -c x
    assert any(g.abs().max() > 0 for g in enc_rev)

    before = loss(None).item()
    opt = torch.optim.SGD(d.parameters(), lr=0.5)
    for _ in range(10):                                   # D alone, through the GRL: L_D goes down
        opt.zero_grad(); loss(1.0).backward(); opt.step()
    trained = loss(None).item()
    assert trained < before
    enc = torch.optim.SGD(encoder, lr=0.01)      # the encoder alone, on its reversed gradient: L_D goes up
    enc.zero_grad(); d.zero_grad(); loss(1.0).backward(); enc.step()
    assert loss(None).item() > trained


# -- the stage ----------------------------------------------------------------------------------------------------
def test_stage_registration_and_presets():
    assert get_stage("dann") is Dann and Dann.init == "optional" and Dann.paper.miou == 39.3
    s, r = get_config("synthcity").dann, get_config("gta5_to_cityscapes").dann
    assert (s.iters, s.lr, s.hidden, s.lambda_dann, s.alpha) == (200, 0.01, 64, 1.0, 10.0)
    assert (r.hidden, r.layers, r.feature_layer, r.freeze_bn) == (1024, 2, "", True)
    assert get_config("synthia_to_cityscapes").dann.hidden == 1024
    from proda_nb.pipeline import get_recipe
    rec = get_recipe("dann")
    assert rec.stages == ("dann",) and rec.family == "gap minimisation"
    assert (rec.published.miou, rec.published.network) == (39.3, "DeepLabv2 ResNet-101")


def test_one_step_trains_the_domain_classifier(tmp_path):
    cfg = tiny_synthcity_config(tmp_path, "dann", **{"dann.iters": 4, "run.ckpt_every": 0})
    tr = Trainer(cfg)
    d = tr.stage.domain_classifier
    assert d.net[0].in_channels == 64                                              # SynthCityNet's features
    before = [p.detach().clone() for p in d.parameters()]
    src, tgt = (next(iter(tr._loader(k, i))) for i, k in enumerate(("source", "target")))
    logs = tr.train_step(src, tgt)
    assert float(logs["grl_coeff"]) == 0.0 and 0 <= float(logs["domain_accuracy"]) <= 1
    assert math.isclose(float(logs["loss"]), float(logs["loss_source_ce"] + logs["loss_domain"]), rel_tol=1e-5)
    assert any((a - b).abs().max() > 0 for a, b in zip(before, d.parameters()))     # its own optimizer stepped
    assert all(p.grad is None for p in d.parameters())
    lr = tr.stage.d_optimizer.param_groups[0]["lr"]
    assert math.isclose(lr, 0.1, rel_tol=1e-9)                                     # 10 x the stage lr, poly factor of step 0
    tr.train_step(src, tgt)
    assert math.isclose(tr.stage.d_optimizer.param_groups[0]["lr"], 0.1 * (1 - 1 / 4) ** 0.9, rel_tol=1e-9)


def test_bad_settings_are_one_line_errors(tmp_path):
    r = run_cli(*ONE, "--dann.lambda_dann", "-1", "--out", tmp_path / "a", ok=False)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("error: dann.lambda_dann")
    r = run_cli(*ONE, "--dann.feature_layer", "nope", "--out", tmp_path / "b", ok=False)
    assert r.returncode == 2 and "dann.feature_layer='nope'" in r.stderr.strip().splitlines()[-1]


# -- the command line ---------------------------------------------------------------------------------------------
def test_cli_alone(tmp_path):
    out = tmp_path / "alone"
    r = run_cli(*ONE, "--run.log_every", "1", "--out", out)
    assert "[dann, 4 steps" in r.stdout
    config = json.loads((out / "config.json").read_text())
    assert config["stage"] == "dann" and config["dann"]["hidden"] == 64
    ck = torch.load(out / "checkpoint.pt", weights_only=True)
    state = ck["stage"]["state"]
    assert ck["stage"]["name"] == "dann" and "domain_classifier" in state and "d_optimizer" in state
    log = [json.loads(l) for l in (out / "log.jsonl").read_text().splitlines() if "domain_accuracy" in l]
    assert [x["iteration"] for x in log] == [1, 2, 3, 4]
    assert [round(x["grl_coeff"], 6) for x in log] == [round(grl_coefficient(i / 4), 6) for i in range(4)]


def test_cli_in_a_chain_after_source_only(tmp_path):
    out = tmp_path / "chain"
    r = run_cli("--run.pipeline", "source_only,dann", "--schedule.iters", "3", "--dann.iters", "2", *TINY_RUN,
                "--run.ckpt_every", "0", "--out", out)
    res = json.loads((out / "results.json").read_text())
    assert [s["name"] for s in res["stages"]] == ["source_only", "dann"]
    assert res["stages"][1]["paper"][1] == 39.3 and "DANN (feature-level GRL)" in r.stdout
    ck = torch.load(out / "dann" / "checkpoint.pt", weights_only=True)
    assert ck["config"]["dann"]["init"] == str(out / "source_only" / "checkpoint.pt")


def test_cli_resume_gives_the_same_weights(tmp_path):
    args = [*ONE, "--run.ckpt_every", "2"]
    run_cli(*args, "--out", tmp_path / "full")
    run_cli(*args, "--stop-after", "2", "--out", tmp_path / "cut")
    run_cli(*args, "--resume", "--out", tmp_path / "cut")
    a, b = (torch.load(tmp_path / d / "checkpoint.pt", weights_only=True) for d in ("full", "cut"))
    assert b["iteration"] == 4 and max_diff(a["model"], b["model"]) == 0.0
    sa, sb = a["stage"]["state"], b["stage"]["state"]
    assert max_diff(sa["domain_classifier"], sb["domain_classifier"]) == 0.0


def test_cli_two_processes_equal_one_with_two_micro_batches(tmp_path):
    run_cli(*ONE, "--gpus", "2", "--out", tmp_path / "two")
    run_cli(*ONE, "--optim.accum_steps", "2", "--out", tmp_path / "one")
    a, b = (torch.load(tmp_path / d / "checkpoint.pt", weights_only=True) for d in ("two", "one"))
    assert (a["world_size"], b["world_size"]) == (2, 1)
    skip = lambda sd: {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}
    assert max_diff(skip(a["model"]), skip(b["model"])) <= 1e-5
    assert max_diff(a["stage"]["state"]["domain_classifier"], b["stage"]["state"]["domain_classifier"]) <= 1e-5


@pytest.mark.parametrize("config,source", [("gta5_to_cityscapes", "gta5"), ("synthia_to_cityscapes", "synthia")])
def test_real_presets_on_fixture_folders(tmp_path, config, source):
    make_root(tmp_path / "data", source)
    out = tmp_path / "out"
    small = [*SMALL_REAL_RUN, *SYNTHCITY_NET]
    r = run_cli("--config", config, "--stage", "dann", "--dann.iters", "2", "--dann.lr", "0.01", "--data-root",
                tmp_path / "data", "--out", out, *small)
    assert "target val mIoU" in r.stdout
    config_json = json.loads((out / "config.json").read_text())
    assert config_json["data"]["target"] == "cityscapes" and config_json["dann"]["hidden"] == 1024
    state = torch.load(out / "checkpoint.pt", weights_only=True)["stage"]["state"]
    assert state["domain_classifier"]["net.0.weight"].shape == (1024, 64, 1, 1)     # 1024 wide on the 64-d features
