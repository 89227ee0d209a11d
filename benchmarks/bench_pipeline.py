"""Wall time of the default command, `python -m proda_nb.train` (the whole chain on SynthCity), on this machine.

    python benchmarks/bench_pipeline.py [--runs 3] [--budget 300] [--seed 0] [-- extra options for the command]

Runs the command `--runs` times, one after another, each into a fresh folder (SynthCity is generated anew every
time, as for a reader running it once: set $SYNTHCITY_CACHE to measure with a warm cache instead), and prints for
each run the wall time of the process and the per-stage seconds of its results.json, then the median wall time
and its ratio to the budget (target: at most 1.0, five minutes on two cores), and the median mIoU per stage.
"""
import argparse, json, os, statistics, subprocess, sys, tempfile, time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--budget", type=float, default=300.0, help="seconds (default 300: five minutes)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("extra", nargs="*", help="more options for the command (after --)")
    args = p.parse_args()
    walls, per_stage, miou = [], {}, {}
    for i in range(args.runs):
        with tempfile.TemporaryDirectory(prefix="proda_nb_bench_pipeline_") as out:
            cmd = [sys.executable, "-m", "proda_nb.train", "--out", out, "--seed", str(args.seed),
                   "--run.progress", "false", *args.extra]
            t0 = time.perf_counter()
            r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
            wall = time.perf_counter() - t0
            if r.returncode != 0: sys.exit(f"run {i + 1} failed (exit {r.returncode}):\n{r.stderr[-3000:]}")
            res = json.loads((Path(out) / "results.json").read_text())
        walls.append(wall)
        for s in res["stages"]:
            per_stage.setdefault(s["name"], []).append(s["seconds"]); miou.setdefault(s["name"], []).append(s["miou"])
        stages = "  ".join(f"{s['name']} {s['seconds']:.0f}s" for s in res["stages"])
        print(f"run {i + 1}: wall {wall:6.1f} s (results.json total {res['total_seconds']:.1f} s)   {stages}", flush=True)
    med = statistics.median(walls)
    print(f"\nmedian wall time of {args.runs} run(s): {med:.1f} s; budget {args.budget:.0f} s; ratio {med / args.budget:.2f} "
          f"({'within' if med <= args.budget else 'OVER'} budget); cpus {os.cpu_count()}, torch threads default")
    for name in per_stage:
        print(f"  {name:12s} median {statistics.median(per_stage[name]):6.1f} s   mIoU {statistics.median(miou[name]):5.1f}")


if __name__ == "__main__":
    main()
