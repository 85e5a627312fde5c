"""backend='numpy': the NumPy oracle run behind the engine interface (pyrnn.engine). Here the
oracle is the engine by design, AdamW and the dropout masks included: this backend is the
reference that the C and CUDA engines are checked against, so it computes nothing of its own."""
import math

import numpy as np

from . import oracle
from .engine import CellEngine, HostParams, LMEngine, StackEngine
from .validate import nonfinite_gradient


class NumpyEngine(HostParams):
    """Parameters in NumPy; AdamW by oracle.adamw_step, its moments kept here, with the module,
    as the C model keeps its own."""
    adam = None   # (m, v, t) once a step was taken

    def adamw_step(self, lr, betas, eps, weight_decay, max_grad_norm):
        grads = self.grads
        norm = oracle.clip_grad_norm(grads, None)
        if not math.isfinite(norm):
            raise nonfinite_gradient(norm)
        if max_grad_norm:   # clip a copy: .grad stays as backward made it
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
        self.adam = ({k: a.copy() for k, a in m.items()}, {k: a.copy() for k, a in v.items()}, t) if t else None


class NumpyStack(NumpyEngine, StackEngine):
    def __init__(self, cell, input_size, hidden_size, num_layers, bias, bidirectional, seed, bf16=False):
        super().__init__(oracle.stack_param_shapes(cell, input_size, hidden_size, num_layers, bias, bidirectional))
        self.cell, self.H, self.L, self.D = cell, hidden_size, num_layers, 2 if bidirectional else 1
        self.bf16 = bf16
        self.rng = oracle.dropout_state(seed)

    def forward(self, x, h0, c0, lengths, p):
        T, B = x.shape[:2]
        masks = None
        if p > 0 and self.L > 1:
            masks, self.rng = oracle.dropout_masks(self.rng, range(1, self.L), T, B, self.D * self.H, p)
        # the oracle's cache keeps its inputs: copies, as C copies them, so that editing the
        # caller's arrays before backward changes nothing
        x, h0, c0 = (None if a is None else a.copy() for a in (x, h0, c0))
        return oracle.stack_forward(self.params, self.cell, x, h0, c0, p if masks else 0.0, masks, lengths,
                                    bf16=self.bf16)

    def backward(self, tape, dout, dh_n, dc_n):
        dx, dh0, dc0, grads = oracle.stack_backward(tape, dout, dh_n, dc_n)
        for k, g in grads.items():
            self.grads[k] += g
        return dx, dh0, dc0


class NumpyCell(NumpyEngine, CellEngine):
    def __init__(self, cell, input_size, hidden_size, bias):
        super().__init__(oracle.layer_param_shapes(cell, input_size, hidden_size, bias))
        self.cell = cell

    def step(self, x, h, c):
        return oracle.cell_forward(self.params, self.cell, x, h, c)

    def step_backward(self, tape, dh, dc):
        dx, dh_prev, dc_prev, grads = oracle.cell_backward(tape, dh, dc)
        for k, g in grads.items():
            self.grads[k] += g
        return dx, dh_prev, dc_prev


class NumpyLM(NumpyEngine, LMEngine):
    def __init__(self, cell, V, E, H, L, seed, bf16=False):
        super().__init__(oracle.lm_param_shapes(cell, V, E, H, L))
        self.cell, self.H, self.L, self.V, self.bf16 = cell, H, L, V, bf16
        self.locked, self.weight_drop, self.embed_dropout, self.training = False, 0.0, 0.0, True
        self.rng = oracle.dropout_state(seed)   # the C model's generator, so both draw the same masks
        self._cache = self._masks = None

    def set_regularisers(self, locked, weight_drop, embed_dropout):
        self.locked, self.weight_drop, self.embed_dropout = locked, weight_drop, embed_dropout

    def forward(self, inputs, targets, h0, c0, p):
        B, T = inputs.shape
        self._masks = wmasks = emask = None
        # the C model's pass: one key for all masks when any regulariser is on (regularisers act in
        # training, so p > 0 stands for training with dropout, and p == 0 without targets for eval)
        wd, ed = (self.weight_drop, self.embed_dropout) if self.training else (0.0, 0.0)
        if p > 0 or wd > 0 or ed > 0:
            key, self.rng = oracle.pass_key(self.rng)
            if p > 0:
                self._masks = [oracle.dropout_mask(key, s, T, B, self.H, p, locked=self.locked)
                               for s in range(1, self.L + 1)]
            if wd > 0:
                wmasks = oracle.weight_masks(key, self.L, oracle.gates(self.cell) * self.H, self.H, wd)
            if ed > 0:
                emask = oracle.embedding_mask(key, self.V, ed)
        # copies: the oracle's cache keeps its inputs until backward (C copies them too)
        inputs, h0, c0 = (None if a is None else a.copy() for a in (inputs, h0, c0))
        loss, logits, h_n, c_n, cache = oracle.lm_forward(
            self.params, self.cell, inputs, targets if targets is not None else np.zeros_like(inputs),
            h0, c0, p, self._masks, bf16=self.bf16, weight_drop=wd, weight_masks=wmasks, embed_dropout=ed,
            embedding_mask=emask)
        self._cache = cache if targets is not None else None
        return loss, logits, h_n, c_n

    def backward(self):
        grads, dh0, dc0 = oracle.lm_backward(self._cache)
        for k, g in grads.items():
            self.grads[k] += g
        return dh0, dc0

    def masks(self):
        return None if self._masks is None else [mk.copy() for mk in self._masks]

    def set_mode(self, training, dropout):
        self.training = training

    def sample(self, prime, length, temperature, top_k, seed):
        # one step at a time, numpy's generator, in eval mode as C samples
        training, self.training = self.training, False
        try:
            return self._sample(prime, length, temperature, top_k, seed)
        finally:
            self.training = training

    def _sample(self, prime, length, temperature, top_k, seed):
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
