"""The engine interface: what a module of pyrnn.nn asks of the backend that computes for it.

Each module picks its engine once, in __init__, from its backend, and from then on only calls
the methods below:

    backend='numpy'  engine_numpy: NumpyStack, NumpyCell, NumpyLM   the oracle, by design
    backend='c'      engine_c:     CStack, CCell, CLM               the C core through cffi
    backend='cuda'   engine_cuda:  CudaLM                           the GPU model (CharLM only)

The module checks every argument (pyrnn.validate) and hands the engine C-contiguous float32 and
int32 arrays, sequences time-major (T, B, ...) except the LM's token ids (B, T). An engine owns
the parameters, the gradients, the AdamW moments and the dropout generator; the module keeps
none of them. Engine holds what every engine offers; StackEngine (RNN, LSTM, GRU), CellEngine
(the cells) and LMEngine (CharLM) add the passes of each kind of module.
"""
import numpy as np

from . import oracle


def views(shapes, flat):
    """Named views into a flat vector, in the order of shapes."""
    out, off = {}, 0
    for name, shape in shapes.items():
        n = int(np.prod(shape))
        out[name] = flat[off:off + n].reshape(shape)
        off += n
    assert off == flat.size, (off, flat.size)
    return out


class Engine:
    """Parameters, gradients, optimizer state and dropout generator of one module.

    params, grads: dicts of writable float32 views of the engine's own buffers, under torch's names
    in state_dict order; the module hands them out, so writes reach the engine directly.
    rng: the dropout generator's state, an int (SplitMix64, as the C trainer's; see
    oracle.dropout_masks); checkpoints store it.
    """
    params = grads = None
    rng = 0

    def zero_grad(self):
        """Every gradient to zero."""
        for g in self.grads.values():
            g[...] = 0.0

    def touched(self):
        """params was handed out for writing: an engine that keeps a copy elsewhere syncs it before
        its next pass."""

    def set_mode(self, training, dropout):
        """The module's training mode and dropout rate, for engines that keep them (C's Model)."""

    def set_regularisers(self, locked, weight_drop, embed_dropout):
        """CharLM's regularisers beyond dropout, applied while training: locked dropout masks, weight
        drop on W_hh, embedding dropout (engines without them refuse a non-default setting)."""
        if locked or weight_drop or embed_dropout:
            raise ValueError(f'{type(self).__name__} has no locked dropout, weight drop or embedding dropout: '
                             "use backend 'c' or 'numpy'")

    def set_rng(self, state):
        """Set the dropout generator's state (as a checkpoint holds it)."""
        self.rng = state

    def writable_grads(self):
        """grads, for callers that change them in place for the next step (clip_grad_norm_); an engine
        whose step does not read these views raises NotImplementedError."""
        return self.grads

    def adamw_step(self, lr, betas, eps, weight_decay, max_grad_norm):
        """One torch.optim.AdamW step (decay on every parameter) after global-norm clipping of a copy
        of the gradients to max_grad_norm (None or 0: off), as torch's clip_grad_norm_. Returns the
        gradient norm before clipping; when it is not finite, raises validate.nonfinite_gradient
        and changes nothing."""
        raise NotImplementedError

    def adam_state(self):
        """(m, v, t): the moments, dicts like params (the engine's own arrays: copy to keep), and the
        number of steps taken; None before the first step."""
        raise NotImplementedError

    def load_adam(self, m, v, t):
        """Set the moments (dicts shaped like params, already checked) and the step count t; t = 0
        starts AdamW afresh."""
        raise NotImplementedError


class StackEngine(Engine):
    """The passes of RNN, LSTM and GRU: L layers, D directions (2: bidirectional)."""

    def forward(self, x, h0, c0, lengths, p):
        """x (T, B, I); h0, c0 (L*D, B, H) or None (zeros), index l*D + d as torch; lengths (B,)
        int64 in [1, T] or None (all T), as through pack_padded_sequence; p > 0: dropout between
        layers, masks drawn from rng. Returns out (T, B, D*H), h_n, c_n (None unless LSTM) and a
        tape, the record of this pass that backward takes."""
        raise NotImplementedError

    def backward(self, tape, dout, dh_n, dc_n):
        """Gradients of a scalar w.r.t. a tape's outputs (dh_n, dc_n None: zeros) -> dx, dh0, dc0;
        parameter gradients accumulate into grads. Any tape not yet undone may come back,
        in any order."""
        raise NotImplementedError


class CellEngine(Engine):
    """The passes of RNNCell, LSTMCell and GRUCell: one step of one layer."""

    def step(self, x, h, c):
        """x (B, I); h, c (B, H) or None (zeros) -> h', c' (None unless LSTM), tape."""
        raise NotImplementedError

    def step_backward(self, tape, dh, dc):
        """dh (B, H), dc (B, H) or None -> dx, dh_prev, dc_prev; parameter gradients accumulate."""
        raise NotImplementedError


class LMEngine(Engine):
    """The passes of CharLM: Embedding(V, E) -> L layers -> Linear(H, V) -> mean cross-entropy."""

    def forward(self, inputs, targets, h0, c0, p):
        """inputs, targets (B, T) int32 (targets None: no loss, and no backward); h0, c0 (L, B, H)
        or None; p > 0: dropout after every layer, masks drawn from rng. Returns loss (without
        targets: anything), logits (T, B, V), h_n, c_n (None unless LSTM)."""
        raise NotImplementedError

    def backward(self):
        """Backward of the last forward with targets -> dh0, dc0; parameter gradients accumulate."""
        raise NotImplementedError

    def masks(self):
        """The 0/1 dropout masks of the last forward, L arrays (T, B, H) as oracle.lm_forward takes
        them, or None when it dropped nothing."""
        raise NotImplementedError

    def sample(self, prime, length, temperature, top_k, seed):
        """Feed prime (int32 ids) through, then draw length tokens (int32 array) carrying the state."""
        raise NotImplementedError


class HostParams(Engine):
    """Parameters and gradients in two flat NumPy vectors, in the order of shapes."""

    def __init__(self, shapes):
        n = oracle.num_params(shapes)
        self.flat, self.flat_grad = np.zeros(n, np.float32), np.zeros(n, np.float32)
        self.params, self.grads = views(shapes, self.flat), views(shapes, self.flat_grad)

    def zero_grad(self):
        self.flat_grad[...] = 0.0
