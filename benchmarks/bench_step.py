"""Seconds per training step of the shared engine, and peak memory, on this machine.

    python benchmarks/bench_step.py [--deeplab-steps 2] [--synthcity-steps 20] [--skip-deeplab]
    python benchmarks/bench_step.py --stage1 [--full 1024x512] [--crop 448x256] [--stage1-steps 2]

Measures, in one run:
1. SynthCityNet, the preset's global batch at 64x128 (the `synthcity` preset), one process;
2. the same global batch with DDP over 2 CPU processes (gloo, half the batch each), and its ratio to (1);
3. ResNet-101 DeepLab with the release's head at the release's crop (896x512), batch 1 (after one warm-up step).
Every step is `Trainer.train_step`: forward, source cross-entropy, backward, SGD, schedule, BN bookkeeping.
Peak memory: the process's peak RSS on the CPU, `torch.cuda.max_memory_allocated` on CUDA.

`--stage1` instead measures the real preset's stage-1 step (ResNet-101 in the release's layout, one image: the full
target image `--full` for the momentum encoder, weak and strong views of `--crop`, a source crop of `--crop`), once
with the source cross-entropy back-propagated before the target passes (`stage1.source_backward=early`, the
release's order) and once with one joint backward (`joint`), each in a fresh process so that each peak is its own;
it prints both and their ratios.
"""
import argparse, json, os, resource, socket, subprocess, sys, tempfile, time

from pathlib import Path

import torch
import torch.multiprocessing as mp

from proda_nb.engine import DistEnv, Trainer, get_config, init_distributed


class Fixed(torch.utils.data.Dataset):
    "Random images and labels of one size, generated once (the benchmark measures the step, not data loading)."
    def __init__(self, n, height, width, classes=19):
        g = torch.Generator().manual_seed(0)
        self.x = torch.rand(n, 3, height, width, generator=g)
        self.y = torch.randint(0, classes, (n, height, width), generator=g)
    def __len__(self): return len(self.x)
    def __getitem__(self, i): return {"image": self.x[i], "label": self.y[i], "index": i, "name": str(i)}


def peak_memory_mb(device) -> float:
    if device.type == "cuda": return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024   # KiB on Linux


def time_steps(cfg, model, data, env, steps, warmup=1):
    "Seconds per `Trainer.train_step` (mean over `steps` after `warmup` untimed steps) and peak memory (MiB)."
    cfg.run.out, cfg.run.progress, cfg.run.tensorboard = "/tmp/proda_nb_bench", False, False
    tr = Trainer(cfg, env=env, model=model, datasets={"source": data, "target": None, "val": data})
    per = tr.micro_batch * cfg.optim.accum_steps
    start = env.rank * per
    batch = {"image": data.x[start:start + per].to(env.device), "label": data.y[start:start + per].to(env.device)}
    if env.device.type == "cuda":
        batch["image"] = batch["image"].contiguous(memory_format=torch.channels_last)
        torch.cuda.reset_peak_memory_stats(env.device)
    for _ in range(warmup): tr.train_step(batch, None)
    sync = torch.cuda.synchronize if env.device.type == "cuda" else (lambda: None)
    sync(); t = time.perf_counter()
    for _ in range(steps): tr.train_step(batch, None)
    sync()
    return (time.perf_counter() - t) / steps, peak_memory_mb(env.device)


SYNTHCITY_BATCH = get_config("synthcity").optim.batch_size   # the preset's global batch


def synthcity_config(device):
    cfg = get_config("synthcity"); cfg.run.device = device
    return cfg


def synthcity_model():
    from proda_nb.models import build_model
    torch.manual_seed(0)
    return build_model("synthcity_net")


def _ddp_worker(rank, world, port, steps, queue):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    env = init_distributed("cpu")
    sec, mem = time_steps(synthcity_config("cpu"), synthcity_model(), Fixed(SYNTHCITY_BATCH, 64, 128), env, steps, warmup=2)
    if rank == 0: queue.put((sec, mem))
    torch.distributed.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0)); return s.getsockname()[1]


class FullImages(torch.utils.data.Dataset):
    "Whole target images of one size with their index (what stage 1's target loader yields)."
    def __init__(self, n, height, width):
        self.x = torch.rand(n, 3, height, width, generator=torch.Generator().manual_seed(1))
    def __len__(self): return len(self.x)
    def __getitem__(self, i): return {"image": self.x[i], "index": i, "name": str(i)}


def stage1_worker(mode, full, crop, steps):
    "One process: the real preset's stage-1 step with `stage1.source_backward=mode`; prints a JSON line."
    from proda_nb.engine import atomic_save
    from proda_nb.models import build_network
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    if not cuda: torch.set_num_threads(os.cpu_count() or 1)
    cfg = get_config("gta5_to_cityscapes"); cfg.stage = "stage1"
    cfg.optim.batch_size, cfg.data.num_workers, cfg.run.device = 1, 0, device.type
    (fw, fh), (cw, ch) = full, crop
    cfg.stage1.weak_crop, cfg.stage1.weak_scale, cfg.stage1.source_backward = (cw, ch), (1.0, 1.0), mode
    folder = Path(tempfile.mkdtemp(prefix="proda_nb_bench_stage1_"))
    torch.manual_seed(0)
    atomic_save({"model": build_network(cfg.model).state_dict()}, folder / "init.pt")
    cfg.stage1.init, cfg.run.out, cfg.run.progress, cfg.run.tensorboard = str(folder / "init.pt"), str(folder / "out"), False, False
    source, target = Fixed(1, ch, cw), FullImages(1, fh, fw)
    tr = Trainer(cfg, env=DistEnv(device=device), datasets={"source": source, "target": target, "val": source})
    src = {"image": source.x.to(device), "label": source.y.to(device)}
    tgt = {"image": target.x.to(device), "index": torch.tensor([0])}
    if cuda: torch.cuda.reset_peak_memory_stats(device)
    tr.train_step(src, tgt)                                    # warm-up
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    sync(); t = time.perf_counter()
    for _ in range(steps): tr.train_step(src, tgt)
    sync()
    print(json.dumps({"mode": mode, "sec": (time.perf_counter() - t) / steps, "peak_mb": peak_memory_mb(device),
                      "minor_faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt}), flush=True)


def stage1_benchmark(args):
    size = lambda t: tuple(int(v) for v in t.lower().split("x"))
    rows = {}
    for mode in ("joint", "early"):
        r = subprocess.run([sys.executable, __file__, "--stage1-worker", mode, "--full", args.full, "--crop", args.crop,
                            "--stage1-steps", str(args.stage1_steps)], capture_output=True, text=True)
        if r.returncode: raise SystemExit(r.stderr[-3000:])
        rows[mode] = json.loads(r.stdout.strip().splitlines()[-1])
        print(f"stage 1, ResNet-101 (release layout), full {args.full}, views {args.crop}, source_backward={mode}: "
              f"{rows[mode]['sec']:.2f} s/step, peak {'allocated' if torch.cuda.is_available() else 'RSS'} "
              f"{rows[mode]['peak_mb']:.0f} MiB, {rows[mode]['minor_faults']} page faults")
    j, e = rows["joint"], rows["early"]
    print(f"early / joint: step time {e['sec'] / j['sec']:.3f}, peak memory {e['peak_mb'] / j['peak_mb']:.3f}, "
          f"page faults {e['minor_faults'] / j['minor_faults']:.3f}")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--deeplab-steps", type=int, default=2)
    p.add_argument("--synthcity-steps", type=int, default=20)
    p.add_argument("--skip-deeplab", action="store_true")
    p.add_argument("--stage1", action="store_true", help="measure the real preset's stage-1 step, early vs joint backward")
    p.add_argument("--full", default="1024x512", help="stage 1: full target image, WxH")
    p.add_argument("--crop", default="448x256", help="stage 1: source crop and weak view, WxH")
    p.add_argument("--stage1-steps", type=int, default=2)
    p.add_argument("--stage1-worker", choices=("early", "joint"), help=argparse.SUPPRESS)
    args = p.parse_args()
    size = lambda t: tuple(int(v) for v in t.lower().split("x"))
    if args.stage1_worker: return stage1_worker(args.stage1_worker, size(args.full), size(args.crop), args.stage1_steps)
    if args.stage1: return stage1_benchmark(args)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    threads = os.cpu_count() or 1
    if not cuda: torch.set_num_threads(threads)
    print(f"device: {torch.cuda.get_device_name() if cuda else f'CPU, {threads} threads'}; torch {torch.__version__}")
    env = DistEnv(device=device)

    sec1, mem1 = time_steps(synthcity_config(device.type), synthcity_model(), Fixed(SYNTHCITY_BATCH, 64, 128), env,
                            args.synthcity_steps, warmup=2)
    print(f"SynthCityNet   batch {SYNTHCITY_BATCH} @ 64x128, 1 process ({threads} threads): {sec1:.4f} s/step, peak "
          f"{'allocated' if cuda else 'RSS'} {mem1:.0f} MiB")
    sec1t = None
    if not cuda and threads > 1:
        torch.set_num_threads(1)
        sec1t, _ = time_steps(synthcity_config("cpu"), synthcity_model(), Fixed(SYNTHCITY_BATCH, 64, 128), env,
                              args.synthcity_steps, warmup=2)
        torch.set_num_threads(threads)
        print(f"SynthCityNet   batch {SYNTHCITY_BATCH} @ 64x128, 1 process (1 thread): {sec1t:.4f} s/step")

    ctx = mp.get_context("spawn"); q = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_ddp_worker, args=(r, 2, port, args.synthcity_steps, q)) for r in range(2)]
    for pr in procs: pr.start()
    sec2, mem2 = q.get(timeout=900)
    for pr in procs: pr.join()
    print(f"SynthCityNet   batch {SYNTHCITY_BATCH} @ 64x128, DDP 2 CPU processes x 1 thread (gloo, {SYNTHCITY_BATCH // 2} images each): {sec2:.4f} s/step, "
          f"peak RSS rank 0 {mem2:.0f} MiB")
    print(f"DDP(2 CPU processes) / single process step time: {sec2 / sec1:.2f} (vs {threads} threads)"
          + (f", {sec2 / sec1t:.2f} (vs 1 thread)" if sec1t else ""))

    if not args.skip_deeplab:
        from proda_nb.models import build_model
        cfg = get_config("gta5_to_cityscapes"); cfg.run.device = device.type
        cfg.optim.batch_size, cfg.data.num_workers = 1, 0
        torch.manual_seed(0)
        model = build_model("deeplab_r101", head="proda")
        sec3, mem3 = time_steps(cfg, model, Fixed(1, 512, 896), env, args.deeplab_steps, warmup=1)
        print(f"DeepLab-R101 (proda head, OS8) batch 1 @ 896x512 ({cfg.run.amp if cuda else 'float32'}): "
              f"{sec3:.2f} s/step, peak {'allocated' if cuda else 'RSS'} {mem3:.0f} MiB")
        print(f"  -> 62k steps of the release's schedule at batch 4 would take "
              f"{sec3 * 4 * 62000 / 3600:.0f} h on this device (one process, batch 4 as 4 steps of 1)")


if __name__ == "__main__":
    main()
