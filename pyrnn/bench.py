"""CPU benchmark: training steps/s of the C trainer, PyTorch (when installed) and the NumPy oracle,
measured back to back in one run on the same machine and thread count.

    python -m pyrnn bench [--threads 2] [--configs small medium large] [--isa avx2] [--out bench.json]
    python -m pyrnn bench --layer          # the layer API: pyrnn.LSTM against torch.nn.LSTM
    python -m pyrnn bench --torch-module   # a torch training step: torch.nn.LSTM / GRU against pyrnn.torch's

Each implementation runs in its own process, so peak resident memory is its own, and the processes
take turns: several rounds of a few steps each (the machine drifts within seconds). tokens/s is the
median step, and the ratio to torch is the median over rounds of each turn against torch's turn of
the same round. A step is forward, backward, global-norm clipping and AdamW; FLOPs count 3x the
forward GEMMs of the model as written (the C trainer looks layer 0's input projection up by token,
so it does fewer). The machine's float32 GEMM rate through numpy is the ceiling; torch's matmul rate
is reported beside it.

--layer times the layer API instead: forward and backward of pyrnn.LSTM (I=128, H=256, L=2, B=32,
T=64, one and two directions; the gradient of the input included) against torch.nn.LSTM with
autograd, given the same output gradient.

--torch-module times one torch training step of a char LM (Embedding, LSTM or GRU, Linear head,
cross-entropy, backward, clip_grad_norm_, AdamW; torch's code throughout) with torch.nn.LSTM / GRU
("torch") against the same loop after pyrnn.torch.accelerate ("pyrnn": the recurrent layers on
pyrnn's C kernels, the rest on torch), on medium LSTM, medium GRU and small GRU (--configs and
--cells choose others); x torch is then the speed-up a torch user gets.

The run names the CPU model and the instruction set each side uses: the kernel set the C extension
ran (pyrnn.isa()), torch's CPU capability and OpenBLAS's core. --isa avx2 holds both sides to AVX2 on
a CPU that has more: the C workers run the extension's avx2 kernels (PYRNN_ISA=avx2), and torch,
oneDNN, MKL and OpenBLAS (the ceiling and the NumPy oracle) are held by their environment variables.

--precision bf16 times both sides in bf16: the C trainer with -M bf16's GEMMs (precision='bf16'),
torch under torch.autocast("cpu", dtype=torch.bfloat16) around the forward pass and the loss, with
float32 master weights (where torch cannot run that, on CPUs without bf16 kernels, its row says why).

--builds ARCH[:ISA] ... times builds of the C extension against each other, each built into a folder
of its own with PYRNN_ARCH=ARCH (any: the default build, which holds every kernel set) and run with
PYRNN_ISA=ISA when given; x first is the speed against the first build, paired round by round. The
dispatched build against the one-CPU builds: `--builds any native`, and
`--builds any:avx2 x86-64-v3`.
"""
import argparse
import ctypes
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from statistics import median

import numpy as np

V = 65
CONFIGS = {   # name: (E, H, L, B, T, cells)
    "small": (64, 128, 1, 32, 64, ("rnn", "lstm", "gru")),
    "medium": (128, 256, 2, 32, 64, ("rnn", "lstm", "gru")),
    "large": (256, 512, 2, 64, 128, ("lstm",)),
}
GATES = {"rnn": 1, "lstm": 4, "gru": 3}
TORCH_MODULE_RUNS = (("medium", "lstm"), ("medium", "gru"), ("small", "gru"))   # --torch-module's default
C_IMPLS = ("c", "pyrnn")   # the implementations that run pyrnn's C extension (--isa holds their kernels)
LAYER_CONFIGS = {   # name: (I, H, L, B, T, directions)
    "layer": (128, 256, 2, 32, 64, 1),
    "layer_bi": (128, 256, 2, 32, 64, 2),
}
# --isa: the C extension's kernel set, the CPU flags that needs, and the environment that holds torch
# (ATen, oneDNN, MKL) and numpy's OpenBLAS to the same instruction set
HELD_ISA = {
    "avx2": {"cpu_flags": ("avx2", "fma"),
             "env": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2",
                     "OPENBLAS_CORETYPE": "Haswell"}},
}


def step_flops(cell, E, H, L, B, T):
    fwd = sum(2 * B * T * GATES[cell] * H * ((E if l == 0 else H) + H) for l in range(L)) + 2 * B * T * H * V
    return 3 * fwd


def layer_step_flops(cell, I, H, L, B, T, D):
    """3x the forward GEMMs of a D-directional stack (backward is twice forward)."""
    return 3 * sum(D * 2 * B * T * GATES[cell] * H * ((I if l == 0 else D * H) + H) for l in range(L))


def shape_of(config, cell):
    """(tokens per step, FLOPs per step) of a benchmark config."""
    if config in LAYER_CONFIGS:
        I, H, L, B, T, D = LAYER_CONFIGS[config]
        return B * T, layer_step_flops(cell, I, H, L, B, T, D)
    E, H, L, B, T, _ = CONFIGS[config]
    return B * T, step_flops(cell, E, H, L, B, T)


def make_layer_step(impl, config, cell, threads):
    """forward and backward of one layer stack, the input's gradient included, from a fixed output gradient"""
    I, H, L, B, T, D = LAYER_CONFIGS[config]
    rng = np.random.default_rng(0)
    x = rng.standard_normal((T, B, I)).astype(np.float32)
    dout = rng.standard_normal((T, B, D * H)).astype(np.float32)
    if impl == "torch":
        import torch
        torch.set_num_threads(threads)
        module = {"rnn": torch.nn.RNN, "lstm": torch.nn.LSTM, "gru": torch.nn.GRU}[cell](I, H, L, bidirectional=D == 2)
        xt, dt = torch.from_numpy(x).requires_grad_(), torch.from_numpy(dout)
        def step():
            out, _ = module(xt)
            module.zero_grad(set_to_none=False)
            xt.grad = None
            out.backward(dt)
    else:
        from . import nn
        from .engine_c import set_num_threads
        set_num_threads(threads)
        module = {"rnn": nn.RNN, "lstm": nn.LSTM, "gru": nn.GRU}[cell](I, H, L, bidirectional=D == 2, backend="c",
                                                                       seed=0)
        def step():
            module.forward(x)
            module.zero_grad()
            module.backward(dout)
    return step


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


def make_step(impl, config, cell, threads):
    """A training step of impl: "c" (pyrnn's CharLM on C), "numpy" (on the oracle), "torch" (a torch
    char LM) or "pyrnn" (the same torch char LM after pyrnn.torch.accelerate)."""
    if config in LAYER_CONFIGS:
        return make_layer_step(impl, config, cell, threads)
    E, H, L, B, T, _ = CONFIGS[config]
    rng = np.random.default_rng(0)
    x = rng.integers(0, V, (B, T)).astype(np.int32)
    y = rng.integers(0, V, (B, T)).astype(np.int32)
    if impl in ("torch", "pyrnn"):
        import torch
        torch.set_num_threads(threads)
        from .interop import torch_char_lm
        model = torch_char_lm(cell, V, E, H, L)
        if impl == "pyrnn":
            from . import torch as pyrnn_torch
            pyrnn_torch.accelerate(model)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
        xt, yt = torch.from_numpy(x).long(), torch.from_numpy(y).long()
        loss_fn = torch.nn.CrossEntropyLoss()
        bf16 = _precision() == "bf16"
        def step():
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                logits, _ = model(xt)
                loss = loss_fn(logits.reshape(-1, V), yt.reshape(-1))
            opt.zero_grad(set_to_none=False)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
    else:
        from .engine_c import set_num_threads
        from .nn import CharLM
        if impl == "c":
            set_num_threads(threads)
        model = CharLM(cell, V, E, H, L, backend="c" if impl == "c" else "numpy", precision=_precision())
        def step():
            model.forward(x, y)
            model.zero_grad()
            model.backward()
            model.step(1e-3, weight_decay=0.01, max_grad_norm=1.0)
    return step


def _precision():
    """fp32 or bf16: --precision, which reaches the workers through their environment"""
    return os.environ.get("PYRNN_BENCH_PRECISION", "fp32")


def worker_isa(impl):
    """The instruction sets a worker's step runs on: torch's CPU capability where torch computes, the
    C extension's kernels where pyrnn's does, OpenBLAS's core for the oracle."""
    isa = {}
    if impl in ("torch", "pyrnn"):
        import torch
        isa["torch"] = torch.backends.cpu.get_cpu_capability()
    if impl in C_IMPLS:
        from . import engine_c
        isa["c"] = engine_c.isa()
    if impl == "numpy":
        isa["blas"] = _blas_core()
    return isa


def worker(impl, config, cell, threads, warmup):
    """A persistent measuring process: after `warmup` steps it says it is ready and what instruction sets
    it ran; then each line "n" on stdin runs n timed steps and answers with their times as one JSON line;
    end of input answers with peak memory."""
    step = make_step(impl, config, cell, threads)
    base = _status_mb("VmRSS")
    for _ in range(warmup):
        step()
    print(json.dumps({"ready": True, "isa": worker_isa(impl)}), flush=True)
    for line in sys.stdin:
        print(json.dumps([_timed(step) for _ in range(int(line))]), flush=True)
    peak = _status_mb("VmHWM")
    print(json.dumps({"peak_rss_mb": peak, "train_rss_mb": peak - base}), flush=True)


class Worker:
    """A worker process; cwd, when given, is a folder whose pyrnn package it imports (--isa)."""
    def __init__(self, impl, config, cell, threads, warmup, env, cwd=None):
        cmd = [sys.executable, "-m", "pyrnn.bench", "--worker", impl, config, cell, str(threads), str(warmup)]
        self.name = f"{impl} {config} {cell}"
        self.stderr = tempfile.TemporaryFile(mode="w+")   # a pipe nobody reads could fill and block it
        self.proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.stderr, text=True)
        self.isa = self._read()["isa"]

    def _read(self):
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            self.stderr.seek(0)
            err = self.stderr.read().strip().splitlines()[-1:]
            raise RuntimeError(f"{self.name} failed: {err}")
        return json.loads(line)

    def steps(self, n):
        self.proc.stdin.write(f"{n}\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self):
        self.proc.stdin.close()
        mem = self._read()
        self.proc.wait()
        self.stderr.close()
        return mem


def _thread_env(threads):
    """The same thread count for every implementation, and OpenMP threads pinned to cores (torch's
    libgomp honours OMP_PROC_BIND too); unpinned, threads migrating inside a Python process cost
    the C trainer up to 30% on the small configs. An explicit OMP_PROC_BIND in the caller's
    environment wins."""
    t = str(threads)
    env = dict(os.environ, OMP_NUM_THREADS=t, OPENBLAS_NUM_THREADS=t, MKL_NUM_THREADS=t)
    env.setdefault("OMP_PROC_BIND", "true")
    return env


def _blas_core():
    """The core OpenBLAS picked for numpy (OPENBLAS_CORETYPE overrides it), when numpy uses OpenBLAS."""
    try:
        with open("/proc/self/maps") as f:
            libs = {l.split()[-1] for l in f if "openblas" in l.rsplit("/", 1)[-1].lower()}
    except OSError:
        return None
    for path in sorted(libs):
        lib = ctypes.CDLL(path)
        for name in ("scipy_openblas_get_corename64_", "scipy_openblas_get_corename", "openblas_get_corename64_",
                     "openblas_get_corename"):
            if hasattr(lib, name):
                getattr(lib, name).restype = ctypes.c_char_p
                return getattr(lib, name)().decode()
    return None


def gemm_worker(threads):
    """The GEMM ceiling, and the instruction set each side runs, in the workers' environment."""
    draw = lambda n: np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    rates = {"numpy": gemm_rate(np.matmul, draw)}
    isa = {"blas": _blas_core()}
    try:
        from . import _crnn, engine_c
        isa.update(c=engine_c.isa(), c_build_flags=_crnn.ffi.string(_crnn.lib.pyrnn_build_flags()).decode(),
                   c_extension=_crnn.__file__)
    except ImportError:
        pass
    try:
        import torch
        torch.set_num_threads(threads)
        rates["torch"] = gemm_rate(torch.matmul, lambda n: torch.randn(n, n))
        isa["torch"] = torch.backends.cpu.get_cpu_capability()
    except ImportError:
        pass
    print(json.dumps({"gemm_gflops": rates, "isa": isa}))


def _cpu():
    """(model name, flags) from /proc/cpuinfo; the model from platform elsewhere."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = f.read().splitlines()
    except OSError:
        return platform.processor(), set()
    field = lambda name: next((l.split(":", 1)[1].strip() for l in lines if l.startswith(name)), "")
    return field("model name") or platform.processor(), set(field("flags").split())


def build_c(arch, folder):
    """The C extension built for -march=arch into folder/pyrnn (pyrnn/_build.py)."""
    build = os.path.join(os.path.dirname(os.path.realpath(__file__)), "_build.py")
    r = subprocess.run([sys.executable, build, folder], env=dict(os.environ, PYRNN_ARCH=arch),
                       capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"error: building the C extension for -march={arch} failed: "
                 f"{(r.stderr.strip().splitlines() or ['no output'])[-1]}")


def take_turns(plans, config, cell, threads, warmup, rounds, repeats):
    """Each implementation in its own warm process; they take `rounds` turns of `repeats` timed steps,
    in alternating order, so the machine's drift (up to +-40% within seconds) falls on all of them
    alike. The first step of a turn is not timed: it pays for waking the process's idle threads.
    plans: {name: (impl, environment, folder whose pyrnn package it imports, or None)}; a worker that
    cannot start (torch's bf16 on a CPU without bf16 kernels) is left out and its reason returned."""
    workers, failed = {}, {}
    try:
        for name, (impl, env, cwd) in plans.items():
            try:
                workers[name] = Worker(impl, config, cell, threads, 1 if impl == "numpy" else warmup, env, cwd)
            except RuntimeError as e:
                failed[name] = str(e)
        names = list(workers)
        turns = {name: [] for name in names}
        mem = {}
        for k in range(rounds):
            for name in names if k % 2 == 0 else names[::-1]:
                if name in mem:
                    continue
                turns[name].append(workers[name].steps(repeats + 1)[1:])
                if plans[name][0] == "numpy":   # the oracle is a reference point, not a target: one turn
                    mem[name] = workers[name].close()
        mem = {name: mem.get(name) or w.close() for name, w in workers.items()}
        return turns, {name: dict(mem[name], isa=w.isa) for name, w in workers.items()}, failed
    finally:
        for w in workers.values():
            if w.proc.poll() is None:
                w.proc.kill()


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m pyrnn bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--configs", nargs="+", choices=[*CONFIGS, *LAYER_CONFIGS],
                   help="default: every char-LM config (--layer: the layer configs)")
    p.add_argument("--layer", action="store_true", help="time the layer API (pyrnn.LSTM against torch.nn.LSTM)")
    p.add_argument("--torch-module", action="store_true",
                   help="time a torch training step with torch.nn.LSTM / GRU against pyrnn.torch's")
    p.add_argument("--cells", nargs="+", choices=["rnn", "lstm", "gru"],
                   help="only these cells (default: each config's own)")
    p.add_argument("--rounds", type=int, default=9, help="turns each implementation takes")
    p.add_argument("--repeats", type=int, default=3, help="timed steps per turn")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--no-numpy", action="store_true", help="skip the (slow) NumPy oracle")
    p.add_argument("--isa", default="native", choices=["native", *HELD_ISA],
                   help="hold both sides to this instruction set (default: what this CPU has)")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"],
                   help="bf16: the C trainer's -M bf16 against torch's bf16 autocast")
    p.add_argument("--builds", nargs="+", metavar="ARCH[:ISA]",
                   help="time builds of the C extension against each other (e.g. any native)")
    p.add_argument("--out", default="bench.json")
    p.add_argument("--worker", nargs=5, help=argparse.SUPPRESS)
    p.add_argument("--gemm-worker", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.layer and args.torch_module:
        p.error("--layer and --torch-module time different things: give one")
    if args.layer:
        args.configs, args.cells, args.no_numpy = list(LAYER_CONFIGS), args.cells or ["lstm"], True
    if args.builds and (args.layer or args.torch_module):
        p.error("--builds times the C trainer's builds: not with --layer or --torch-module")
    if args.precision == "bf16" and (args.layer or args.torch_module):
        p.error("--precision bf16 times the char LM (the C trainer against torch's autocast)")
    if args.torch_module and any(c in LAYER_CONFIGS for c in args.configs or ()):
        p.error(f"--torch-module times char-LM configs ({', '.join(CONFIGS)})")
    if args.torch_module and not (args.configs or args.cells):
        args.runs = list(TORCH_MODULE_RUNS)
    else:
        args.runs = [(config, cell) for config in args.configs or list(CONFIGS)
                     for cell in (("rnn", "lstm", "gru") if config in LAYER_CONFIGS else CONFIGS[config][-1])
                     if not args.cells or cell in args.cells]
    if args.gemm_worker:
        gemm_worker(args.gemm_worker)
        return
    if args.worker:
        impl, config, cell, threads, warmup = args.worker
        worker(impl, config, cell, int(threads), int(warmup))
        return
    with tempfile.TemporaryDirectory(prefix="pyrnn-bench-") as tmp:
        run(args, tmp)


def plan(args, env, tmp):
    """{name: (impl, environment, folder)} of the implementations this run times, and the first folder
    (the build whose GEMM probe and instruction sets the run reports)"""
    c_env = dict(env, PYRNN_ISA=args.isa) if args.isa in HELD_ISA else env
    if args.builds:
        plans = {}
        for spec in args.builds:
            arch, _, isa = spec.partition(":")
            folder = os.path.join(tmp, arch)
            if not os.path.isdir(folder):
                build_c(arch, folder)
            plans[spec] = ("c", dict(env, PYRNN_ISA=isa) if isa else env, folder)
        return plans, plans[args.builds[0]][2]
    try:
        import torch  # noqa: F401
        names = ["c", "torch"]
    except ImportError:
        if args.torch_module:
            sys.exit("error: --torch-module times torch training steps: it needs torch (pip install torch)")
        names = ["c"]
        print("torch is not installed: measuring without the PyTorch peer (pip install torch)")
    if args.torch_module:
        names = ["pyrnn", "torch"]
    elif not args.no_numpy:
        names.append("numpy")
    return {name: (name, c_env if name in C_IMPLS else env, None) for name in names}, None


def run(args, tmp):
    """The benchmark; tmp holds the C extensions of --builds."""
    cpu, cpu_flags = _cpu()
    env, held = _thread_env(args.threads), HELD_ISA.get(args.isa)
    env["PYRNN_BENCH_PRECISION"] = args.precision
    if held:
        missing = [f for f in held["cpu_flags"] if f not in cpu_flags]
        if missing:
            sys.exit(f"error: --isa {args.isa} needs a CPU with {' and '.join(missing)}; this one ({cpu}) has not")
        env.update(held["env"])
    plans, c_dir = plan(args, env, tmp)
    impls = list(plans)
    c_env = plans[impls[0]][1] if args.builds else dict(env, PYRNN_ISA=args.isa) if held else env
    r = subprocess.run([sys.executable, "-m", "pyrnn.bench", "--gemm-worker", str(args.threads)], env=c_env,
                       cwd=c_dir, capture_output=True, text=True, check=True)
    probe = json.loads(r.stdout)
    rates, isa = probe["gemm_gflops"], dict(probe["isa"], held_to=args.isa, env=held["env"] if held else {},
                                            precision=args.precision)
    ceiling = rates["numpy"]
    march = next((f for f in isa.get("c_build_flags", "").split() if f.startswith("-march=")), "no -march")
    torch_rate = f", torch {rates['torch']:.0f}" if "torch" in rates else ""
    print(f"{cpu}, {os.cpu_count()} cores, {args.threads} threads")
    print(f"instruction sets: C {isa.get('c')} ({march}), torch {isa.get('torch', '-')}, numpy's BLAS "
          f"{isa['blas'] or 'not OpenBLAS'}" + (f"; held to {args.isa}: " + " ".join(f"{k}={v}" for k, v in
                                                 held["env"].items()) if held else ""))
    if held and isa.get("c") != args.isa:
        print(f"warning: the C extension reports {isa.get('c')} kernels, not {args.isa}")
    if args.precision == "bf16":
        print("precision bf16: the C trainer's -M bf16 against torch.autocast('cpu', dtype=torch.bfloat16)")
    print(f"float32 GEMM GFLOP/s: numpy {ceiling:.0f} (the ceiling){torch_rate}")
    base = impls[0] if args.builds else "torch"   # what the ratios are against
    width = max(6, *map(len, impls))
    header = (f"{'config':8} {'cell':5} {'impl':{width}} {'tok/s':>9} {'x ' + base.split(':')[0]:>8} {'GFLOP/s':>8} "
              f"{'% peak':>7} {'peak MB':>8} {'train MB':>8}  isa")
    print(header)
    print("-" * len(header))
    results = []
    for config, cell in args.runs:
        turns, mem, failed = take_turns(plans, config, cell, args.threads, args.warmup, args.rounds, args.repeats)
        tokens, flops = shape_of(config, cell)
        for impl, why in failed.items():
            print(f"{config:8} {cell:5} {impl:{width}} could not run: {why}")
            results.append({"impl": impl, "config": config, "cell": cell, "error": why})
        for impl in turns:
            step_s = median(t for turn in turns[impl] for t in turn)
            r = {"impl": impl, "config": config, "cell": cell, "step_s": step_s, "tok_s": tokens / step_s,
                 "gflops": flops / step_s / 1e9, "pct_peak": 100 * flops / step_s / 1e9 / ceiling, **mem[impl],
                 "tok_s_rounds": [round(tokens / median(turn)) for turn in turns[impl]]}
            if base in turns:   # paired: each turn against the base's turn of the same round
                ratios = sorted(median(tt) / median(t) for t, tt in zip(turns[impl], turns[base]))
                key = "x_first" if args.builds else "x_torch"
                r[key] = median(ratios)
                r[key + "_rounds"] = [round(x, 2) for x in ratios]
            ratio = r.get("x_first" if args.builds else "x_torch", float("nan"))
            print(f"{config:8} {cell:5} {impl:{width}} {r['tok_s']:9.0f} {ratio:8.2f} "
                  f"{r['gflops']:8.1f} {r['pct_peak']:6.0f}% {r['peak_rss_mb']:8.0f} {r['train_rss_mb']:8.0f}  "
                  + " ".join(f"{k} {v}" for k, v in r["isa"].items()))
            results.append(r)
    with open(args.out, "w") as f:
        json.dump({"cpu": cpu, "cores": os.cpu_count(), "threads": args.threads, "isa": isa, "gemm_gflops": rates,
                   "rounds": args.rounds, "repeats": args.repeats, "builds": args.builds, "results": results}, f,
                  indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
