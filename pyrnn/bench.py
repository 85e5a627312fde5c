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

The run names the CPU model and the instruction set each side uses: the kernels the C extension was
built for (pyrnn.isa()), torch's CPU capability and OpenBLAS's core. --isa avx2 holds both sides to
AVX2 on a CPU that has more: the C extension is built for x86-64-v3 into a temporary folder (the
installed one stays as it is) and its workers run from there; torch, oneDNN, MKL and OpenBLAS (the
ceiling and the NumPy oracle) are held by their environment variables.
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
C_IMPLS = ("c", "pyrnn")   # the implementations that run pyrnn's C extension (--isa builds it for them)
LAYER_CONFIGS = {   # name: (I, H, L, B, T, directions)
    "layer": (128, 256, 2, 32, 64, 1),
    "layer_bi": (128, 256, 2, 32, 64, 2),
}
# --isa: the -march the C extension is built for, the CPU flags that needs, and the environment that
# holds torch (ATen, oneDNN, MKL) and numpy's OpenBLAS to the same instruction set
HELD_ISA = {
    "avx2": {"arch": "x86-64-v3", "cpu_flags": ("avx2", "fma"),
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
        def step():
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
        model = CharLM(cell, V, E, H, L, backend="c" if impl == "c" else "numpy")
        def step():
            model.forward(x, y)
            model.zero_grad()
            model.backward()
            model.step(1e-3, weight_decay=0.01, max_grad_norm=1.0)
    return step


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


def take_turns(impls, config, cell, threads, warmup, rounds, repeats, env, c_dir=None):
    """Each implementation in its own warm process; they take `rounds` turns of `repeats` timed steps,
    in alternating order, so the machine's drift (up to +-40% within seconds) falls on all of them
    alike. The first step of a turn is not timed: it pays for waking the process's idle threads."""
    workers = {}
    try:
        for impl in impls:
            workers[impl] = Worker(impl, config, cell, threads, 1 if impl == "numpy" else warmup, env,
                                   c_dir if impl in C_IMPLS else None)
        turns = {impl: [] for impl in impls}
        mem = {}
        for k in range(rounds):
            for impl in impls if k % 2 == 0 else impls[::-1]:
                if impl in mem:
                    continue
                turns[impl].append(workers[impl].steps(repeats + 1)[1:])
                if impl == "numpy":   # the oracle is a reference point, not a target: one turn
                    mem[impl] = workers[impl].close()
        mem = {impl: mem.get(impl) or w.close() for impl, w in workers.items()}
        return turns, {impl: dict(mem[impl], isa=w.isa) for impl, w in workers.items()}
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
    p.add_argument("--out", default="bench.json")
    p.add_argument("--worker", nargs=5, help=argparse.SUPPRESS)
    p.add_argument("--gemm-worker", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.layer and args.torch_module:
        p.error("--layer and --torch-module time different things: give one")
    if args.layer:
        args.configs, args.cells, args.no_numpy = list(LAYER_CONFIGS), args.cells or ["lstm"], True
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


def run(args, tmp):
    """The benchmark; tmp holds the C extension built for --isa."""
    cpu, cpu_flags = _cpu()
    env, c_dir, held = _thread_env(args.threads), None, HELD_ISA.get(args.isa)
    if held:
        missing = [f for f in held["cpu_flags"] if f not in cpu_flags]
        if missing:
            sys.exit(f"error: --isa {args.isa} needs a CPU with {' and '.join(missing)}; this one ({cpu}) has not")
        env.update(held["env"])
        c_dir = tmp
        build_c(held["arch"], c_dir)
    try:
        import torch  # noqa: F401
        impls = ["c", "torch"]
    except ImportError:
        if args.torch_module:
            sys.exit("error: --torch-module times torch training steps: it needs torch (pip install torch)")
        impls = ["c"]
        print("torch is not installed: measuring without the PyTorch peer (pip install torch)")
    if args.torch_module:
        impls = ["pyrnn", "torch"]
    elif not args.no_numpy:
        impls.append("numpy")
    r = subprocess.run([sys.executable, "-m", "pyrnn.bench", "--gemm-worker", str(args.threads)], env=env, cwd=c_dir,
                       capture_output=True, text=True, check=True)
    probe = json.loads(r.stdout)
    rates, isa = probe["gemm_gflops"], dict(probe["isa"], held_to=args.isa, env=held["env"] if held else {})
    ceiling = rates["numpy"]
    march = next((f for f in isa.get("c_build_flags", "").split() if f.startswith("-march=")), "no -march")
    torch_rate = f", torch {rates['torch']:.0f}" if "torch" in rates else ""
    print(f"{cpu}, {os.cpu_count()} cores, {args.threads} threads")
    print(f"instruction sets: C {isa.get('c')} ({march}), torch {isa.get('torch', '-')}, numpy's BLAS "
          f"{isa['blas'] or 'not OpenBLAS'}" + (f"; held to {args.isa}: " + " ".join(f"{k}={v}" for k, v in
                                                 held["env"].items()) if held else ""))
    if held and isa.get("c") != args.isa:
        print(f"warning: the C extension built with -march={held['arch']} reports {isa.get('c')} kernels, "
              f"not {args.isa}")
    print(f"float32 GEMM GFLOP/s: numpy {ceiling:.0f} (the ceiling){torch_rate}")
    header = (f"{'config':8} {'cell':5} {'impl':6} {'tok/s':>9} {'x torch':>8} {'GFLOP/s':>8} {'% peak':>7} "
              f"{'peak MB':>8} {'train MB':>8}  isa")
    print(header)
    print("-" * len(header))
    results = []
    for config, cell in args.runs:
        turns, mem = take_turns(impls, config, cell, args.threads, args.warmup, args.rounds, args.repeats, env, c_dir)
        tokens, flops = shape_of(config, cell)
        for impl in impls:
            step_s = median(t for turn in turns[impl] for t in turn)
            r = {"impl": impl, "config": config, "cell": cell, "step_s": step_s, "tok_s": tokens / step_s,
                 "gflops": flops / step_s / 1e9, "pct_peak": 100 * flops / step_s / 1e9 / ceiling, **mem[impl],
                 "tok_s_rounds": [round(tokens / median(turn)) for turn in turns[impl]]}
            if "torch" in turns:   # paired: each turn against torch's turn of the same round
                ratios = sorted(median(tt) / median(t) for t, tt in zip(turns[impl], turns["torch"]))
                r["x_torch"] = median(ratios)
                r["x_torch_rounds"] = [round(x, 2) for x in ratios]
            print(f"{config:8} {cell:5} {impl:6} {r['tok_s']:9.0f} {r.get('x_torch', float('nan')):8.2f} "
                  f"{r['gflops']:8.1f} {r['pct_peak']:6.0f}% {r['peak_rss_mb']:8.0f} {r['train_rss_mb']:8.0f}  "
                  + " ".join(f"{k} {v}" for k, v in r["isa"].items()))
            results.append(r)
    with open(args.out, "w") as f:
        json.dump({"cpu": cpu, "cores": os.cpu_count(), "threads": args.threads, "isa": isa, "gemm_gflops": rates,
                   "rounds": args.rounds, "repeats": args.repeats, "results": results}, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
