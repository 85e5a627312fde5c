"""torch-like modules over the C trainer (backend='c'), the NumPy oracle (backend='numpy') or, for
CharLM, the GPU (backend='cuda').

    rnn = pyrnn.LSTM(10, 32, num_layers=2, batch_first=True, bidirectional=True, seed=0)
    opt = pyrnn.AdamW(rnn, lr=1e-3)
    out, (h_n, c_n) = rnn(x)                     # x: float (B, T, 10); out (B, T, 64)
    opt.zero_grad()
    dx, (dh0, dc0) = rnn.backward(dout)          # grads accumulate into rnn.grad
    opt.step()
    lm = pyrnn.CharLM('gru', vocab_size=65, embed_size=32, hidden_size=128, vocab=vocab)
    loss = lm.forward(inputs, targets); lm.zero_grad(); lm.backward(); lm.step(1e-3)

Arrays come out as NumPy float32, each a fresh copy; floating inputs of any precision (or torch
tensors) are converted to float32, token ids must be integers. parameters() and .grad are dicts
of writable views of the module's own buffers (C's, for backend='c'): edit them in place.
Gradients follow torch's convention: backward *accumulates* into gradients that the caller zeroed
first (they start at zero; call zero_grad() between steps), and undoes exactly one forward.

Each module picks its engine once, in __init__: an object that owns the parameters, runs forward
and backward and keeps the AdamW moments. _NumpyStack / _NumpyCell / _NumpyLM run the oracle,
_CStack / _CCell / _CLM the C core through cffi, _CudaLM the GPU model of pyrnn._cuda.
"""
import math
import os
import secrets
import warnings

import numpy as np

from . import oracle
from .data import Vocab

__all__ = ['RNN', 'LSTM', 'GRU', 'RNNCell', 'LSTMCell', 'GRUCell', 'CharLM', 'AdamW', 'clip_grad_norm_',
           'set_num_threads', 'get_num_threads', 'isa']

BACKENDS = ('c', 'numpy', 'cuda')

# No lock around the C core: each model and layer owns its scratch, and the error message is per
# thread, so threads may call into separate modules at once (cffi releases the GIL during calls).


def _load_backend(backend):
    """(ffi, lib) of the C extension; for 'cuda', (None, the pyrnn._cuda module)."""
    if backend == 'c':
        try:
            from . import _crnn
        except ImportError as e:
            raise RuntimeError('the C backend is not built (pyrnn._crnn is missing): run '
                               '`pip install --no-build-isolation -e .` or `make install`, '
                               "or use backend='numpy'") from e
        return _crnn.ffi, _crnn.lib
    if backend == 'cuda':
        try:
            from . import _cuda  # raises ImportError when lib/libpyrnn_cuda.so is missing
        except ImportError as e:
            raise RuntimeError(f'the cuda backend is not built: {e}') from e
        return None, _cuda   # ctypes: no ffi
    raise AssertionError(backend)


def _check_backend(backend):
    if backend not in BACKENDS:
        raise ValueError(f'unknown backend {backend!r}, expected one of {BACKENDS}')
    return backend


def set_num_threads(n):
    """OpenMP threads used by the C backend (no effect if it was built without OpenMP). OpenMP keeps
    this per thread: a Python thread that runs models calls it for itself (or set OMP_NUM_THREADS)."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f'set_num_threads: n must be a positive int, got {n!r}')
    _, lib = _load_backend('c')
    lib.pyrnn_set_num_threads(int(n))


def get_num_threads():
    _, lib = _load_backend('c')
    return int(lib.pyrnn_get_num_threads())


def isa():
    """The instruction set the C backend's kernels were built for: 'avx512', 'avx2', 'neon', 'sse2'
    or 'portable' (set at build time by -march: PYRNN_ARCH, native by default)."""
    ffi, lib = _load_backend('c')
    return ffi.string(lib.pyrnn_isa()).decode()


# ----------------------------------------------------------------------------- input checks

def _numpy(a):
    # torch tensors (any device, requires_grad or not) and array-likes
    if hasattr(a, 'detach'):
        a = a.detach().cpu()
    return np.asarray(a)


def _floats(a, name, shape=None):
    """C-contiguous float32 copy-or-view of a floating array, shape-checked (None = any)."""
    a = _numpy(a)
    if not np.issubdtype(a.dtype, np.floating):
        raise TypeError(f'{name} must be a floating-point array, got dtype {a.dtype}')
    if shape is not None and a.shape != tuple(shape):
        raise ValueError(f'{name} has shape {a.shape}, expected {tuple(shape)}')
    return np.ascontiguousarray(a, dtype=np.float32)


def _tokens(a, name, V, shape=None):
    """C-contiguous int32 token ids of shape (B, T), each in [0, V)."""
    a = _numpy(a)
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


def _states(hx, name, lstm, shape, parts=('h0', 'c0')):
    """hx -> (h, c) float32 arrays of `shape` or None. LSTM takes a pair, e.g. (h0, c0), either
    part None (zeros)."""
    if hx is None:
        return None, None
    if lstm:
        if not isinstance(hx, (tuple, list)) or len(hx) != 2:
            raise TypeError(f'{name} must be a pair ({parts[0]}, {parts[1]}) for an LSTM, '
                            f'got {type(hx).__name__}')
        return tuple(None if s is None else _floats(s, f'{name}[{i}] ({parts[i]})', shape)
                     for i, s in enumerate(hx))
    if isinstance(hx, (tuple, list)):
        raise TypeError(f'{name} must be a single array {parts[0]} (only LSTMs take a pair)')
    return _floats(hx, name, shape), None


def _int(name, v, lo=1):
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
        raise ValueError(f'{name} must be {"a positive int" if lo == 1 else f"an int >= {lo}"}, got {v!r}')
    return int(v)


_C_INT_MAX = 2**31 - 1


def _sizes(**sizes):
    """Positive ints that the C core's int fields can hold."""
    for name, v in sizes.items():
        _int(name, v)
        if v > _C_INT_MAX:
            raise ValueError(f'{name}={v} is too large: sizes must be below 2**31')
    return [int(v) for v in sizes.values()]


def _seed(seed):
    """seed=None draws one from the OS (then kept in .seed, so the run can be repeated)."""
    if seed is None:
        return secrets.randbits(63)
    return _int('seed', seed, lo=0)


def _dropout(p):
    if isinstance(p, bool) or not isinstance(p, (int, float, np.floating, np.integer)) or not 0.0 <= p < 1.0:
        raise ValueError(f'dropout must be in [0, 1), got {p!r}')
    return float(p)


def _lengths(lengths, B, T):
    """B ints in [1, T] (any integer array-like or tensor), as int64."""
    a = _numpy(lengths)
    if not np.issubdtype(a.dtype, np.integer):
        raise TypeError(f'lengths must be integers, got dtype {a.dtype}')
    if a.shape != (B,):
        raise ValueError(f'lengths has shape {a.shape}, expected ({B},): one length per sequence')
    lo, hi = int(a.min()), int(a.max())
    if lo < 1 or hi > T:
        raise ValueError(f'lengths must lie in [1, {T}] (the sequence length), got {lo if lo < 1 else hi}')
    return a.astype(np.int64)


def _available_bytes():
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


def _check_memory(nbytes, what):
    """MemoryError naming what and its bytes, before allocating more than the machine has free:
    an overcommitted allocation would otherwise be killed by the kernel when first touched.
    Below 64 MiB nothing is asked (a forward should not pay for reading /proc)."""
    if nbytes < 2**26:
        return
    avail = _available_bytes()
    if avail is not None and nbytes > avail:
        raise MemoryError(f'{what} needs {nbytes:,} bytes ({nbytes / 2**30:,.1f} GiB), more than the '
                          f'{avail / 2**30:,.1f} GiB of memory available')


def _check_params(what, n):
    # weights and gradients; the AdamW moments come at the first step
    _check_memory(2 * 4 * n, f'{what} with {n:,} parameters (weights and gradients)')


def _check_adamw(lr, betas, eps, weight_decay):
    """torch.optim.AdamW's checks: ValueError for lr < 0 or NaN, betas outside [0, 1), eps < 0,
    weight_decay < 0."""
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


def _nonfinite(norm):
    return FloatingPointError(f'the gradient norm is {norm}: a gradient is not finite, so the step was '
                              'not taken (parameters and optimizer state are unchanged)')


# ----------------------------------------------------------------------------- buffers

def _views(shapes, flat):
    """Named views into a flat vector, in the order of shapes."""
    out, off = {}, 0
    for name, shape in shapes.items():
        n = int(np.prod(shape))
        out[name] = flat[off:off + n].reshape(shape)
        off += n
    assert off == flat.size, (off, flat.size)
    return out


def _load_into(views, d, what='state_dict'):
    """Copy a dict of arrays (or torch tensors) into views; keys and shapes must match exactly.
    Everything is checked before anything is copied, so a bad dict changes nothing."""
    if not hasattr(d, 'keys'):
        raise TypeError(f'{what} must be a mapping, got {type(d).__name__}')
    missing = [k for k in views if k not in d]
    extra = [k for k in d if k not in views]
    if missing or extra:
        raise ValueError(f'{what} keys do not match: missing {missing}, unexpected {extra}')
    arrays = {k: _floats(d[k], f'{what}[{k!r}]', v.shape) for k, v in views.items()}
    for k, a in arrays.items():
        views[k][...] = a


def _c_array(ffi, a, ctype='float[]'):
    # pointer into a numpy array; the caller keeps `a` alive for the duration of the call
    return ffi.NULL if a is None else ffi.from_buffer(ctype, a, require_writable=False)


class _CMemory:
    """n floats of C memory as numpy sees them (the array interface), holding `owner`, the object
    that frees them: a view handed out (parameters(), grad) keeps the C model alive, so it can never
    read freed memory, however long the user keeps it."""

    def __init__(self, ffi, ptr, n, owner):
        self.owner = owner
        self.__array_interface__ = {'version': 3, 'shape': (n,), 'typestr': '<f4',
                                    'data': (int(ffi.cast('uintptr_t', ptr)), False)}


def _c_view(ffi, ptr, n, owner):
    """float32 view of n floats owned by C, alive as long as owner (the gc'd pointer that frees them)."""
    return np.asarray(_CMemory(ffi, ptr, n, owner))


def _c_check(ffi, lib, rc):
    if rc != 0:
        raise RuntimeError(ffi.string(lib.pyrnn_last_error()).decode(errors='replace'))


class _Engine:
    """Defaults every engine shares."""
    rng = 0   # the dropout generator's state (oracle.dropout_masks), for engines that draw masks

    def touched(self):
        """parameters() handed the views out for writing."""

    def set_mode(self, training, dropout):
        pass

    def set_rng(self, state):
        self.rng = state


class _HostAdam(_Engine):
    """AdamW on the host over an engine's parameter views (oracle.adamw_step; clipping scales a
    copy of the gradients). The moments live here, with the module, as the C model keeps its own."""
    adam = None   # (m, v, t) once a step was taken

    def adamw_step(self, lr, betas, eps, weight_decay, max_grad_norm):
        grads = self.grads
        norm = oracle.clip_grad_norm(grads, None)
        if not math.isfinite(norm):
            raise _nonfinite(norm)
        if max_grad_norm:
            grads = {k: g.copy() for k, g in grads.items()}
            oracle.clip_grad_norm(grads, max_grad_norm)
        if self.adam is None:
            self.adam = ({k: np.zeros_like(p) for k, p in self.params.items()},
                         {k: np.zeros_like(p) for k, p in self.params.items()}, 0)
        m, v, t = self.adam
        oracle.adamw_step(self.params, grads, m, v, t + 1, lr, betas, eps, weight_decay)
        self.adam = (m, v, t + 1)
        return norm

    def adam_state(self):
        return self.adam

    def load_adam(self, m, v, t):
        """The moments and step count t (t = 0: none, AdamW starts afresh)."""
        self.adam = ({k: a.copy() for k, a in m.items()}, {k: a.copy() for k, a in v.items()}, t) if t else None


class _HostParams(_HostAdam):
    """Parameters and gradients in two flat NumPy vectors, in the order of shapes."""

    def __init__(self, shapes):
        n = oracle.num_params(shapes)
        self.flat, self.flat_grad = np.zeros(n, np.float32), np.zeros(n, np.float32)
        self.params, self.grads = _views(shapes, self.flat), _views(shapes, self.flat_grad)

    def zero_grad(self):
        self.flat_grad[...] = 0.0


# ----------------------------------------------------------------------------- stack and cell engines
# A stack engine: forward(x, h0, c0, lengths, masks, p) -> out, h_n, c_n, tape and
# backward(tape, dout, dh_n, dc_n) -> dx, dh0, dc0, time-major, h/c indexed l*D + d as torch.
# A cell engine: step(x, h, c) -> h', c', tape and step_backward(tape, dh, dc) -> dx, dh, dc.

class _NumpyStack(_HostParams):
    def __init__(self, cell, shapes):
        super().__init__(shapes)
        self.cell = cell

    def forward(self, x, h0, c0, lengths, masks, p):
        # the oracle's cache keeps its inputs: copies, as C copies them, so that editing the
        # caller's arrays before backward changes nothing
        x, h0, c0 = (None if a is None else a.copy() for a in (x, h0, c0))
        return oracle.stack_forward(self.params, self.cell, x, h0, c0, p if masks else 0.0, masks, lengths)

    def backward(self, tape, dout, dh_n, dc_n):
        dx, dh0, dc0, grads = oracle.stack_backward(tape, dout, dh_n, dc_n)
        for k, g in grads.items():
            self.grads[k] += g
        return dx, dh0, dc0


class _NumpyCell(_HostParams):
    def __init__(self, cell, shapes):
        super().__init__(shapes)
        self.cell = cell

    def step(self, x, h, c):
        return oracle.cell_forward(self.params, self.cell, x, h, c)

    def step_backward(self, tape, dh, dc):
        dx, dh_prev, dc_prev, grads = oracle.cell_backward(tape, dh, dc)
        for k, g in grads.items():
            self.grads[k] += g
        return dx, dh_prev, dc_prev


def _reversal(lengths, T, B):
    """Gather indices (T, B) that reverse each sequence within its own length and leave its padding
    in place: the reverse direction is the forward recurrence over them. Their own inverse."""
    t = np.arange(T)[:, None]
    n = np.full(B, T) if lengths is None else lengths
    return np.where(t < n, n - 1 - t, t), np.arange(B)


class _CStack(_HostAdam):
    """The stack as one single-layer C Layer per layer and direction, joined in NumPy: the reverse
    direction runs over its input reversed within each sequence's length (so it starts at the
    sequence's own last step; C holds ended sequences' state), the directions' outputs are
    concatenated, dropout multiplies between layers. Each Layer keeps the activations of its last
    forward; a tape that is not the last one forward ran (a cell unwinding LIFO) is run forward
    again before backward."""

    def __init__(self, cell, input_size, hidden_size, num_layers, bias, directions, suffix=oracle._suffix):
        ffi, lib = self._ffi, self._lib = _load_backend('c')
        self.cell, self.H, self.L, self.D = cell, hidden_size, num_layers, directions
        self.units, self.params, self.grads = [], {}, {}
        for l in range(num_layers):
            in_l = input_size if l == 0 else directions * hidden_size
            for d in range(directions):
                ptr = lib.layer_new(oracle.cell_id(cell), in_l, hidden_size, 1, int(bias))
                if ptr == ffi.NULL:
                    _c_check(ffi, lib, -1)
                owner = ffi.gc(ptr, lib.layer_free)
                self.units.append(owner)
                shapes = oracle.layer_param_shapes(cell, in_l, hidden_size, bias, suffix(l, d))
                n = int(ptr.num_params)
                self.params.update(_views(shapes, _c_view(ffi, ptr.params, n, owner)))
                self.grads.update(_views(shapes, _c_view(ffi, ptr.grads, n, owner)))
        self._current = None   # the tape whose activations the Layers hold

    def zero_grad(self):
        for g in self.grads.values():
            g[...] = 0.0

    def forward(self, x, h0, c0, lengths, masks, p):
        T, B = x.shape[:2]
        tape = dict(x=x, h0=h0, c0=c0, masks=masks, scale=oracle.dropout_scale(p, np.float32),
                    lengths=None if lengths is None else lengths.astype(np.int32),
                    reverse=_reversal(lengths, T, B) if self.D == 2 else None)
        return self._run(tape) + (tape,)

    def _run(self, tape):
        self._current = None   # the Layers' activations are the tape's only once every call succeeded
        ffi, lib, L, D, H = self._ffi, self._lib, self.L, self.D, self.H
        x, h0, c0, masks, rev = tape['x'], tape['h0'], tape['c0'], tape['masks'], tape['reverse']
        lengths = ffi.NULL if tape['lengths'] is None else _c_array(ffi, tape['lengths'], 'int[]')
        T, B = x.shape[:2]
        lstm = self.cell == 'lstm'
        h_n = np.empty((L * D, B, H), np.float32)
        c_n = np.empty((L * D, B, H), np.float32) if lstm else None
        inp = x
        for l in range(L):
            outs = []
            for d in range(D):
                k = l * D + d
                out = np.empty((T, B, H), np.float32)
                xin = np.ascontiguousarray(inp[rev]) if d else inp
                rc = lib.layer_forward_api(
                    self.units[k], _c_array(ffi, out), _c_array(ffi, h_n[k]),
                    ffi.NULL if c_n is None else _c_array(ffi, c_n[k]), _c_array(ffi, xin),
                    ffi.NULL if h0 is None else _c_array(ffi, h0[k]),
                    ffi.NULL if c0 is None else _c_array(ffi, c0[k]), lengths, B, T)
                _c_check(ffi, lib, rc)
                outs.append(out[rev] if d else out)
            inp = np.concatenate(outs, axis=2) if D == 2 else outs[0]
            if masks is not None and l < L - 1:
                inp = inp * (masks[l] * tape['scale'])
        self._current = tape
        return np.ascontiguousarray(inp), h_n, c_n

    def backward(self, tape, dout, dh_n, dc_n):
        if self._current is not tape:
            self._run(tape)
        ffi, lib, L, D, H = self._ffi, self._lib, self.L, self.D, self.H
        T, B = dout.shape[:2]
        lstm = self.cell == 'lstm'
        dh0 = np.empty((L * D, B, H), np.float32)
        dc0 = np.empty((L * D, B, H), np.float32) if lstm else None
        dy, rev = dout, tape['reverse']
        for l in reversed(range(L)):
            if tape['masks'] is not None and l < L - 1:
                dy = dy * (tape['masks'][l] * tape['scale'])
            dinp = None
            for d in range(D):
                k = l * D + d
                dy_d = dy[..., d * H:(d + 1) * H]
                dy_d = np.ascontiguousarray(dy_d[rev] if d else dy_d)
                dx = np.empty((T, B, tape['x'].shape[2] if l == 0 else D * H), np.float32)
                rc = lib.layer_backward_api(
                    self.units[k], _c_array(ffi, dx), _c_array(ffi, dh0[k]),
                    ffi.NULL if dc0 is None else _c_array(ffi, dc0[k]), _c_array(ffi, dy_d),
                    ffi.NULL if dh_n is None else _c_array(ffi, dh_n[k]),
                    ffi.NULL if dc_n is None else _c_array(ffi, dc_n[k]))
                _c_check(ffi, lib, rc)
                dx = dx[rev] if d else dx
                dinp = dx if dinp is None else dinp + dx
            dy = dinp
        return np.ascontiguousarray(dy), dh0, dc0


class _CCell(_CStack):
    """A cell is a one-layer, one-direction stack run for one step."""

    def __init__(self, cell, input_size, hidden_size, bias):
        super().__init__(cell, input_size, hidden_size, 1, bias, 1, suffix=lambda l, d: '')

    def step(self, x, h, c):
        out, h_n, c_n, tape = self.forward(x[None], None if h is None else h[None],
                                           None if c is None else c[None], None, None, 0.0)
        return out[0], None if c_n is None else c_n[0], tape

    def step_backward(self, tape, dh, dc):
        dx, dh0, dc0 = self.backward(tape, dh[None], None, None if dc is None else dc[None])
        return dx[0], dh0[0], None if dc0 is None else dc0[0]


# ----------------------------------------------------------------------------- modules

class _Module:
    """What every module shares: named parameter and gradient views, state dicts, modes."""
    training = True

    def parameters(self):
        """The parameters as writable views, under torch's names: edit them in place."""
        self._engine.touched()
        return dict(self._engine.params)

    @property
    def grad(self):
        """The accumulated gradients as writable views, same names as parameters()."""
        return dict(self._engine.grads)

    def state_dict(self):
        """Copies of the parameters, under torch's names."""
        return {k: v.copy() for k, v in self._engine.params.items()}

    def load_state_dict(self, state_dict):
        """Copy parameters in (numpy arrays or torch tensors); keys and shapes must match exactly."""
        self._engine.touched()
        _load_into(self._engine.params, state_dict)

    @property
    def num_params(self):
        return sum(p.size for p in self._engine.params.values())

    def zero_grad(self):
        self._engine.zero_grad()

    def train(self, mode=True):
        self.training = bool(mode)
        return self

    def eval(self):
        return self.train(False)


class _RNNBase(_Module):
    """Recurrent stack with exactly torch.nn.{RNN,LSTM,GRU} semantics: bidirectional, dropout
    between layers in training mode, variable lengths as through pack_padded_sequence.

    Initialised like torch, every tensor ~ U(-1/sqrt(H), 1/sqrt(H)), from
    numpy.random.default_rng(seed) (seed=None: drawn from the OS and kept in .seed). Dropout masks
    come from oracle.dropout_masks, the C trainer's generator, seeded from the same seed.
    """

    def __init__(self, input_size, hidden_size, num_layers=1, bias=True, batch_first=False, dropout=0.0,
                 bidirectional=False, seed=None, backend='c', *, cell):
        I, H, L = _sizes(input_size=input_size, hidden_size=hidden_size, num_layers=num_layers)
        self.cell = cell
        self.input_size, self.hidden_size, self.num_layers = I, H, L
        self.bias, self.batch_first, self.bidirectional = bool(bias), bool(batch_first), bool(bidirectional)
        self.dropout, self.seed = _dropout(dropout), _seed(seed)
        self.backend = _check_backend(backend)
        if backend == 'cuda':
            raise ValueError("the layer API runs on backend 'c' or 'numpy'; backend='cuda' is for CharLM")
        D = 2 if self.bidirectional else 1
        _check_params(repr(self), oracle.stack_num_params(cell, I, H, L, self.bias, self.bidirectional))
        if backend == 'numpy':
            shapes = oracle.stack_param_shapes(cell, I, H, L, self.bias, self.bidirectional)
            self._engine = _NumpyStack(cell, shapes)
        else:
            self._engine = _CStack(cell, I, H, L, self.bias, D)
        self.load_state_dict(oracle.init_stack_params(cell, I, H, L, self.bias, np.random.default_rng(self.seed),
                                                      bidirectional=self.bidirectional))
        self._rng = oracle.dropout_state(self.seed)
        self._last = None  # what backward needs from the last forward

    def __call__(self, x, hx=None, lengths=None):
        return self.forward(x, hx, lengths)

    def __repr__(self):
        extra = f', nonlinearity={self.cell[4:]!r}' if self.cell == 'rnn_relu' else ''
        return (f'{type(self).__name__}({self.input_size}, {self.hidden_size}, num_layers={self.num_layers}'
                f'{extra}, bias={self.bias}, batch_first={self.batch_first}, dropout={self.dropout}, '
                f'bidirectional={self.bidirectional}, backend={self.backend!r})')

    def forward(self, x, hx=None, lengths=None):
        """x: (T, B, input_size), (B, T, input_size) with batch_first, or unbatched (T, input_size).
        hx: h0 (L*D, B, H) (unbatched: (L*D, H)), D = 2 if bidirectional; LSTM: a pair (h0, c0).
        None = zeros. lengths: B ints in [1, T] (batched input only), None = all T.
        Returns (output, h_n), LSTM (output, (h_n, c_n)); output (T, B, D*H) or (B, T, D*H),
        zero past each sequence's length; h_n (L*D, B, H), each sequence's state at its last step."""
        lstm = self.cell == 'lstm'
        x = _floats(x, 'x')
        D = 2 if self.bidirectional else 1
        LD, H = self.num_layers * D, self.hidden_size
        unbatched = x.ndim == 2
        if x.ndim not in (2, 3):
            raise ValueError(f'x must be 3-D (T, B, input_size){" with batch_first (B, T, ...)" if self.batch_first else ""}'
                             f' or unbatched 2-D (T, input_size), got shape {x.shape}')
        if x.shape[-1] != self.input_size:
            raise ValueError(f'x has shape {x.shape}: last dimension must be input_size={self.input_size}')
        if 0 in x.shape:
            raise ValueError(f'x has shape {x.shape}: sequence length and batch must be non-zero')
        if unbatched:
            if lengths is not None:
                raise ValueError('lengths needs batched input (one length per sequence)')
            x = x[:, None]
        elif self.batch_first:
            x = x.transpose(1, 0, 2)
        x = np.ascontiguousarray(x)
        T, B = x.shape[:2]
        if lengths is not None:
            lengths = _lengths(lengths, B, T)
        h0, c0 = _states(hx, 'hx', lstm, (LD, H) if unbatched else (LD, B, H))
        if unbatched:  # (L*D, H) -> (L*D, 1, H)
            h0, c0 = (None if s is None else np.ascontiguousarray(s[:, None]) for s in (h0, c0))
        self._last = None  # a failed forward must not leave backward with stale shapes
        G = oracle.gates(self.cell)
        _check_memory(4 * T * B * (LD * H * (G + 4) + 2 * self.input_size),
                      f'a forward of {T} steps x {B} sequences through {self!r}')
        masks = None
        if self.training and self.dropout > 0 and self.num_layers > 1:
            masks, self._rng = oracle.dropout_masks(self._rng, range(1, self.num_layers), T, B, D * H,
                                                    self.dropout)
        out, h_n, c_n, tape = self._engine.forward(x, h0, c0, lengths, masks, self.dropout)
        self._last = dict(tape=tape, T=T, B=B, unbatched=unbatched)
        out = out[:, 0] if unbatched else out.transpose(1, 0, 2) if self.batch_first else out
        if unbatched:
            h_n = np.ascontiguousarray(h_n[:, 0])
            c_n = None if c_n is None else np.ascontiguousarray(c_n[:, 0])
        out = np.ascontiguousarray(out)
        return (out, (h_n, c_n)) if lstm else (out, h_n)

    def backward(self, doutput, dh_n=None):
        """Backward of the last forward, given the gradients of some scalar w.r.t. its outputs:
        doutput (shaped like output) and dh_n (like h_n; for an LSTM the pair (dh_n, dc_n); None or
        either part None = zeros). Returns (dx, dh0), LSTM (dx, (dh0, dc0)); parameter gradients
        accumulate into .grad. One backward per forward."""
        if self._last is None:
            raise RuntimeError('backward needs a forward first (one backward per forward)')
        lstm = self.cell == 'lstm'
        T, B, unbatched = self._last['T'], self._last['B'], self._last['unbatched']
        D = 2 if self.bidirectional else 1
        LD, H = self.num_layers * D, self.hidden_size
        if unbatched:
            dout = _floats(doutput, 'doutput', (T, D * H))[:, None]
            dh, dc = _states(dh_n, 'dh_n', lstm, (LD, H), ('dh_n', 'dc_n'))
            dh, dc = (None if s is None else np.ascontiguousarray(s[:, None]) for s in (dh, dc))
        else:
            dout = _floats(doutput, 'doutput', (B, T, D * H) if self.batch_first else (T, B, D * H))
            if self.batch_first:
                dout = dout.transpose(1, 0, 2)
            dh, dc = _states(dh_n, 'dh_n', lstm, (LD, B, H), ('dh_n', 'dc_n'))
        dout = np.ascontiguousarray(dout)
        tape, self._last = self._last['tape'], None
        dx, dh0, dc0 = self._engine.backward(tape, dout, dh, dc)
        if unbatched:
            dx, dh0 = dx[:, 0], np.ascontiguousarray(dh0[:, 0])
            dc0 = None if dc0 is None else np.ascontiguousarray(dc0[:, 0])
        elif self.batch_first:
            dx = dx.transpose(1, 0, 2)
        dx = np.ascontiguousarray(dx)
        return (dx, (dh0, dc0)) if lstm else (dx, dh0)


class RNN(_RNNBase):
    """torch.nn.RNN: h_t = act(W_ih x_t + b_ih + W_hh h_{t-1} + b_hh), act tanh or relu."""

    def __init__(self, input_size, hidden_size, num_layers=1, nonlinearity='tanh', bias=True,
                 batch_first=False, dropout=0.0, bidirectional=False, seed=None, backend='c'):
        super().__init__(input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional,
                         seed, backend, cell=oracle.rnn_cell(nonlinearity))


class LSTM(_RNNBase):
    """torch.nn.LSTM (gates i, f, g, o); hx, the final state and dh_n are pairs (h, c)."""

    def __init__(self, input_size, hidden_size, num_layers=1, bias=True, batch_first=False, dropout=0.0,
                 bidirectional=False, seed=None, backend='c'):
        super().__init__(input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional,
                         seed, backend, cell='lstm')


class GRU(_RNNBase):
    """torch.nn.GRU (gates r, z, n; r multiplies W_hn h + b_hn)."""

    def __init__(self, input_size, hidden_size, num_layers=1, bias=True, batch_first=False, dropout=0.0,
                 bidirectional=False, seed=None, backend='c'):
        super().__init__(input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional,
                         seed, backend, cell='gru')


# ----------------------------------------------------------------------------- cells

class _CellBase(_Module):
    """One step of torch.nn.{RNN,LSTM,GRU}Cell. Each forward in training mode records its inputs;
    backward undoes the most recent call not yet undone, so a Python loop of forward calls followed
    by as many backward calls is BPTT, as torch's autograd would run it. In eval() mode forward
    records nothing (as under torch.no_grad()). Initialised as torch, U(-1/sqrt(H), 1/sqrt(H))."""

    def __init__(self, input_size, hidden_size, bias=True, seed=None, backend='c', *, cell):
        I, H = _sizes(input_size=input_size, hidden_size=hidden_size)
        self.cell, self.input_size, self.hidden_size, self.bias = cell, I, H, bool(bias)
        self.seed, self.backend = _seed(seed), _check_backend(backend)
        if backend == 'cuda':
            raise ValueError("cells run on backend 'c' or 'numpy'; backend='cuda' is for CharLM")
        shapes = oracle.layer_param_shapes(cell, I, H, self.bias)
        _check_params(repr(self), oracle.num_params(shapes))
        self._engine = _NumpyCell(cell, shapes) if backend == 'numpy' else _CCell(cell, I, H, self.bias)
        self.load_state_dict(oracle.init_uniform(shapes, H, np.random.default_rng(self.seed)))
        self._calls = []   # (tape, batch shape) of every call not yet undone, oldest first

    def __repr__(self):
        extra = f', nonlinearity={self.cell[4:]!r}' if self.cell == 'rnn_relu' else ''
        return (f'{type(self).__name__}({self.input_size}, {self.hidden_size}, bias={self.bias}{extra}, '
                f'backend={self.backend!r})')

    def __call__(self, x, hx=None):
        return self.forward(x, hx)

    def forward(self, x, hx=None):
        """x (B, input_size) or unbatched (input_size,); hx h (B, H), LSTM (h, c), None = zeros.
        Returns h' (B, H), LSTM (h', c')."""
        lstm = self.cell == 'lstm'
        x = _floats(x, 'x')
        if x.ndim not in (1, 2) or x.shape[-1] != self.input_size or 0 in x.shape:
            raise ValueError(f'x has shape {x.shape}, expected (B, {self.input_size}) or ({self.input_size},)')
        unbatched = x.ndim == 1
        x = x[None] if unbatched else x
        B, H = x.shape[0], self.hidden_size
        h, c = _states(hx, 'hx', lstm, (H,) if unbatched else (B, H), ('h', 'c'))
        h, c = (None if s is None else s.reshape(B, H) for s in (h, c))
        if self.training:   # the tape keeps what it is given: copies, so later edits change nothing
            x, h, c = (None if s is None else s.copy() for s in (x, h, c))
        h1, c1, tape = self._engine.step(x, h, c)
        if self.training:
            self._calls.append((tape, B, unbatched))
        h1, c1 = (None if s is None else np.ascontiguousarray(s[0] if unbatched else s) for s in (h1, c1))
        return (h1, c1) if lstm else h1

    def backward(self, dh):
        """Undo the most recent call not yet undone, given dh on its h' (LSTM: (dh, dc), either
        None = zeros). Returns (dx, dh_prev), LSTM (dx, (dh_prev, dc_prev)); parameter gradients
        accumulate into .grad."""
        if not self._calls:
            raise RuntimeError('backward: every forward call has been undone (cells record calls only '
                               'in training mode)')
        lstm = self.cell == 'lstm'
        tape, B, unbatched = self._calls[-1]
        H = self.hidden_size
        if lstm:
            dh, dc = _states(dh, 'dh', True, (H,) if unbatched else (B, H), ('dh', 'dc'))
        else:
            dh, dc = _floats(dh, 'dh', (H,) if unbatched else (B, H)), None
        dh = np.zeros((B, H), np.float32) if dh is None else dh.reshape(B, H)
        dc = None if dc is None else dc.reshape(B, H)
        self._calls.pop()
        dx, dh_prev, dc_prev = self._engine.step_backward(tape, dh, dc)
        dx, dh_prev, dc_prev = (None if s is None else np.ascontiguousarray(s[0] if unbatched else s)
                                for s in (dx, dh_prev, dc_prev))
        return (dx, (dh_prev, dc_prev)) if lstm else (dx, dh_prev)


class RNNCell(_CellBase):
    """torch.nn.RNNCell: h' = act(W_ih x + b_ih + W_hh h + b_hh), act tanh or relu."""

    def __init__(self, input_size, hidden_size, bias=True, nonlinearity='tanh', seed=None, backend='c'):
        super().__init__(input_size, hidden_size, bias, seed, backend, cell=oracle.rnn_cell(nonlinearity))


class LSTMCell(_CellBase):
    """torch.nn.LSTMCell: hx and the result are pairs (h, c); backward takes (dh, dc)."""

    def __init__(self, input_size, hidden_size, bias=True, seed=None, backend='c'):
        super().__init__(input_size, hidden_size, bias, seed, backend, cell='lstm')


class GRUCell(_CellBase):
    """torch.nn.GRUCell."""

    def __init__(self, input_size, hidden_size, bias=True, seed=None, backend='c'):
        super().__init__(input_size, hidden_size, bias, seed, backend, cell='gru')


# ----------------------------------------------------------------------------- optimizer

class AdamW:
    """torch.optim.AdamW over one module's parameters (one param group; decay on every parameter).

        opt = pyrnn.AdamW(model, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
        opt.zero_grad(); ...forward, backward...; opt.step()

    The moments live with the module (as in the C trainer), so CharLM.save / load keep them and
    CharLM.step continues them. step() raises FloatingPointError when a gradient is not finite and
    then changes neither the parameters nor the moments. param_groups[0] holds the
    hyperparameters and may be edited between steps (e.g. a learning-rate schedule), as in torch.
    """

    def __init__(self, module, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01):
        if not isinstance(module, _Module):
            raise TypeError(f'AdamW takes a pyrnn module, got {type(module).__name__}')
        lr, betas, eps, weight_decay = _check_adamw(lr, betas, eps, weight_decay)
        self.module = module
        self.param_groups = [dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)]

    def __repr__(self):
        return f'AdamW({type(self.module).__name__}, {self.param_groups[0]})'

    def zero_grad(self):
        self.module.zero_grad()

    def step(self):
        self._step(None)

    def _step(self, max_grad_norm):
        """Clip (a copy of) the gradients to max_grad_norm (None or 0: off), then one step; returns
        the gradient norm before clipping."""
        g = self.param_groups[0]
        lr, betas, eps, weight_decay = _check_adamw(g['lr'], g['betas'], g['eps'], g['weight_decay'])
        return self.module._engine.adamw_step(lr, betas, eps, weight_decay, max_grad_norm)

    def state_dict(self):
        """torch's layout: {'state': {i: {'step', 'exp_avg', 'exp_avg_sq'}}, 'param_groups': [...]},
        i indexing parameters() in order; state is empty before the first step. Arrays are copies."""
        names = list(self.module._engine.params)
        st = self.module._engine.adam_state()
        state = {} if st is None else {i: dict(step=st[2], exp_avg=st[0][n].copy(), exp_avg_sq=st[1][n].copy())
                                       for i, n in enumerate(names)}
        return dict(state=state, param_groups=[dict(self.param_groups[0], params=list(range(len(names))))])

    def load_state_dict(self, state_dict):
        """Load what state_dict() gave (from this or an equal module); checked before anything changes.
        An empty state starts AdamW afresh, as in torch."""
        engine = self.module._engine
        names = list(engine.params)
        try:
            group, state = state_dict['param_groups'][0], state_dict['state']
            hp = _check_adamw(group['lr'], group['betas'], group['eps'], group['weight_decay'])
        except (KeyError, IndexError, TypeError) as e:
            raise ValueError(f'not an AdamW state dict: {e!r}') from None
        m, v, t = {}, {}, 0
        if state:
            if sorted(state) != list(range(len(names))):
                raise ValueError(f'the state holds parameters {sorted(state)}, the module has {len(names)}')
            steps = {int(s['step']) for s in state.values()}
            if len(steps) != 1 or min(steps) < 1:
                raise ValueError(f'every parameter must have the same step count >= 1, got {sorted(steps)}')
            t = steps.pop()
            for i, n in enumerate(names):
                m[n] = _floats(state[i]['exp_avg'], f'exp_avg of {n}', engine.params[n].shape)
                v[n] = _floats(state[i]['exp_avg_sq'], f'exp_avg_sq of {n}', engine.params[n].shape)
        engine.load_adam(m, v, t)
        self.param_groups = [dict(zip(('lr', 'betas', 'eps', 'weight_decay'), hp))]


def clip_grad_norm_(module, max_norm):
    """torch.nn.utils.clip_grad_norm_: scales the module's gradients in place so that their global
    L2 norm is at most max_norm (coefficient max_norm / (norm + 1e-6), applied when below 1).
    Returns the norm before clipping (a float; inf or nan for non-finite gradients, which are then
    scaled by nan, as torch does)."""
    max_norm = float(max_norm)
    if not max_norm >= 0:
        raise ValueError(f'max_norm must be >= 0, got {max_norm}')
    if not isinstance(module, _Module):
        raise TypeError(f'clip_grad_norm_ takes a pyrnn module, got {type(module).__name__}')
    grads = module.grad
    norm = math.sqrt(sum(float(np.dot(g.ravel().astype(np.float64), g.ravel())) for g in grads.values()))
    coef = min(max_norm / (norm + 1e-6), 1.0) if math.isfinite(norm) else math.nan
    if coef != 1.0:
        for g in grads.values():
            g *= np.float32(coef)
    return norm


# ----------------------------------------------------------------------------- char LM engines
# forward(inputs, targets, h0, c0, p) -> loss, logits (T, B, V), h_n, c_n with dropout p > 0 in
# training (0 otherwise); backward() -> dh0, dc0; masks(); sample(...); rng, the dropout
# generator's state (checkpoints store it); adamw_step / adam_state / load_adam as _HostAdam.

class _NumpyLM(_HostParams):
    def __init__(self, cell, V, E, H, L, seed):
        super().__init__(oracle.lm_param_shapes(cell, V, E, H, L))
        self.cell, self.H, self.L = cell, H, L
        self.rng = oracle.dropout_state(seed)   # the C model's generator, so both draw the same masks
        self._cache = self._masks = None

    def forward(self, inputs, targets, h0, c0, p):
        B, T = inputs.shape
        self._masks = None
        if p > 0:
            self._masks, self.rng = oracle.dropout_masks(self.rng, range(1, self.L + 1), T, B, self.H, p)
        # copies: the oracle's cache keeps its inputs until backward (C copies them too)
        inputs, h0, c0 = (None if a is None else a.copy() for a in (inputs, h0, c0))
        loss, logits, h_n, c_n, cache = oracle.lm_forward(
            self.params, self.cell, inputs, targets if targets is not None else np.zeros_like(inputs),
            h0, c0, p, self._masks)
        self._cache = cache if targets is not None else None
        return loss, logits, h_n, c_n

    def backward(self):
        grads, dh0, dc0 = oracle.lm_backward(self._cache)
        for k, g in grads.items():
            self.grads[k] += g
        return dh0, dc0

    def masks(self):
        return None if self._masks is None else [mk.copy() for mk in self._masks]

    def sample(self, prime, length, temperature, top_k, seed):
        # one step at a time, numpy's generator
        rng, out = np.random.default_rng(seed), []
        _, logits, h, c = self.forward(prime[None], None, None, None, 0.0)
        for _ in range(length):
            z = logits[-1, 0].astype(np.float64)
            if 0 < top_k < z.size:
                z[z < np.sort(z)[-top_k]] = -np.inf
            p = np.exp((z - z.max()) / temperature)
            tok = int(rng.choice(z.size, p=p / p.sum()))
            out.append(tok)
            _, logits, h, c = self.forward(np.array([[tok]], np.int32), None, h, c, 0.0)
        return np.array(out, np.int32)


class _CLM(_Engine):
    """The C Model. Its dropout generator (SplitMix64, a counter) advances by one draw per training
    forward with dropout, so its state is tracked here: the Python binding does not name the field
    (model_init sets it: state = seed ^ 0x5DEECE66D)."""

    def __init__(self, cell, V, E, H, L, seed):
        ffi, lib = self._ffi, self._lib = _load_backend('c')
        config = ffi.new('Config*')
        config.cell, config.vocab_size, config.embed_size = oracle.cell_id(cell), V, E
        config.hidden_size, config.n_layers = H, L
        ptr = lib.model_new(config[0])
        if ptr == ffi.NULL:
            _c_check(ffi, lib, -1)
        lib.model_init(ptr, seed % 2**64)   # seeds the dropout generator; the weights are set by CharLM
        self.ptr = ffi.gc(ptr, lib.model_free)
        self.cell, self.H, self.L, self.V = cell, H, L, V
        self.rng = oracle.dropout_state(seed)
        self.shapes = oracle.lm_param_shapes(cell, V, E, H, L)
        n = int(ptr.num_params)
        self.params = _views(self.shapes, _c_view(ffi, ptr.params, n, self.ptr))
        self.grads = _views(self.shapes, _c_view(ffi, ptr.grads, n, self.ptr))
        self.flat_grad = _c_view(ffi, ptr.grads, n, self.ptr)
        self._dropped = False

    def zero_grad(self):
        self.flat_grad[...] = 0.0

    def set_mode(self, training, dropout):
        self._lib.model_set_training(self.ptr, int(training), dropout)

    def set_rng(self, state):
        # model_init is the only way in: it also redraws the weights and zeroes AdamW, so keep both
        params = {k: v.copy() for k, v in self.params.items()}
        adam = self.adam_state()
        adam = adam and ({k: a.copy() for k, a in adam[0].items()}, {k: a.copy() for k, a in adam[1].items()}, adam[2])
        self._lib.model_init(self.ptr, (state ^ oracle._DROPOUT_SEED_XOR) & oracle._MASK64)
        _load_into(self.params, params)
        if adam:
            self.load_adam(*adam)
        self.rng = state

    def forward(self, inputs, targets, h0, c0, p):
        ffi, lib, m = self._ffi, self._lib, self.ptr
        B, T = inputs.shape
        H, L, V = self.H, self.L, self.V
        rc = lib.model_forward(m, _c_array(ffi, inputs, 'int[]'), _c_array(ffi, targets, 'int[]'),
                               _c_array(ffi, h0), _c_array(ffi, c0), B, T)
        _c_check(ffi, lib, rc)
        self._dropped = p > 0
        if p > 0:
            self.rng = oracle.dropout_skip(self.rng, 1)   # a pass's key
        lbh = L * B * H
        # copies now: backward overwrites the C logits with their gradient
        logits = _c_view(ffi, m.logits, T * B * V, self.ptr).reshape(T, B, V).copy()
        h_n = _c_view(ffi, m.h_n, lbh, self.ptr).reshape(L, B, H).copy()
        c_n = _c_view(ffi, m.c_n, lbh, self.ptr).reshape(L, B, H).copy() if self.cell == 'lstm' else None
        return m.loss, logits, h_n, c_n

    def backward(self):
        ffi, lib, m = self._ffi, self._lib, self.ptr
        _c_check(ffi, lib, lib.model_backward(m))
        lbh = self.L * m.B * self.H
        shape = (self.L, m.B, self.H)
        dh0 = _c_view(ffi, m.dh0, lbh, self.ptr).reshape(shape).copy()
        dc0 = _c_view(ffi, m.dc0, lbh, self.ptr).reshape(shape).copy() if self.cell == 'lstm' else None
        return dh0, dc0

    def masks(self):
        m = self.ptr
        if not self._dropped:
            return None
        B, T, L, H = m.B, m.T, self.L, self.H
        n = T * B * H
        bufs = [m.rnn.mask[l] for l in range(L - 1)] + [m.head_mask]   # C stores 0 or 1/(1-p)
        return [(_c_view(self._ffi, p, n, self.ptr) != 0).astype(np.float32).reshape(T, B, H) for p in bufs]

    def sample(self, prime, length, temperature, top_k, seed):
        ffi, lib = self._ffi, self._lib
        out = np.zeros(length, np.int32)
        rc = lib.model_sample(self.ptr, _c_array(ffi, out, 'int[]'), _c_array(ffi, prime, 'int[]'),
                              prime.size, length, temperature, top_k, seed % 2**64)
        _c_check(ffi, lib, rc)
        return out

    def adamw_step(self, lr, betas, eps, weight_decay, max_grad_norm):
        ffi, lib = self._ffi, self._lib
        norm = ffi.new('float*')
        # C skips the update when the norm is not finite
        rc = lib.model_step(self.ptr, lr, betas[0], betas[1], eps, weight_decay, max_grad_norm or 0.0, norm)
        _c_check(ffi, lib, rc)
        if not math.isfinite(norm[0]):
            raise _nonfinite(float(norm[0]))
        return float(norm[0])

    def adam_state(self):
        m = self.ptr
        if m.m == self._ffi.NULL or m.adam_t == 0:
            return None
        n = int(m.num_params)
        return (_views(self.shapes, _c_view(self._ffi, m.m, n, self.ptr)),
                _views(self.shapes, _c_view(self._ffi, m.v, n, self.ptr)),
                int(m.adam_t))

    def load_adam(self, mom1, mom2, t):
        ffi, lib, m = self._ffi, self._lib, self.ptr
        if not t:
            if m.m != ffi.NULL:
                _c_view(ffi, m.m, int(m.num_params), self.ptr)[...] = 0.0
                _c_view(ffi, m.v, int(m.num_params), self.ptr)[...] = 0.0
            m.adam_t = 0
            return
        if m.m == ffi.NULL:
            # C allocates the moments at its first step: take one with zero gradients and lr = 0,
            # which leaves every parameter as it is (p * 1 - 0), then overwrite what it wrote
            grads = self.flat_grad.copy()
            self.flat_grad[...] = 0.0
            norm = ffi.new('float*')
            rc = lib.model_step(m, 0.0, 0.9, 0.999, 1e-8, 0.0, 0.0, norm)
            self.flat_grad[...] = grads
            _c_check(ffi, lib, rc)
        n = int(m.num_params)
        _load_into(_views(self.shapes, _c_view(ffi, m.m, n, self.ptr)), mom1, 'exp_avg')
        _load_into(_views(self.shapes, _c_view(ffi, m.v, n, self.ptr)), mom2, 'exp_avg_sq')
        m.adam_t = int(t)


class _CudaLM(_Engine):
    """The GPU model (pyrnn._cuda.GpuLM) behind host copies of its state. It is made at the first
    forward, for that batch shape (cuDNN's descriptors are per shape), and made again with all of
    the state moved over when the shape changes. Until it exists the host copies are the model:
    parameters and gradients, AdamW's moments and step count, the dropout generator. Once it does,
    it holds them: parameters and gradients sync lazily both ways (the side written last is copied
    over before the other is used), moments and the generator are read from it when asked for."""

    def __init__(self, cell, V, E, H, L, seed):
        self._cuda = _load_backend('cuda')[1]
        self.cell, self.dims = cell, (V, E, H, L)
        self._shapes = oracle.lm_param_shapes(cell, V, E, H, L)
        self._host = _HostParams(self._shapes)
        self._rng = oracle.dropout_state(seed)
        self._adam = (None, None, 0)   # m, v (flat) and t while no GPU model holds them
        self._gpu = None
        self._newer = {'params': 'host', 'grads': None}   # the side written last; None: both agree

    def _pull(self, what):
        """The host copy of 'params' or 'grads', up to date."""
        if self._gpu is not None and self._newer[what] == 'gpu':
            if what == 'params':
                self._host.flat[...] = self._gpu.get_params()
            else:
                self._host.flat_grad[...] = self._gpu.get_grads()
            self._newer[what] = None

    def _push(self):
        """The GPU's copies, up to date."""
        if self._newer['params'] == 'host':
            self._gpu.set_params(self._host.flat)
        if self._newer['grads'] == 'host':
            self._gpu.set_grads(self._host.flat_grad)
        self._newer = {k: None if side == 'host' else side for k, side in self._newer.items()}

    @property
    def params(self):
        self._pull('params')
        return self._host.params

    @property
    def grads(self):
        # writable views: whatever the caller does to them (clip_grad_norm_, say) goes to the GPU
        self._pull('grads')
        self._newer['grads'] = 'host'
        return self._host.grads

    def touched(self):
        self._pull('params')
        self._newer['params'] = 'host'

    def zero_grad(self):
        self._host.zero_grad()
        if self._gpu is not None:
            self._gpu.zero_grad()
            self._newer['grads'] = None

    @property
    def rng(self):
        return self._gpu.rng() if self._gpu is not None else self._rng

    def set_rng(self, state):
        if self._gpu is not None:
            self._gpu.set_rng(state)
        else:
            self._rng = int(state)

    def _gpu_for(self, B, T, p):
        """The GPU model for this batch shape, with the whole state on it."""
        if self._gpu is not None and (self._gpu.B, self._gpu.T) == (B, T):
            return self._gpu
        if self._gpu is not None:   # the state comes home, then goes to the new model
            self._pull('params')
            self._pull('grads')
            self._adam, self._rng = self._gpu.adam(), self._gpu.rng()
            self._gpu.close()
            self._gpu = None
        gpu = self._cuda.GpuLM(self.cell, *self.dims, B, T, dropout=p)
        gpu.set_adam(*self._adam)
        gpu.set_rng(self._rng)
        self._gpu, self._adam = gpu, (None, None, 0)
        self._newer = {'params': 'host', 'grads': 'host'}
        return gpu

    def forward(self, inputs, targets, h0, c0, p):
        gpu = self._gpu_for(*inputs.shape, p)
        self._push()
        gpu.set_dropout(p)
        loss = gpu.forward(inputs, targets, h0, c0)
        h_n, c_n = gpu.final_state()
        return loss, gpu.logits(), h_n, c_n

    def backward(self):
        self._push()
        self._gpu.backward()
        self._newer['grads'] = 'gpu'
        return self._gpu.dstate()

    def masks(self):
        return None   # cuDNN's masks stay inside cuDNN

    def sample(self, prime, length, temperature, top_k, seed):
        # one token at a time: the CPU is the right place, and the GPU model's shape stays put
        cpu = _CLM(self.cell, *self.dims, 0)
        _load_into(cpu.params, self.params)
        return cpu.sample(prime, length, temperature, top_k, seed)

    def adamw_step(self, lr, betas, eps, weight_decay, max_grad_norm):
        if self._gpu is None:
            raise RuntimeError("backend='cuda' makes its GPU model at the first forward: step needs a forward and "
                               "backward first")
        self._push()
        norm = self._gpu.step(lr, betas[0], betas[1], eps, weight_decay, max_grad_norm or 0.0)
        if not math.isfinite(norm):   # the device skipped the update
            raise _nonfinite(norm)
        self._newer['params'] = 'gpu'
        return norm

    def adam_state(self):
        m, v, t = self._gpu.adam() if self._gpu is not None else self._adam
        return (_views(self._shapes, m), _views(self._shapes, v), t) if t else None

    def load_adam(self, mom1, mom2, t):
        m = v = None
        if t:
            n = oracle.num_params(self._shapes)
            m, v = np.zeros(n, np.float32), np.zeros(n, np.float32)
            _load_into(_views(self._shapes, m), mom1, 'exp_avg')
            _load_into(_views(self._shapes, v), mom2, 'exp_avg_sq')
        if self._gpu is not None:
            self._gpu.set_adam(m, v, t)
        else:
            self._adam = (m, v, int(t))


# ----------------------------------------------------------------------------- char LM

class CharLM(_Module):
    """Embedding(V, E) -> cell stack (L layers, hidden H) -> Linear(H, V) -> mean cross-entropy.

    cell: 'rnn', 'rnn_relu', 'lstm' or 'gru' ('rnn' with nonlinearity='relu' is 'rnn_relu').
    Parameters are initialised from `seed` with oracle.init_lm_params (embedding N(0, 1), every
    other tensor U(-1/sqrt(H), 1/sqrt(H))) for every backend, so all backends start identical
    (seed=None: drawn from the OS, kept in .seed). dropout p applies, in training mode (the default,
    as in torch), to the output of every layer (between layers and before the head); eval() turns
    it off. Masks come from the C trainer's generator seeded from `seed` on every backend, so C and
    numpy draw the same masks. vocab (a pyrnn.Vocab or its bytes) lets sample() take and return
    text; save() stores it.

    state_dict() names are those of the torch module Embedding -> nn.<CELL>(batch_first=True)
    -> Linear stored as attributes embedding / rnn / head.
    """

    def __init__(self, cell, vocab_size, embed_size, hidden_size, num_layers=1,
                 nonlinearity='tanh', seed=None, backend='c', dropout=0.0, vocab=None):
        if cell not in oracle.CELLS:
            raise ValueError(f'unknown cell {cell!r}, expected one of {oracle.CELLS}')
        if oracle.rnn_cell(nonlinearity) == 'rnn_relu':
            if cell not in ('rnn', 'rnn_relu'):
                raise ValueError(f"nonlinearity='relu' only applies to cell 'rnn', got cell {cell!r}")
            cell = 'rnn_relu'
        V, E, H, L = _sizes(vocab_size=vocab_size, embed_size=embed_size, hidden_size=hidden_size,
                            num_layers=num_layers)
        self.cell, self.vocab_size, self.embed_size, self.hidden_size, self.num_layers = cell, V, E, H, L
        self._dropout, self.seed, self.backend = _dropout(dropout), _seed(seed), _check_backend(backend)
        self.vocab = None if vocab is None else Vocab(vocab)
        if self.vocab is not None and len(self.vocab) != V:
            raise ValueError(f'vocab has {len(self.vocab)} symbols, vocab_size is {V}')
        _check_params(repr(self), oracle.lm_num_params(cell, V, E, H, L))
        self._engine = {'numpy': _NumpyLM, 'c': _CLM, 'cuda': _CudaLM}[backend](cell, V, E, H, L, self.seed)
        self.load_state_dict(oracle.init_lm_params(cell, V, E, H, L, seed=self.seed))
        self.train(True)
        self._can_backward = False
        self.loss = self.logits = self.h_n = self.c_n = self.dh0 = self.dc0 = None

    def __repr__(self):
        return (f'CharLM({self.cell!r}, vocab_size={self.vocab_size}, embed_size={self.embed_size}, '
                f'hidden_size={self.hidden_size}, num_layers={self.num_layers}, '
                f'dropout={self.dropout}, backend={self.backend!r})')

    @property
    def dropout(self):
        return self._dropout

    @dropout.setter
    def dropout(self, p):
        self._dropout = _dropout(p)
        self._engine.set_mode(self.training, self._dropout)

    @property
    def state(self):
        """The final state of the last forward in the form hx takes: h_n, or (h_n, c_n) for an LSTM."""
        return (self.h_n, self.c_n) if self.cell == 'lstm' else self.h_n

    def train(self, mode=True):
        super().train(mode)
        self._engine.set_mode(self.training, self.dropout)
        return self

    def __call__(self, inputs, targets=None, hx=None):
        return self.forward(inputs, targets, hx)

    def forward(self, inputs, targets=None, hx=None):
        """inputs, targets: int (B, T) token ids in [0, vocab_size); hx: h0 (L, B, H), or (h0, c0)
        for an LSTM; None = zeros. Returns the mean cross-entropy (float), or None without
        targets (then only logits and states are computed and backward is not possible).
        Sets .logits (B, T, V), .h_n and .c_n (LSTM), all copies: pass (h_n[, c_n]) back as hx
        to carry the state across batches (truncated BPTT)."""
        V, E, H, L = self.vocab_size, self.embed_size, self.hidden_size, self.num_layers
        inputs = _tokens(inputs, 'inputs', V)
        B, T = inputs.shape
        if targets is not None:
            targets = _tokens(targets, 'targets', V, inputs.shape)
        h0, c0 = _states(hx, 'hx', self.cell == 'lstm', (L, B, H))
        self._can_backward = False
        self.loss = self.dh0 = self.dc0 = None
        _check_memory(4 * T * B * (3 * V + L * H * (oracle.gates(self.cell) + 4) + 2 * E),
                      f'a forward of {B} x {T} tokens through {self!r}')
        p = self.dropout if self.training else 0.0
        loss, logits, self.h_n, self.c_n = self._engine.forward(inputs, targets, h0, c0, p)
        self.logits = np.ascontiguousarray(logits.transpose(1, 0, 2))
        if targets is None:
            return None
        self._can_backward = True
        self.loss = float(loss)
        return self.loss

    def backward(self):
        """Gradient of the last forward's mean loss; accumulates into .grad and sets .dh0
        (and .dc0 for an LSTM), the gradients w.r.t. hx. One backward per forward."""
        if not self._can_backward:
            raise RuntimeError('backward needs a forward with targets first (and one backward per forward)')
        self._can_backward = False
        self.dh0, self.dc0 = self._engine.backward()

    def step(self, lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, max_grad_norm=None):
        """pyrnn.AdamW(self, lr, betas, eps, weight_decay).step() after global-norm clipping of a copy
        of the gradients (torch's clip_grad_norm_; skipped when max_grad_norm is None or 0), so
        .grad is left as backward made it. Returns the gradient norm before clipping. A non-finite
        gradient raises FloatingPointError and changes nothing."""
        clip = 0.0 if max_grad_norm is None else float(max_grad_norm)
        if not clip >= 0:
            raise ValueError(f'max_grad_norm must be >= 0 or None, got {max_grad_norm!r}')
        return AdamW(self, lr, betas, eps, weight_decay)._step(clip)

    def save(self, path, vocab=None):
        """Writes a checkpoint train_cpu can sample from or resume (docs/formats.md): parameters,
        vocabulary (the model's, or vocab: a pyrnn.Vocab or its bytes), dropout, the dropout
        generator's state and AdamW's moments and step count, so that load() continues exactly."""
        from .checkpoint import write_checkpoint
        vocab = self.vocab if vocab is None else Vocab(vocab)
        if vocab is None:
            raise ValueError('this model has no vocabulary, and a checkpoint stores one to turn token ids '
                             'back into text: create it with CharLM(..., vocab=pyrnn.Vocab(...)) or call '
                             'save(path, vocab=...)')
        if len(vocab) != self.vocab_size:
            raise ValueError(f'vocab has {len(vocab)} symbols, the model {self.vocab_size}')
        try:
            adam = self._engine.adam_state()
        except NotImplementedError as e:
            warnings.warn(f'{e}: the checkpoint holds no AdamW state', RuntimeWarning, stacklevel=2)
            adam = None
        m, v, t = (None, None, 0) if adam is None else (oracle.flatten(adam[0]), oracle.flatten(adam[1]), adam[2])
        write_checkpoint(path, self.cell, self.state_dict(), vocab.symbols, m=m, v=v, adam_t=t,
                         dropout=self.dropout, rng=self._engine.rng)

    @classmethod
    def load(cls, path, backend='c', with_vocab=False):
        """The model a checkpoint holds (written by save(), train_cpu or train_gpu): parameters,
        vocabulary, dropout, AdamW state and the dropout generator's state; with_vocab=True returns
        (model, vocab bytes)."""
        from .checkpoint import read_checkpoint
        ck = read_checkpoint(path)
        model = cls(ck['cell'], ck['vocab_size'], ck['embed_size'], ck['hidden_size'], ck['num_layers'],
                    seed=0, backend=backend, dropout=ck['dropout'], vocab=ck['vocab'])
        model.load_state_dict(ck['params'])
        model.seed = None                     # the weights and the generator's state come from the file
        model._engine.set_rng(ck['rng'])
        if ck['adam_t'] > 0:
            shapes = oracle.lm_param_shapes(ck['cell'], ck['vocab_size'], ck['embed_size'], ck['hidden_size'],
                                            ck['num_layers'])
            try:
                model._engine.load_adam(oracle.unflatten(ck['m'], shapes), oracle.unflatten(ck['v'], shapes),
                                        ck['adam_t'])
            except NotImplementedError as e:
                warnings.warn(f'{e}: AdamW starts afresh', RuntimeWarning, stacklevel=2)
        return (model, ck['vocab']) if with_vocab else model

    def sample(self, prime, length, temperature=1.0, top_k=0, seed=0):
        """Feeds the prime through the network, then draws `length` tokens, carrying the state.
        prime: token ids, or a str when the model has a vocabulary (then the result is a str too).
        temperature > 0 divides the logits; top_k > 0 keeps the k most likely (top_k=1: argmax)."""
        text = isinstance(prime, str)
        if text:
            if self.vocab is None:
                raise ValueError('a str prime needs a model with a vocabulary (CharLM(..., vocab=...)); '
                                 'without one, pass token ids')
            prime = self.vocab.encode(prime)
        prime = _numpy(prime).reshape(-1)
        if prime.size < 1:
            raise ValueError('prime needs at least one token')
        prime = _tokens(prime[None], 'prime', self.vocab_size)[0]
        length = _int('length', length, lo=0)
        temperature = float(temperature)
        if not (math.isfinite(temperature) and temperature > 0):
            raise ValueError(f'temperature must be > 0 and finite, got {temperature} '
                             '(for the most likely token at every step use top_k=1)')
        top_k = min(_int('top_k', top_k, lo=0), self.vocab_size)
        seed = _int('seed', seed, lo=0)
        self._can_backward = False   # sampling runs forward passes of its own
        out = self._engine.sample(prime, length, temperature, top_k, seed)
        return self.vocab.decode(out) if text else out

    def _dropout_masks(self):
        """The 0/1 dropout masks of the last forward, L arrays (T, B, H) (the first L-1 between
        layers, the last before the head) in oracle.lm_forward's convention, or None. For tests."""
        return self._engine.masks()
