"""backend='cuda': the GPU model of pyrnn._cuda (lib/libpyrnn_cuda.so) behind the engine interface
(pyrnn.engine), for CharLM."""
import math

from . import oracle
from .engine import HostParams, LMEngine
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
    """The GPU model (pyrnn._cuda.GpuLM) behind a host copy of the parameters. The GPU model is made
    on the first forward, for that batch shape (cuDNN descriptors are per shape); parameters sync
    lazily both ways. AdamW's moments stay on the GPU (the library cannot hand them out yet), and
    dropout is not implemented there."""

    def __init__(self, cell, V, E, H, L, seed, bf16=False):
        if bf16:
            raise ValueError("precision='bf16' runs on the CPU (backend 'c' or 'numpy'); the GPU library is fp32")
        self._cuda = load()
        self.cell, self.dims = cell, (V, E, H, L)
        self.rng = oracle.dropout_state(seed)
        self._host = HostParams(oracle.lm_param_shapes(cell, V, E, H, L))
        self._gpu, self._host_newer, self._gpu_newer, self._steps = None, True, False, 0

    def _sync_from_gpu(self):
        if self._gpu is not None and self._gpu_newer:
            self._host.flat[...] = self._gpu.get_params()
            self._gpu_newer = False

    @property
    def params(self):
        self._sync_from_gpu()
        return self._host.params

    @property
    def grads(self):
        if self._gpu is not None:
            self._host.flat_grad[...] = self._gpu.get_grads()
        return self._host.grads

    def touched(self):
        # the host copy may be written: upload it before the next forward (that restarts AdamW)
        self._sync_from_gpu()
        self._host_newer = True

    def zero_grad(self):
        self._host.zero_grad()
        if self._gpu is not None:
            self._gpu.zero_grad()

    def writable_grads(self):
        raise NotImplementedError("clip_grad_norm_ on backend='cuda': use CharLM.step(..., max_grad_norm=)")

    def _gpu_for(self, B, T):
        """The GPU model for this batch shape."""
        if self._gpu is None or (self._gpu.B, self._gpu.T) != (B, T):
            if self._gpu_newer:   # a new GpuLM starts with fresh AdamW moments: never drop them silently
                raise ValueError(f"backend='cuda' trains at one batch shape: this model took steps at "
                                 f"{(self._gpu.B, self._gpu.T)}, not {(B, T)}; save() and load() to change it")
            self._sync_from_gpu()
            self._gpu = self._cuda.GpuLM(self.cell, *self.dims, B, T)
            self._host_newer = True
        if self._host_newer:
            self._gpu.set_params(self._host.flat)
            self._host_newer = False
        return self._gpu

    def forward(self, inputs, targets, h0, c0, p):
        if p > 0:
            raise ValueError("backend='cuda' does not implement dropout; use dropout=0 or eval()")
        gpu = self._gpu_for(*inputs.shape)
        loss = gpu.forward(inputs, targets, h0, c0)
        h_n, c_n = gpu.final_state()
        return loss, gpu.logits(), h_n, c_n

    def backward(self):
        self._gpu.backward()
        return self._gpu.dstate()

    def masks(self):
        return None

    def sample(self, prime, length, temperature, top_k, seed):
        # one token at a time: the CPU is the right place, and the GPU model's shape stays put
        cpu = CLM(self.cell, *self.dims, 0)
        load_into(cpu.params, self.params)
        return cpu.sample(prime, length, temperature, top_k, seed)

    def adamw_step(self, lr, betas, eps, weight_decay, max_grad_norm):
        if self._gpu is None:
            raise RuntimeError('step needs a forward and backward first')
        norm = self._gpu.step(lr, betas[0], betas[1], eps, weight_decay, max_grad_norm or 0.0)
        if not math.isfinite(norm):   # the device skipped the update
            raise nonfinite_gradient(norm)
        self._gpu_newer = True
        self._steps += 1
        return norm

    def adam_state(self):
        if self._steps:
            raise NotImplementedError("backend='cuda' keeps AdamW's moments on the GPU and cannot read them yet")
        return None

    def load_adam(self, m, v, t):
        raise NotImplementedError("backend='cuda' cannot load AdamW's moments onto the GPU yet")
