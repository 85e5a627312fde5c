"""Write / read the reference file of docs/formats.md.

    python -m pyrnn.reference --cell lstm -o ref/ref_lstm.bin

Everything stored as float32 (params, h0/c0, hyperparameters) is rounded to float32 first
and then used in float64, so the file alone determines the computation it records.
"""
import argparse
import os

import numpy as np

from . import oracle

MAGIC, VERSION = 20261103, 1
HEADER_WORDS, HPARAM_WORDS = 64, 16


def _f32(x):
    return float(np.float32(x))


def make_reference(cell, V, E, H, L, B, T, steps, seed, lr=1e-2, betas=(0.9, 0.999),
                   eps=1e-8, weight_decay=0.01, max_grad_norm=1.0, use_h0=True, bf16=False):
    """Compute the reference in float64 (bf16: every matmul's operands rounded to bfloat16 first);
    returns the dict that read_reference gives back."""
    cell = oracle._cell_name(cell)
    C = cell == 'lstm'
    p32 = oracle.init_lm_params(cell, V, E, H, L, seed=seed, dtype=np.float32)
    params = {k: p.astype(np.float64) for k, p in p32.items()}
    rng = np.random.default_rng(seed + 1)
    inputs = rng.integers(0, V, size=(B, T)).astype(np.int32)
    targets = rng.integers(0, V, size=(B, T)).astype(np.int32)
    shape = (L, B, H)
    if use_h0:  # N(0, 0.5^2), drawn after the tokens; c0 only for lstm
        h0 = rng.normal(0, 0.5, shape).astype(np.float32)
        c0 = rng.normal(0, 0.5, shape).astype(np.float32) if C else None
    else:
        h0 = np.zeros(shape, np.float32)
        c0 = np.zeros(shape, np.float32) if C else None
    h0d = h0.astype(np.float64)
    c0d = c0.astype(np.float64) if C else None
    hp = dict(lr=_f32(lr), beta1=_f32(betas[0]), beta2=_f32(betas[1]), eps=_f32(eps),
              weight_decay=_f32(weight_decay), max_grad_norm=_f32(max_grad_norm or 0.0))

    loss, logits, h_n, c_n, cache = oracle.lm_forward(params, cell, inputs, targets, h0d, c0d, bf16=bf16)
    grads, dh0, dc0 = oracle.lm_backward(cache)
    losses, norms, after = oracle.train_steps(
        params, cell, inputs, targets, h0d, c0d, steps, hp['lr'], (hp['beta1'], hp['beta2']),
        hp['eps'], hp['weight_decay'], hp['max_grad_norm'], bf16=bf16)
    f32 = lambda a: None if a is None else np.asarray(a, dtype=np.float32)
    return dict(cell=oracle.CELLS.index(cell), cell_name=cell, V=V, E=E, H=H, L=L, B=B, T=T,
                n_steps=steps, seed=seed, bf16=int(bf16), **hp,
                inputs=inputs, targets=targets, h0=h0, c0=c0,
                params=f32(oracle.flatten(params)), logits=f32(logits),
                loss=f32([loss]), grads=f32(oracle.flatten(grads)), dh0=f32(dh0), dc0=f32(dc0),
                h_n=f32(h_n), c_n=f32(c_n), step_losses=f32(losses), step_norms=f32(norms),
                params_after=f32(oracle.flatten(after)))


_ARRAYS = ('inputs', 'targets', 'h0', 'c0', 'params', 'logits', 'loss', 'grads', 'dh0', 'dc0',
           'h_n', 'c_n', 'step_losses', 'step_norms', 'params_after')
_HPARAMS = ('lr', 'beta1', 'beta2', 'eps', 'weight_decay', 'max_grad_norm')


def _array_specs(r):
    """(name, dtype, shape) of every array, in file order; None shape = absent (C = 0)."""
    V, E, H, L, B, T = (r[k] for k in 'VEHLBT')
    P = oracle.lm_num_params(oracle.CELLS[r['cell']], V, E, H, L)
    st = (L, B, H)
    cs = st if oracle.CELLS[r['cell']] == 'lstm' else None
    shapes = dict(inputs=(B, T), targets=(B, T), h0=st, c0=cs, params=(P,), logits=(T, B, V),
                  loss=(1,), grads=(P,), dh0=st, dc0=cs, h_n=st, c_n=cs,
                  step_losses=(r['n_steps'],), step_norms=(r['n_steps'],), params_after=(P,))
    return [(n, '<i4' if n in ('inputs', 'targets') else '<f4', shapes[n]) for n in _ARRAYS]


def write_reference(path, cell, V, E, H, L, B, T, steps, seed, lr=1e-2, betas=(0.9, 0.999),
                    eps=1e-8, weight_decay=0.01, max_grad_norm=1.0, use_h0=True, bf16=False):
    r = make_reference(cell, V, E, H, L, B, T, steps, seed, lr, betas, eps, weight_decay,
                       max_grad_norm, use_h0, bf16)
    header = np.zeros(HEADER_WORDS, '<i4')
    header[:12] = [MAGIC, VERSION, r['cell'], V, E, H, L, B, T, steps, seed, int(bf16)]
    hparams = np.zeros(HPARAM_WORDS, '<f4')
    hparams[:6] = [r[k] for k in _HPARAMS]
    parts = [header.tobytes(), hparams.tobytes()]
    for name, dt, shape in _array_specs(r):
        if shape is not None:
            parts.append(np.ascontiguousarray(r[name], dtype=dt).reshape(shape).tobytes())
    d = os.path.dirname(path)
    if d:
        os.makedirs(d, exist_ok=True)
    with open(path, 'wb') as f:
        f.write(b''.join(parts))
    return r


def read_reference(path):
    """Parse a reference file into named arrays; ValueError on any malformed file."""
    with open(path, 'rb') as f:
        data = f.read()
    hsize = 4 * (HEADER_WORDS + HPARAM_WORDS)
    if len(data) < hsize:
        raise ValueError(f'{path}: short file ({len(data)} bytes, header needs {hsize})')
    header = np.frombuffer(data, '<i4', HEADER_WORDS)
    if header[0] != MAGIC:
        raise ValueError(f'{path}: bad magic {header[0]} (expected {MAGIC})')
    if header[1] != VERSION:
        raise ValueError(f'{path}: unsupported version {header[1]} (expected {VERSION})')
    if not 0 <= header[2] < len(oracle.CELLS):
        raise ValueError(f'{path}: bad cell id {header[2]}')
    r = dict(zip(('cell', 'V', 'E', 'H', 'L', 'B', 'T', 'n_steps', 'seed', 'bf16'),
                 (int(w) for w in header[2:12])))
    if min(r[k] for k in 'VEHLBT') <= 0 or r['n_steps'] < 0:
        raise ValueError(f'{path}: bad sizes in header {r}')
    r['cell_name'] = oracle.CELLS[r['cell']]
    hparams = np.frombuffer(data, '<f4', HPARAM_WORDS, 4 * HEADER_WORDS)
    r.update({k: float(x) for k, x in zip(_HPARAMS, hparams)})
    off = hsize
    specs = _array_specs(r)
    expected = hsize + sum(4 * int(np.prod(s)) for _, _, s in specs if s is not None)
    if len(data) != expected:
        kind = 'short file' if len(data) < expected else 'trailing bytes'
        raise ValueError(f'{path}: {kind}: {len(data)} bytes, expected {expected}')
    for name, dt, shape in specs:
        if shape is None:
            r[name] = None
            continue
        n = int(np.prod(shape))
        r[name] = np.frombuffer(data, dt, n, off).reshape(shape).copy()
        off += 4 * n
    return r


def main(argv=None):
    ap = argparse.ArgumentParser(description='Write a pyrnn reference file (docs/formats.md).')
    ap.add_argument('--cell', choices=oracle.CELLS, default='lstm')
    ap.add_argument('--layers', type=int, default=2)
    ap.add_argument('--vocab', type=int, default=13)
    ap.add_argument('--embed', type=int, default=10)
    ap.add_argument('--hidden', type=int, default=16)
    ap.add_argument('-B', type=int, default=3)
    ap.add_argument('-T', type=int, default=8)
    ap.add_argument('--steps', type=int, default=10)
    ap.add_argument('--seed', type=int, default=1337)
    ap.add_argument('--lr', type=float, default=1e-2)
    ap.add_argument('--weight-decay', type=float, default=0.01)
    ap.add_argument('--max-grad-norm', type=float, default=1.0, help='0 = no clipping')
    ap.add_argument('--no-h0', action='store_true', help='zero h0/c0 instead of N(0, 0.5)')
    ap.add_argument('--precision', choices=('fp32', 'bf16'), default='fp32',
                    help='bf16: every matmul of bfloat16-rounded operands (the C model\'s -M bf16)')
    ap.add_argument('-o', '--out', default=None, help='default ref/ref_CELL.bin')
    a = ap.parse_args(argv)
    out = a.out or f'ref/ref_{a.cell}.bin'
    r = write_reference(out, a.cell, a.vocab, a.embed, a.hidden, a.layers, a.B, a.T, a.steps,
                        a.seed, lr=a.lr, weight_decay=a.weight_decay,
                        max_grad_norm=a.max_grad_norm, use_h0=not a.no_h0, bf16=a.precision == 'bf16')
    print(f'wrote {out}: {a.cell} {a.precision} V={a.vocab} E={a.embed} H={a.hidden} L={a.layers} '
          f'B={a.B} T={a.T} P={r["params"].size} loss={r["loss"][0]:.6f} '
          f'steps={a.steps} final loss={r["step_losses"][-1] if a.steps else float("nan"):.6f}')


if __name__ == '__main__':
    main()
