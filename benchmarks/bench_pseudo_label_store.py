"""Size, precision and read speed of the soft pseudo-label store, against the release's float32 arrays.

    python benchmarks/bench_pseudo_label_store.py [--images 8] [--batch 4] [--top-k 4] [--checkpoint PATH]

For two sizes, ProDA's (19 x 128 x 256 per image, Cityscapes at 1/8) and SynthCity's (19 x 16 x 32), it
1. makes realistic softmaxes: spatially smooth random logits sharpened until the median max probability is ~0.98
   and a quarter of the pixels are below ~0.8 (the range of a trained segmentation model);
2. builds a store from them and prints its bytes per image against float32 (K x h x w x 4 bytes) and the ratio;
3. prints the agreement of the rectified labels argmax_k w_k p_k computed from the store and from float32, with
   random softmax weights (log-weights N(0, sigma^2) per pixel and class, sigma = 1 and 2);
4. times `store[indices]` for a random batch (memory-mapped read + decode) and, for comparison, `torch.load` of
   the same batch saved as one float32 file per image (the release's layout).
With --checkpoint (a source-only/warm-up checkpoint of `python -m proda_nb.train`), it also measures the agreement
on the real predictions of that model on SynthCity's target_train split.
"""
import argparse, tempfile, time
from pathlib import Path

import numpy as np
import torch

from proda_nb.pseudo_labels import build_soft_label_store, peaky_softmax


class Table(torch.nn.Module):
    "Returns row i of a table of logits for image i (each image carries its index in every pixel)."
    def __init__(self, probs): super().__init__(); self.logits = probs.clamp_min(1e-12).log()
    def forward(self, x): return self.logits[x[:, 0, 0, 0].round().long()]


def agreement(p, q, sigma, seed=0):
    w = (sigma * torch.randn(p.shape, generator=torch.Generator().manual_seed(seed))).softmax(1)
    return ((w * p).argmax(1) == (w * q).argmax(1)).float().mean().item()


def bench_size(name, probs, batch, top_k, folder):
    n, K, h, w = probs.shape
    slug = f"{h}x{w}"
    data = [{"image": torch.full((3, 4, 4), float(i)), "name": str(i)} for i in range(n)]
    store = build_soft_label_store(Table(probs), data, folder / f"{slug}.pls", "bench", batch_size=4, top_k=top_k)
    f32 = 4 * K * h * w
    q = store[:]
    conf = probs.max(1).values.flatten().numpy()
    print(f"\n== {name}: {n} images of {K} x {h} x {w}; max probability quantiles 5/25/50 %: "
          f"{' / '.join(f'{v:.3f}' for v in np.quantile(conf, [0.05, 0.25, 0.5]))}")
    print(f"bytes per image: store {store.bytes_per_image}, float32 {f32}, ratio {store.bytes_per_image / f32:.4f} "
          f"(file {store.path.stat().st_size} bytes for {n} images)")
    print(f"largest |store - float32| probability: {(q - probs).abs().max():.4f}; argmax agreement "
          f"{100 * (q.argmax(1) == probs.argmax(1)).float().mean():.3f} %")
    for sigma in (1.0, 2.0):
        a = np.mean([agreement(probs, q, sigma, s) for s in range(3)])
        print(f"rectified-label agreement, random softmax weights sigma={sigma}: {100 * a:.3f} %")
    for i in range(n): torch.save(probs[i].clone(), folder / f"{slug}_{i}.pt")
    rng = np.random.default_rng(0)
    reps = 20
    t = time.perf_counter()
    for _ in range(reps): store[rng.integers(0, n, batch)]
    t_store = (time.perf_counter() - t) / reps
    t = time.perf_counter()
    for _ in range(reps): torch.stack([torch.load(folder / f"{slug}_{i}.pt") for i in rng.integers(0, n, batch)])
    t_f32 = (time.perf_counter() - t) / reps
    print(f"read a batch of {batch}: store {1000 * t_store:.2f} ms, float32 files {1000 * t_f32:.2f} ms "
          f"(both from the page cache)")


def bench_checkpoint(path, top_k, folder):
    from proda_nb.engine import config_from_dict, load_checkpoint
    from proda_nb.models import network_from_checkpoint
    from proda_nb.pseudo_labels import checkpoint_id
    from proda_nb.synthcity import SynthCity
    model = network_from_checkpoint(config_from_dict(load_checkpoint(path)["config"]).model, path)
    ds = SynthCity("target_train")
    store = build_soft_label_store(model, ds, folder / "real.pls", checkpoint_id(path), batch_size=50, top_k=top_k)
    with torch.no_grad():
        probs = torch.cat([model(torch.stack([ds[j]["image"] for j in range(i, min(i + 50, len(ds)))])).logits.softmax(1)
                           for i in range(0, len(ds), 50)])
    q = store[:]
    print(f"\n== {path} on SynthCity target_train ({len(ds)} images, {tuple(probs.shape[1:])}): ratio "
          f"{store.bytes_per_image / (4 * probs[0].numel()):.4f}")
    for sigma in (1.0, 2.0):
        a = np.mean([agreement(probs, q, sigma, s) for s in range(3)])
        print(f"rectified-label agreement, random softmax weights sigma={sigma}: {100 * a:.3f} %")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=8, help="images per size (default 8)")
    ap.add_argument("--batch", type=int, default=4, help="batch read per step (default 4)")
    ap.add_argument("--top-k", type=int, default=4, help="classes stored per pixel (default 4)")
    ap.add_argument("--checkpoint", help="also measure on a trained model's SynthCity target_train predictions")
    args = ap.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        bench_size("ProDA (Cityscapes at 1/8)", peaky_softmax(args.images, 19, 128, 256, seed=0), args.batch, args.top_k, folder)
        bench_size("SynthCity", peaky_softmax(max(args.images, 64), 19, 16, 32, seed=1), args.batch, args.top_k, folder)
        if args.checkpoint: bench_checkpoint(args.checkpoint, args.top_k, folder)


if __name__ == "__main__":
    main()
