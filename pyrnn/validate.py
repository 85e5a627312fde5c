"""Input checks for the modules and engines: each returns the value in the form the engines take
(C-contiguous float32 or int32 arrays, Python ints and floats) or raises one clear ValueError,
TypeError or MemoryError naming the argument. Nothing here allocates more than its result."""
import os
import secrets

import numpy as np

BACKENDS = ('c', 'numpy', 'cuda')
C_INT_MAX = 2**31 - 1   # the C core's sizes are ints


def as_numpy(a):
    """A NumPy array of torch tensors (any device, requires_grad or not) and array-likes."""
    if hasattr(a, 'detach'):
        a = a.detach().cpu()
    return np.asarray(a)


def floats(a, name, shape=None):
    """C-contiguous float32 copy-or-view of a floating array, shape-checked (None = any)."""
    a = as_numpy(a)
    if not np.issubdtype(a.dtype, np.floating):
        raise TypeError(f'{name} must be a floating-point array, got dtype {a.dtype}')
    if shape is not None and a.shape != tuple(shape):
        raise ValueError(f'{name} has shape {a.shape}, expected {tuple(shape)}')
    return np.ascontiguousarray(a, dtype=np.float32)


def tokens(a, name, V, shape=None):
    """C-contiguous int32 token ids of shape (B, T), each in [0, V)."""
    a = as_numpy(a)
    if not np.issubdtype(a.dtype, np.integer):
        raise TypeError(f'{name} must be an integer array of token ids, got dtype {a.dtype}')
    if a.ndim != 2 or 0 in a.shape:
        raise ValueError(f'{name} must be a non-empty (B, T) array, got shape {a.shape}')
    if shape is not None and a.shape != tuple(shape):
        raise ValueError(f'{name} has shape {a.shape}, expected {tuple(shape)} (the shape of inputs)')
    lo, hi = int(a.min()), int(a.max())
    if lo < 0 or hi >= V:
        bad = lo if lo < 0 else hi
        raise ValueError(f'{name} holds token id {bad}, outside the vocabulary [0, {V})')
    return np.ascontiguousarray(a, dtype=np.int32)


def states(hx, name, lstm, shape, parts=('h0', 'c0')):
    """hx -> (h, c) float32 arrays of `shape` or None. LSTM takes a pair, e.g. (h0, c0), either
    part None (zeros)."""
    if hx is None:
        return None, None
    if lstm:
        if not isinstance(hx, (tuple, list)) or len(hx) != 2:
            raise TypeError(f'{name} must be a pair ({parts[0]}, {parts[1]}) for an LSTM, '
                            f'got {type(hx).__name__}')
        return tuple(None if s is None else floats(s, f'{name}[{i}] ({parts[i]})', shape)
                     for i, s in enumerate(hx))
    if isinstance(hx, (tuple, list)):
        raise TypeError(f'{name} must be a single array {parts[0]} (only LSTMs take a pair)')
    return floats(hx, name, shape), None


def integer(name, v, lo=1):
    """An int >= lo (bools refused)."""
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
        raise ValueError(f'{name} must be {"a positive int" if lo == 1 else f"an int >= {lo}"}, got {v!r}')
    return int(v)


def sizes(**named):
    """Positive ints that the C core's int fields can hold, in the order given."""
    for name, v in named.items():
        integer(name, v)
        if v > C_INT_MAX:
            raise ValueError(f'{name}={v} is too large: sizes must be below 2**31')
    return [int(v) for v in named.values()]


def seed(s):
    """seed=None draws one from the OS (then kept in .seed, so the run can be repeated)."""
    if s is None:
        return secrets.randbits(63)
    return integer('seed', s, lo=0)


def dropout(p, name='dropout'):
    if isinstance(p, bool) or not isinstance(p, (int, float, np.floating, np.integer)) or not 0.0 <= p < 1.0:
        raise ValueError(f'{name} must be in [0, 1), got {p!r}')
    return float(p)


def precision(name):
    """'fp32' or 'bf16' (GEMM operands rounded to bfloat16, sums in float32): True for bf16."""
    if name not in ('fp32', 'bf16'):
        raise ValueError(f"precision must be 'fp32' or 'bf16', got {name!r}")
    return name == 'bf16'


def backend(name):
    if name not in BACKENDS:
        raise ValueError(f'unknown backend {name!r}, expected one of {BACKENDS}')
    return name


def lengths(a, B, T):
    """B ints in [1, T] (any integer array-like or tensor), as int64."""
    a = as_numpy(a)
    if not np.issubdtype(a.dtype, np.integer):
        raise TypeError(f'lengths must be integers, got dtype {a.dtype}')
    if a.shape != (B,):
        raise ValueError(f'lengths has shape {a.shape}, expected ({B},): one length per sequence')
    lo, hi = int(a.min()), int(a.max())
    if lo < 1 or hi > T:
        raise ValueError(f'lengths must lie in [1, {T}] (the sequence length), got {lo if lo < 1 else hi}')
    return a.astype(np.int64)


def available_bytes():
    """Memory the OS can give now (Linux MemAvailable, else free physical pages), or None."""
    try:
        with open('/proc/meminfo') as f:
            for line in f:
                if line.startswith('MemAvailable:'):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf('SC_AVPHYS_PAGES') * os.sysconf('SC_PAGE_SIZE')
    except (ValueError, OSError, AttributeError):
        return None


def check_memory(nbytes, what):
    """MemoryError naming what and its bytes, before allocating more than the machine has free:
    an overcommitted allocation would otherwise be killed by the kernel when first touched.
    Below 64 MiB nothing is asked (a forward should not pay for reading /proc)."""
    if nbytes < 2**26:
        return
    avail = available_bytes()
    if avail is not None and nbytes > avail:
        raise MemoryError(f'{what} needs {nbytes:,} bytes ({nbytes / 2**30:,.1f} GiB), more than the '
                          f'{avail / 2**30:,.1f} GiB of memory available')


def check_params(what, n):
    # weights and gradients; the AdamW moments come at the first step
    check_memory(2 * 4 * n, f'{what} with {n:,} parameters (weights and gradients)')


def adamw_hyperparameters(lr, betas, eps, weight_decay):
    """torch.optim.AdamW's checks: ValueError for lr < 0 or NaN, betas outside [0, 1), eps < 0,
    weight_decay < 0. Returns (lr, (beta1, beta2), eps, weight_decay) as floats."""
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f'betas must be a pair (beta1, beta2), got {betas!r}')
    lr, eps, weight_decay = float(lr), float(eps), float(weight_decay)
    b1, b2 = float(betas[0]), float(betas[1])
    if not 0.0 <= lr:
        raise ValueError(f'Invalid learning rate: {lr}')
    if not 0.0 <= eps:
        raise ValueError(f'Invalid epsilon value: {eps}')
    for i, b in enumerate((b1, b2)):
        if not 0.0 <= b < 1.0:
            raise ValueError(f'Invalid beta parameter at index {i}: {b}')
    if not 0.0 <= weight_decay:
        raise ValueError(f'Invalid weight_decay value: {weight_decay}')
    return lr, (b1, b2), eps, weight_decay


def nonfinite_gradient(norm):
    """The error every engine's step raises, having changed nothing, for a gradient norm that is not finite."""
    return FloatingPointError(f'the gradient norm is {norm}: a gradient is not finite, so the step was '
                              'not taken (parameters and optimizer state are unchanged)')


def load_into(views, d, what='state_dict'):
    """Copy a dict of arrays (or torch tensors) into views; keys and shapes must match exactly.
    Everything is checked before anything is copied, so a bad dict changes nothing."""
    if not hasattr(d, 'keys'):
        raise TypeError(f'{what} must be a mapping, got {type(d).__name__}')
    missing = [k for k in views if k not in d]
    extra = [k for k in d if k not in views]
    if missing or extra:
        raise ValueError(f'{what} keys do not match: missing {missing}, unexpected {extra}')
    arrays = {k: floats(d[k], f'{what}[{k!r}]', v.shape) for k, v in views.items()}
    for k, a in arrays.items():
        views[k][...] = a
