"""CPU benchmark: training steps/s of the C trainer, PyTorch (when installed) and the NumPy oracle,
measured back to back in one run on the same machine and thread count.

    python -m pyrnn bench [--threads 2] [--configs small medium large] [--out bench.json]

Each measurement runs in its own process, so peak resident memory is per implementation, and the
implementations take turns over several rounds (the machine drifts over minutes); tokens/s is the
median over rounds of a median over steps, and the ratio to torch is the median of the per-round
ratios, each against torch's measurement of the same round. A step is forward, backward, global-norm clipping and
AdamW; FLOPs count 3x the forward GEMMs. The machine's float32 GEMM rate through numpy is the
ceiling; torch's matmul rate is reported beside it.
"""
import argparse
import json
import os
import platform
import subprocess
import sys
import time

import numpy as np

V = 65
CONFIGS = {   # name: (E, H, L, B, T, cells)
    "small": (64, 128, 1, 32, 64, ("rnn", "lstm", "gru")),
    "medium": (128, 256, 2, 32, 64, ("rnn", "lstm", "gru")),
    "large": (256, 512, 2, 64, 128, ("lstm",)),
}
GATES = {"rnn": 1, "lstm": 4, "gru": 3}


def step_flops(cell, E, H, L, B, T):
    fwd = sum(2 * B * T * GATES[cell] * H * ((E if l == 0 else H) + H) for l in range(L)) + 2 * B * T * H * V
    return 3 * fwd


def gemm_rate(matmul, make, sizes=(1024, 2048), repeats=3):
    """Best GFLOP/s of a square float32 product over a few sizes."""
    best = 0.0
    for n in sizes:
        a = make(n)
        matmul(a, a)
        t = min(_timed(lambda: matmul(a, a)) for _ in range(repeats))
        best = max(best, 2 * n ** 3 / t / 1e9)
    return best


def _timed(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _status_mb(field):
    """VmRSS / VmHWM in MB; unlike ru_maxrss, VmHWM is not inherited from the parent across exec."""
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith(field + ":")) / 1024


def worker(impl, config, cell, threads, warmup, repeats):
    """Times `repeats` steady-state steps; prints one JSON line."""
    E, H, L, B, T, _ = CONFIGS[config]
    rng = np.random.default_rng(0)
    x = rng.integers(0, V, (B, T)).astype(np.int32)
    y = rng.integers(0, V, (B, T)).astype(np.int32)
    if impl == "torch":
        import torch
        torch.set_num_threads(threads)
        from .interop import torch_char_lm
        model = torch_char_lm(cell, V, E, H, L)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
        xt, yt = torch.from_numpy(x).long(), torch.from_numpy(y).long()
        loss_fn = torch.nn.CrossEntropyLoss()
        def step():
            logits, _ = model(xt)
            loss = loss_fn(logits.reshape(-1, V), yt.reshape(-1))
            opt.zero_grad(set_to_none=False)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
    else:
        from .nn import CharLM, set_num_threads
        if impl == "c":
            set_num_threads(threads)
        model = CharLM(cell, V, E, H, L, backend="c" if impl == "c" else "numpy")
        def step():
            model.forward(x, y)
            model.zero_grad()
            model.backward()
            model.step(1e-3, weight_decay=0.01, max_grad_norm=1.0)
    base = _status_mb("VmRSS")
    for _ in range(warmup):
        step()
    times = sorted(_timed(step) for _ in range(repeats))
    median = times[len(times) // 2]
    peak = _status_mb("VmHWM")
    print(json.dumps({"impl": impl, "config": config, "cell": cell, "step_s": median, "tok_s": B * T / median,
                      "gflops": step_flops(cell, E, H, L, B, T) / median / 1e9, "peak_rss_mb": peak,
                      "train_rss_mb": peak - base}))


def _thread_env(threads):
    """The same thread count for every implementation, and OpenMP threads pinned to cores (torch's
    libgomp honours OMP_PROC_BIND too); unpinned, threads migrating inside a Python process cost
    the C trainer up to 30% on the small configs. An explicit OMP_PROC_BIND in the caller's
    environment wins."""
    t = str(threads)
    env = dict(os.environ, OMP_NUM_THREADS=t, OPENBLAS_NUM_THREADS=t, MKL_NUM_THREADS=t)
    env.setdefault("OMP_PROC_BIND", "true")
    return env


def gemm_worker(threads):
    rates = {"numpy": gemm_rate(np.matmul, lambda n: np.random.default_rng(0).standard_normal((n, n), dtype=np.float32))}
    try:
        import torch
        torch.set_num_threads(threads)
        rates["torch"] = gemm_rate(torch.matmul, lambda n: torch.randn(n, n))
    except ImportError:
        pass
    print(json.dumps(rates))


def measure(impl, config, cell, threads, warmup, repeats):
    env = _thread_env(threads)
    cmd = [sys.executable, "-m", "pyrnn.bench", "--worker", impl, config, cell, str(threads), str(warmup), str(repeats)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{impl} {config} {cell} failed: {r.stderr.strip().splitlines()[-1:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m pyrnn bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--repeats", type=int, default=15, help="timed steps per measurement")
    p.add_argument("--rounds", type=int, default=5, help="turns each implementation takes")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--no-numpy", action="store_true", help="skip the (slow) NumPy oracle")
    p.add_argument("--out", default="bench.json")
    p.add_argument("--worker", nargs=6, help=argparse.SUPPRESS)
    p.add_argument("--gemm-worker", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.gemm_worker:
        gemm_worker(args.gemm_worker)
        return
    if args.worker:
        impl, config, cell, threads, warmup, repeats = args.worker
        worker(impl, config, cell, int(threads), int(warmup), int(repeats))
        return
    try:
        import torch  # noqa: F401
        impls = ["c", "torch"]
    except ImportError:
        impls = ["c"]
        print("torch is not installed: measuring without the PyTorch peer (pip install torch)")
    if not args.no_numpy:
        impls.append("numpy")
    env = _thread_env(args.threads)
    r = subprocess.run([sys.executable, "-m", "pyrnn.bench", "--gemm-worker", str(args.threads)], env=env,
                       capture_output=True, text=True, check=True)
    rates = json.loads(r.stdout)
    ceiling = rates["numpy"]
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")),
               platform.processor())
    torch_rate = f", torch {rates['torch']:.0f}" if "torch" in rates else ""
    print(f"{cpu}, {os.cpu_count()} cores, {args.threads} threads; float32 GEMM GFLOP/s: numpy {ceiling:.0f} "
          f"(the ceiling){torch_rate}")
    header = f"{'config':7} {'cell':5} {'impl':6} {'tok/s':>9} {'x torch':>8} {'GFLOP/s':>8} {'% peak':>7} {'peak MB':>8} {'train MB':>8}"
    print(header)
    print("-" * len(header))
    results = []
    for config in args.configs:
        for cell in CONFIGS[config][5]:
            runs = {impl: [] for impl in impls}
            for k in range(args.rounds):   # take turns, so drift hits every implementation alike
                for impl in impls:
                    if impl == "numpy" and k > 0:
                        continue   # the oracle is a reference point, not a target: one round
                    reps = max(3, args.repeats // 5) if impl == "numpy" else args.repeats
                    runs[impl].append(measure(impl, config, cell, args.threads, 1 if impl == "numpy" else args.warmup, reps))
            row = {}
            for impl, rs in runs.items():
                by_speed = sorted(rs, key=lambda r: r["tok_s"])
                row[impl] = dict(by_speed[len(rs) // 2], peak_rss_mb=max(r["peak_rss_mb"] for r in rs),
                                 train_rss_mb=max(r["train_rss_mb"] for r in rs),
                                 tok_s_rounds=[round(r["tok_s"]) for r in rs])
                # the ratio is paired: each round's measurement against torch's of the same round
                if "torch" in runs:
                    n = min(len(rs), len(runs["torch"]))
                    ratios = sorted(rs[i]["tok_s"] / runs["torch"][i]["tok_s"] for i in range(n))
                    row[impl]["x_torch"] = ratios[len(ratios) // 2]
                    row[impl]["x_torch_rounds"] = [round(x, 2) for x in ratios]
            for impl, r in row.items():
                ratio = r.get("x_torch", float("nan"))
                r["pct_peak"] = 100 * r["gflops"] / ceiling
                print(f"{config:7} {cell:5} {impl:6} {r['tok_s']:9.0f} {ratio:8.2f} {r['gflops']:8.1f} "
                      f"{r['pct_peak']:6.0f}% {r['peak_rss_mb']:8.0f} {r['train_rss_mb']:8.0f}")
                results.append(r)
    with open(args.out, "w") as f:
        json.dump({"cpu": cpu, "cores": os.cpu_count(), "threads": args.threads, "gemm_gflops": rates,
                   "rounds": args.rounds, "results": results}, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
