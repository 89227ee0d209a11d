"""Wall time of the methods table (`python -m proda_nb.methods`) for several seeds, trained by several processes at once.

    python benchmarks/bench_methods_table.py [--processes 2] [--seeds 0 1 2] [--rows source_only,adabn,...]
                                             [--budget 40] [--out DIR] [--compare runs/methods]

Starts `--processes` copies of the command on one fresh root (`--out`, default a temporary folder), each with one
OpenMP thread: the copies share the rows through their claims (`row.lock`), so on two cores two processes keep both
cores busy. Prints the wall time from the first start to the last exit, its ratio to the budget (minutes), and the
summed row seconds per seed. With `--compare ROOT`, each row's mIoU per seed is set beside the same row in ROOT (a
table trained before, by other processes at other times): rows are deterministic by seed, so the two agree.
SynthCity is read from $SYNTHCITY_CACHE when it is set (generated once otherwise).
"""
import argparse, json, os, subprocess, sys, tempfile, time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--rows", default="", help="comma-separated recipes (default: every registered one)")
    p.add_argument("--budget", type=float, default=40.0, help="minutes (default 40)")
    p.add_argument("--out", help="root folder of the rows (default: a fresh temporary folder)")
    p.add_argument("--compare", help="a root trained before: print each row's mIoU beside its own")
    args = p.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="proda_nb_bench_methods_"))
    cmd = [sys.executable, "-m", "proda_nb.methods", "--out", str(out), "--seeds", *map(str, args.seeds),
           *(["--rows", args.rows] if args.rows else [])]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    procs = []
    for i in range(args.processes):
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
        time.sleep(2)                                       # the first claims the first source-only row
    logs = [pr.communicate()[0] for pr in procs]
    wall = time.perf_counter() - t0
    for i, (pr, log) in enumerate(zip(procs, logs)):
        rows = [l for l in log.splitlines() if l.startswith("seed ")]
        print(f"process {i + 1}: exit {pr.returncode}, {len(rows)} lines: " + "; ".join(rows))
        if pr.returncode: sys.exit(f"process {i + 1} failed:\n{log[-3000:]}")
    names = args.rows.split(",") if args.rows else None
    print()
    for seed in args.seeds:
        rows = [json.loads(f.read_text()) for f in sorted((out / f"seed{seed}").glob("*/row.json"))
                if names is None or f.parent.name in names]
        print(f"seed {seed}: {len(rows)} rows, {sum(r['seconds'] for r in rows):.0f} s of row time")
    print(f"\nwall time, {args.processes} processes, seeds {args.seeds}: {wall / 60:.1f} min; budget {args.budget:.0f} min; "
          f"ratio {wall / 60 / args.budget:.2f} ({'within' if wall / 60 <= args.budget else 'OVER'} budget); cpus {os.cpu_count()}")
    if args.compare:
        print(f"\nmIoU per row and seed, this run / {args.compare}:")
        for f in sorted(out.glob("seed*/*/row.json")):
            ref = Path(args.compare) / f.relative_to(out)
            mine = json.loads(f.read_text())["miou"]
            theirs = json.loads(ref.read_text())["miou"] if ref.is_file() else float("nan")
            print(f"  {f.parent.parent.name} {f.parent.name:14s} {mine:6.2f} / {theirs:6.2f}  {'same' if abs(mine - theirs) < 0.01 else 'DIFFERENT'}")
    print(f"-> {out}")


if __name__ == "__main__":
    main()
