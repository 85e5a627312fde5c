#!/usr/bin/env python3
"""Training throughput of train_gpu's step (through lib/libpyrnn_cuda.so) against PyTorch's cuDNN
RNNs on the same GPU, each side in a process of its own, and torch from a Python environment of
its own.

    python scripts/bench_gpu.py                                   # the full grid, fp32 and tf32
    python scripts/bench_gpu.py --torch-python /path/to/python    # torch from another environment
    python scripts/bench_gpu.py --algos standard persist_static persist_small_h --no-torch --math fp32

Why apart: torch's pip wheel pins its own nvidia-cudnn / nvidia-cublas, and installed beside ours
it replaces the libcudnn.so.9 that train_gpu's rpath points at; in one process the dynamic linker
loads libcudnn.so.9 once, for both sides. So torch runs under --torch-python (else $TORCH_PYTHON,
else this Python or python3 on the PATH, whichever has torch with CUDA), and each side reports the
libcudnn / libcublas files it really mapped (/proc/self/maps) and their versions.

The model: Embedding(V, E=H) -> nn.LSTM / nn.GRU (E, H, L) -> Linear(H, V), mean cross-entropy,
global-norm clipping (1.0), AdamW (lr 2e-3, betas 0.9 / 0.999, eps 1e-8, wd 0.01), the same
initial weights (torch's init distributions, drawn here) and the same batch on both sides. A step
is forward, backward, clipping and AdamW on a batch copied from host memory. pyrnn's step is
train_gpu's, which waits on the GPU once, for the loss and the norm. torch takes every advantage it
takes by default: its own cuDNN algorithm choice, no wait inside a timed block (only at its end),
pinned host memory with non_blocking copies, TF32 in tf32 mode (cuDNN and matmuls; both off in
fp32 mode), and --torch-compile compiles its step (the RNN stays a cuDNN call).

The two processes stay warm and take turns: per shape, `--rounds` rounds of `--steps` timed steps
each, in an order that alternates between rounds, after `--warmup` steps. The time of a step is
the median over rounds; the ratio pyrnn / torch (tokens/s) is the median of the rounds' ratios.
The first step's losses of both sides are compared (same weights and batch: they agree to ~1e-6
in fp32). Targets (issue 13): pyrnn >= 1.0x torch at every shape and >= 1.5x at B = 32.
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

SCRIPTS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(SCRIPTS)
sys.path.insert(0, SCRIPTS)
import gpu_env  # noqa: E402

LR, BETAS, EPS, WD, CLIP = 2e-3, (0.9, 0.999), 1e-8, 0.01, 1.0
TARGET_ALL, TARGET_B32 = 1.0, 1.5


# ---- the two sides, each a worker process answering one JSON line per request on stdin

class PyrnnSide:
    """train_gpu's step through lib/libpyrnn_cuda.so."""

    def __init__(self):
        sys.path.insert(0, REPO)
        from pyrnn import _cuda   # raises ImportError when the library is not built
        self._cuda, self.m = _cuda, None

    def setup(self, req, params, tokens):
        import numpy as np
        if self.m is not None:
            self.m.close()
        self.m = None   # a failed setup leaves none
        B, T = req['B'], req['T']
        self.m = self._cuda.GpuLM(req['cell'], req['V'], req['E'], req['H'], req['L'], B, T,
                                  tf32=req['math'] == 'tf32', algo=req['algo'])
        if self.m.num_params != params.size:
            raise ValueError(f'pyrnn has {self.m.num_params} parameters, the bench drew {params.size}')
        self.m.set_params(params)
        self.x = np.ascontiguousarray(tokens[0].reshape(B, T))
        self.y = np.ascontiguousarray(tokens[1].reshape(B, T))
        loss = self.step()
        return {'first_loss': loss, 'algo': self.m.algo, 'about': self.m.about}

    def step(self):
        return self.m.train_step(self.x, self.y, LR, BETAS[0], BETAS[1], EPS, WD, CLIP)[0]

    def sync(self):
        pass   # every step has waited already

    def facts(self):
        return {}


class TorchSide:
    def __init__(self, device):
        import torch
        if device == 'cuda' and not torch.cuda.is_available():
            raise RuntimeError(f'torch {torch.__version__} sees no CUDA device')
        self.torch, self.device, self.model = torch, device, None

    def setup(self, req, params, tokens):
        torch, nn = self.torch, self.torch.nn
        self.model = self.opt = None
        if self.device == 'cuda':
            torch.cuda.empty_cache()
        tf32 = req['math'] == 'tf32'
        torch.backends.cudnn.allow_tf32 = tf32
        torch.backends.cuda.matmul.allow_tf32 = tf32
        cell, V, E, H, L, B, T = (req[k] for k in ('cell', 'V', 'E', 'H', 'L', 'B', 'T'))
        rnn_class = {'lstm': nn.LSTM, 'gru': nn.GRU, 'rnn': nn.RNN}[cell]

        class CharLM(nn.Module):
            def __init__(self):
                super().__init__()
                self.embedding = nn.Embedding(V, E)
                self.rnn = rnn_class(E, H, L)
                self.head = nn.Linear(H, V)

            def forward(self, x):   # (T, B) -> (T, B, V)
                return self.head(self.rnn(self.embedding(x))[0])

        model = CharLM()
        sd = model.state_dict()   # docs/formats.md's flat order is this state_dict's
        n = sum(t.numel() for t in sd.values())
        if n != params.numel():
            raise ValueError(f'torch has {n} parameters, the bench drew {params.numel()}')
        off = 0
        for k, t in sd.items():
            sd[k] = params[off:off + t.numel()].reshape(t.shape)
            off += t.numel()
        model.load_state_dict(sd)
        self.model = model.to(self.device)
        self.model.rnn.flatten_parameters()
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=LR, betas=BETAS, eps=EPS, weight_decay=WD)
        pin = self.device == 'cuda'
        self.x_host = tokens[0].reshape(B, T).t().contiguous().long()
        self.y_host = tokens[1].reshape(B, T).t().contiguous().long()
        if pin:
            self.x_host, self.y_host = self.x_host.pin_memory(), self.y_host.pin_memory()
        F = torch.nn.functional

        def loss_fn(x, y):
            return F.cross_entropy(self.model(x).reshape(-1, V), y.reshape(-1))
        self.loss_fn = torch.compile(loss_fn) if req.get('torch_compile') else loss_fn
        loss = self.step()
        return {'first_loss': float(loss.item()), 'algo': 'torch'}

    def step(self):
        x = self.x_host.to(self.device, non_blocking=True)
        y = self.y_host.to(self.device, non_blocking=True)
        loss = self.loss_fn(x, y)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.torch.nn.utils.clip_grad_norm_(self.model.parameters(), CLIP)
        self.opt.step()
        return loss

    def sync(self):
        if self.device == 'cuda':
            self.torch.cuda.synchronize()

    def facts(self):
        t = self.torch
        return {'torch': t.__version__, 'torch_cuda': t.version.cuda,
                'torch_cudnn': t.backends.cudnn.version() if t.backends.cudnn.is_available() else None}


def read_floats(path):
    import numpy as np
    return np.fromfile(path, dtype=np.float32)


def worker(side, device):
    """One request per stdin line, one JSON answer per line on stdout."""
    try:
        impl = PyrnnSide() if side == 'pyrnn' else TorchSide(device)
    except Exception as e:   # noqa: BLE001: whatever stops this side is the answer
        print(json.dumps({'error': f'{type(e).__name__}: {e}'}), flush=True)
        return 1
    print(json.dumps({'ready': True, 'python': sys.executable}), flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        try:
            if req['op'] == 'setup':
                if side == 'torch':   # torch reads the shared files itself: numpy is not needed there
                    torch = impl.torch
                    with open(req['params'], 'rb') as f:
                        params = torch.frombuffer(bytearray(f.read()), dtype=torch.float32)
                    with open(req['tokens'], 'rb') as f:
                        tokens = torch.frombuffer(bytearray(f.read()), dtype=torch.int32).reshape(2, -1)
                else:
                    import numpy as np
                    params = read_floats(req['params'])
                    tokens = np.fromfile(req['tokens'], dtype=np.int32).reshape(2, -1)
                out = impl.setup(req, params, tokens)
                for _ in range(req['warmup']):
                    impl.step()
                impl.sync()
            elif req['op'] == 'time':
                t0 = time.perf_counter()
                for _ in range(req['steps']):
                    impl.step()
                impl.sync()
                out = {'s': (time.perf_counter() - t0) / req['steps']}
            elif req['op'] == 'libs':
                libs = gpu_env.loaded_libraries()
                out = {'libraries': libs, 'versions': gpu_env.library_versions(libs), **impl.facts()}
            else:
                out = {'error': f'unknown op {req["op"]!r}'}
        except Exception as e:   # noqa: BLE001: e.g. out of memory at one shape; the next may run
            out = {'error': f'{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""}'}
        print(json.dumps(out), flush=True)
    return 0


class Worker:
    def __init__(self, side, python, device='cuda'):
        self.side = side
        self.stderr = tempfile.TemporaryFile(mode='w+')   # a pipe nobody reads could fill and block it
        cmd = [python, os.path.abspath(__file__), '--worker', side, '--device', device]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr, text=True,
                                     cwd=REPO)
        hello = self._read()
        if 'error' in hello:
            self.close()
            raise RuntimeError(f'{side}: {hello["error"]}')
        self.python = hello['python']

    def _read(self):
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            self.stderr.seek(0)
            tail = self.stderr.read().strip().splitlines()[-3:]
            raise RuntimeError(f'{self.side} worker exited ({self.proc.returncode}): {" | ".join(tail)}')
        return json.loads(line)

    def ask(self, **req):
        """The answer, or {'error': ...} when the worker is gone (a crash at one shape ends that side)."""
        try:
            self.proc.stdin.write(json.dumps(req) + '\n')
            self.proc.stdin.flush()
            return self._read()
        except (OSError, RuntimeError, ValueError) as e:
            return {'error': str(e)}

    def close(self):
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def find_torch_python(explicit):
    """The Python to run torch in, and why; (None, reason) when none has torch with CUDA."""
    cands = [explicit] if explicit else [os.environ.get('TORCH_PYTHON'), sys.executable, shutil.which('python3')]
    tried = []
    for py in dict.fromkeys(c for c in cands if c):
        try:
            r = subprocess.run([py, '-c', 'import torch; print(torch.__version__, torch.cuda.is_available())'],
                               capture_output=True, text=True, timeout=120)
        except (OSError, subprocess.TimeoutExpired) as e:
            tried.append(f'{py}: {e}')
            continue
        if r.returncode == 0 and r.stdout.split()[-1:] == ['True']:
            return py, f'torch {r.stdout.split()[0]} in {py}'
        tried.append(f'{py}: ' + (f'torch {r.stdout.split()[0]} sees no GPU' if r.returncode == 0 else 'no torch'))
    return None, '; '.join(tried) or 'no Python given'


def draw_inputs(folder, cell, V, E, H, L, B, T, seed=0):
    """The shared initial weights (embedding N(0, 1), the rest U(-1/sqrt(H), 1/sqrt(H)), torch's
    init) and one batch of tokens, as raw float32 / int32 files both sides read."""
    import numpy as np
    sys.path.insert(0, REPO)
    from pyrnn.oracle import lm_param_shapes
    rng = np.random.default_rng(seed)
    bound = 1.0 / np.sqrt(H)
    parts = []
    for name, shape in lm_param_shapes(cell, V, E, H, L).items():
        n = int(np.prod(shape))
        parts.append(rng.standard_normal(n) if name == 'embedding.weight' else rng.uniform(-bound, bound, n))
    params = np.concatenate(parts).astype(np.float32)
    tokens = rng.integers(0, V, size=(2, B * T)).astype(np.int32)
    p_path, t_path = os.path.join(folder, 'params.f32'), os.path.join(folder, 'tokens.i32')
    params.tofile(p_path)
    tokens.tofile(t_path)
    return p_path, t_path


def bench_shape(workers, req, args):
    """Setup on every side, then the rounds of turns; {side: {...}} for one shape."""
    res = {}
    for name, w in workers.items():
        r = w.ask(op='setup', warmup=args.warmup, torch_compile=args.torch_compile, **req)
        res[name] = r if 'error' in r else {**r, 'rounds_s': []}
    live = [n for n in workers if 'error' not in res[n]]
    for k in range(args.rounds):
        for name in (live if k % 2 == 0 else live[::-1]):
            r = workers[name].ask(op='time', steps=args.steps)
            if 'error' in r:
                res[name] = r
                live.remove(name)
            else:
                res[name]['rounds_s'].append(r['s'])
    for name in live:
        res[name]['ms'] = statistics.median(res[name]['rounds_s']) * 1e3
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument('--cells', nargs='+', default=['lstm', 'gru'], choices=['rnn', 'lstm', 'gru'])
    ap.add_argument('--batch', nargs='+', type=int, default=[32, 64, 128, 256])
    ap.add_argument('--hidden', nargs='+', type=int, default=[256, 512, 1024])
    ap.add_argument('--math', nargs='+', default=['fp32', 'tf32'], choices=['fp32', 'tf32'])
    ap.add_argument('--algos', nargs='+', default=['auto'],
                    choices=['auto', 'standard', 'persist_static', 'persist_small_h'], help="pyrnn's cuDNN algorithms")
    ap.add_argument('-L', type=int, default=2)
    ap.add_argument('-T', type=int, default=64)
    ap.add_argument('-V', type=int, default=65)
    ap.add_argument('--warmup', type=int, default=3)
    ap.add_argument('--rounds', type=int, default=3)
    ap.add_argument('--steps', type=int, default=5, help='timed steps per turn')
    ap.add_argument('--torch-python', help='the Python that runs torch (default: $TORCH_PYTHON, this one, python3)')
    ap.add_argument('--no-torch', action='store_true', help='pyrnn only (e.g. to compare its algorithms)')
    ap.add_argument('--torch-compile', action='store_true', help="torch.compile torch's step")
    ap.add_argument('--time-limit', type=float, default=None, metavar='S',
                    help='start no new shape after S seconds (the shapes left are listed as not measured)')
    ap.add_argument('--out', default=os.path.join(REPO, 'out', 'bench_gpu.json'))
    ap.add_argument('--worker', choices=['pyrnn', 'torch'], help=argparse.SUPPRESS)
    ap.add_argument('--device', default='cuda', help=argparse.SUPPRESS)   # torch worker: cpu for a dry run
    args = ap.parse_args(argv)
    if args.worker:
        return worker(args.worker, args.device)

    ok, gpu_line, gpu = gpu_env.probe()
    if not ok:
        print(f'bench_gpu: {gpu_line}')
        return 1
    gpu['driver_release'] = gpu_env.driver_release()
    workers, sides = {}, {}
    try:
        workers['pyrnn'] = Worker('pyrnn', sys.executable)
    except RuntimeError as e:
        print(f'bench_gpu: {e} (build it with make lib_gpu)')
        return 1
    torch_note = 'not asked for (--no-torch)'
    if not args.no_torch:
        py, torch_note = find_torch_python(args.torch_python)
        if py:
            try:
                workers['torch'] = Worker('torch', py)
            except RuntimeError as e:
                torch_note = str(e)
    print(f'GPU: {gpu_line}')
    print(f'pyrnn: {sys.executable}; torch: {torch_note}')
    print(f'L={args.L} T={args.T} V={args.V} E=H | warmup {args.warmup}, median of {args.rounds} rounds x '
          f'{args.steps} steps')
    header = (f"{'cell':<5} {'math':<5} {'B':>4} {'H':>5} {'algo':<16} | {'pyrnn ms':>9} {'torch ms':>9} "
              f"{'x torch':>8} | "
              f"first loss pyrnn / torch")
    print(header)
    print('-' * len(header))
    rows, skipped, t_start = [], [], time.time()
    folder = tempfile.mkdtemp(prefix='bench_gpu_')
    try:
        for math in args.math:
            for cell in args.cells:
                for B in args.batch:
                    for H in args.hidden:
                        if args.time_limit is not None and time.time() - t_start > args.time_limit:
                            skipped.append(f'{cell} {math} B={B} H={H}')
                            continue
                        p_path, t_path = draw_inputs(folder, cell, args.V, H, H, args.L, B, args.T)
                        torch_res = None
                        for algo in args.algos:
                            req = dict(cell=cell, math=math, B=B, H=H, E=H, L=args.L, T=args.T, V=args.V, algo=algo,
                                       params=p_path, tokens=t_path)
                            w = {'pyrnn': workers['pyrnn']}
                            if 'torch' in workers and torch_res is None:
                                w['torch'] = workers['torch']
                            res = bench_shape(w, req, args)
                            torch_res = res.get('torch', torch_res)
                            row = dict(cell=cell, math=math, B=B, H=H, E=H, L=args.L, T=args.T, V=args.V, algo=algo,
                                       pyrnn=res['pyrnn'], torch=torch_res)
                            p, t = res['pyrnn'], torch_res or {}
                            if 'ms' in p and 'ms' in t:
                                ratios = sorted(b / a for a, b in zip(p['rounds_s'], t['rounds_s']))
                                row['x_torch'] = statistics.median(ratios)
                                diff = abs(p['first_loss'] - t['first_loss'])
                                row['first_loss_rel_diff'] = diff / abs(t['first_loss'])
                            rows.append(row)

                            def fmt(d, key, spec):
                                return format(d[key], spec) if key in d else ('error' if 'error' in d else '-')
                            print(f"{cell:<5} {math:<5} {B:>4} {H:>5} {p.get('algo', algo):<16} | "
                                  f"{fmt(p, 'ms', '9.2f'):>9} "
                                  f"{fmt(t, 'ms', '9.2f'):>9} {fmt(row, 'x_torch', '8.2f'):>8} | "
                                  f"{fmt(p, 'first_loss', '.6f')} / {fmt(t, 'first_loss', '.6f')}", flush=True)
                            for name, d in (('pyrnn', p), ('torch', t)):
                                if 'error' in d:
                                    print(f'    {name}: {d["error"]}')
        for name, w in workers.items():
            sides[name] = {'python': w.python, **w.ask(op='libs')}
    finally:
        for w in workers.values():
            w.close()
        shutil.rmtree(folder, ignore_errors=True)
    for name, s in sides.items():
        libs = '; '.join(p for paths in s.get('libraries', {}).values() for p in paths) or 'none'
        print(f'{name} loaded: {libs} | versions {s.get("versions")}'
              + (f' | torch {s["torch"]}, CUDA {s["torch_cuda"]}, cuDNN {s["torch_cudnn"]}' if 'torch' in s else ''))
    shared = set(sides.get('pyrnn', {}).get('libraries', {}).get('libcudnn', [])) & \
        set(sides.get('torch', {}).get('libraries', {}).get('libcudnn', []))
    if shared:
        print(f'note: both sides loaded the same cuDNN files: {sorted(shared)}')
    if skipped:
        print(f'time limit of {args.time_limit:g} s: {len(skipped)} shape(s) not measured: {", ".join(skipped)}')
    targets = check_targets(rows)
    for line in targets['lines']:
        print(line)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, 'w') as f:
        json.dump(dict(gpu=gpu, gpu_line=gpu_line, sides=sides, torch_note=torch_note, config=vars(args), results=rows,
                       not_measured=skipped, targets=targets), f, indent=1)
    print(f'wrote {args.out}')
    return 0


def shape_name(r):
    return f"{r['cell']} {r['math']} B={r['B']} H={r['H']}"


def check_targets(rows):
    """The issue's targets on the 'auto' rows: x torch >= 1.0 at every shape, >= 1.5 at B = 32. Each
    target met or missed, with the worst shape and, when missed, which shapes fell short and by how
    much; lines for the log ('target met: ...' / 'target missed: ...'), notes on what was not measured."""
    auto = [r for r in rows if r['algo'] == 'auto']
    measured = [r for r in auto if 'x_torch' in r]
    targets = []
    for name, need, selects in ((f'>= {TARGET_ALL}x torch at every shape', TARGET_ALL, lambda r: True),
                                (f'>= {TARGET_B32}x torch at B=32', TARGET_B32, lambda r: r['B'] == 32)):
        rs = [r for r in measured if selects(r)]
        if not rs:
            targets.append(dict(target=name, met=False, detail='not measured'))
            continue
        worst = min(rs, key=lambda r: r['x_torch'])
        short = [r for r in rs if r['x_torch'] < need]
        detail = f'min {worst["x_torch"]:.2f}x ({shape_name(worst)}) over {len(rs)} shapes'
        if short:
            detail += '; short: ' + ', '.join(f'{shape_name(r)} {r["x_torch"]:.2f}x (by {need - r["x_torch"]:.2f}x)'
                                              for r in short)
        targets.append(dict(target=name, met=not short, detail=detail))
    notes = []
    if len(measured) < len(auto):
        notes.append(f'{len(auto) - len(measured)} shape(s) without a pyrnn / torch ratio (an error, or no torch)')
    if measured:
        xs = [r['x_torch'] for r in measured]
        notes.append(f'x torch over {len(xs)} shapes: min {min(xs):.2f}, median {statistics.median(xs):.2f}, '
                     f'max {max(xs):.2f}')
    lines = [f'target {"met" if t["met"] else "missed"}: {t["target"]}: {t["detail"]}' for t in targets] + notes
    return {'ok': all(t['met'] for t in targets) and len(measured) == len(auto), 'targets': targets,
            'notes': notes, 'lines': lines}


if __name__ == '__main__':
    sys.exit(main())
