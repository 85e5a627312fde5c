"""torch-like modules over the C trainer (backend='c') or the NumPy oracle (backend='numpy').

    rnn = pyrnn.LSTM(10, 32, num_layers=2, batch_first=True, seed=0)
    out, (h_n, c_n) = rnn(x)                     # x: float (B, T, 10)
    dx, (dh0, dc0) = rnn.backward(dout)          # grads accumulate into rnn.grad
    lm = pyrnn.CharLM('gru', vocab_size=65, embed_size=32, hidden_size=128)
    loss = lm.forward(inputs, targets); lm.zero_grad(); lm.backward(); lm.step(1e-3)

Arrays come out as NumPy float32, each a fresh copy; floating inputs of any precision (or
torch tensors) are converted to float32, token ids must be integers.
Gradients follow the C core's convention, which is torch's: backward *accumulates* into
gradients that the caller zeroed first (they start at zero; call zero_grad() between steps).
Parameters live in one flat float32 vector per module (owned by C for backend='c'), in torch
state_dict order, so state_dict() / load_state_dict() are plain slices of it.
"""
import threading

import numpy as np

from . import oracle

__all__ = ['RNN', 'LSTM', 'GRU', 'CharLM', 'set_num_threads', 'get_num_threads']

BACKENDS = ('c', 'numpy', 'cuda')

# The C core keeps global scratch buffers and a global error message, and cffi releases the
# GIL during calls: serialise every call into it.
_lock = threading.RLock()


def _load_backend(backend):
    """(ffi, lib) of the C extension; for 'cuda', (ffi, the pyrnn._cuda module)."""
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
        return _cuda.ffi, _cuda
    raise AssertionError(backend)


def _check_backend(backend):
    if backend not in BACKENDS:
        raise ValueError(f'unknown backend {backend!r}, expected one of {BACKENDS}')
    return backend


def set_num_threads(n):
    """OpenMP threads used by the C backend (no effect if it was built without OpenMP)."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f'set_num_threads: n must be a positive int, got {n!r}')
    _, lib = _load_backend('c')
    with _lock:
        lib.pyrnn_set_num_threads(int(n))


def get_num_threads():
    _, lib = _load_backend('c')
    return int(lib.pyrnn_get_num_threads())


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
    """hx -> (h, c) float32 arrays of `shape` or None. LSTM takes a pair, e.g. (h0, c0)."""
    if hx is None:
        return None, None
    if lstm:
        if not isinstance(hx, (tuple, list)) or len(hx) != 2:
            raise TypeError(f'{name} must be a pair ({parts[0]}, {parts[1]}) for an LSTM, '
                            f'got {type(hx).__name__}')
        return (_floats(hx[0], f'{name}[0] ({parts[0]})', shape),
                _floats(hx[1], f'{name}[1] ({parts[1]})', shape))
    if isinstance(hx, (tuple, list)):
        raise TypeError(f'{name} must be a single array {parts[0]} (only LSTMs take a pair)')
    return _floats(hx, name, shape), None


class _Params:
    """Named views into a flat parameter vector and its gradient (torch state_dict order)."""

    def __init__(self, shapes, params, grads):
        self.shapes = dict(shapes)
        self.flat, self.flat_grad = params, grads
        self.p, self.g, off = {}, {}, 0
        for name, shape in self.shapes.items():
            n = int(np.prod(shape))
            self.p[name] = params[off:off + n].reshape(shape)
            self.g[name] = grads[off:off + n].reshape(shape)
            off += n
        assert off == params.size == grads.size, (off, params.size, grads.size)

    def state_dict(self):
        return {k: v.copy() for k, v in self.p.items()}

    def grad(self):
        return {k: v.copy() for k, v in self.g.items()}

    def load(self, d):
        if not hasattr(d, 'keys'):
            raise TypeError(f'state_dict must be a mapping, got {type(d).__name__}')
        missing = [k for k in self.shapes if k not in d]
        extra = [k for k in d if k not in self.shapes]
        if missing or extra:
            raise ValueError(f'state_dict keys do not match: missing {missing}, unexpected {extra}')
        # check everything before copying anything, so a bad dict leaves the module unchanged
        arrays = {k: _floats(d[k], f'state_dict[{k!r}]', self.shapes[k]) for k in self.shapes}
        for k, a in arrays.items():
            self.p[k][...] = a


def _c_array(ffi, a, ctype='float[]'):
    # pointer into a numpy array; the caller keeps `a` alive for the duration of the call
    return ffi.NULL if a is None else ffi.from_buffer(ctype, a, require_writable=False)


def _c_view(ffi, ptr, n):
    """float32 view of n floats owned by C; only ever kept inside the module that owns them."""
    return np.frombuffer(ffi.buffer(ptr, 4 * n), dtype=np.float32)


def _c_check(ffi, lib, rc):
    if rc != 0:
        raise RuntimeError(ffi.string(lib.pyrnn_last_error()).decode(errors='replace'))


# ----------------------------------------------------------------------------- layer API

class _RNNBase:
    """Recurrent stack with exactly torch.nn.{RNN,LSTM,GRU} semantics (no dropout, one direction).

    Initialised like torch, every tensor ~ U(-1/sqrt(H), 1/sqrt(H)), from
    numpy.random.default_rng(seed) (seed=None: fresh entropy), through oracle.init_stack_params.
    """
    _cell = None

    def __init__(self, input_size, hidden_size, num_layers=1, bias=True, batch_first=False,
                 backend='c', seed=None, *, _cell=None):
        for name, v in (('input_size', input_size), ('hidden_size', hidden_size),
                        ('num_layers', num_layers)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f'{name} must be a positive int, got {v!r}')
        self.cell = _cell or self._cell
        self.input_size, self.hidden_size, self.num_layers = int(input_size), int(hidden_size), int(num_layers)
        self.bias, self.batch_first = bool(bias), bool(batch_first)
        self.backend = _check_backend(backend)
        if backend == 'cuda':
            raise ValueError("the layer API runs on backend 'c' or 'numpy'; backend='cuda' is for CharLM")
        shapes = oracle.stack_param_shapes(self.cell, self.input_size, self.hidden_size,
                                           self.num_layers, self.bias)
        if backend == 'numpy':
            n = sum(int(np.prod(s)) for s in shapes.values())
            self._ptr = None
            self._params = _Params(shapes, np.zeros(n, np.float32), np.zeros(n, np.float32))
        else:
            self._ffi, self._lib = _load_backend(backend)
            with _lock:
                ptr = self._lib.layer_new(oracle.CELLS.index(self.cell), self.input_size,
                                          self.hidden_size, self.num_layers, int(self.bias))
                if ptr == self._ffi.NULL:
                    _c_check(self._ffi, self._lib, -1)
            self._ptr = self._ffi.gc(ptr, self._lib.layer_free)
            n = int(ptr.num_params)
            self._params = _Params(shapes, _c_view(self._ffi, ptr.params, n),
                                   _c_view(self._ffi, ptr.grads, n))
        init = oracle.init_stack_params(self.cell, self.input_size, self.hidden_size,
                                        self.num_layers, self.bias, rng=np.random.default_rng(seed))
        self._params.load(init)
        self._last = None  # what backward needs from the last forward

    # torch-style accessors
    def state_dict(self):
        """Copies of the parameters under torch's names (weight_ih_l0, ...)."""
        return self._params.state_dict()

    def load_state_dict(self, state_dict):
        """Copy parameters in; keys and shapes must match exactly (torch tensors accepted)."""
        self._params.load(state_dict)

    @property
    def grad(self):
        """Copies of the accumulated parameter gradients, same names as state_dict()."""
        return self._params.grad()

    def zero_grad(self):
        self._params.flat_grad[...] = 0.0

    def __call__(self, x, hx=None):
        return self.forward(x, hx)

    def __repr__(self):
        extra = f', nonlinearity={self.cell[4:]!r}' if self.cell == 'rnn_relu' else ''
        return (f'{type(self).__name__}({self.input_size}, {self.hidden_size}, '
                f'num_layers={self.num_layers}{extra}, bias={self.bias}, '
                f'batch_first={self.batch_first}, backend={self.backend!r})')

    def forward(self, x, hx=None):
        """x: (T, B, input_size), (B, T, input_size) with batch_first, or unbatched (T, input_size).
        hx: h0 (L, B, H) (unbatched: (L, H)); LSTM: a pair (h0, c0). None = zeros.
        Returns (output, h_n), LSTM (output, (h_n, c_n)); output (T, B, H) or (B, T, H)."""
        lstm = self.cell == 'lstm'
        x = _floats(x, 'x')
        L, H = self.num_layers, self.hidden_size
        unbatched = x.ndim == 2
        if x.ndim not in (2, 3):
            raise ValueError(f'x must be 3-D (T, B, input_size){" with batch_first (B, T, ...)" if self.batch_first else ""}'
                             f' or unbatched 2-D (T, input_size), got shape {x.shape}')
        if x.shape[-1] != self.input_size:
            raise ValueError(f'x has shape {x.shape}: last dimension must be input_size={self.input_size}')
        if 0 in x.shape:
            raise ValueError(f'x has shape {x.shape}: sequence length and batch must be non-zero')
        if unbatched:
            x = x[:, None]
        elif self.batch_first:
            x = x.transpose(1, 0, 2)
        x = np.ascontiguousarray(x)
        T, B = x.shape[:2]
        h0, c0 = _states(hx, 'hx', lstm, (L, H) if unbatched else (L, B, H))
        if unbatched:  # (L, H) -> (L, 1, H)
            h0, c0 = (None if s is None else np.ascontiguousarray(s[:, None]) for s in (h0, c0))
        self._last = None  # a failed forward must not leave backward with stale shapes
        if self._ptr is None:
            # the oracle's cache keeps its inputs: copy them, as C does, so that editing the
            # caller's arrays before backward changes nothing
            x, h0, c0 = (None if a is None else a.copy() for a in (x, h0, c0))
            out, h_n, c_n, cache = oracle.stack_forward(dict(self._params.p), self.cell, x, h0, c0)
        else:
            ffi, lib = self._ffi, self._lib
            out = np.empty((T, B, H), np.float32)
            h_n = np.empty((L, B, H), np.float32)
            c_n = np.empty((L, B, H), np.float32) if lstm else None
            with _lock:
                rc = lib.layer_forward_api(self._ptr, _c_array(ffi, out), _c_array(ffi, h_n),
                                           _c_array(ffi, c_n), _c_array(ffi, x), _c_array(ffi, h0),
                                           _c_array(ffi, c0), ffi.NULL, B, T)
            _c_check(ffi, lib, rc)
            cache = None
        self._last = dict(T=T, B=B, unbatched=unbatched, cache=cache)
        out = out[:, 0] if unbatched else out.transpose(1, 0, 2) if self.batch_first else out
        if unbatched:
            h_n = np.ascontiguousarray(h_n[:, 0])
            c_n = None if c_n is None else np.ascontiguousarray(c_n[:, 0])
        out = np.ascontiguousarray(out)
        return (out, (h_n, c_n)) if lstm else (out, h_n)

    def backward(self, doutput, dh_n=None):
        """Backward of the last forward, given the gradients of some scalar w.r.t. its outputs:
        doutput (shaped like output) and dh_n (like h_n; None = zeros).
        Returns (dx, dh0); parameter gradients accumulate into .grad (see zero_grad)."""
        return self._backward(doutput, dh_n, 'dh_n')

    def _backward(self, doutput, dhx, dhx_name):
        if self._last is None:
            raise RuntimeError('backward called before forward')
        lstm = self.cell == 'lstm'
        T, B, unbatched = self._last['T'], self._last['B'], self._last['unbatched']
        L, H = self.num_layers, self.hidden_size
        if unbatched:
            dout = _floats(doutput, 'doutput', (T, H))[:, None]
            dh_n, dc_n = _states(dhx, dhx_name, lstm, (L, H), ('dh_n', 'dc_n'))
            dh_n, dc_n = (None if s is None else np.ascontiguousarray(s[:, None]) for s in (dh_n, dc_n))
        else:
            shape = (B, T, H) if self.batch_first else (T, B, H)
            dout = _floats(doutput, 'doutput', shape)
            if self.batch_first:
                dout = dout.transpose(1, 0, 2)
            dh_n, dc_n = _states(dhx, dhx_name, lstm, (L, B, H), ('dh_n', 'dc_n'))
        dout = np.ascontiguousarray(dout)
        if self._ptr is None:
            dx, dh0, dc0, grads = oracle.stack_backward(self._last['cache'], dout, dh_n, dc_n)
            for k, g in grads.items():
                self._params.g[k] += g
        else:
            ffi, lib = self._ffi, self._lib
            dx = np.empty((T, B, self.input_size), np.float32)
            dh0 = np.empty((L, B, H), np.float32)
            dc0 = np.empty((L, B, H), np.float32) if lstm else None
            with _lock:
                rc = lib.layer_backward_api(self._ptr, _c_array(ffi, dx), _c_array(ffi, dh0),
                                            _c_array(ffi, dc0), _c_array(ffi, dout),
                                            _c_array(ffi, dh_n), _c_array(ffi, dc_n))
            _c_check(ffi, lib, rc)
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
                 batch_first=False, backend='c', seed=None):
        if nonlinearity not in ('tanh', 'relu'):
            raise ValueError(f"unknown nonlinearity {nonlinearity!r}, expected 'tanh' or 'relu'")
        super().__init__(input_size, hidden_size, num_layers, bias, batch_first, backend, seed,
                         _cell='rnn' if nonlinearity == 'tanh' else 'rnn_relu')


class LSTM(_RNNBase):
    """torch.nn.LSTM (gates i, f, g, o); hx and the final state are pairs (h, c)."""
    _cell = 'lstm'

    def backward(self, doutput, dhx=None):
        """As RNN.backward, with dhx = (dh_n, dc_n) (None = zeros); returns (dx, (dh0, dc0))."""
        return self._backward(doutput, dhx, 'dhx')


class GRU(_RNNBase):
    """torch.nn.GRU (gates r, z, n; r multiplies W_hn h + b_hn)."""
    _cell = 'gru'


# ----------------------------------------------------------------------------- char LM

class CharLM:
    """Embedding(V, E) -> cell stack (L layers, hidden H) -> Linear(H, V) -> mean cross-entropy.

    cell: 'rnn', 'rnn_relu', 'lstm' or 'gru' ('rnn' with nonlinearity='relu' is 'rnn_relu').
    Parameters are initialised from `seed` with oracle.init_lm_params (embedding N(0, 1), every
    other tensor U(-1/sqrt(H), 1/sqrt(H))) for every backend, so all backends start identical.
    dropout p applies, in training mode (the default, as in torch), to the output of every layer
    (between layers and before the head); eval() turns it off. Masks are drawn by the backend
    (C: its own generator seeded from `seed`; numpy: numpy.random.default_rng(seed)).

    state_dict() names are those of the torch module Embedding -> nn.<CELL>(batch_first=True)
    -> Linear stored as attributes embedding / rnn / head.
    """

    def __init__(self, cell, vocab_size, embed_size, hidden_size, num_layers=1,
                 nonlinearity='tanh', seed=0, backend='c', dropout=0.0):
        if cell not in oracle.CELLS:
            raise ValueError(f'unknown cell {cell!r}, expected one of {oracle.CELLS}')
        if nonlinearity not in ('tanh', 'relu'):
            raise ValueError(f"unknown nonlinearity {nonlinearity!r}, expected 'tanh' or 'relu'")
        if nonlinearity == 'relu':
            if cell not in ('rnn', 'rnn_relu'):
                raise ValueError(f"nonlinearity='relu' only applies to cell 'rnn', got cell {cell!r}")
            cell = 'rnn_relu'
        for name, v in (('vocab_size', vocab_size), ('embed_size', embed_size),
                        ('hidden_size', hidden_size), ('num_layers', num_layers)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f'{name} must be a positive int, got {v!r}')
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f'dropout must be in [0, 1), got {dropout!r}')
        self.cell, self.backend = cell, _check_backend(backend)
        self.vocab_size, self.embed_size = int(vocab_size), int(embed_size)
        self.hidden_size, self.num_layers = int(hidden_size), int(num_layers)
        self.dropout, self.seed, self.training = float(dropout), int(seed), True
        V, E, H, L = self.vocab_size, self.embed_size, self.hidden_size, self.num_layers
        shapes = oracle.lm_param_shapes(cell, V, E, H, L)
        self._gpu = None
        if backend in ('numpy', 'cuda'):
            n = sum(int(np.prod(s)) for s in shapes.values())
            self._ptr = None
            if backend == 'cuda':
                # parameters stay mirrored here; the GPU model is made on the first forward, for
                # that batch shape (cuDNN descriptors are per shape), and synced lazily both ways
                self._cuda = _load_backend('cuda')[1]
                self._host_newer, self._gpu_newer = True, False
            self._params = _Params(shapes, np.zeros(n, np.float32), np.zeros(n, np.float32))
            self._rng = np.random.default_rng(seed)   # dropout masks
            self._adam = None                         # (m, v, t), created on the first step
        else:
            self._ffi, self._lib = _load_backend(backend)
            ffi, lib = self._ffi, self._lib
            config = ffi.new('Config*')
            config.cell, config.vocab_size, config.embed_size = oracle.CELLS.index(cell), V, E
            config.hidden_size, config.n_layers = H, L
            with _lock:
                ptr = lib.model_new(config[0])
                if ptr == ffi.NULL:
                    _c_check(ffi, lib, -1)
                lib.model_init(ptr, self.seed % 2**64)  # seeds C's dropout generator; weights set below
            self._ptr = ffi.gc(ptr, lib.model_free)
            n = int(ptr.num_params)
            self._params = _Params(shapes, _c_view(ffi, ptr.params, n), _c_view(ffi, ptr.grads, n))
        self._params.load(oracle.init_lm_params(cell, V, E, H, L, seed=self.seed))
        self.train(True)
        self._cache = None
        self._masks = None
        self.loss = self.logits = self.h_n = self.c_n = self.dh0 = self.dc0 = None

    def __repr__(self):
        return (f'CharLM({self.cell!r}, vocab_size={self.vocab_size}, embed_size={self.embed_size}, '
                f'hidden_size={self.hidden_size}, num_layers={self.num_layers}, '
                f'dropout={self.dropout}, backend={self.backend!r})')

    @property
    def num_params(self):
        return int(self._params.flat.size)

    @property
    def state(self):
        """The final state of the last forward in the form hx takes: h_n, or (h_n, c_n) for an LSTM."""
        return (self.h_n, self.c_n) if self.cell == 'lstm' else self.h_n

    def _sync_from_gpu(self):
        if self._gpu is not None and self._gpu_newer:
            self._params.flat[...] = self._gpu.get_params()
            self._gpu_newer = False

    def state_dict(self):
        """Copies of the parameters: embedding.weight, rnn.weight_ih_l0, ..., head.weight, head.bias."""
        self._sync_from_gpu()
        return self._params.state_dict()

    def load_state_dict(self, state_dict):
        """Copy parameters in (numpy arrays or torch tensors); keys and shapes must match exactly."""
        self._sync_from_gpu()
        self._params.load(state_dict)
        if self.backend == 'cuda':
            self._host_newer = True

    @property
    def grad(self):
        """Copies of the accumulated gradients, same names as state_dict()."""
        if self._gpu is not None:
            self._params.flat_grad[...] = self._gpu.get_grads()
        return self._params.grad()

    def train(self, mode=True):
        self.training = bool(mode)
        if self._ptr is not None:
            with _lock:
                self._lib.model_set_training(self._ptr, int(self.training), self.dropout)
        return self

    def eval(self):
        return self.train(False)

    def zero_grad(self):
        self._params.flat_grad[...] = 0.0
        if self._gpu is not None:
            self._gpu.zero_grad()

    def _gpu_for(self, B, T):
        """The GPU model for this batch shape (cuDNN descriptors are per shape)."""
        if self._gpu is None or (self._gpu.B, self._gpu.T) != (B, T):
            if self._gpu_newer:   # a new GpuLM starts with fresh AdamW moments: never drop them silently
                raise ValueError(f"backend='cuda' trains at one batch shape: this model took steps at "
                                 f"{(self._gpu.B, self._gpu.T)}, not {(B, T)}; save() and load() to change it")
            if self.training and self.dropout > 0:
                raise ValueError("backend='cuda' does not implement dropout; use dropout=0 or eval()")
            self._sync_from_gpu()
            self._gpu = self._cuda.GpuLM(self.cell, self.vocab_size, self.embed_size, self.hidden_size,
                                         self.num_layers, B, T)
            self._host_newer = True
        if self._host_newer:
            self._gpu.set_params(self._params.flat)
            self._host_newer = False
        return self._gpu

    def __call__(self, inputs, targets=None, hx=None):
        return self.forward(inputs, targets, hx)

    def forward(self, inputs, targets=None, hx=None):
        """inputs, targets: int (B, T) token ids in [0, vocab_size); hx: h0 (L, B, H), or (h0, c0)
        for an LSTM; None = zeros. Returns the mean cross-entropy (float), or None without
        targets (then only logits and states are computed and backward is not possible).
        Sets .logits (T, B, V), .h_n and .c_n (LSTM), all copies: pass (h_n[, c_n]) back as hx
        to carry the state across batches (truncated BPTT)."""
        V, H, L = self.vocab_size, self.hidden_size, self.num_layers
        lstm = self.cell == 'lstm'
        inputs = _tokens(inputs, 'inputs', V)
        B, T = inputs.shape
        if targets is not None:
            targets = _tokens(targets, 'targets', V, inputs.shape)
        h0, c0 = _states(hx, 'hx', lstm, (L, B, H))
        self._cache = self.loss = self.dh0 = self.dc0 = None
        dropping = self.training and self.dropout > 0
        if self.backend == 'cuda':
            gpu = self._gpu_for(B, T)
            loss = gpu.forward(inputs, targets, h0, c0)
            self.logits = gpu.logits()
            self.h_n, self.c_n = gpu.final_state()
            self._cache = (B, T) if targets is not None else None
        elif self._ptr is None:
            # copies: the oracle's cache keeps its inputs until backward (C copies them too)
            inputs, h0, c0 = (None if a is None else a.copy() for a in (inputs, h0, c0))
            self._masks = ([(self._rng.random((T, B, H)) >= self.dropout).astype(np.float32)
                            for _ in range(L)] if dropping else None)
            tg = targets if targets is not None else np.zeros_like(inputs)
            loss, logits, h_n, c_n, cache = oracle.lm_forward(
                dict(self._params.p), self.cell, inputs, tg, h0, c0,
                self.dropout if dropping else 0.0, self._masks)
            self._cache = cache if targets is not None else None
            self.logits, self.h_n = logits, h_n
            self.c_n = c_n
        else:
            ffi, lib, m = self._ffi, self._lib, self._ptr
            with _lock:
                rc = lib.model_forward(m, _c_array(ffi, inputs, 'int[]'),
                                       _c_array(ffi, targets, 'int[]'), _c_array(ffi, h0),
                                       _c_array(ffi, c0), B, T)
                _c_check(ffi, lib, rc)
                lbh = L * B * H
                # copies now: backward overwrites the C logits with their gradient
                self.logits = _c_view(ffi, m.logits, T * B * V).reshape(T, B, V).copy()
                self.h_n = _c_view(ffi, m.h_n, lbh).reshape(L, B, H).copy()
                self.c_n = _c_view(ffi, m.c_n, lbh).reshape(L, B, H).copy() if lstm else None
                loss = m.loss
            self._cache = (B, T) if targets is not None else None
        if targets is None:
            return None
        self.loss = float(loss)
        return self.loss

    def backward(self):
        """Gradient of the last forward's mean loss; accumulates into .grad and sets .dh0
        (and .dc0 for an LSTM), the gradients w.r.t. hx. One backward per forward."""
        if self._cache is None:
            raise RuntimeError('backward needs a forward with targets first (and one backward per forward)')
        L, H = self.num_layers, self.hidden_size
        if self.backend == 'cuda':
            self._gpu.backward()
            self.dh0, self.dc0 = self._gpu.dstate()
        elif self._ptr is None:
            grads, dh0, dc0 = oracle.lm_backward(self._cache)
            for k, g in grads.items():
                self._params.g[k] += g
            self.dh0, self.dc0 = dh0, dc0
        else:
            ffi, lib, m = self._ffi, self._lib, self._ptr
            B, T = self._cache
            with _lock:
                _c_check(ffi, lib, lib.model_backward(m))
                lbh = L * B * H
                self.dh0 = _c_view(ffi, m.dh0, lbh).reshape(L, B, H).copy()
                self.dc0 = _c_view(ffi, m.dc0, lbh).reshape(L, B, H).copy() if self.cell == 'lstm' else None
        self._cache = None

    def step(self, lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, max_grad_norm=None):
        """Global-norm clipping (torch clip_grad_norm_, skipped when max_grad_norm is None or 0),
        then one torch.optim.AdamW step; weight decay applies to every parameter. .grad is left
        unclipped. Returns the gradient norm before clipping."""
        clip = 0.0 if max_grad_norm is None else float(max_grad_norm)
        if clip < 0:
            raise ValueError(f'max_grad_norm must be >= 0 or None, got {max_grad_norm!r}')
        b1, b2 = (float(b) for b in betas)
        if self.backend == 'cuda':
            if self._gpu is None:
                raise RuntimeError('step needs a forward and backward first')
            norm = self._gpu.step(lr, b1, b2, eps, weight_decay, clip)
            self._gpu_newer = True
            return norm
        if self._ptr is None:
            if self._adam is None:
                self._adam = ({k: np.zeros_like(p) for k, p in self._params.p.items()},
                              {k: np.zeros_like(p) for k, p in self._params.p.items()}, 0)
            m, v, t = self._adam
            grads = self._params.grad()  # clip a copy: .grad stays as backward left it, as in C
            norm = oracle.clip_grad_norm(grads, clip)
            oracle.adamw_step(self._params.p, grads, m, v, t + 1, lr, (b1, b2), eps, weight_decay)
            self._adam = (m, v, t + 1)
            return norm
        ffi, lib = self._ffi, self._lib
        norm = ffi.new('float*')
        with _lock:
            rc = lib.model_step(self._ptr, lr, b1, b2, eps, weight_decay, clip, norm)
        _c_check(ffi, lib, rc)
        return float(norm[0])

    def save(self, path, vocab=None):
        """Writes a checkpoint train_cpu can sample from or resume (docs/formats.md): parameters,
        AdamW state when a step was taken (C and numpy backends), and vocab (bytes; default: byte i
        for token i)."""
        from .checkpoint import write_checkpoint
        vocab = bytes(range(self.vocab_size)) if vocab is None else bytes(vocab)
        if len(vocab) != self.vocab_size:
            raise ValueError(f'vocab has {len(vocab)} symbols, the model {self.vocab_size}')
        m = v = None
        t = 0
        if self._ptr is None and self._adam is not None:
            m, v, t = (oracle.flatten(self._adam[0]), oracle.flatten(self._adam[1]), self._adam[2])
        elif self._ptr is not None and self._ptr.m != self._ffi.NULL:
            n = self.num_params
            m, v, t = (_c_view(self._ffi, self._ptr.m, n).copy(), _c_view(self._ffi, self._ptr.v, n).copy(),
                       int(self._ptr.adam_t))
        write_checkpoint(path, self.cell, self.state_dict(), vocab, m=m, v=v, adam_t=t)

    @classmethod
    def load(cls, path, backend='c', with_vocab=False):
        """A model with the parameters of a checkpoint written by train_cpu, train_gpu or save();
        with_vocab=True returns (model, vocab bytes)."""
        from .checkpoint import read_checkpoint
        ck = read_checkpoint(path)
        model = cls(ck['cell'], ck['vocab_size'], ck['embed_size'], ck['hidden_size'], ck['num_layers'],
                    backend=backend)
        model.load_state_dict(ck['params'])
        return (model, ck['vocab']) if with_vocab else model

    def sample(self, prime, length, temperature=1.0, top_k=0, seed=0):
        """Feeds the prime token ids through the network, then draws `length` tokens, carrying the
        state. temperature <= 0 takes the argmax; top_k > 0 keeps the k most likely."""
        if self.backend == 'cuda':   # one token at a time: the CPU is the right place, and shapes stay put
            cpu = CharLM(self.cell, self.vocab_size, self.embed_size, self.hidden_size, self.num_layers)
            cpu.load_state_dict(self.state_dict())
            return cpu.sample(prime, length, temperature, top_k, seed)
        prime = _tokens(np.asarray(prime).reshape(1, -1), 'prime', self.vocab_size)
        if prime.size < 1:
            raise ValueError('prime needs at least one token')
        if isinstance(length, bool) or not isinstance(length, (int, np.integer)) or length < 0:
            raise ValueError(f'length must be an int >= 0, got {length!r}')
        if self._ptr is not None:
            ffi, lib = self._ffi, self._lib
            out = np.zeros(int(length), np.int32)
            with _lock:
                rc = lib.model_sample(self._ptr, _c_array(ffi, out, 'int[]'), _c_array(ffi, prime, 'int[]'),
                                      prime.size, int(length), float(temperature), int(top_k), int(seed) % 2**64)
            _c_check(ffi, lib, rc)
            return out
        # the oracle: one step at a time, numpy's generator
        rng, training, out = np.random.default_rng(seed), self.training, []
        self.eval()
        self.forward(prime)
        for _ in range(length):
            z = self.logits[-1, 0].astype(np.float64)
            if temperature <= 0:
                tok = int(np.argmax(z))
            else:
                if 0 < top_k < z.size:
                    z[z < np.sort(z)[-top_k]] = -np.inf
                p = np.exp((z - z.max()) / temperature)
                tok = int(rng.choice(z.size, p=p / p.sum()))
            out.append(tok)
            self.forward(np.array([[tok]], np.int32), hx=self.state)
        self.train(training)
        return np.array(out, np.int32)

    def _dropout_masks(self):
        """The 0/1 dropout masks of the last forward, L arrays (T, B, H) (the first L-1 between
        layers, the last before the head) in oracle.lm_forward's convention, or None. For tests."""
        if self._ptr is None:
            return None if self._masks is None else [mk.copy() for mk in self._masks]
        m = self._ptr
        if not (self.training and self.dropout > 0) or not m.B:
            return None
        B, T, L, H = m.B, m.T, self.num_layers, self.hidden_size
        n = T * B * H
        with _lock:  # C stores 0 or 1/(1-p)
            bufs = [m.rnn.mask[l] for l in range(L - 1)] + [m.head_mask]
            return [(_c_view(self._ffi, p, n) != 0).astype(np.float32).reshape(T, B, H) for p in bufs]
