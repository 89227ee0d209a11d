"""TGCF-DA (`proda_nb.tgcf`): AdaIN by hand, the generator and the spectral-normalised discriminator, the semantic
constraint leaving the frozen segmenter alone, the generator file, and `--stage tgcf` alone, in a chain after
source-only, after a SIGKILL (resumed to identical weights), under `--gpus 2`, and on the real presets' fixture folders."""
import math
from pathlib import Path

import pytest
import torch

from conftest import SMALL_REAL_RUN, SYNTHCITY_NET, TINY_RUN, default_network, kill_and_resume, max_diff, run_cli
from proda_nb.tgcf import (adain, channel_moments, TGCFGenerator, PatchDiscriminator, power_iteration, frozen_copy,
                           semantic_loss, lsgan_discriminator_loss, lsgan_generator_loss, load_generator, save_generator,
                           GENERATOR_FILE, TGCF)
from proda_nb.models import SynthCityNet, WeightFileError
from proda_nb.engine import get_config, Trainer, atomic_save
from test_real_data_training import make_root

TINY_TGCF = [*TINY_RUN, "--tgcf.iters", "3", "--run.ckpt_every", "0"]


def ck(out):
    return torch.load(Path(out) / "checkpoint.pt", weights_only=True)


# -- AdaIN ----------------------------------------------------------------------------------------------------------
def test_adain_on_a_hand_computed_2x2_example():
    content = torch.tensor([[1., 2.], [3., 4.]]).view(1, 1, 2, 2)      # mean 2.5, population variance 1.25
    style = torch.tensor([[0., 0.], [2., 2.]]).view(1, 1, 2, 2)        # mean 1, standard deviation 1
    out = adain(content, style, eps=0.0)
    expected = (torch.tensor([1., 2., 3., 4.]) - 2.5) / math.sqrt(1.25) + 1.0
    assert torch.allclose(out.flatten(), expected, atol=1e-6)
    assert torch.allclose(out.flatten(), torch.tensor([-0.341641, 0.552786, 1.447214, 2.341641]), atol=1e-6)
    with_eps = adain(content, style)                                    # eps = 1e-5 in both sigmas: nearly the same
    assert torch.allclose(with_eps, out, atol=1e-4)


def test_adain_output_has_the_styles_per_channel_mean_and_std():
    g = torch.Generator().manual_seed(0)
    content, style = 4 * torch.randn(3, 5, 8, 6, generator=g) + 2, 0.3 * torch.randn(3, 5, 7, 9, generator=g) - 1
    out = adain(content, style, eps=0.0)
    (mu_o, sd_o), (mu_s, sd_s) = channel_moments(out, 0.0), channel_moments(style, 0.0)
    assert torch.allclose(mu_o, mu_s, atol=1e-5) and torch.allclose(sd_o, sd_s, atol=1e-5)
    assert torch.allclose(out.std((2, 3), unbiased=False), style.std((2, 3), unbiased=False), atol=1e-5)


def test_adain_of_a_constant_channel_is_the_styles_mean():
    out = adain(torch.full((1, 1, 2, 2), 5.0), torch.tensor([[1., 3.], [5., 7.]]).view(1, 1, 2, 2))
    assert torch.allclose(out, torch.full((1, 1, 2, 2), 4.0), atol=1e-5)


# -- generator and discriminator ------------------------------------------------------------------------------------
def test_generator_shapes_and_range():
    g = TGCFGenerator(8)
    y = g(torch.rand(2, 3, 32, 64), torch.rand(2, 3, 40, 40))
    assert y.shape == (2, 3, 32, 64) and 0 <= y.min() and y.max() <= 1
    assert g(torch.rand(1, 3, 33, 47), torch.rand(1, 3, 16, 16)).shape == (1, 3, 33, 47)


def test_discriminator_is_spectrally_normalised_and_lsgan_losses():
    torch.manual_seed(0)
    d = PatchDiscriminator(8, 3).eval()
    for _ in range(100): power_iteration(d)
    norms = [torch.linalg.matrix_norm(m.weight.flatten(1), ord=2).item() for m in d.modules()
             if torch.nn.utils.parametrize.is_parametrized(m, "weight")]
    assert len(norms) == 4 and all(abs(n - 1) < 1e-2 for n in norms)
    assert d(torch.rand(2, 3, 64, 128)).shape == (2, 1, 8, 16)
    half = torch.full((1, 1, 2, 2), 0.5)
    assert math.isclose(lsgan_discriminator_loss(half, half).item(), 0.25)
    assert math.isclose(lsgan_generator_loss(torch.zeros(1, 1, 2, 2)).item(), 1.0)


# -- the semantic constraint ----------------------------------------------------------------------------------------
def test_semantic_constraint_leaves_the_frozen_segmenter_unchanged():
    torch.manual_seed(0)
    segmenter = frozen_copy(SynthCityNet(num_classes=19))
    before = {k: v.clone() for k, v in segmenter.state_dict().items()}
    gen = TGCFGenerator(8)
    opt = torch.optim.SGD(gen.parameters(), lr=0.1)
    for _ in range(3):
        loss = semantic_loss(segmenter, gen(torch.rand(2, 3, 64, 128), torch.rand(2, 3, 64, 128)),
                             torch.randint(0, 19, (2, 64, 128)))
        opt.zero_grad(); loss.backward(); opt.step()
    assert all(p.grad is not None for p in gen.parameters())             # the gradient reached the generator ...
    assert all(p.grad is None and not p.requires_grad for p in segmenter.parameters())
    assert all(torch.equal(before[k], v) for k, v in segmenter.state_dict().items())   # ... and nothing else moved
    assert not segmenter.training


def test_stage_steps_move_the_generator_not_the_segmenters(tmp_path):
    cfg = get_config("synthcity"); cfg.stage = "tgcf"
    cfg.optim.batch_size, cfg.data.synthcity_n, cfg.data.max_val = 4, 8, 2
    cfg.run.out, cfg.run.progress, cfg.run.tensorboard, cfg.run.ckpt_every = str(tmp_path), False, False, 0
    torch.manual_seed(0); atomic_save({"model": default_network().state_dict()}, tmp_path / "init.pt")
    cfg.tgcf.init, cfg.tgcf.iters = str(tmp_path / "init.pt"), 2
    tr = Trainer(cfg)
    frozen = {k: v.clone() for k, v in tr.stage.segmenter.state_dict().items()}
    engine = {k: v.clone() for k, v in tr.raw_model.state_dict().items()}
    gen = {k: v.clone() for k, v in tr.stage.generator.state_dict().items()}
    tr.fit()
    assert all(torch.equal(frozen[k], v) for k, v in tr.stage.segmenter.state_dict().items())
    assert all(torch.equal(engine[k], v) for k, v in tr.raw_model.state_dict().items() if not k.endswith("num_batches_tracked"))
    assert any(not torch.equal(gen[k], v) for k, v in tr.stage.generator.state_dict().items())
    assert tr.out == tmp_path / "tgcf" and (tr.out / GENERATOR_FILE).is_file()   # an init inside OUT: it writes OUT/tgcf


def test_generator_file_round_trip_and_bad_files(tmp_path):
    g = TGCFGenerator(4)
    save_generator(tmp_path / GENERATOR_FILE, g)
    back = load_generator(tmp_path / GENERATOR_FILE)
    x = torch.rand(1, 3, 8, 8)
    assert torch.equal(back(x, x), g.eval()(x, x)) and not any(p.requires_grad for p in back.parameters())
    torch.save({"model": {}}, tmp_path / "not_a_generator.pt")
    with pytest.raises(WeightFileError, match="not_a_generator.pt holds no TGCF-DA generator"): load_generator(tmp_path / "not_a_generator.pt")
    with pytest.raises(FileNotFoundError, match="missing.pt"): load_generator(tmp_path / "missing.pt")


def test_bad_settings_are_one_line_errors(random_init, tmp_path):
    r = run_cli("--stage", "tgcf", "--tgcf.init", random_init, "--tgcf.lambda_sem", "-1", *TINY_TGCF, "--out", tmp_path, ok=False)
    assert r.returncode != 0 and "tgcf.lambda_sem must be >= 0" in r.stderr
    r = run_cli("--stage", "tgcf", *TINY_TGCF, "--out", tmp_path / "empty", ok=False)
    assert r.returncode != 0 and "tgcf starts from the previous stage's checkpoint" in r.stderr


# -- the command line -----------------------------------------------------------------------------------------------
def test_cli_alone(random_init, tmp_path):
    out = tmp_path / "alone"
    r = run_cli("--stage", "tgcf", "--tgcf.init", random_init, "--tgcf.width", "8", *TINY_TGCF, "--out", out)
    assert "[tgcf, 3 steps" in r.stdout
    state = ck(out)["stage"]
    assert state["name"] == "tgcf" and state["state"]["settings"]["width"] == 8
    assert set(state["state"]) >= {"generator", "discriminator", "g_optimizer", "d_optimizer"}
    assert load_generator(out / GENERATOR_FILE).width == 8 and load_generator(out / "checkpoint.pt").width == 8
    init = torch.load(random_init, weights_only=True)["model"]
    assert max_diff(init, ck(out)["model"]) == 0.0                       # the engine's network: the init, untouched


def test_cli_in_a_chain_after_source_only(tmp_path):
    out = tmp_path / "chain"
    run_cli("--run.pipeline", "source_only,tgcf", "--schedule.iters", "3", *TINY_TGCF, "--out", out)
    c = ck(out / "tgcf")
    assert c["config"]["tgcf"]["init"] == str(out / "source_only" / "checkpoint.pt")
    assert max_diff(c["model"], ck(out / "source_only")["model"]) == 0.0
    assert (out / "tgcf" / GENERATOR_FILE).is_file()


def test_resumes_exactly_after_a_kill(random_init, tmp_path):
    args = ["--stage", "tgcf", "--tgcf.init", random_init, "--tgcf.width", "8", *TINY_RUN, "--tgcf.iters", "30",
            "--run.ckpt_every", "5"]
    full, killed = kill_and_resume(args, tmp_path, iters=30)
    a, b = ck(full)["stage"]["state"], ck(killed)["stage"]["state"]
    assert ck(killed)["iteration"] == 30
    for key in ("generator", "discriminator"): assert max_diff(a[key], b[key]) == 0.0, key
    assert torch.equal(torch.load(full / GENERATOR_FILE, weights_only=True)["generator"]["decoder.3.weight"],
                       torch.load(killed / GENERATOR_FILE, weights_only=True)["generator"]["decoder.3.weight"])


def test_two_processes_train_as_one_with_two_micro_batches(random_init, tmp_path):
    args = ["--stage", "tgcf", "--tgcf.init", random_init, "--tgcf.width", "8", *TINY_TGCF]
    run_cli(*args, "--gpus", "2", "--out", tmp_path / "two")
    run_cli(*args, "--optim.accum_steps", "2", "--out", tmp_path / "one")
    a, b = ck(tmp_path / "two"), ck(tmp_path / "one")
    assert (a["world_size"], b["world_size"]) == (2, 1)
    for key in ("generator", "discriminator"):
        assert max_diff(a["stage"]["state"][key], b["stage"]["state"][key]) <= 1e-5, key


def test_real_preset_on_fixture_folders(tmp_path):
    make_root(tmp_path / "data", "gta5")
    out = tmp_path / "real"
    small = [*SMALL_REAL_RUN, *SYNTHCITY_NET]
    run_cli("--config", "gta5_to_cityscapes", "--data-root", tmp_path / "data", "--run.pipeline", "source_only,tgcf",
            "--schedule.iters", "2", "--tgcf.iters", "2", *small, "--out", out)
    c = ck(out / "tgcf")
    assert c["config"]["data"]["source"] == "gta5" and c["stage"]["state"]["settings"]["width"] == 32   # the real preset's generator
    assert load_generator(out / "tgcf" / GENERATOR_FILE).width == 32
