"""backend='c': the C core (c/train_rnn.c, the cffi extension pyrnn._crnn) behind the engine
interface (pyrnn.engine). Parameters, gradients and activations are C's, handed to NumPy as views;
AdamW is C's adamw_update, the dropout masks are C's.

No lock around the C core: each model and layer owns its scratch, and the error message is per
thread, so threads may call into separate modules at once (cffi releases the GIL during calls).
"""
import math

import numpy as np

from . import oracle
from .engine import CellEngine, LMEngine, StackEngine, views
from .validate import load_into, nonfinite_gradient


def load():
    """(ffi, lib) of the C extension."""
    try:
        from . import _crnn
    except ImportError as e:
        raise RuntimeError('the C backend is not built (pyrnn._crnn is missing): run '
                           '`pip install --no-build-isolation -e .` or `make install`, '
                           "or use backend='numpy'") from e
    return _crnn.ffi, _crnn.lib


def set_num_threads(n):
    """OpenMP threads used by the C backend (no effect if it was built without OpenMP). OpenMP keeps
    this per thread: a Python thread that runs models calls it for itself (or set OMP_NUM_THREADS)."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f'set_num_threads: n must be a positive int, got {n!r}')
    _, lib = load()
    lib.pyrnn_set_num_threads(int(n))


def get_num_threads():
    _, lib = load()
    return int(lib.pyrnn_get_num_threads())


def isa():
    """The kernel set new C models take: 'avx512bf16', 'avx512', 'avx2', 'sse2', 'neon' or 'portable'.
    The extension holds one set per instruction set it was built for and takes the widest this CPU
    runs, unless PYRNN_ISA (read at import) or set_isa names one."""
    ffi, lib = load()
    name = lib.pyrnn_isa()
    if name == ffi.NULL:
        raise RuntimeError(ffi.string(lib.pyrnn_last_error()).decode())
    return ffi.string(name).decode()


def set_isa(name=None):
    """Models made from now on take the kernel set `name` (None: the widest this CPU runs); ValueError
    when this build or this CPU has no such set. Models already made keep theirs."""
    ffi, lib = load()
    if lib.pyrnn_set_isa(ffi.NULL if name is None else str(name).encode()) != 0:
        raise ValueError(ffi.string(lib.pyrnn_last_error()).decode())


def isa_list(cpu_only=False):
    """The kernel sets this build holds (cpu_only: those this CPU runs), narrowest first."""
    ffi, lib = load()
    return ffi.string(lib.pyrnn_isa_list(int(cpu_only))).decode().split(', ')


# ----------------------------------------------------------------------------- C memory

class _CMemory:
    """n floats of C memory as numpy sees them (the array interface), holding `owner`, the object
    that frees them: a view handed out (parameters(), grad) keeps the C model alive, so it can never
    read freed memory, however long the user keeps it."""

    def __init__(self, ffi, ptr, n, owner):
        self.owner = owner
        self.__array_interface__ = {'version': 3, 'shape': (n,), 'typestr': '<f4',
                                    'data': (int(ffi.cast('uintptr_t', ptr)), False)}


def c_view(ffi, ptr, n, owner):
    """float32 view of n floats owned by C, alive as long as owner (the gc'd pointer that frees them)."""
    return np.asarray(_CMemory(ffi, ptr, n, owner))


def c_array(ffi, a, ctype='float[]'):
    """Pointer into a numpy array (None: NULL); the caller keeps `a` alive for the duration of the call."""
    return ffi.NULL if a is None else ffi.from_buffer(ctype, a, require_writable=False)


def c_check(ffi, lib, rc):
    """A C call's non-zero status as RuntimeError(C's message)."""
    if rc != 0:
        raise RuntimeError(ffi.string(lib.pyrnn_last_error()).decode(errors='replace'))


def _reversal(lengths, T, B):
    """Gather indices (T, B) that reverse each sequence within its own length and leave its padding
    in place: the reverse direction is the forward recurrence over them. Their own inverse."""
    t = np.arange(T)[:, None]
    n = np.full(B, T) if lengths is None else lengths
    return np.where(t < n, n - 1 - t, t), np.arange(B)


# ----------------------------------------------------------------------------- stacks and cells

class CStack(StackEngine):
    """The stack as one single-layer C Layer per layer and direction, joined in NumPy: the reverse
    direction runs over its input reversed within each sequence's length (so it starts at the
    sequence's own last step; C holds ended sequences' state), the directions' outputs are
    concatenated, C's dropout applies between layers. Each Layer keeps the activations of its last
    forward; a tape that is not the last one forward ran (a cell unwinding LIFO) is run forward
    again before backward. AdamW is C's adamw_update over each Layer's buffers, the moments in
    NumPy, one pair of flat vectors per Layer."""

    def __init__(self, cell, input_size, hidden_size, num_layers, bias, bidirectional, seed, bf16=False,
                 suffix=oracle.layer_suffix):
        ffi, lib = self._ffi, self._lib = load()
        D = 2 if bidirectional else 1
        self.cell, self.H, self.L, self.D = cell, hidden_size, num_layers, D
        self.units, self.shapes, self.params, self.grads = [], [], {}, {}
        for l in range(num_layers):
            in_l = input_size if l == 0 else D * hidden_size
            for d in range(D):
                ptr = lib.layer_new(oracle.cell_id(cell), in_l, hidden_size, 1, int(bias))
                if ptr == ffi.NULL:
                    c_check(ffi, lib, -1)
                owner = ffi.gc(ptr, lib.layer_free)
                lib.layer_set_bf16(ptr, int(bf16))
                self.units.append(owner)
                shapes = oracle.layer_param_shapes(cell, in_l, hidden_size, bias, suffix(l, d))
                self.shapes.append(shapes)
                n = int(ptr.num_params)
                self.params.update(views(shapes, c_view(ffi, ptr.params, n, owner)))
                self.grads.update(views(shapes, c_view(ffi, ptr.grads, n, owner)))
        self.rng = int(lib.pyrnn_dropout_state(seed % 2**64))
        self.moments, self.adam_t = None, 0   # one (m, v) pair of flat float32 vectors per unit
        self._current = None   # the tape whose activations the Layers hold

    def zero_grad(self):
        for u in self.units:
            self._lib.layer_zero_grad(u)

    def forward(self, x, h0, c0, lengths, p):
        T, B = x.shape[:2]
        key = None
        if p > 0 and self.L > 1:
            rng = self._ffi.new('uint64_t*', self.rng)
            key = int(self._lib.pyrnn_dropout_key(rng))
            self.rng = int(rng[0])
        tape = dict(x=x, h0=h0, c0=c0, p=p, key=key, masks=[None] * (self.L - 1),
                    lengths=None if lengths is None else lengths.astype(np.int32),
                    reverse=_reversal(lengths, T, B) if self.D == 2 else None)
        return self._run(tape) + (tape,)

    def _run(self, tape):
        self._current = None   # the Layers' activations are the tape's only once every call succeeded
        ffi, lib, L, D, H = self._ffi, self._lib, self.L, self.D, self.H
        x, h0, c0, rev = tape['x'], tape['h0'], tape['c0'], tape['reverse']
        lengths = ffi.NULL if tape['lengths'] is None else c_array(ffi, tape['lengths'], 'int[]')
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
                    self.units[k], c_array(ffi, out), c_array(ffi, h_n[k]),
                    ffi.NULL if c_n is None else c_array(ffi, c_n[k]), c_array(ffi, xin),
                    ffi.NULL if h0 is None else c_array(ffi, h0[k]),
                    ffi.NULL if c0 is None else c_array(ffi, c0[k]), lengths, B, T)
                c_check(ffi, lib, rc)
                outs.append(out[rev] if d else out)
            inp = np.ascontiguousarray(np.concatenate(outs, axis=2) if D == 2 else outs[0])
            if tape['key'] is not None and l < L - 1:   # site l + 1: layer l + 1's input
                y, mask = np.empty_like(inp), np.empty_like(inp)
                lib.pyrnn_dropout_forward(c_array(ffi, y), c_array(ffi, mask), c_array(ffi, inp), tape['p'],
                                          tape['key'], l + 1, T, B, D * H)
                inp, tape['masks'][l] = y, mask
        self._current = tape
        return inp, h_n, c_n

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
            if tape['key'] is not None and l < L - 1:
                dy = dy * tape['masks'][l]   # 0 or 1/(1-p), as C's dropout_backward
            dinp = None
            for d in range(D):
                k = l * D + d
                dy_d = dy[..., d * H:(d + 1) * H]
                dy_d = np.ascontiguousarray(dy_d[rev] if d else dy_d)
                dx = np.empty((T, B, tape['x'].shape[2] if l == 0 else D * H), np.float32)
                rc = lib.layer_backward_api(
                    self.units[k], c_array(ffi, dx), c_array(ffi, dh0[k]),
                    ffi.NULL if dc0 is None else c_array(ffi, dc0[k]), c_array(ffi, dy_d),
                    ffi.NULL if dh_n is None else c_array(ffi, dh_n[k]),
                    ffi.NULL if dc_n is None else c_array(ffi, dc_n[k]))
                c_check(ffi, lib, rc)
                dx = dx[rev] if d else dx
                dinp = dx if dinp is None else dinp + dx
            dy = dinp
        return np.ascontiguousarray(dy), dh0, dc0

    def adamw_step(self, lr, betas, eps, weight_decay, max_grad_norm):
        ffi, lib = self._ffi, self._lib
        norm = math.sqrt(sum(lib.pyrnn_sum_squares(u.grads, u.num_params) for u in self.units))
        if not math.isfinite(norm):
            raise nonfinite_gradient(norm)
        scale = min(max_grad_norm / (norm + 1e-6), 1.0) if max_grad_norm else 1.0
        if self.moments is None:
            self.moments = [(np.zeros(u.num_params, np.float32), np.zeros(u.num_params, np.float32))
                            for u in self.units]
        self.adam_t += 1
        for u, (m, v) in zip(self.units, self.moments):
            lib.adamw_update(u.params, c_array(ffi, m), c_array(ffi, v), u.grads, u.num_params, scale, self.adam_t,
                             lr, betas[0], betas[1], eps, weight_decay)
        return norm

    def adam_state(self):
        if not self.adam_t:
            return None
        m, v = {}, {}
        for shapes, (mk, vk) in zip(self.shapes, self.moments):
            m.update(views(shapes, mk))
            v.update(views(shapes, vk))
        return m, v, self.adam_t

    def load_adam(self, m, v, t):
        if not t:
            self.moments, self.adam_t = None, 0
            return
        moments = []
        for shapes in self.shapes:
            n = oracle.num_params(shapes)
            mk, vk = np.zeros(n, np.float32), np.zeros(n, np.float32)
            load_into(views(shapes, mk), {k: m[k] for k in shapes}, 'exp_avg')
            load_into(views(shapes, vk), {k: v[k] for k in shapes}, 'exp_avg_sq')
            moments.append((mk, vk))
        self.moments, self.adam_t = moments, int(t)


class CCell(CStack, CellEngine):
    """A cell is a one-layer, one-direction stack run for one step."""

    def __init__(self, cell, input_size, hidden_size, bias):
        super().__init__(cell, input_size, hidden_size, 1, bias, False, 0, suffix=lambda l, d: '')

    def step(self, x, h, c):
        out, h_n, c_n, tape = self.forward(x[None], None if h is None else h[None],
                                           None if c is None else c[None], None, 0.0)
        return out[0], None if c_n is None else c_n[0], tape

    def step_backward(self, tape, dh, dc):
        dx, dh0, dc0 = self.backward(tape, dh[None], None, None if dc is None else dc[None])
        return dx[0], dh0[0], None if dc0 is None else dc0[0]


# ----------------------------------------------------------------------------- char LM

class CLM(LMEngine):
    """The C Model: parameters, gradients, AdamW moments and the dropout generator all live in it."""

    def __init__(self, cell, V, E, H, L, seed, bf16=False):
        ffi, lib = self._ffi, self._lib = load()
        config = ffi.new('Config*')
        config.cell, config.vocab_size, config.embed_size = oracle.cell_id(cell), V, E
        config.hidden_size, config.n_layers = H, L
        ptr = lib.model_new(config[0])
        if ptr == ffi.NULL:
            c_check(ffi, lib, -1)
        self.ptr = ffi.gc(ptr, lib.model_free)
        lib.model_set_bf16(ptr, int(bf16))
        ptr.rng = lib.pyrnn_dropout_state(seed % 2**64)   # the weights are set by CharLM
        self.cell, self.H, self.L, self.V = cell, H, L, V
        self.shapes = oracle.lm_param_shapes(cell, V, E, H, L)
        n = int(ptr.num_params)
        self.params = views(self.shapes, c_view(ffi, ptr.params, n, self.ptr))
        self.grads = views(self.shapes, c_view(ffi, ptr.grads, n, self.ptr))
        self._dropped = False

    @property
    def rng(self):
        return int(self.ptr.rng)

    def set_rng(self, state):
        self.ptr.rng = state

    def zero_grad(self):
        self._lib.model_zero_grad(self.ptr)

    def set_mode(self, training, dropout):
        self._lib.model_set_training(self.ptr, int(training), dropout)

    def set_regularisers(self, locked, weight_drop, embed_dropout):
        self._lib.model_set_regularisers(self.ptr, int(locked), weight_drop, embed_dropout)

    def forward(self, inputs, targets, h0, c0, p):
        ffi, lib, m = self._ffi, self._lib, self.ptr
        B, T = inputs.shape
        H, L, V = self.H, self.L, self.V
        rc = lib.model_forward(m, c_array(ffi, inputs, 'int[]'), c_array(ffi, targets, 'int[]'),
                               c_array(ffi, h0), c_array(ffi, c0), B, T)
        c_check(ffi, lib, rc)
        self._dropped = p > 0
        lbh = L * B * H
        # copies now: backward overwrites the C logits with their gradient
        logits = c_view(ffi, m.logits, T * B * V, self.ptr).reshape(T, B, V).copy()
        h_n = c_view(ffi, m.h_n, lbh, self.ptr).reshape(L, B, H).copy()
        c_n = c_view(ffi, m.c_n, lbh, self.ptr).reshape(L, B, H).copy() if self.cell == 'lstm' else None
        return m.loss, logits, h_n, c_n

    def backward(self):
        ffi, lib, m = self._ffi, self._lib, self.ptr
        c_check(ffi, lib, lib.model_backward(m))
        lbh = self.L * m.B * self.H
        shape = (self.L, m.B, self.H)
        dh0 = c_view(ffi, m.dh0, lbh, self.ptr).reshape(shape).copy()
        dc0 = c_view(ffi, m.dc0, lbh, self.ptr).reshape(shape).copy() if self.cell == 'lstm' else None
        return dh0, dc0

    def masks(self):
        m = self.ptr
        if not self._dropped:
            return None
        B, T, L, H = m.B, m.T, self.L, self.H
        n = T * B * H
        bufs = [m.rnn.mask[l] for l in range(L - 1)] + [m.head_mask]   # C stores 0 or 1/(1-p)
        return [(c_view(self._ffi, p, n, self.ptr) != 0).astype(np.float32).reshape(T, B, H) for p in bufs]

    def sample(self, prime, length, temperature, top_k, seed):
        ffi, lib = self._ffi, self._lib
        out = np.zeros(length, np.int32)
        rc = lib.model_sample(self.ptr, c_array(ffi, out, 'int[]'), c_array(ffi, prime, 'int[]'),
                              prime.size, length, temperature, top_k, seed % 2**64)
        c_check(ffi, lib, rc)
        return out

    def adamw_step(self, lr, betas, eps, weight_decay, max_grad_norm):
        ffi, lib = self._ffi, self._lib
        norm = ffi.new('float*')
        # C skips the update when the norm is not finite
        rc = lib.model_step(self.ptr, lr, betas[0], betas[1], eps, weight_decay, max_grad_norm or 0.0, norm)
        c_check(ffi, lib, rc)
        if not math.isfinite(norm[0]):
            raise nonfinite_gradient(float(norm[0]))
        return float(norm[0])

    def _moments(self):
        ffi, m, n = self._ffi, self.ptr, int(self.ptr.num_params)
        return views(self.shapes, c_view(ffi, m.m, n, self.ptr)), views(self.shapes, c_view(ffi, m.v, n, self.ptr))

    def adam_state(self):
        if self.ptr.m == self._ffi.NULL or self.ptr.adam_t == 0:
            return None
        return self._moments() + (int(self.ptr.adam_t),)

    def load_adam(self, mom1, mom2, t):
        ffi, lib, m = self._ffi, self._lib, self.ptr
        if not t:
            if m.m != ffi.NULL:
                for a in self._moments():
                    for x in a.values():
                        x[...] = 0.0
            m.adam_t = 0
            return
        c_check(ffi, lib, lib.model_adam_alloc(m))
        m1, m2 = self._moments()
        load_into(m1, mom1, 'exp_avg')
        load_into(m2, mom2, 'exp_avg_sq')
        m.adam_t = int(t)
