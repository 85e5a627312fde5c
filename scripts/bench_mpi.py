"""Data-parallel scaling on one machine, and the paper model of R machines built on it.

Trains the medium LSTM of `python -m pyrnn bench` (E 128, H 256, L 2, B 32, T 64) with
./train_cpu_mpi as 1 rank x 2 threads and as 2 ranks x 1 thread, the same global batch, each rank
bound to its cores; reads each step's time and the time its all-reduce took from log.jsonl; the
layouts take turns for a few rounds (the machine drifts). Then models R machines training a
10M-parameter LSTM from the measured step time and all-reduce bandwidth (docs/benchmarks.md, "More
than one process", says how).

    python scripts/bench_mpi.py [--layouts 1x2,2x1] [--steps 40] [--warmup 10] [--rounds 3] [--out bench_mpi.json]
    python scripts/bench_mpi.py --smoke     # a tiny model for a few steps: checks the script, measures nothing

On one machine the ranks share its cores and memory: this measures what splitting a step costs,
not a speedup. The all-reduce time includes waiting for the slowest rank.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from statistics import median

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from pyrnn import data, oracle  # noqa: E402
from pyrnn.bench import CONFIGS, V, step_flops  # noqa: E402

SMOKE = (8, 16, 1, 4, 16)        # E, H, L, B, T
BIG = (128, 896, 2)              # E, H, L of the modelled LSTM: 10.2M parameters at V = 65
BIG_B = 256                      # its global batch (T as measured): 8 rows a rank on 32 machines
NETWORKS = {                     # name: (bandwidth bytes/s, latency s) per link, for a ring all-reduce
    "10 GbE": (1.25e9, 50e-6),
    "100 Gb/s": (12.5e9, 5e-6),
}
MACHINES = (1, 2, 4, 8, 16, 32)


def mpi_tool(name):
    """On the PATH, else beside this Python (the mpich wheel): where the Makefile looks too."""
    found = shutil.which(name)
    local = os.path.join(sysconfig.get_path("scripts"), name)
    return found or (local if os.access(local, os.X_OK) else None)


def binary():
    """PYRNN_TRAIN_CPU_MPI, else ./train_cpu_mpi, (re)built."""
    if os.environ.get("PYRNN_TRAIN_CPU_MPI"):
        return os.environ["PYRNN_TRAIN_CPU_MPI"]
    path = os.path.join(ROOT, "train_cpu_mpi")
    r = subprocess.run(["make", "-s", "train_cpu_mpi", f"PYTHON={sys.executable}"], cwd=ROOT, capture_output=True,
                       text=True)
    if r.returncode != 0:
        sys.exit(f"make train_cpu_mpi failed:\n{r.stdout}{r.stderr}")
    return path


def num_params(E, H, L):
    return oracle.lm_num_params("lstm", V, E, H, L)


def run_layout(mpiexec, exe, ranks, threads, model, steps, train_bin, out):
    E, H, L, B, T = model
    cmd = [mpiexec]
    version = subprocess.run([mpiexec, "--version"], capture_output=True, text=True)
    if "Open MPI" in version.stdout + version.stderr:
        cmd += ["--oversubscribe", "--map-by", f"slot:PE={threads}", "--bind-to", "core"]
    else:   # MPICH's hydra
        cmd += ["-bind-to", f"core:{threads}"]
    cmd += ["-n", str(ranks), exe, "-i", train_bin, "-j", "", "-o", out, "-c", "lstm", "-E", str(E), "-H", str(H),
            "-L", str(L), "-b", str(B), "-t", str(T), "-n", str(steps), "-v", "0", "-s", "0", "-m", "0", "-k", "0",
            "-P", str(threads)]
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
    if r.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{r.stdout}{r.stderr}")
    rows = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
    return [(x["ms"], x["comm_ms"]) for x in rows if "train_loss" in x]


def paper_model(step_s, busbw, flops_measured):
    """R machines, each with the cores of this one, train the 10M LSTM at global batch BIG_B and the
    measured T. One machine's step takes the measured one times the ratio of FLOPs (the same FLOP
    rate); compute shrinks as 1/R (each rank has B/R rows); the ring all-reduce of the gradient
    moves 2 (R-1)/R x 4P bytes over each link and pays 2 (R-1) latencies, and nothing overlaps it."""
    E, H, L = BIG
    B, T = BIG_B, CONFIGS["medium"][4]
    P = num_params(E, H, L)
    t1 = step_s * step_flops("lstm", E, H, L, B, T) / flops_measured
    out = {"params": P, "step_s_1_machine": t1, "one_machine_busbw": busbw, "rows": []}
    for name, (bw, lat) in dict(NETWORKS, **{"as measured here": (busbw, 0.0)}).items():
        for R in MACHINES:
            t_ar = 0.0 if R == 1 else 2 * (R - 1) / R * 4 * P / bw + 2 * (R - 1) * lat
            t = t1 / R + t_ar
            out["rows"].append({"network": name, "machines": R, "allreduce_s": t_ar, "step_s": t,
                                "speedup": t1 / t, "efficiency": t1 / t / R, "rows_per_rank": B / R})
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layouts", default="1x2,2x1", help="RANKSxTHREADS, comma-separated")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=10, help="steps of each run left out of the medians")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--smoke", action="store_true", help="tiny model, 4 steps, 1 round: checks the script only")
    ap.add_argument("--out", help="JSON results")
    args = ap.parse_args(argv)
    E, H, L, B, T, _ = CONFIGS["medium"]
    model = (E, H, L, B, T)
    if args.smoke:
        model, args.steps, args.warmup, args.rounds = SMOKE, 4, 1, 1
    mpiexec = mpi_tool("mpiexec")
    if not mpiexec:
        sys.exit("no mpiexec (apt-get install mpich libmpich-dev, or make train_cpu_mpi)")
    exe = binary()
    layouts = [tuple(int(x) for x in s.split("x")) for s in args.layouts.split(",")]
    times = {lay: [] for lay in layouts}
    with tempfile.TemporaryDirectory() as tmp:
        rng = np.random.default_rng(0)
        data.prepare(rng.integers(0, V, 400000).astype(np.uint8).tobytes(), tmp, val_frac=0.0)
        for k in range(args.rounds):
            for ranks, threads in layouts:
                out = os.path.join(tmp, f"run_{ranks}x{threads}_{k}")
                steps = run_layout(mpiexec, exe, ranks, threads, model, args.steps, os.path.join(tmp, "train.bin"), out)
                times[ranks, threads].append(steps[args.warmup:])
    P = num_params(*model[:3])
    result = {"model": dict(zip("EHLBT", model)), "steps": args.steps, "warmup": args.warmup, "rounds": args.rounds,
              "cpu_count": os.cpu_count(), "layouts": []}
    print(f"lstm E={model[0]} H={model[1]} L={model[2]}, global B={model[3]} T={model[4]}; median of "
          f"{args.steps - args.warmup} steps x {args.rounds} rounds")
    print(f"{'layout':>14} {'step ms':>9} {'all-reduce ms':>14} {'share':>7} {'tok/s':>9}")
    for (ranks, threads), rounds in times.items():
        step_ms = median(median(ms for ms, _ in r) for r in rounds)
        comm_ms = median(median(c for _, c in r) for r in rounds)
        row = {"ranks": ranks, "threads": threads, "step_ms": step_ms, "allreduce_ms": comm_ms,
               "allreduce_share": comm_ms / step_ms, "tok_s": model[3] * model[4] / (step_ms / 1e3)}
        result["layouts"].append(row)
        print(f"{ranks:>5} x {threads} thr {step_ms:9.2f} {comm_ms:14.2f} {row['allreduce_share']:7.1%} "
              f"{row['tok_s']:9.0f}")
    multi = [r for r in result["layouts"] if r["ranks"] > 1 and r["allreduce_ms"] > 0]
    single = [r for r in result["layouts"] if r["ranks"] == 1]
    if multi and single:
        R, t_ar = multi[0]["ranks"], multi[0]["allreduce_ms"] / 1e3
        busbw = 2 * (R - 1) / R * 4 * P / t_ar   # what a ring moves per link, over the measured time
        m = paper_model(single[0]["step_ms"] / 1e3, busbw, step_flops("lstm", *model))
        result["paper_model"] = m
        print(f"\nall-reduce of the model's {P / 1e6:.2f}M gradients on {R} ranks: {t_ar * 1e3:.2f} ms, "
              f"{busbw / 1e9:.2f} GB/s per link")
        print(f"paper model, {m['params'] / 1e6:.1f}M-parameter LSTM (E={BIG[0]} H={BIG[1]} L={BIG[2]}, B={BIG_B}), "
              f"{m['step_s_1_machine'] * 1e3:.0f} ms a step on one machine:")
        print(f"{'network':>26} {'R':>3} {'all-reduce ms':>14} {'step ms':>9} {'speedup':>8} {'efficiency':>10}")
        for r in m["rows"]:
            print(f"{r['network']:>26} {r['machines']:>3} {r['allreduce_s'] * 1e3:14.1f} {r['step_s'] * 1e3:9.1f} "
                  f"{r['speedup']:8.2f} {r['efficiency']:10.0%}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
