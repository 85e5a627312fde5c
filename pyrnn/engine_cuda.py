"""backend='cuda': the GPU model of pyrnn._cuda (lib/libpyrnn_cuda.so) behind the engine interface
(pyrnn.engine), for CharLM."""
import math

import numpy as np

from . import oracle
from .engine import HostParams, LMEngine, views
from .engine_c import CLM
from .validate import load_into, nonfinite_gradient


def load():
    """The pyrnn._cuda module (it raises ImportError when lib/libpyrnn_cuda.so is missing)."""
    try:
        from . import _cuda
    except ImportError as e:
        raise RuntimeError(f'the cuda backend is not built: {e}') from e
    return _cuda


class CudaLM(LMEngine):
    """The GPU model (pyrnn._cuda.GpuLM) behind host copies of its state. It is made at the first
    forward, for that batch shape (cuDNN's descriptors are per shape), and made again with all of
    the state moved over when the shape changes. Until it exists the host copies are the model:
    parameters and gradients, AdamW's moments and step count, the dropout generator. Once it does,
    it holds them: parameters and gradients sync lazily both ways (the side written last is copied
    over before the other is used), moments and the generator are read from it when asked for."""

    def __init__(self, cell, V, E, H, L, seed, bf16=False):
        if bf16:
            raise ValueError("precision='bf16' runs on the CPU (backend 'c' or 'numpy'); the GPU library is fp32")
        self._cuda = load()
        self.cell, self.dims = cell, (V, E, H, L)
        self._shapes = oracle.lm_param_shapes(cell, V, E, H, L)
        self._host = HostParams(self._shapes)
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
        cpu = CLM(self.cell, *self.dims, 0)
        load_into(cpu.params, self.params)
        return cpu.sample(prime, length, temperature, top_k, seed)

    def adamw_step(self, lr, betas, eps, weight_decay, max_grad_norm):
        if self._gpu is None:
            raise RuntimeError("backend='cuda' makes its GPU model at the first forward: step needs a forward and "
                               "backward first")
        self._push()
        norm = self._gpu.step(lr, betas[0], betas[1], eps, weight_decay, max_grad_norm or 0.0)
        if not math.isfinite(norm):   # the device skipped the update
            raise nonfinite_gradient(norm)
        self._newer['params'] = 'gpu'
        return norm

    def adam_state(self):
        m, v, t = self._gpu.adam() if self._gpu is not None else self._adam
        return (views(self._shapes, m), views(self._shapes, v), t) if t else None

    def load_adam(self, mom1, mom2, t):
        m = v = None
        if t:
            n = oracle.num_params(self._shapes)
            m, v = np.zeros(n, np.float32), np.zeros(n, np.float32)
            load_into(views(self._shapes, m), mom1, 'exp_avg')
            load_into(views(self._shapes, v), mom2, 'exp_avg_sq')
        if self._gpu is not None:
            self._gpu.set_adam(m, v, t)
        else:
            self._adam = (m, v, int(t))
