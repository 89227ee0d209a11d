"""Forward + backward time of PiPa's patch loss, one class block at a time (`patch_contrast_loss`) against the same
formula as one masked anchor-by-bank matrix, at the SynthCity preset's sizes, in one run.

    python benchmarks/bench_patch_loss.py [--anchors 3072] [--negatives 6144] [--dim 256] [--classes 11] [--repeats 20]

The defaults are the sizes of one SynthCity PiPa step: 16 target images x 96 anchor places, used in both directions,
and a bank of 4 steps x 16 images x 2 views x 48 cells. Prints the median seconds of each, their ratio, and the
largest differences of the loss and of the gradients (the two compute the same sums over the same pairs).
"""
import argparse, statistics, time
import torch
from proda_nb.labels import IGNORE_INDEX
from proda_nb.pipa import masked_patch_loss, patch_contrast_loss


def run(f, inputs):
    xs = [t.clone().requires_grad_() for t in inputs[:3]]
    t0 = time.perf_counter()
    loss = f(xs[0], xs[1], inputs[3], xs[2], inputs[4]); loss.backward()
    return time.perf_counter() - t0, loss.item(), [x.grad for x in xs]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--anchors", type=int, default=3072); p.add_argument("--negatives", type=int, default=6144)
    p.add_argument("--dim", type=int, default=256); p.add_argument("--classes", type=int, default=11)
    p.add_argument("--repeats", type=int, default=20)
    args = p.parse_args()
    g = torch.Generator().manual_seed(0)
    A, P, N = (torch.randn(k, args.dim, generator=g) for k in (args.anchors, args.anchors, args.negatives))
    y, yn = (torch.randint(0, args.classes, (k,), generator=g) for k in (args.anchors, args.negatives))
    yn[torch.rand(args.negatives, generator=g) < 0.2] = IGNORE_INDEX          # the teacher's unsure cells
    inputs, times = (A, P, N, y, yn), {"masked": [], "blocks": []}
    for _ in range(args.repeats):                                             # interleaved: both see the same machine
        for name, f in (("masked", masked_patch_loss), ("blocks", patch_contrast_loss)):
            times[name].append(run(f, inputs)[0])
    (_, l_m, g_m), (_, l_b, g_b) = run(masked_patch_loss, inputs), run(patch_contrast_loss, inputs)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"{args.anchors} anchors x {args.negatives} bank pixels, D={args.dim}, {args.classes} classes, "
          f"torch threads {torch.get_num_threads()}, {args.repeats} repeats")
    print(f"masked matrix  {med['masked'] * 1e3:7.1f} ms   class blocks  {med['blocks'] * 1e3:7.1f} ms   "
          f"ratio {med['masked'] / med['blocks']:.2f}x")
    print(f"|loss difference| {abs(l_m - l_b):.1e}   max |gradient difference| "
          f"{max((a - b).abs().max().item() for a, b in zip(g_m, g_b)):.1e}")


if __name__ == "__main__":
    main()
