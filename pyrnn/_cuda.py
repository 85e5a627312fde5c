"""The GPU model (cuda/train_rnn.cu built as lib/libpyrnn_cuda.so by `make lib_gpu`), loaded with
cffi's ABI mode: no compiler needed at import time, only the library.

    from pyrnn import _cuda
    m = _cuda.GpuLM('lstm', V=65, E=128, H=256, L=2, B=32, T=64)    # tf32=False: exact fp32 math
    m.set_params(flat)                       # float32 (P,), torch state_dict order
    loss = m.forward(inputs, targets, h0, c0)  # tokens (B, T); h0 / c0 (L, B, H) or None
    m.zero_grad(); m.backward(); norm = m.step(lr=2e-3, max_norm=1.0)
    loss, norm = m.train_step(inputs, targets, lr=2e-3, max_norm=1.0)   # train_gpu's step, one wait
    m.about                                  # device, driver, libraries, math, cuDNN algorithm and why

algo picks cuDNN's RNN algorithm: 'auto' (default, or $PYRNN_CUDNN_ALGO), 'standard',
'persist_static' or 'persist_small_h' (see cuda/train_rnn.cu); m.algo is the one in use.

`ffi` and `lib` are the raw binding (the functions of the extern "C" block in cuda/train_rnn.cu);
GpuLM wraps them for NumPy arrays. The library is <repo>/lib/libpyrnn_cuda.so, or the file named
by the environment variable PYRNN_CUDA_LIB. Importing raises ImportError when it is missing.
"""
import os

import numpy as np
from cffi import FFI

from .oracle import CELLS, lm_num_params

CDEF = """
void* gpu_lm_new(int cell, int V, int E, int H, int L, int B, int T, int tf32, const char* algo, float dropout);
void gpu_lm_free(void* self);
const char* gpu_last_error(void);
const char* gpu_lm_about(void* self);
const char* gpu_lm_algo(void* self);
int gpu_lm_set_params(void* self, const float* params);
int gpu_lm_get_params(void* self, float* params);
int gpu_lm_get_grads(void* self, float* grads);
int gpu_lm_forward(void* self, float* loss, const int* inputs, const int* targets, const float* h0, const float* c0);
int gpu_lm_get_logits(void* self, float* logits);
int gpu_lm_get_final_state(void* self, float* h_n, float* c_n);
int gpu_lm_backward(void* self);
int gpu_lm_get_dstate(void* self, float* dh0, float* dc0);
int gpu_lm_zero_grad(void* self);
int gpu_lm_step(void* self, float* grad_norm, float lr, float beta1, float beta2, float eps, float weight_decay,
                float max_norm);
int gpu_lm_train_step(void* self, float* loss, float* grad_norm, const int* inputs, const int* targets, float lr,
                      float beta1, float beta2, float eps, float weight_decay, float max_norm);
"""


def library_path():
    env = os.environ.get('PYRNN_CUDA_LIB')
    if env:
        return env
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return os.path.join(repo, 'lib', 'libpyrnn_cuda.so')


def _load():
    path = library_path()
    if not os.path.isfile(path):
        raise ImportError(f'pyrnn cuda backend: {path} not found; build it with `make lib_gpu` '
                          '(needs nvcc, cuDNN 9 and cuBLAS: `make cuda_deps`), or point PYRNN_CUDA_LIB at it')
    ffi = FFI()
    ffi.cdef(CDEF)
    try:
        lib = ffi.dlopen(path)
    except OSError as e:   # e.g. libcudnn.so.9 not found by the library's rpath
        raise ImportError(f'pyrnn cuda backend: cannot load {path}: {e}') from e
    return ffi, lib


ffi, lib = _load()


def last_error():
    return ffi.string(lib.gpu_last_error()).decode('utf-8', 'replace')


def _check(status, what):
    if status != 0:
        raise RuntimeError(f'{what}: {last_error()}')


class GpuLM:
    """Embedding(V, E) -> L recurrent layers (cuDNN) -> Linear(H, V) -> mean cross-entropy, on the GPU,
    for one fixed batch shape (B, T). Arrays in and out are NumPy; every output is a fresh copy."""

    def __init__(self, cell, V, E, H, L, B, T, tf32=False, algo=None):
        cell = CELLS[cell] if isinstance(cell, int) else cell
        if cell not in CELLS:
            raise ValueError(f'unknown cell {cell!r}, expected one of {CELLS}')
        self.cell, self.V, self.E, self.H, self.L, self.B, self.T = cell, V, E, H, L, B, T
        self.num_params = lm_num_params(cell, V, E, H, L)
        self._ptr = lib.gpu_lm_new(CELLS.index(cell), V, E, H, L, B, T, 1 if tf32 else 0,
                                   algo.encode() if algo else ffi.NULL, 0.0)
        if self._ptr == ffi.NULL:
            raise RuntimeError(f'gpu_lm_new: {last_error()}')
        self.about = ffi.string(lib.gpu_lm_about(self._ptr)).decode('utf-8', 'replace')
        self.algo = ffi.string(lib.gpu_lm_algo(self._ptr)).decode()

    def close(self):
        if getattr(self, '_ptr', ffi.NULL) != ffi.NULL:
            lib.gpu_lm_free(self._ptr)
            self._ptr = ffi.NULL

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
        if a is None:
            return ffi.NULL, None
        a = self._f32(a, self.L * self.B * self.H, name)
        return ffi.from_buffer('float[]', a), a

    def _out(self, n):
        a = np.empty(n, np.float32)
        return a, ffi.from_buffer('float[]', a)

    # -- parameters
    def set_params(self, params):
        """Flat float32 params (torch state_dict order); also resets the AdamW state."""
        p = self._f32(params, self.num_params, 'params')
        _check(lib.gpu_lm_set_params(self._ptr, ffi.from_buffer('float[]', p)), 'set_params')

    def get_params(self):
        a, buf = self._out(self.num_params)
        _check(lib.gpu_lm_get_params(self._ptr, buf), 'get_params')
        return a

    def get_grads(self):
        a, buf = self._out(self.num_params)
        _check(lib.gpu_lm_get_grads(self._ptr, buf), 'get_grads')
        return a

    # -- training
    def forward(self, inputs, targets=None, h0=None, c0=None):
        """Mean loss (0.0 without targets); readies backward when targets are given."""
        x = self._tokens(inputs, 'inputs')
        y = self._tokens(targets, 'targets') if targets is not None else None
        h0p, h0a = self._state(h0, 'h0')
        c0p, c0a = self._state(c0, 'c0')
        loss = ffi.new('float*')
        status = lib.gpu_lm_forward(self._ptr, loss, ffi.from_buffer('int[]', x),
                                    ffi.from_buffer('int[]', y) if y is not None else ffi.NULL, h0p, c0p)
        del h0a, c0a
        _check(status, 'forward')
        return float(loss[0])

    def logits(self):
        a, buf = self._out(self.T * self.B * self.V)
        _check(lib.gpu_lm_get_logits(self._ptr, buf), 'logits')
        return a.reshape(self.T, self.B, self.V)

    def _state_pair(self, getter, what):
        """(h-like, c-like), each (L, B, H), from a C getter; the second is None unless LSTM."""
        n, shape = self.L * self.B * self.H, (self.L, self.B, self.H)
        h, hb = self._out(n)
        c, cb = self._out(n) if self.cell == 'lstm' else (None, ffi.NULL)
        _check(getter(self._ptr, hb, cb), what)
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
        norm = ffi.new('float*')
        _check(lib.gpu_lm_step(self._ptr, norm, lr, beta1, beta2, eps, weight_decay, max_norm), 'step')
        return float(norm[0])

    def train_step(self, inputs, targets, lr, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01, max_norm=0.0):
        """train_gpu's step: forward from the carried state (zeros at first, then each step's final
        state), backward, clip, AdamW, with one wait on the GPU; returns (loss, norm before clipping)."""
        x, y = self._tokens(inputs, 'inputs'), self._tokens(targets, 'targets')
        loss, norm = ffi.new('float*'), ffi.new('float*')
        _check(lib.gpu_lm_train_step(self._ptr, loss, norm, ffi.from_buffer('int[]', x), ffi.from_buffer('int[]', y),
                                     lr, beta1, beta2, eps, weight_decay, max_norm), 'train_step')
        return float(loss[0]), float(norm[0])
