"""A stage of one's own, defined in a plug-in file outside the package: it runs alone with its own option, inside a
chain, resumes exactly after a kill, and runs under `--gpus 2`, all without a change to the engine, the pipeline or
the command line. Also the README's "Your own method" blocks, run as written."""
import json, os, re, signal, subprocess, sys, textwrap, time
from pathlib import Path

import pytest
import torch

from conftest import REPO, TINY_RUN, max_diff, run_cli

PLUGIN = textwrap.dedent('''
    """A user's method: source cross-entropy plus a weighted target entropy, with a running mean of the entropy as state."""
    from dataclasses import dataclass
    import torch
    from proda_nb.engine import Stage, StageConfig, register_stage, segmentation_ce

    @dataclass
    class ScaledEntropySettings(StageConfig):
        weight: float = 0.01           # weight of the target entropy
        smoothing: float = 0.9         # of the running mean kept in the stage's state

    @register_stage("scaled_entropy", settings=ScaledEntropySettings, init="optional", title="scaled entropy (plug-in)")
    class ScaledEntropy(Stage):
        uses_target = True
        def setup(self, trainer):
            super().setup(trainer)
            self.running = torch.zeros((), device=trainer.env.device)
        def compute_loss(self, batch):
            model = self.trainer.model
            ce = segmentation_ce(model(batch["source"]["image"]).logits, batch["source"]["label"])
            p = model(batch["target"]["image"]).logits.float().softmax(1)
            entropy = -(p * p.clamp_min(1e-8).log()).sum(1).mean()
            self.last = entropy.detach()
            return ce + self.settings.weight * entropy, {"loss_source_ce": ce.detach(), "loss_entropy": entropy.detach()}
        def after_step(self, iteration):
            s = self.settings.smoothing
            self.running = s * self.running + (1 - s) * self.last
        def state_dict(self): return {"running": self.running}
        def load_state_dict(self, state): self.running = state["running"].to(self.running.device)
''')


@pytest.fixture(scope="module")
def plugin(tmp_path_factory):
    path = tmp_path_factory.mktemp("plugin") / "my_entropy.py"
    path.write_text(PLUGIN)
    return path


def test_engine_pipeline_and_train_name_no_stage():
    "The shared modules know no stage but source-only, and no dataset: every method plugs in."
    text = (REPO / "proda_nb" / "engine.py").read_text()
    code = "\n".join(line.split("#")[0] for line in text.splitlines())          # outside comments
    for word in ("stage1", "warmup", "stage2", "stage3", "distill", "synthcity"):
        assert word not in code.lower(), word


def test_plugin_stage_alone_with_its_own_option(plugin, tmp_path):
    out = tmp_path / "alone"
    r = run_cli("--plugin", plugin, "--stage", "scaled_entropy", "--scaled_entropy.weight", "0.5",
                "--schedule.iters", "4", *TINY_RUN, "--out", out)
    assert "target val mIoU" in r.stdout and "[scaled_entropy, 4 steps" in r.stdout
    config = json.loads((out / "config.json").read_text())
    assert config["scaled_entropy"]["weight"] == 0.5 and config["stage"] == "scaled_entropy"
    ck = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ck["stage"]["name"] == "scaled_entropy" and ck["stage"]["state"]["running"] > 0   # its own state, saved
    log = [json.loads(l) for l in (out / "log.jsonl").read_text().splitlines() if "loss_entropy" in l]
    assert log and all(x["loss_entropy"] > 0 for x in log)
    bad = run_cli("--plugin", plugin, "--stage", "scaled_entropy", "--scaled_entropy.wieght", "1", ok=False)
    assert bad.returncode == 2 and "--scaled_entropy.weight" in bad.stderr                  # its options are real ones


def test_plugin_stage_in_a_chain(plugin, tmp_path):
    out = tmp_path / "chain"
    r = run_cli("--plugin", plugin, "--run.pipeline", "source_only,scaled_entropy", "--schedule.iters", "3",
                *TINY_RUN, "--run.ckpt_every", "0", "--out", out)
    res = json.loads((out / "results.json").read_text())
    assert [s["name"] for s in res["stages"]] == ["source_only", "scaled_entropy"]
    assert "scaled entropy (plug-in)" in r.stdout                                           # its title in the table
    ck = torch.load(out / "scaled_entropy" / "checkpoint.pt", weights_only=True)
    assert ck["config"]["scaled_entropy"]["init"] == str(out / "source_only" / "checkpoint.pt")


def test_plugin_stage_resumes_after_a_kill(plugin, tmp_path):
    args = ["--plugin", plugin, "--stage", "scaled_entropy", "--schedule.iters", "40", "--run.ckpt_every", "5", *TINY_RUN]
    full = tmp_path / "full"; run_cli(*args, "--out", full)
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "proda_nb.train", *map(str, args), "--out", str(killed)], cwd=REPO,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (killed / "checkpoint.pt").exists() and proc.poll() is None and time.time() < deadline: time.sleep(0.05)
    proc.send_signal(signal.SIGKILL); proc.wait()
    at_kill = torch.load(killed / "checkpoint.pt", weights_only=True)["iteration"]
    assert at_kill < 40, "the run finished before it could be killed; make it longer"
    run_cli(*args, "--out", killed, "--resume")
    a, b = (torch.load(d / "checkpoint.pt", weights_only=True) for d in (full, killed))
    assert b["iteration"] == 40 and max_diff(a["model"], b["model"]) == 0.0
    assert torch.equal(a["stage"]["state"]["running"], b["stage"]["state"]["running"])       # the stage's state too


def test_plugin_stage_under_two_processes(plugin, tmp_path):
    "`--gpus 2` (two gloo processes, each importing the plug-in) trains as one process with two micro-batches."
    args = ["--plugin", plugin, "--stage", "scaled_entropy", "--schedule.iters", "4", *TINY_RUN]
    run_cli(*args, "--gpus", "2", "--out", tmp_path / "two")
    run_cli(*args, "--optim.accum_steps", "2", "--out", tmp_path / "one")
    a, b = (torch.load(tmp_path / d / "checkpoint.pt", weights_only=True) for d in ("two", "one"))
    assert (a["world_size"], b["world_size"]) == (2, 1)
    diff = max((a["model"][k].double() - b["model"][k].double()).abs().max().item()
               for k in a["model"] if not k.endswith("num_batches_tracked"))
    assert diff <= 1e-5, diff


def readme_blocks():
    "The ```python and ```sh blocks of the README's section 'Your own method'."
    text = (REPO / "README.md").read_text()
    section = text.split("## Your own method", 1)[1].split("\n## ", 1)[0]
    python = re.search(r"```python\n(.*?)```", section, re.S)[1]
    sh = re.search(r"```sh\n(.*?)```", section, re.S)[1]
    return python, sh


def test_readme_your_own_method_runs_as_written(tmp_path):
    python, sh = readme_blocks()
    file = re.search(r"--plugin (\S+)", sh)[1]
    (tmp_path / file).write_text(python)
    commands = [line for line in sh.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    assert commands
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SYNTHCITY_CACHE": str(tmp_path / "cache"),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}   # `python` is this interpreter
    for command in commands:
        command = command.split(" #")[0]
        r = subprocess.run(command + " --schedule.iters 3", shell=True, cwd=tmp_path, env=env, capture_output=True,
                           text=True, timeout=600)
        assert r.returncode == 0, f"{command}\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}"
        assert "mIoU" in r.stdout
