"""The GPU model (cuda/gpu_model.cuh, built as lib/libpyrnn_cuda.so by `make lib_gpu` from
cuda/lib_rnn.cu), loaded with ctypes: no compiler and no package beyond numpy at import time.

    from pyrnn import _cuda
    m = _cuda.GpuLM('lstm', V=65, E=128, H=256, L=2, B=32, T=64)    # tf32=False: exact fp32 math
    m.set_params(flat)                       # float32 (P,), torch state_dict order; AdamW untouched
    loss = m.forward(inputs, targets, h0, c0)  # tokens (B, T); h0 / c0 (L, B, H) or None
    m.zero_grad(); m.backward(); norm = m.step(lr=2e-3, max_norm=1.0)
    loss, norm = m.train_step(inputs, targets, lr=2e-3, max_norm=1.0)   # train_gpu's step, one wait
    m.set_adam(m1, m2, t); m.adam(); m.set_rng(state); m.rng(); m.set_dropout(0.2)
    m.about                                  # device, driver, libraries, math, cuDNN algorithm and why

algo picks cuDNN's RNN algorithm: 'auto' (default, or $PYRNN_CUDNN_ALGO), 'standard',
'persist_static' or 'persist_small_h' (see cuda/cudnn_rnn.cuh); m.algo is the one in use.

CALLS is the library's API, once: (name, result type, argument types) of each function of the
extern "C" block in cuda/lib_rnn.cu. `lib` is the loaded library with those types set; GpuLM wraps
it for NumPy arrays. The library is <repo>/lib/libpyrnn_cuda.so, or the file named by the
environment variable PYRNN_CUDA_LIB. Importing raises ImportError when it is missing, cannot be
loaded, or lacks a function of CALLS (built from older sources).
"""
import ctypes
import os
from ctypes import POINTER, c_char_p, c_float, c_int, c_uint64, c_void_p

import numpy as np

from .oracle import CELLS, lm_num_params

_F, _I = POINTER(c_float), POINTER(c_int)
CALLS = [
    ('gpu_lm_new', c_void_p, [c_int, c_int, c_int, c_int, c_int, c_int, c_int, c_int, c_char_p, c_float]),
    ('gpu_lm_free', None, [c_void_p]),
    ('gpu_last_error', c_char_p, []),
    ('gpu_lm_about', c_char_p, [c_void_p]),
    ('gpu_lm_algo', c_char_p, [c_void_p]),
    ('gpu_lm_set_params', c_int, [c_void_p, _F]),
    ('gpu_lm_get_params', c_int, [c_void_p, _F]),
    ('gpu_lm_get_grads', c_int, [c_void_p, _F]),
    ('gpu_lm_set_grads', c_int, [c_void_p, _F]),
    ('gpu_lm_set_adam', c_int, [c_void_p, _F, _F, c_int]),
    ('gpu_lm_get_adam', c_int, [c_void_p, _F, _F, _I]),
    ('gpu_lm_set_rng', c_int, [c_void_p, c_uint64]),
    ('gpu_lm_get_rng', c_int, [c_void_p, POINTER(c_uint64)]),
    ('gpu_lm_set_dropout', c_int, [c_void_p, c_float]),
    ('gpu_lm_forward', c_int, [c_void_p, _F, _I, _I, _F, _F]),
    ('gpu_lm_get_logits', c_int, [c_void_p, _F]),
    ('gpu_lm_get_final_state', c_int, [c_void_p, _F, _F]),
    ('gpu_lm_backward', c_int, [c_void_p]),
    ('gpu_lm_get_dstate', c_int, [c_void_p, _F, _F]),
    ('gpu_lm_zero_grad', c_int, [c_void_p]),
    ('gpu_lm_step', c_int, [c_void_p, _F, c_float, c_float, c_float, c_float, c_float, c_float]),
    ('gpu_lm_train_step', c_int, [c_void_p, _F, _F, _I, _I, c_float, c_float, c_float, c_float, c_float, c_float]),
]


def library_path():
    env = os.environ.get('PYRNN_CUDA_LIB')
    if env:
        return env
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return os.path.join(repo, 'lib', 'libpyrnn_cuda.so')


def load(path):
    """The library at path with CALLS' types set on each function; ImportError when it cannot be."""
    if not os.path.isfile(path):
        raise ImportError(f'pyrnn cuda backend: {path} not found; build it with `make lib_gpu` '
                          '(needs nvcc, cuDNN 9 and cuBLAS: `make cuda_deps`), or point PYRNN_CUDA_LIB at it')
    try:
        lib = ctypes.CDLL(path)
    except OSError as e:   # e.g. libcudnn.so.9 not found by the library's runpath
        raise ImportError(f'pyrnn cuda backend: cannot load {path}: {e}') from e
    missing = [name for name, _, _ in CALLS if not hasattr(lib, name)]
    if missing:
        raise ImportError(f'pyrnn cuda backend: {path} lacks {", ".join(missing)}: it was built from older '
                          'sources; rebuild it with `make lib_gpu`')
    for name, restype, argtypes in CALLS:
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = restype, argtypes
    return lib


lib = load(library_path())


def last_error():
    return (lib.gpu_last_error() or b'').decode('utf-8', 'replace')


def _check(status, what):
    if status != 0:
        raise RuntimeError(f'{what}: {last_error()}')


def _floats(a):
    return None if a is None else a.ctypes.data_as(_F)


def _ints(a):
    return None if a is None else a.ctypes.data_as(_I)


class GpuLM:
    """Embedding(V, E) -> L recurrent layers (cuDNN) -> Linear(H, V) -> mean cross-entropy, on the GPU,
    for one fixed batch shape (B, T). Arrays in and out are NumPy; every output is a fresh copy.
    dropout is the rate of training forwards (set_dropout changes it; 0 in eval mode)."""

    def __init__(self, cell, V, E, H, L, B, T, tf32=False, algo=None, dropout=0.0):
        cell = CELLS[cell] if isinstance(cell, int) else cell
        if cell not in CELLS:
            raise ValueError(f'unknown cell {cell!r}, expected one of {CELLS}')
        self.cell, self.V, self.E, self.H, self.L, self.B, self.T = cell, V, E, H, L, B, T
        self.num_params = lm_num_params(cell, V, E, H, L)
        self._ptr = lib.gpu_lm_new(CELLS.index(cell), V, E, H, L, B, T, 1 if tf32 else 0,
                                   algo.encode() if algo else None, float(dropout))
        if not self._ptr:
            raise RuntimeError(f'gpu_lm_new: {last_error()}')
        self.dropout = float(dropout)
        self.about = lib.gpu_lm_about(self._ptr).decode('utf-8', 'replace')
        self.algo = lib.gpu_lm_algo(self._ptr).decode()

    def close(self):
        if getattr(self, '_ptr', None) and lib is not None:   # lib is None at interpreter exit
            lib.gpu_lm_free(self._ptr)
            self._ptr = None

    __del__ = close

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- helpers
    def _f32(self, a, n, name):
        a = np.ascontiguousarray(a, dtype=np.float32)
        if a.size != n:
            raise ValueError(f'{name}: expected {n} floats, got shape {a.shape}')
        return a

    def _tokens(self, a, name):
        a = np.ascontiguousarray(a, dtype=np.int32)
        if a.shape != (self.B, self.T):
            raise ValueError(f'{name}: expected shape {(self.B, self.T)}, got {a.shape}')
        return a

    def _state(self, a, name):
        return None if a is None else self._f32(a, self.L * self.B * self.H, name)

    def _get(self, fn, n, what):
        a = np.empty(n, np.float32)
        _check(fn(self._ptr, _floats(a)), what)
        return a

    # -- parameters, gradients, AdamW, the generator, dropout
    def set_params(self, params):
        """Flat float32 params (torch state_dict order); AdamW's moments stay as they are."""
        _check(lib.gpu_lm_set_params(self._ptr, _floats(self._f32(params, self.num_params, 'params'))), 'set_params')

    def get_params(self):
        return self._get(lib.gpu_lm_get_params, self.num_params, 'get_params')

    def get_grads(self):
        return self._get(lib.gpu_lm_get_grads, self.num_params, 'get_grads')

    def set_grads(self, grads):
        _check(lib.gpu_lm_set_grads(self._ptr, _floats(self._f32(grads, self.num_params, 'grads'))), 'set_grads')

    def adam(self):
        """(m, v, t): AdamW's moments (P,) and its step count (0: none taken)."""
        m, v, t = np.empty(self.num_params, np.float32), np.empty(self.num_params, np.float32), c_int(0)
        _check(lib.gpu_lm_get_adam(self._ptr, _floats(m), _floats(v), ctypes.byref(t)), 'adam')
        return m, v, t.value

    def set_adam(self, m, v, t):
        """AdamW's moments and step count; m, v None: zeros."""
        m = None if m is None else self._f32(m, self.num_params, 'm')
        v = None if v is None else self._f32(v, self.num_params, 'v')
        _check(lib.gpu_lm_set_adam(self._ptr, _floats(m), _floats(v), int(t)), 'set_adam')

    def rng(self):
        """The run's generator; reading it restarts cuDNN's dropout generator from it (see lib_rnn.cu)."""
        state = c_uint64(0)
        _check(lib.gpu_lm_get_rng(self._ptr, ctypes.byref(state)), 'rng')
        return state.value

    def set_rng(self, state):
        _check(lib.gpu_lm_set_rng(self._ptr, int(state) % 2**64), 'set_rng')

    def set_dropout(self, p):
        if float(p) != self.dropout:
            _check(lib.gpu_lm_set_dropout(self._ptr, float(p)), 'set_dropout')
            self.dropout = float(p)

    # -- training
    def forward(self, inputs, targets=None, h0=None, c0=None):
        """Mean loss (0.0 without targets); readies backward when targets are given."""
        x = self._tokens(inputs, 'inputs')
        y = self._tokens(targets, 'targets') if targets is not None else None
        h0, c0 = self._state(h0, 'h0'), self._state(c0, 'c0')
        loss = c_float(0.0)
        _check(lib.gpu_lm_forward(self._ptr, ctypes.byref(loss), _ints(x), _ints(y), _floats(h0), _floats(c0)),
               'forward')
        return loss.value

    def logits(self):
        return self._get(lib.gpu_lm_get_logits, self.T * self.B * self.V, 'logits').reshape(self.T, self.B, self.V)

    def _state_pair(self, getter, what):
        """(h-like, c-like), each (L, B, H), from a C getter; the second is None unless LSTM."""
        n, shape = self.L * self.B * self.H, (self.L, self.B, self.H)
        h = np.empty(n, np.float32)
        c = np.empty(n, np.float32) if self.cell == 'lstm' else None
        _check(getter(self._ptr, _floats(h), _floats(c)), what)
        return h.reshape(shape), (c.reshape(shape) if c is not None else None)

    def final_state(self):
        """(h_n, c_n); c_n is None unless LSTM."""
        return self._state_pair(lib.gpu_lm_get_final_state, 'final_state')

    def zero_grad(self):
        _check(lib.gpu_lm_zero_grad(self._ptr), 'zero_grad')

    def backward(self):
        _check(lib.gpu_lm_backward(self._ptr), 'backward')

    def dstate(self):
        """(dh0, dc0) of the last backward; dc0 is None unless LSTM."""
        return self._state_pair(lib.gpu_lm_get_dstate, 'dstate')

    def step(self, lr, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01, max_norm=0.0):
        """Global-norm clip (max_norm 0 = off) and one AdamW step; returns the norm before clipping."""
        norm = c_float(0.0)
        _check(lib.gpu_lm_step(self._ptr, ctypes.byref(norm), lr, beta1, beta2, eps, weight_decay, max_norm), 'step')
        return norm.value

    def train_step(self, inputs, targets, lr, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01, max_norm=0.0):
        """train_gpu's step: forward from the carried state (zeros at first, then each step's final
        state), backward, clip, AdamW, with one wait on the GPU; returns (loss, norm before clipping)."""
        x, y = self._tokens(inputs, 'inputs'), self._tokens(targets, 'targets')
        loss, norm = c_float(0.0), c_float(0.0)
        _check(lib.gpu_lm_train_step(self._ptr, ctypes.byref(loss), ctypes.byref(norm), _ints(x), _ints(y),
                                     lr, beta1, beta2, eps, weight_decay, max_norm), 'train_step')
        return loss.value, norm.value
