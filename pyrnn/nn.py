"""torch-like modules: RNN, LSTM, GRU, their cells and CharLM, each over an engine that computes for
it (pyrnn.engine): the C core (backend='c'), the NumPy oracle (backend='numpy') or, for CharLM,
the GPU (backend='cuda').

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

A module checks its arguments (pyrnn.validate), picks its engine once, in __init__, from the
tables below, and keeps nothing the engine owns: parameters, gradients, AdamW moments, the
dropout generator. AdamW and clip_grad_norm_ are in pyrnn.optim.
"""
import math

import numpy as np

from . import oracle, validate
from .data import Vocab
from .engine_c import CCell, CLM, CStack
from .engine_cuda import CudaLM
from .engine_numpy import NumpyCell, NumpyLM, NumpyStack

__all__ = ['RNN', 'LSTM', 'GRU', 'RNNCell', 'LSTMCell', 'GRUCell', 'CharLM']

# each kind of module's engine per backend: the one place a backend is looked at
STACK_ENGINES = {'numpy': NumpyStack, 'c': CStack}
CELL_ENGINES = {'numpy': NumpyCell, 'c': CCell}
LM_ENGINES = {'numpy': NumpyLM, 'c': CLM, 'cuda': CudaLM}

# ----------------------------------------------------------------------------- modules

class Module:
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
        validate.load_into(self._engine.params, state_dict)

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


class _RNNBase(Module):
    """Recurrent stack with exactly torch.nn.{RNN,LSTM,GRU} semantics: bidirectional, dropout
    between layers in training mode, variable lengths as through pack_padded_sequence.

    Initialised like torch, every tensor ~ U(-1/sqrt(H), 1/sqrt(H)), from
    numpy.random.default_rng(seed) (seed=None: drawn from the OS and kept in .seed). Dropout masks
    are the C trainer's on both backends (oracle.dropout_masks transcribes its generator), seeded
    from the same seed.
    """

    def __init__(self, input_size, hidden_size, num_layers=1, bias=True, batch_first=False, dropout=0.0,
                 bidirectional=False, seed=None, backend='c', precision='fp32', *, cell):
        I, H, L = validate.sizes(input_size=input_size, hidden_size=hidden_size, num_layers=num_layers)
        self.cell = cell
        self.input_size, self.hidden_size, self.num_layers = I, H, L
        self.bias, self.batch_first, self.bidirectional = bool(bias), bool(batch_first), bool(bidirectional)
        self.dropout, self.seed = validate.dropout(dropout), validate.seed(seed)
        self.backend, self._precision = validate.backend(backend), precision
        bf16 = validate.precision(precision)
        if backend not in STACK_ENGINES:
            raise ValueError("the layer API runs on backend 'c' or 'numpy'; backend='cuda' is for CharLM")
        validate.check_params(repr(self), oracle.stack_num_params(cell, I, H, L, self.bias, self.bidirectional))
        self._engine = STACK_ENGINES[backend](cell, I, H, L, self.bias, self.bidirectional, self.seed, bf16=bf16)
        self.load_state_dict(oracle.init_stack_params(cell, I, H, L, self.bias, np.random.default_rng(self.seed),
                                                      bidirectional=self.bidirectional))
        self._last = None  # what backward needs from the last forward

    def __call__(self, x, hx=None, lengths=None):
        return self.forward(x, hx, lengths)

    @property
    def precision(self):
        """'fp32' or 'bf16' (the GEMMs' operands rounded to bfloat16), fixed at construction"""
        return self._precision

    def __repr__(self):
        extra = f', nonlinearity={self.cell[4:]!r}' if self.cell == 'rnn_relu' else ''
        return (f'{type(self).__name__}({self.input_size}, {self.hidden_size}, num_layers={self.num_layers}'
                f'{extra}, bias={self.bias}, batch_first={self.batch_first}, dropout={self.dropout}, '
                f'bidirectional={self.bidirectional}, backend={self.backend!r}{_precision_repr(self)})')

    def forward(self, x, hx=None, lengths=None):
        """x: (T, B, input_size), (B, T, input_size) with batch_first, or unbatched (T, input_size).
        hx: h0 (L*D, B, H) (unbatched: (L*D, H)), D = 2 if bidirectional; LSTM: a pair (h0, c0).
        None = zeros. lengths: B ints in [1, T] (batched input only), None = all T.
        Returns (output, h_n), LSTM (output, (h_n, c_n)); output (T, B, D*H) or (B, T, D*H),
        zero past each sequence's length; h_n (L*D, B, H), each sequence's state at its last step."""
        lstm = self.cell == 'lstm'
        x = validate.floats(x, 'x')
        D = 2 if self.bidirectional else 1
        LD, H = self.num_layers * D, self.hidden_size
        unbatched = x.ndim == 2
        if x.ndim not in (2, 3):
            first = ' with batch_first (B, T, ...)' if self.batch_first else ''
            raise ValueError(f'x must be 3-D (T, B, input_size){first} or unbatched 2-D (T, input_size), '
                             f'got shape {x.shape}')
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
            lengths = validate.lengths(lengths, B, T)
        h0, c0 = validate.states(hx, 'hx', lstm, (LD, H) if unbatched else (LD, B, H))
        if unbatched:  # (L*D, H) -> (L*D, 1, H)
            h0, c0 = (None if s is None else np.ascontiguousarray(s[:, None]) for s in (h0, c0))
        self._last = None  # a failed forward must not leave backward with stale shapes
        G = oracle.gates(self.cell)
        validate.check_memory(4 * T * B * (LD * H * (G + 4) + 2 * self.input_size),
                              f'a forward of {T} steps x {B} sequences through {self!r}')
        out, h_n, c_n, tape = self._engine.forward(x, h0, c0, lengths, self.dropout if self.training else 0.0)
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
            dout = validate.floats(doutput, 'doutput', (T, D * H))[:, None]
            dh, dc = validate.states(dh_n, 'dh_n', lstm, (LD, H), ('dh_n', 'dc_n'))
            dh, dc = (None if s is None else np.ascontiguousarray(s[:, None]) for s in (dh, dc))
        else:
            dout = validate.floats(doutput, 'doutput', (B, T, D * H) if self.batch_first else (T, B, D * H))
            if self.batch_first:
                dout = dout.transpose(1, 0, 2)
            dh, dc = validate.states(dh_n, 'dh_n', lstm, (LD, B, H), ('dh_n', 'dc_n'))
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
                 batch_first=False, dropout=0.0, bidirectional=False, seed=None, backend='c', precision='fp32'):
        super().__init__(input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional,
                         seed, backend, precision, cell=oracle.rnn_cell(nonlinearity))


class LSTM(_RNNBase):
    """torch.nn.LSTM (gates i, f, g, o); hx, the final state and dh_n are pairs (h, c)."""

    def __init__(self, input_size, hidden_size, num_layers=1, bias=True, batch_first=False, dropout=0.0,
                 bidirectional=False, seed=None, backend='c', precision='fp32'):
        super().__init__(input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional,
                         seed, backend, precision, cell='lstm')


class GRU(_RNNBase):
    """torch.nn.GRU (gates r, z, n; r multiplies W_hn h + b_hn)."""

    def __init__(self, input_size, hidden_size, num_layers=1, bias=True, batch_first=False, dropout=0.0,
                 bidirectional=False, seed=None, backend='c', precision='fp32'):
        super().__init__(input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional,
                         seed, backend, precision, cell='gru')


# ----------------------------------------------------------------------------- cells

class _CellBase(Module):
    """One step of torch.nn.{RNN,LSTM,GRU}Cell. Each forward in training mode records its inputs;
    backward undoes the most recent call not yet undone, so a Python loop of forward calls followed
    by as many backward calls is BPTT, as torch's autograd would run it. In eval() mode forward
    records nothing (as under torch.no_grad()). Initialised as torch, U(-1/sqrt(H), 1/sqrt(H))."""

    def __init__(self, input_size, hidden_size, bias=True, seed=None, backend='c', *, cell):
        I, H = validate.sizes(input_size=input_size, hidden_size=hidden_size)
        self.cell, self.input_size, self.hidden_size, self.bias = cell, I, H, bool(bias)
        self.seed, self.backend = validate.seed(seed), validate.backend(backend)
        if backend not in CELL_ENGINES:
            raise ValueError("cells run on backend 'c' or 'numpy'; backend='cuda' is for CharLM")
        shapes = oracle.layer_param_shapes(cell, I, H, self.bias)
        validate.check_params(repr(self), oracle.num_params(shapes))
        self._engine = CELL_ENGINES[backend](cell, I, H, self.bias)
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
        x = validate.floats(x, 'x')
        if x.ndim not in (1, 2) or x.shape[-1] != self.input_size or 0 in x.shape:
            raise ValueError(f'x has shape {x.shape}, expected (B, {self.input_size}) or ({self.input_size},)')
        unbatched = x.ndim == 1
        x = x[None] if unbatched else x
        B, H = x.shape[0], self.hidden_size
        h, c = validate.states(hx, 'hx', lstm, (H,) if unbatched else (B, H), ('h', 'c'))
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
            dh, dc = validate.states(dh, 'dh', True, (H,) if unbatched else (B, H), ('dh', 'dc'))
        else:
            dh, dc = validate.floats(dh, 'dh', (H,) if unbatched else (B, H)), None
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


# ----------------------------------------------------------------------------- char LM

def _regularisers_repr(lm):
    return ''.join(f', {k}={getattr(lm, k)!r}' for k, off in (('weight_drop', 0.0), ('embed_dropout', 0.0),
                                                               ('locked_dropout', False)) if getattr(lm, k) != off)


def _precision_repr(module):
    return '' if module.precision == 'fp32' else f', precision={module.precision!r}'


class CharLM(Module):
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
                 nonlinearity='tanh', seed=None, backend='c', dropout=0.0, vocab=None, precision='fp32',
                 weight_drop=0.0, embed_dropout=0.0, locked_dropout=False):
        if cell not in oracle.CELLS:
            raise ValueError(f'unknown cell {cell!r}, expected one of {oracle.CELLS}')
        if oracle.rnn_cell(nonlinearity) == 'rnn_relu':
            if cell not in ('rnn', 'rnn_relu'):
                raise ValueError(f"nonlinearity='relu' only applies to cell 'rnn', got cell {cell!r}")
            cell = 'rnn_relu'
        V, E, H, L = validate.sizes(vocab_size=vocab_size, embed_size=embed_size, hidden_size=hidden_size,
                                    num_layers=num_layers)
        self.cell, self.vocab_size, self.embed_size, self.hidden_size, self.num_layers = cell, V, E, H, L
        self._dropout, self.seed = validate.dropout(dropout), validate.seed(seed)
        self.backend, self._precision = validate.backend(backend), precision
        bf16 = validate.precision(precision)
        self._regularisers = (bool(locked_dropout), validate.dropout(weight_drop, 'weight_drop'),
                              validate.dropout(embed_dropout, 'embed_dropout'))
        self.vocab = None if vocab is None else Vocab(vocab)
        if self.vocab is not None and len(self.vocab) != V:
            raise ValueError(f'vocab has {len(self.vocab)} symbols, vocab_size is {V}')
        validate.check_params(repr(self), oracle.lm_num_params(cell, V, E, H, L))
        self._engine = LM_ENGINES[backend](cell, V, E, H, L, self.seed, bf16=bf16)
        self._engine.set_regularisers(*self._regularisers)
        self.load_state_dict(oracle.init_lm_params(cell, V, E, H, L, seed=self.seed))
        self.train(True)
        self._can_backward = False
        self.loss = self.logits = self.h_n = self.c_n = self.dh0 = self.dc0 = None

    def __repr__(self):
        return (f'CharLM({self.cell!r}, vocab_size={self.vocab_size}, embed_size={self.embed_size}, '
                f'hidden_size={self.hidden_size}, num_layers={self.num_layers}, '
                f'dropout={self.dropout}, backend={self.backend!r}{_precision_repr(self)}{_regularisers_repr(self)})')

    @property
    def dropout(self):
        return self._dropout

    @property
    def precision(self):
        """'fp32' or 'bf16', fixed at construction (CharLM.load(..., precision=) changes it)"""
        return self._precision

    # the regularisers beyond dropout, applied in training mode; each may be set at any time
    locked_dropout = property(lambda self: self._regularisers[0], lambda self, v: self._set_regularisers(0, bool(v)))
    weight_drop = property(lambda self: self._regularisers[1],
                           lambda self, p: self._set_regularisers(1, validate.dropout(p, 'weight_drop')))
    embed_dropout = property(lambda self: self._regularisers[2],
                             lambda self, p: self._set_regularisers(2, validate.dropout(p, 'embed_dropout')))

    def _set_regularisers(self, i, value):
        regs = list(self._regularisers)
        regs[i] = value
        self._engine.set_regularisers(*regs)
        self._regularisers = tuple(regs)

    @dropout.setter
    def dropout(self, p):
        self._dropout = validate.dropout(p)
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
        inputs = validate.tokens(inputs, 'inputs', V)
        B, T = inputs.shape
        if targets is not None:
            targets = validate.tokens(targets, 'targets', V, inputs.shape)
        h0, c0 = validate.states(hx, 'hx', self.cell == 'lstm', (L, B, H))
        self._can_backward = False
        self.loss = self.dh0 = self.dc0 = None
        validate.check_memory(4 * T * B * (3 * V + L * H * (oracle.gates(self.cell) + 4) + 2 * E),
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
        return self._engine.adamw_step(*validate.adamw_hyperparameters(lr, betas, eps, weight_decay), clip)

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
        adam = self._engine.adam_state()
        m, v, t = (None, None, 0) if adam is None else (oracle.flatten(adam[0]), oracle.flatten(adam[1]), adam[2])
        write_checkpoint(path, self.cell, self.state_dict(), vocab.symbols, m=m, v=v, adam_t=t,
                         dropout=self.dropout, rng=self._engine.rng, precision=self.precision,
                         locked_dropout=self.locked_dropout, weight_drop=self.weight_drop,
                         embed_dropout=self.embed_dropout)

    @classmethod
    def load(cls, path, backend='c', with_vocab=False, precision=None):
        """The model a checkpoint holds (written by save(), train_cpu or train_gpu): parameters,
        vocabulary, dropout, AdamW state and the dropout generator's state; with_vocab=True returns
        (model, vocab bytes). precision: 'fp32' or 'bf16' (None: the one it was trained with; the
        file is float32 either way)."""
        from .checkpoint import read_checkpoint
        ck = read_checkpoint(path)
        model = cls(ck['cell'], ck['vocab_size'], ck['embed_size'], ck['hidden_size'], ck['num_layers'],
                    seed=0, backend=backend, dropout=ck['dropout'], vocab=ck['vocab'],
                    weight_drop=ck['weight_drop'], embed_dropout=ck['embed_dropout'],
                    locked_dropout=ck['locked_dropout'],
                    precision=precision or ck['precision'])
        model.load_state_dict(ck['params'])
        model.seed = None                     # the weights and the generator's state come from the file
        model._engine.set_rng(ck['rng'])
        if ck['adam_t'] > 0:
            shapes = oracle.lm_param_shapes(ck['cell'], ck['vocab_size'], ck['embed_size'], ck['hidden_size'],
                                            ck['num_layers'])
            model._engine.load_adam(oracle.unflatten(ck['m'], shapes), oracle.unflatten(ck['v'], shapes),
                                    ck['adam_t'])
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
        prime = validate.as_numpy(prime).reshape(-1)
        if prime.size < 1:
            raise ValueError('prime needs at least one token')
        prime = validate.tokens(prime[None], 'prime', self.vocab_size)[0]
        length = validate.integer('length', length, lo=0)
        temperature = float(temperature)
        if not (math.isfinite(temperature) and temperature > 0):
            raise ValueError(f'temperature must be > 0 and finite, got {temperature} '
                             '(for the most likely token at every step use top_k=1)')
        top_k = min(validate.integer('top_k', top_k, lo=0), self.vocab_size)
        seed = validate.integer('seed', seed, lo=0)
        self._can_backward = False   # sampling runs forward passes of its own
        out = self._engine.sample(prime, length, temperature, top_k, seed)
        return self.vocab.decode(out) if text else out

    def _dropout_masks(self):
        """The 0/1 dropout masks of the last forward, L arrays (T, B, H) (the first L-1 between
        layers, the last before the head) in oracle.lm_forward's convention, or None. For tests."""
        return self._engine.masks()

