"""torch.nn.RNN / LSTM / GRU on pyrnn's C kernels, for an existing PyTorch training loop on the CPU.

    import pyrnn.torch
    model = pyrnn.torch.accelerate(model)   # every nn.RNN / LSTM / GRU inside now runs on pyrnn's C layer
    ...                                     # the same loop: loss.backward(), clip_grad_norm_, opt.step()
    pyrnn.torch.restore(model)              # back to torch's own

    rnn = pyrnn.torch.GRU(64, 128, num_layers=2, batch_first=True)   # or build one directly

pyrnn.torch.RNN, LSTM and GRU subclass torch.nn.RNN, LSTM and GRU: construction, parameter names,
initialisation, state_dict, pickling, deepcopy, .train() / .eval() and repr are torch's own, and
isinstance(m, torch.nn.LSTM) holds. Only forward differs: in float32 on the CPU it runs one C Layer
(c/train_rnn.c's layer API) per layer and direction, through a torch.autograd.Function that gives
gradients for the input, hx and every parameter. The rest is torch: batch_first is one transpose
each way (the C layer is time-major), bidirectional runs the reverse direction over each sequence
reversed within its length, dropout between layers is torch.nn.functional.dropout in training mode,
a PackedSequence (sorted or not) is padded for C and packed again, unbatched input is a batch of one.

Memory: the parameters are ordinary torch tensors, and C computes with them where they lie
(layer_bind hands it their pointers on every call), so optimizers, load_state_dict and in-place
edits reach it with no copy and nothing to keep in sync; backward accumulates straight into the
gradient tensors returned to autograd. What is copied is what the C layout needs: the input into
the Layer (it keeps it for backward, zero past each sequence's end), batch_first's transposes, the
bidirectional reversal and concatenation, and the padding of packed sequences. C Layers hold a
forward's activations until its backward: each module keeps a pool, a forward takes a Layer from
it, its backward (or the graph being freed) gives it back, so a training loop reuses one Layer per
layer and direction. A backward whose Layer was taken since (retain_graph and a forward in between)
runs that forward again first. The C threads follow torch.get_num_threads() on every call.

Torch's own forward runs instead (the same results, torch's speed and error messages) for what the
C kernels do not serve: tensors off the CPU, dtypes other than float32, proj_size > 0, CPU autocast,
empty batches, and any argument torch would reject. Double backward (create_graph=True, then
differentiating the gradient) raises torch's once_differentiable error: restore() the module for
higher-order gradients. TorchScript does not compile these modules; restore() first.
"""
import weakref

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from . import oracle
from .engine_c import c_check, load

__all__ = ['RNN', 'LSTM', 'GRU', 'accelerate', 'restore']

_CELLS = {'RNN_TANH': 'rnn', 'RNN_RELU': 'rnn_relu', 'LSTM': 'lstm', 'GRU': 'gru'}


# ----------------------------------------------------------------------------- C Layers

class _Layer:
    """One C Layer, and the forward whose activations it holds (holder: that _Lease's token, or None; a
    token, not the lease, so that no cycle keeps a lease from being freed with its graph)."""

    def __init__(self, ffi, lib, cell, input_size, hidden_size, bias):
        ptr = lib.layer_new(oracle.cell_id(cell), input_size, hidden_size, 1, int(bias))
        if ptr == ffi.NULL:
            c_check(ffi, lib, -1)
        self.ptr, self.holder, self.idle = ffi.gc(ptr, lib.layer_free), None, False


class _Pool:
    """The idle C Layers of one shape (cell, input size, hidden size, bias) of one module."""

    def __init__(self, key):
        self.key, self.idle = key, []

    def take(self, holder):
        ffi, lib = load()
        layer = self.idle.pop() if self.idle else _Layer(ffi, lib, *self.key)
        layer.idle, layer.holder = False, holder
        return layer

    def give(self, layer):
        if not layer.idle:
            layer.idle = True
            self.idle.append(layer)

    def reclaim(self, lease):
        """lease's Layer if it still holds lease's forward (then out of the idle list), else None."""
        layer = lease.layer
        if layer is None or layer.holder is not lease.token:
            return None
        if layer.idle:
            self.idle.remove(layer)
            layer.idle = False
        return layer


class _Lease:
    """A forward's claim on the Layer holding its activations; the Layer goes back to the pool when the
    graph (the autograd node that keeps this lease) is freed. After backward the Layer is idle but keeps
    the holder, so a second backward (retain_graph) finds it unless a forward took it meanwhile."""

    def __init__(self, pool):
        self.pool, self.layer, self.token = pool, None, object()

    def take(self):
        self.layer = self.pool.take(self.token)
        return self.layer

    def __del__(self):
        layer = self.layer
        if layer is not None and layer.holder is self.token:
            layer.holder = None
            self.pool.give(layer)


_POOLS = weakref.WeakKeyDictionary()   # module -> {shape: _Pool}; nothing on the module, so pickling is torch's


def _pool(module, key):
    pools = _POOLS.get(module)
    if pools is None:
        pools = _POOLS[module] = {}
    if key not in pools:
        pools[key] = _Pool(key)
    return pools[key]


# ----------------------------------------------------------------------------- autograd

def _floats(ffi, t):
    return ffi.NULL if t is None else ffi.cast('float*', t.data_ptr())


def _bind(ffi, lib, layer, weights, grads):
    """Point the Layer at the weights (and gradient buffers) in C's order, NULL for missing biases."""
    pad = [None] * (4 - len(weights))
    params = ffi.new('float*[4]', [_floats(ffi, w) for w in list(weights) + pad])
    bufs = ffi.NULL if grads is None else ffi.new('float*[4]', [_floats(ffi, g) for g in list(grads) + pad])
    lib.layer_bind(layer.ptr, params, bufs)


def _forward(ffi, lib, layer, tokens, x, h0, c0, lengths, weights, lstm):
    """One C Layer forward; x (T, B, I), h0 / c0 (B, H) or None, all contiguous float32. With tokens
    (T, B int32), x is the table (V, I) their rows come from."""
    T, B = x.shape[:2] if tokens is None else tokens.shape
    H = weights[1].shape[1]
    out, h_n = x.new_empty((T, B, H)), x.new_empty((B, H))
    c_n = x.new_empty((B, H)) if lstm else None
    _bind(ffi, lib, layer, weights, None)
    lens = ffi.NULL if lengths is None else ffi.cast('int*', lengths.data_ptr())
    if tokens is None:
        rc = lib.layer_forward_api(layer.ptr, _floats(ffi, out), _floats(ffi, h_n), _floats(ffi, c_n),
                                   _floats(ffi, x), _floats(ffi, h0), _floats(ffi, c0), lens, B, T)
    else:
        rc = lib.layer_forward_tokens(layer.ptr, _floats(ffi, out), _floats(ffi, h_n), _floats(ffi, c_n),
                                      ffi.cast('int*', tokens.data_ptr()), _floats(ffi, x), x.shape[0],
                                      _floats(ffi, h0), _floats(ffi, c0), lens, B, T)
    c_check(ffi, lib, rc)
    return out, h_n, c_n


def _contiguous(*ts):
    return [None if t is None else t.contiguous() for t in ts]


class _LayerFunction(torch.autograd.Function):
    """One layer and direction: (x (T, B, I), h0, c0 (B, H) or None, weights) -> out (T, B, H), h_n, c_n
    (LSTM only), computed by a C Layer of pool; lengths: int32 (B,) or None (all T). With tokens (T, B
    int32), x is an embedding's table (V, I) and the layer reads its rows by token: the table's gradient
    is then x's."""

    @staticmethod
    def forward(ctx, pool, lstm, lengths, tokens, x, h0, c0, *weights):
        ffi, lib = load()
        lib.pyrnn_set_num_threads(torch.get_num_threads())
        lease = _Lease(pool)
        out, h_n, c_n = _forward(ffi, lib, lease.take(), tokens, *_contiguous(x, h0, c0), lengths,
                                 _contiguous(*weights), lstm)
        if any(ctx.needs_input_grad):
            ctx.lease, ctx.lstm, ctx.lengths, ctx.tokens = lease, lstm, lengths, tokens
            ctx.save_for_backward(x, h0, c0, *weights)
        ctx.set_materialize_grads(False)
        return (out, h_n, c_n) if lstm else (out, h_n)

    @staticmethod
    @once_differentiable
    def backward(ctx, dout, dh_n, dc_n=None):
        ffi, lib = load()
        lib.pyrnn_set_num_threads(torch.get_num_threads())
        x, h0, c0, *weights = ctx.saved_tensors
        x, h0, c0 = _contiguous(x, h0, c0)
        weights = _contiguous(*weights)
        lease = ctx.lease
        pool = lease.pool
        layer = pool.reclaim(lease)
        tokens = ctx.tokens
        dx = torch.empty_like(x) if tokens is None else torch.zeros_like(x)   # the table's: C adds to it
        if layer is None:   # taken by a later forward since: run this one again
            layer = lease.take()
            _forward(ffi, lib, layer, tokens, x, h0, c0, ctx.lengths, weights, ctx.lstm)
        try:
            grads = [torch.zeros_like(w) for w in weights]   # C accumulates
            T, B = (x.shape[0], x.shape[1]) if tokens is None else tokens.shape
            H = weights[1].shape[1]
            dh0 = x.new_empty((B, H))
            dc0 = x.new_empty((B, H)) if ctx.lstm else None
            if dout is None:
                dout = x.new_zeros((T, B, H))
            dout, dh_n, dc_n = _contiguous(dout, dh_n, dc_n)
            _bind(ffi, lib, layer, weights, grads)
            rc = lib.layer_backward_api(layer.ptr, _floats(ffi, dx), _floats(ffi, dh0), _floats(ffi, dc0),
                                        _floats(ffi, dout), _floats(ffi, dh_n), _floats(ffi, dc_n))
            c_check(ffi, lib, rc)
        finally:
            pool.give(layer)
        need = ctx.needs_input_grad
        return (None, None, None, None, dx if need[4] else None, dh0 if need[5] else None,
                dc0 if need[6] else None, *(g if n else None for g, n in zip(grads, need[7:])))


class _Reverse(torch.autograd.Function):
    """Rows of x (T, B, W) gathered by index (T*B flat rows): each sequence reversed within its length,
    padding in place. A reversal is its own inverse, so backward gathers the same rows."""

    @staticmethod
    def forward(ctx, x, index):
        ctx.index = index
        T, B, W = x.shape
        return x.reshape(T * B, W).index_select(0, index).view(T, B, W)

    @staticmethod
    def backward(ctx, grad):
        return _Reverse.apply(grad, ctx.index), None


def _reversal(lengths, T, B):
    """Flat row indices (T*B) reversing each sequence within its length (lengths None: all T)."""
    t = torch.arange(T).unsqueeze(1)
    n = torch.full((B,), T) if lengths is None else lengths.long()
    src = torch.where(t < n, n - 1 - t, t)
    return (src * B + torch.arange(B)).reshape(-1)


def _embedding_rows(input, input_size):
    """(indices, weight) when input is exactly the output of an embedding (nn.Embedding, F.embedding) of a
    float32 weight that trains, with no padding_idx, scale_grad_by_freq or sparse gradient: then the stack
    reads weight's rows by index, and gives weight the gradient its embedding would have. None otherwise.
    The embedding's own output then receives no gradient from the stack (its other uses, if any, still
    do), so the two gradients add up on weight as they would through the embedding."""
    fn = getattr(input, 'grad_fn', None)
    if fn is None or fn.name() != 'EmbeddingBackward0':
        return None
    if fn._saved_padding_idx not in (-1, 2 ** 64 - 1) or fn._saved_scale_grad_by_freq or fn._saved_sparse:
        return None
    weight = getattr(fn.next_functions[0][0], 'variable', None)
    indices = fn._saved_indices
    if (weight is None or not weight.requires_grad or weight.dtype != torch.float32 or weight.dim() != 2
            or weight.shape[1] != input_size or not weight.is_contiguous() or weight.device.type != 'cpu'
            or tuple(indices.shape) != tuple(input.shape[:-1])):
        return None
    return indices, weight


# ----------------------------------------------------------------------------- modules

class _Accelerated:
    """forward on the C kernels, mixed in before torch's class; everything else is torch's."""

    def __init__(self, *args, **kwargs):
        load()   # a missing C extension fails here, not at the first forward
        super().__init__(*args, **kwargs)

    def forward(self, input, hx=None):
        if not self._served(input, hx):
            return super().forward(input, hx)
        self._update_flat_weights()
        lstm = self.mode == 'LSTM'
        packed = isinstance(input, PackedSequence)
        if packed:
            data, batch_sizes, sorted_indices, unsorted_indices = input
            x, lengths = pad_packed_sequence(PackedSequence(data, batch_sizes))   # sorted order, time-major
            if hx is not None:
                hx = self.permute_hidden(hx, sorted_indices)
        else:
            unbatched = input.dim() == 2
            x = input.unsqueeze(1) if unbatched else input.transpose(0, 1) if self.batch_first else input
            lengths = None
            if hx is not None and unbatched:
                hx = (hx[0].unsqueeze(1), hx[1].unsqueeze(1)) if lstm else hx.unsqueeze(1)
        h0, c0 = hx if lstm and hx is not None else (hx, None)
        rows = None if packed else _embedding_rows(input, self.input_size)
        if rows is not None:   # time-major token ids, as the stack runs
            ids = rows[0].unsqueeze(1) if input.dim() == 2 else rows[0].t() if self.batch_first else rows[0]
            rows = (ids.to(torch.int32).contiguous(), rows[1])
        out, h_n, c_n = self._stack(x, lengths, h0, c0, lstm, rows)
        hidden = (h_n, c_n) if lstm else h_n
        if packed:
            out = PackedSequence(pack_padded_sequence(out, lengths).data, batch_sizes, sorted_indices,
                                 unsorted_indices)
            return out, self.permute_hidden(hidden, unsorted_indices)
        if unbatched:
            return out.squeeze(1), (h_n.squeeze(1), c_n.squeeze(1)) if lstm else h_n.squeeze(1)
        return (out.transpose(0, 1) if self.batch_first else out), hidden

    def _stack(self, x, lengths, h0, c0, lstm, rows=None):
        """x (T, B, I) time-major; lengths (B,) int64 or None; h0, c0 (L*D, B, H) or None. rows: (tokens (T, B)
        int32, table) when x holds an embedding's rows of table: layer 0's forward direction reads them by
        token (the C model's lookup: a V-row GEMM for its input projection and both its gradients)."""
        T, B = x.shape[:2]
        D, L, H = 2 if self.bidirectional else 1, self.num_layers, self.hidden_size
        cell = _CELLS[self.mode]
        n = len(self._all_weights[0])
        h0s = [None] * (L * D) if h0 is None else h0.unbind(0)
        c0s = [None] * (L * D) if c0 is None else c0.unbind(0)
        c_lengths = None if lengths is None else lengths.to(torch.int32)
        index = _reversal(lengths, T, B) if D == 2 else None
        hs, cs, inp = [], [], x
        for l in range(L):
            pool = _pool(self, (cell, self.input_size if l == 0 else D * H, H, self.bias))
            outs = []
            for d in range(D):
                k = l * D + d
                xin = _Reverse.apply(inp, index) if d else inp
                tokens, src = rows if rows is not None and k == 0 else (None, xin)
                res = _LayerFunction.apply(pool, lstm, c_lengths, tokens, src, h0s[k], c0s[k],
                                           *self._flat_weights[k * n:(k + 1) * n])
                outs.append(_Reverse.apply(res[0], index) if d else res[0])
                hs.append(res[1])
                cs.append(res[2] if lstm else None)
            inp = torch.cat(outs, 2) if D == 2 else outs[0]
            if self.dropout > 0 and self.training and l < L - 1:
                inp = F.dropout(inp, self.dropout, True)
        join = (lambda ts: ts[0].unsqueeze(0)) if L * D == 1 else torch.stack   # a view where one will do
        return inp, join(hs), join(cs) if lstm else None

    def _served(self, input, hx):
        """Whether the C kernels compute this call: float32 CPU tensors of the shapes torch expects
        (anything else goes to torch's forward, which computes it or says what is wrong)."""
        if self.proj_size or torch.is_autocast_enabled('cpu'):
            return False
        packed = isinstance(input, PackedSequence)
        x = input.data if packed else input
        if not isinstance(x, torch.Tensor) or x.dim() not in ((2,) if packed else (2, 3)):
            return False
        if packed:
            B, T = int(input.batch_sizes[0]), len(input.batch_sizes)
        elif x.dim() == 2:
            B, T = 1, x.shape[0]
        else:
            B, T = (x.shape[0], x.shape[1]) if self.batch_first else (x.shape[1], x.shape[0])
        if x.shape[-1] != self.input_size or B == 0 or T == 0:
            return False
        states = ([] if hx is None else list(hx) if self.mode == 'LSTM' and isinstance(hx, (tuple, list))
                  else [hx] if self.mode != 'LSTM' else None)
        if states is None or (self.mode == 'LSTM' and hx is not None and len(states) != 2):
            return False
        L, H = self.num_layers * (2 if self.bidirectional else 1), self.hidden_size
        shape = (L, H) if not packed and x.dim() == 2 else (L, B, H)
        tensors = [x, *states, *self._flat_weights]
        return (all(isinstance(s, torch.Tensor) and tuple(s.shape) == shape for s in states)
                and all(isinstance(t, torch.Tensor) and t.dtype == torch.float32 and t.device.type == 'cpu'
                        and t.layout == torch.strided for t in tensors))


class RNN(_Accelerated, torch.nn.RNN):
    """torch.nn.RNN (tanh or relu) on pyrnn's C kernels; see the module's docstring."""


class LSTM(_Accelerated, torch.nn.LSTM):
    """torch.nn.LSTM on pyrnn's C kernels (proj_size > 0 runs torch's own); see the module's docstring."""


class GRU(_Accelerated, torch.nn.GRU):
    """torch.nn.GRU on pyrnn's C kernels; see the module's docstring."""


_OURS = {torch.nn.RNN: RNN, torch.nn.LSTM: LSTM, torch.nn.GRU: GRU}
_TORCHS = {v: k for k, v in _OURS.items()}


def accelerate(model):
    """Every torch.nn.RNN / LSTM / GRU in model (model itself included) becomes the pyrnn module, in
    place: the same object, its class swapped, so its parameters (and an optimizer over them), buffers,
    hooks and mode stay as they are. Subclasses of torch's modules (their forward may be their own) and
    LSTMs with proj_size are left alone. Returns model."""
    load()   # a missing C extension fails here, not at the first forward
    for m in model.modules():
        if type(m) in _OURS and not m.proj_size:
            m.__class__ = _OURS[type(m)]
    return model


def restore(model):
    """accelerate's inverse: every pyrnn.torch module in model goes back to torch's class. Returns model."""
    for m in model.modules():
        if type(m) in _TORCHS:
            m.__class__ = _TORCHS[type(m)]
            _POOLS.pop(m, None)
    return model
