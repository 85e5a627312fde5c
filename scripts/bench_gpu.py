#!/usr/bin/env python3
"""Training throughput (tokens/s) of pyrnn's GPU model against PyTorch's cuDNN RNNs on the same GPU.

Both train the same char LM: Embedding(V, E) -> nn.{RNN,LSTM,GRU}(E, H, L) -> Linear(H, V), mean
cross-entropy, global-norm clipping (1.0), AdamW (lr 2e-3, betas 0.9/0.999, eps 1e-8, wd 0.01),
from the same initial weights (torch's init, copied into ours) on the same random batch. One step
is forward + backward + clip + AdamW, with the batch copied from host memory and the loss read back
every step (what a training loop that logs each step does; pyrnn's library syncs there anyway).

    python scripts/bench_gpu.py                      # full grid, fp32 and tf32
    python scripts/bench_gpu.py --quick --cells lstm # smaller grid, fewer repeats
    PYRNN_CUDA_LIB=path/to/libpyrnn_cuda.so python scripts/bench_gpu.py

fp32: torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False and pyrnn
tf32=0 (cuDNN FMA math); tf32: both True and pyrnn tf32=1 (PyTorch's default for cuDNN RNNs).
Reported time is the median over repeats of the mean step time of a block of steps, after warmup.
The first-step losses of both are printed as a sanity check (same weights and batch, so they
agree to ~1e-6 in fp32). Needs lib/libpyrnn_cuda.so (`make lib_gpu`) and torch with CUDA; either
side is skipped with a message when it is missing.
"""
import argparse
import json
import os
import statistics
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

LR, BETAS, EPS, WD, CLIP = 2e-3, (0.9, 0.999), 1e-8, 0.01, 1.0


def load_torch():
    try:
        import torch
    except ImportError as e:
        return None, f'torch not installed ({e})'
    if not torch.cuda.is_available():
        return None, 'torch has no CUDA device'
    return torch, None


def load_ours():
    try:
        from pyrnn import _cuda
    except ImportError as e:
        return None, str(e)
    return _cuda, None


def set_tf32(torch, on):
    if torch is not None:
        torch.backends.cudnn.allow_tf32 = on
        torch.backends.cuda.matmul.allow_tf32 = on


def torch_model(torch, cell, V, E, H, L, seed):
    nn = torch.nn

    class CharLM(nn.Module):
        def __init__(self):
            super().__init__()
            self.embedding = nn.Embedding(V, E)
            if cell == 'lstm':
                self.rnn = nn.LSTM(E, H, L)
            elif cell == 'gru':
                self.rnn = nn.GRU(E, H, L)
            else:
                self.rnn = nn.RNN(E, H, L, nonlinearity='relu' if cell == 'rnn_relu' else 'tanh')
            self.head = nn.Linear(H, V)

        def forward(self, x):  # x (T, B) -> logits (T, B, V)
            y, _ = self.rnn(self.embedding(x))
            return self.head(y)

    torch.manual_seed(seed)
    return CharLM().cuda()


def flat_params(model):
    # state_dict order is docs/formats.md's flat layout: embedding, rnn.* per layer, head
    return np.concatenate([t.detach().float().cpu().numpy().ravel() for t in model.state_dict().values()])


def time_steps(step, sync, warmup, repeats, steps):
    for _ in range(warmup):
        step()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        sync()
        times.append((time.perf_counter() - t0) / steps)
    return statistics.median(times)


def bench_torch(torch, model, V, inputs, targets, args):
    F = torch.nn.functional
    x_host = torch.from_numpy(np.ascontiguousarray(inputs.T)).long()    # (T, B)
    y_host = torch.from_numpy(np.ascontiguousarray(targets.T)).long()
    opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=BETAS, eps=EPS, weight_decay=WD)

    def step():
        x, y = x_host.cuda(), y_host.cuda()
        logits = model(x)
        loss = F.cross_entropy(logits.reshape(-1, V), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
        return loss.item()

    first = step()
    sec = time_steps(step, torch.cuda.synchronize, args.warmup, args.repeats, args.steps)
    return first, sec


def bench_ours(_cuda, cell, V, E, H, L, B, T, tf32, params, inputs, targets, args):
    with _cuda.GpuLM(cell, V, E, H, L, B, T, tf32=tf32) as m:
        m.set_params(params)

        def step():
            loss = m.forward(inputs, targets)   # reads the loss back: a sync, like torch's .item()
            m.zero_grad()
            m.backward()
            m.step(LR, BETAS[0], BETAS[1], EPS, WD, CLIP)
            return loss

        first = step()
        sec = time_steps(step, lambda: None, args.warmup, args.repeats, args.steps)   # step() has synced
    return first, sec


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--cells', nargs='+', default=['lstm', 'gru', 'rnn'], choices=['rnn', 'rnn_relu', 'lstm', 'gru'])
    ap.add_argument('--batch', nargs='+', type=int, default=[32, 256])
    ap.add_argument('--hidden', nargs='+', type=int, default=[256, 1024])
    ap.add_argument('--math', nargs='+', default=['fp32', 'tf32'], choices=['fp32', 'tf32'])
    ap.add_argument('-L', type=int, default=2)
    ap.add_argument('-T', type=int, default=128)
    ap.add_argument('-V', type=int, default=65)
    ap.add_argument('--warmup', type=int, default=5)
    ap.add_argument('--repeats', type=int, default=5)
    ap.add_argument('--steps', type=int, default=10, help='steps per timed block')
    ap.add_argument('--quick', action='store_true', help='warmup 2, repeats 3, steps 5')
    ap.add_argument('--out', default=os.path.join(REPO, 'out', 'bench_gpu.json'))
    args = ap.parse_args()
    if args.quick:
        args.warmup, args.repeats, args.steps = 2, 3, 5

    torch, why_torch = load_torch()
    ours, why_ours = load_ours()
    if why_torch:
        print(f'note: skipping PyTorch: {why_torch}')
    if why_ours:
        print(f'note: skipping pyrnn: {why_ours}')
    if torch is None and ours is None:
        print('nothing to benchmark')
        return 1
    device = torch.cuda.get_device_name() if torch is not None else 'unknown GPU'
    print(f'device: {device} | L={args.L} T={args.T} V={args.V} E=H | warmup {args.warmup}, '
          f'median of {args.repeats} x {args.steps} steps')

    rows = []
    header = f"{'cell':<8} {'math':<5} {'B':>4} {'H':>5} | {'pyrnn tok/s':>12} {'torch tok/s':>12} {'ratio':>6} | " \
             f"{'pyrnn ms':>9} {'torch ms':>9} | first loss pyrnn / torch"
    print(header)
    print('-' * len(header))
    for math in args.math:
        tf32 = math == 'tf32'
        set_tf32(torch, tf32)
        for cell in args.cells:
            for B in args.batch:
                for H in args.hidden:
                    E, V, L, T = H, args.V, args.L, args.T
                    rng = np.random.default_rng(1234)
                    inputs = rng.integers(0, V, size=(B, T), dtype=np.int32)
                    targets = rng.integers(0, V, size=(B, T), dtype=np.int32)
                    row = dict(cell=cell, math=math, B=B, H=H, E=E, L=L, T=T, V=V, device=device)
                    model = torch_model(torch, cell, V, E, H, L, seed=0) if torch is not None else None
                    if model is not None:
                        params = flat_params(model)
                    else:   # torch's init scale, drawn here
                        bound = 1.0 / np.sqrt(H)
                        params = np.random.default_rng(0).uniform(-bound, bound, ours.num_params(cell, V, E, H, L))
                        params = params.astype(np.float32)
                    if ours is not None:
                        try:
                            row['pyrnn_first_loss'], sec = bench_ours(ours, cell, V, E, H, L, B, T, tf32, params,
                                                                      inputs, targets, args)
                            row['pyrnn_ms'], row['pyrnn_tok_s'] = sec * 1e3, B * T / sec
                        except RuntimeError as e:
                            row['pyrnn_error'] = str(e)
                    if model is not None:
                        try:
                            row['torch_first_loss'], sec = bench_torch(torch, model, V, inputs, targets, args)
                            row['torch_ms'], row['torch_tok_s'] = sec * 1e3, B * T / sec
                        except RuntimeError as e:   # e.g. CUDA out of memory
                            row['torch_error'] = str(e).split('\n')[0]
                        del model
                        torch.cuda.empty_cache()
                    if 'pyrnn_tok_s' in row and 'torch_tok_s' in row:
                        row['ratio'] = row['pyrnn_tok_s'] / row['torch_tok_s']
                        row['first_loss_rel_diff'] = abs(row['pyrnn_first_loss'] - row['torch_first_loss']) / \
                            abs(row['torch_first_loss'])
                    rows.append(row)

                    def fmt(key, spec):
                        return format(row[key], spec) if key in row else '-'
                    print(f"{cell:<8} {math:<5} {B:>4} {H:>5} | {fmt('pyrnn_tok_s', '12,.0f'):>12} "
                          f"{fmt('torch_tok_s', '12,.0f'):>12} {fmt('ratio', '6.2f'):>6} | "
                          f"{fmt('pyrnn_ms', '9.2f'):>9} {fmt('torch_ms', '9.2f'):>9} | "
                          f"{fmt('pyrnn_first_loss', '.6f')} / {fmt('torch_first_loss', '.6f')}", flush=True)
                    for key in ('pyrnn_error', 'torch_error'):
                        if key in row:
                            print(f'    {key}: {row[key]}')

    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, 'w') as f:
        json.dump(dict(config=vars(args), results=rows), f, indent=1)
    print(f'wrote {args.out}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
