"""Overhead of a ProDA stage-1 step over the network passes it cannot avoid.

A stage-1 step must run: the student forward+backward on the source batch, on the weak and on the strong target
views, and the momentum encoder forward on the full target image. Everything else (soft-label lookup, prototype
weights and rectification, view geometry and warps, SCE, prototype KL, prototype update, EMA update) is overhead.

    python benchmarks/bench_stage1_overhead.py [--threads 1] [--repeats 7] [--clock cpu|wall]
                                               [--models synthcity_net,deeplab_r101]

All timings use the same images and the same optimizer step; they are interleaved (A B C A B C ...) after two
warm-up rounds, with the garbage collector run before and paused during each, and the medians are reported.
`--clock cpu` (the default) counts the CPU time of this process, which other processes on a shared machine
disturb far less than the wall clock; `--clock wall` counts elapsed time. Two ratios are printed:

* ratio  = step / passes: the weak and strong views are built in both. Target: ratio <= 1.10.
* ratio* = step / passes*: the passes on pre-cut crops, so that building the views counts as overhead too.
"""
import argparse, gc, statistics, tempfile, time, types
from pathlib import Path

import torch

from proda_nb.engine import DistEnv, get_config, segmentation_ce
from proda_nb.models import build_model
from proda_nb.consistency import weak_view, strong_view, create_ema_model
from proda_nb.pseudo_labels import build_soft_label_store, peaky_softmax
from proda_nb.stage1 import Stage1

SETTINGS = {  # model -> (batch, source/crop size (h, w), full target image size (h, w), model kwargs, steps per sample)
    "synthcity_net": (8, (48, 96), (64, 128), {}, 4),
    "deeplab_r101": (1, (128, 256), (256, 512), {"head": "proda"}, 1),
}


class Table(torch.nn.Module):
    "A 'model' whose logits for image i are row i of a table (each image carries its index in every pixel)."
    def __init__(self, probs): super().__init__(); self.logits = probs.clamp_min(1e-12).log()
    def forward(self, x): return self.logits[x[:, 0, 0, 0].round().long()]


def make_stage(name, folder):
    B, crop, full, kw, _ = SETTINGS[name]
    torch.manual_seed(0)
    model = build_model(name, **kw)
    model.train()
    cfg = get_config("synthcity")
    cfg.stage1.weak_crop = (crop[1], crop[0])
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    trainer = types.SimpleNamespace(model=model, raw_model=model, env=DistEnv(), cfg=cfg, optimizer=opt)
    st = Stage1(); st.bind(cfg); st.trainer = trainer
    st.ema_model = create_ema_model(model)
    st.index_models()
    with torch.no_grad(): feats, logits = st.ema_model(torch.rand(B, 3, *full))
    K, D = logits.shape[1], feats.shape[1]
    probs = peaky_softmax(B, K, *logits.shape[-2:], seed=0)                  # a real store, read as stage 1 reads it
    images = [{"image": torch.full((3, 4, 4), float(i)), "name": str(i)} for i in range(B)]
    st.store = build_soft_label_store(Table(probs), images, Path(folder) / f"{name}.bin", "bench", batch_size=B)
    st.prototypes = feats.mean((0, 2, 3))[None] + 0.1 * torch.randn(K, D)
    st.uses_prototypes = True
    batch = {"source": {"image": torch.rand(B, 3, *crop), "label": torch.randint(0, K, (B, *crop))},
             "target": {"image": torch.rand(B, 3, *full), "index": torch.arange(B)}}
    return st, model, opt, batch


def stage1_step(st, model, opt, batch):
    loss, _ = st.compute_loss(batch)
    loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
    st.after_step(0)


def unavoidable_passes(st, model, opt, batch):
    "Student fwd/bwd on source, weak view, strong view; EMA fwd on the full image; the same optimizer step."
    src, img = batch["source"], batch["target"]["image"]
    crop = tuple(src["image"].shape[-2:])
    x_w, _ = weak_view(img, crop); x_s, _ = strong_view(x_w)
    with torch.no_grad(): st.ema_model(img)
    loss = segmentation_ce(model(src["image"]).logits, src["label"])
    loss = loss + model(x_w).logits.float().mean() + model(x_s).features.float().mean()
    loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)


def unavoidable_passes_only(st, model, opt, batch):
    "As above without the weak/strong view construction (pure network passes on pre-made crops)."
    src, img = batch["source"], batch["target"]["image"]
    x = img[..., :src["image"].shape[-2], :src["image"].shape[-1]]
    with torch.no_grad(): st.ema_model(img)
    loss = segmentation_ce(model(src["image"]).logits, src["label"])
    loss = loss + model(x).logits.float().mean() + model(x.flip(-1)).features.float().mean()
    loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)


CLOCKS = {"cpu": time.process_time, "wall": time.perf_counter}

def timed(clock, n, fn, *args):
    "Seconds per call of `fn(*args)`, averaged over `n` calls, with the garbage collector run first and paused."
    gc.collect(); gc.disable()
    try:
        t = clock()
        for _ in range(n): fn(*args)
        return (clock() - t) / n
    finally: gc.enable()


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--clock", choices=tuple(CLOCKS), default="cpu")
    p.add_argument("--models", default="synthcity_net,deeplab_r101")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    clock = CLOCKS[a.clock]
    print(f"torch {torch.__version__}, {a.threads} thread(s), CPU, {a.clock} clock, median of {a.repeats} interleaved repeats")
    print(f"{'model':15s} {'batch':>5s} {'crop':>8s} {'full':>8s} {'stage-1 step':>13s} {'passes':>9s} {'ratio':>6s} "
          f"{'passes*':>9s} {'ratio*':>6s}")
    folder = tempfile.TemporaryDirectory()
    for name in a.models.split(","):
        st, model, opt, batch = make_stage(name, folder.name)
        B, crop, full, _, n = SETTINGS[name]
        fns = {"step": stage1_step, "passes": unavoidable_passes, "bare": unavoidable_passes_only}
        for _ in range(2):                                                        # warm-up
            for fn in fns.values(): fn(st, model, opt, batch)
        times = {k: [] for k in fns}
        for _ in range(a.repeats):
            for k, fn in fns.items(): times[k].append(timed(clock, n, fn, st, model, opt, batch))
        med = {k: statistics.median(v) for k, v in times.items()}
        print(f"{name:15s} {B:5d} {crop[1]}x{crop[0]:<4d} {full[1]}x{full[0]:<4d} {med['step']:12.3f}s {med['passes']:8.3f}s "
              f"{med['step'] / med['passes']:6.3f} {med['bare']:8.3f}s {med['step'] / med['bare']:6.3f}", flush=True)
    print("passes  = student fwd/bwd on source + weak + strong views (views made as in stage 1), EMA fwd on the full image, SGD step")
    print("passes* = the same network passes on pre-cut crops (no view construction)")


if __name__ == "__main__":
    main()
