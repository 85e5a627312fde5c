"""NumPy oracle for pyrnn: the ground truth the C and CUDA trainers are tested against.

Recurrent stacks with exactly PyTorch's nn.RNN / nn.LSTM / nn.GRU semantics (time-major,
double bias, gate orders LSTM i,f,g,o and GRU r,z,n), bidirectional, with variable lengths as
through pack_padded_sequence and dropout between layers; the cells (nn.RNNCell, ...); a char LM
around a stack (Embedding -> stack -> Linear -> mean cross-entropy); torch-style global-norm
clipping and torch.optim.AdamW; the dropout generator the C trainer uses (SplitMix64).

Everything is computed in the dtype of the inputs (float64 for references and
finite-difference tests, float32 to mimic the C code). No autograd anywhere: each
backward is written out by hand, min-char-rnn style.

It is only the reference: what computes with it is the reference itself, run behind the modules
as backend='numpy' (engine_numpy) and written to files for the C and CUDA harnesses
(pyrnn.reference). The rest of the package takes from it definitions alone: the cell list, the
parameter names, shapes and layout, the initialisation (so every backend starts from the same
weights) and the dropout generator's seeding.
"""
import numpy as np

# The one list of cells: the id stored in files and passed to C is the index here.
CELLS = ('rnn', 'rnn_relu', 'lstm', 'gru')
_GATES = {'rnn': 1, 'rnn_relu': 1, 'lstm': 4, 'gru': 3}


def _cell_name(cell):
    # accept a name or the integer id used in files
    if isinstance(cell, (int, np.integer)) and not isinstance(cell, bool):
        if not 0 <= cell < len(CELLS):
            raise ValueError(f'unknown cell id {cell}, expected 0..{len(CELLS) - 1}')
        return CELLS[int(cell)]
    if cell not in _GATES:
        raise ValueError(f'unknown cell {cell!r}, expected one of {CELLS}')
    return cell


def cell_id(cell):
    """The integer id of a cell (its index in CELLS), as files and the C core store it."""
    return CELLS.index(_cell_name(cell))


def rnn_cell(nonlinearity):
    """The cell of a vanilla RNN with this nonlinearity: 'rnn' (tanh) or 'rnn_relu'."""
    if nonlinearity not in ('tanh', 'relu'):
        raise ValueError(f"unknown nonlinearity {nonlinearity!r}, expected 'tanh' or 'relu'")
    return 'rnn' if nonlinearity == 'tanh' else 'rnn_relu'


def gates(cell):
    """Number of stacked gate blocks G: weight_ih is (G*H, in)."""
    return _GATES[_cell_name(cell)]


# ----------------------------------------------------------------------------- parameters
# One rule for every shape: layer_param_shapes. A cell is one layer without a suffix; a stack
# is layers l = 0..L-1, each with one direction (suffix _l{l}) or two (then also _l{l}_reverse),
# in torch's state_dict order.

def layer_param_shapes(cell, input_size, hidden_size, bias=True, suffix=''):
    GH = gates(cell) * hidden_size
    shapes = {f'weight_ih{suffix}': (GH, input_size), f'weight_hh{suffix}': (GH, hidden_size)}
    if bias:
        shapes[f'bias_ih{suffix}'] = (GH,)
        shapes[f'bias_hh{suffix}'] = (GH,)
    return shapes


def layer_suffix(l, d):
    """torch's suffix for the names of layer l's parameters, direction d (1: reverse)."""
    return f'_l{l}' + ('_reverse' if d else '')


def _layer_input(l, input_size, hidden_size, directions):
    return input_size if l == 0 else directions * hidden_size


def stack_param_shapes(cell, input_size, hidden_size, num_layers, bias=True, bidirectional=False):
    D = 2 if bidirectional else 1
    shapes = {}
    for l in range(num_layers):
        for d in range(D):
            shapes.update(layer_param_shapes(cell, _layer_input(l, input_size, hidden_size, D),
                                             hidden_size, bias, layer_suffix(l, d)))
    return shapes


def stack_param_names(num_layers, bias=True, bidirectional=False):
    return list(stack_param_shapes('rnn', 1, 1, num_layers, bias, bidirectional))


def num_params(shapes):
    """Number of floats in a dict of shapes."""
    return sum(int(np.prod(s, dtype=np.int64)) for s in shapes.values())


def stack_num_params(cell, input_size, hidden_size, num_layers, bias=True, bidirectional=False):
    """num_params(stack_param_shapes(...)) without building the dict: layers above 0 are alike,
    so a huge num_layers costs nothing to check."""
    D = 2 if bidirectional else 1
    first = num_params(layer_param_shapes(cell, input_size, hidden_size, bias))
    rest = num_params(layer_param_shapes(cell, D * hidden_size, hidden_size, bias))
    return D * (first + (num_layers - 1) * rest)


def lm_param_shapes(cell, V, E, H, L):
    """Shapes of the char LM in torch state_dict order (docs/formats.md)."""
    shapes = {'embedding.weight': (V, E)}
    for name, shape in stack_param_shapes(cell, E, H, L).items():
        shapes['rnn.' + name] = shape
    shapes['head.weight'] = (V, H)
    shapes['head.bias'] = (V,)
    return shapes


def lm_num_params(cell, V, E, H, L):
    return V * E + stack_num_params(cell, E, H, L) + V * H + V


def init_uniform(shapes, hidden_size, rng=None, dtype=np.float32):
    """torch's default for recurrent layers and cells: every tensor ~ U(-1/sqrt(H), 1/sqrt(H)),
    drawn in the order of shapes."""
    rng = np.random.default_rng() if rng is None else rng
    k = 1.0 / np.sqrt(hidden_size)
    return {name: rng.uniform(-k, k, size=shape).astype(dtype) for name, shape in shapes.items()}


def init_stack_params(cell, input_size, hidden_size, num_layers, bias=True, rng=None,
                      dtype=np.float32, bidirectional=False):
    return init_uniform(stack_param_shapes(cell, input_size, hidden_size, num_layers, bias,
                                           bidirectional), hidden_size, rng, dtype)


def init_lm_params(cell, V, E, H, L, seed=0, dtype=np.float32):
    # one rng, tensors drawn in state_dict order so the draw is reproducible from the seed
    rng = np.random.default_rng(seed)
    params = {'embedding.weight': rng.standard_normal((V, E)).astype(dtype)}  # nn.Embedding: N(0,1)
    for name, p in init_stack_params(cell, E, H, L, rng=rng, dtype=dtype).items():
        params['rnn.' + name] = p
    k = 1.0 / np.sqrt(H)  # nn.Linear: fan_in = H for both weight and bias
    params['head.weight'] = rng.uniform(-k, k, size=(V, H)).astype(dtype)
    params['head.bias'] = rng.uniform(-k, k, size=(V,)).astype(dtype)
    return params


def flatten(params):
    return np.concatenate([np.ravel(p) for p in params.values()])


def unflatten(vec, shapes):
    out, off = {}, 0
    for name, shape in shapes.items():
        n = int(np.prod(shape))
        out[name] = np.array(vec[off:off + n]).reshape(shape)  # copy, so edits don't alias vec
        off += n
    if off != len(vec):
        raise ValueError(f'flat vector has {len(vec)} elements, shapes need {off}')
    return out


# ----------------------------------------------------------------------------- dropout
# The C trainer's masks, draw for draw. Its generator is SplitMix64, whose state is a counter that
# each draw advances by GAMMA. A training pass that regularises takes one draw, its key; every element
# of a mask is then a pure function of (key, site, row id, j): site l in 1..L-1 is the output of layer
# l-1 (the input of layer l), site L the top layer's output before a head, SITE_WEIGHT_DROP + l layer
# l's W_hh, SITE_EMBEDDING the embedding's rows; each row id hashes to a SplitMix64 sequence whose draw
# j decides column j. Dropped when its 24-bit uniform u < p. A dropout row's id is (t << 32 | stream),
# a locked dropout row's the stream alone (one mask for every step), a weight's or the table's row r.

_GAMMA, _MASK64 = 0x9E3779B97F4A7C15, (1 << 64) - 1
_DROPOUT_SEED_XOR = 0x5DEECE66D   # C's model_init: the generator's state is seed ^ this


def dropout_state(seed):
    """The dropout generator's state for a model made with this seed (as C's model_init)."""
    return (int(seed) ^ _DROPOUT_SEED_XOR) & _MASK64


def dropout_skip(state, n):
    """The generator's state after n draws."""
    return (int(state) + n * _GAMMA) & _MASK64


def _mix(z):
    # SplitMix64's output function, on uint64 arrays (products wrap mod 2^64)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def _next(states):
    """C's rng_next on each state (uint64 array): the draw; the states advance by GAMMA."""
    return _mix(states + np.uint64(_GAMMA))


SITE_WEIGHT_DROP, SITE_EMBEDDING = 1 << 16, 2 << 16


def _keep_mask(key, site, row_ids, width, p):
    """0/1 float32 keep-mask (row_ids.shape + (width,)) of one site"""
    site_key = _next(np.array([(int(key) + site) & _MASK64], np.uint64))
    draws = _next(site_key ^ row_ids)                   # each row's own sequence
    steps = np.arange(1, width + 1, dtype=np.uint64) * np.uint64(_GAMMA)
    u = (_mix(draws[..., None] + steps) >> np.uint64(40)).astype(np.float32) * np.float32(2.0 ** -24)
    return (u >= np.float32(p)).astype(np.float32)


def dropout_mask(key, site, T, B, width, p, first_stream=0, locked=False):
    """Keep-mask (T, B, width) of 0/1 float32 of one site for a pass's key; batch row b is global
    stream first_stream + b (data-parallel ranks draw what one process would). locked: the same
    mask at every step."""
    t, b = np.meshgrid(np.arange(T, dtype=np.uint64), np.arange(B, dtype=np.uint64) + np.uint64(first_stream),
                       indexing='ij')
    t = np.zeros_like(t) if locked else t
    return _keep_mask(key, site, (t << np.uint64(32)) | (b & np.uint64(0xFFFFFFFF)), width, p)


def pass_key(state):
    """A regularising pass's key, and the generator's state after it."""
    return int(_next(np.array([state], np.uint64))[0]), dropout_skip(state, 1)


def dropout_masks(state, sites, T, B, width, p, first_stream=0, locked=False):
    """One pass's keep-masks, one (T, B, width) array per site, and the generator's state after it."""
    key, state = pass_key(state)
    return [dropout_mask(key, s, T, B, width, p, first_stream, locked) for s in sites], state


def weight_masks(key, L, rows, cols, p):
    """Weight drop's keep-masks, one (rows, cols) per layer's W_hh."""
    ids = np.arange(rows, dtype=np.uint64)
    return [_keep_mask(key, SITE_WEIGHT_DROP + l, ids, cols, p) for l in range(L)]


def embedding_mask(key, V, p):
    """Embedding dropout's keep-mask (V,): one draw per table row."""
    return _keep_mask(key, SITE_EMBEDDING, np.arange(V, dtype=np.uint64), 1, p)[:, 0]


def dropout_scale(p, dtype):
    """1 / (1 - p), computed in dtype as the C code does in float."""
    one = np.dtype(dtype).type(1)
    return one / (one - np.dtype(dtype).type(p))


# ----------------------------------------------------------------------------- cell steps
# Every cell computes gi = x W_ih^T + b_ih and gh = h W_hh^T + b_hh first (exactly what
# cuDNN and torch do), then a cell-specific elementwise part. The step backward returns
# d(gi), d(gh) and the gradient flowing straight into h_prev / c_prev through the
# elementwise part; the matmul gradients are shared by all cells.

def _sigmoid(a):
    return 1.0 / (1.0 + np.exp(-a))


def _step_forward(cell, gi, gh, h_prev, c_prev):
    """One timestep's elementwise part. Returns h, c (None unless lstm), step cache."""
    if cell in ('rnn', 'rnn_relu'):
        a = gi + gh
        h = np.tanh(a) if cell == 'rnn' else np.maximum(a, 0)
        return h, None, (a, h)
    if cell == 'lstm':
        a = gi + gh
        i, f, g, o = np.split(a, 4, axis=1)
        i, f, g, o = _sigmoid(i), _sigmoid(f), np.tanh(g), _sigmoid(o)
        c = f * c_prev + i * g
        tc = np.tanh(c)
        h = o * tc
        return h, c, (i, f, g, o, c_prev, tc)
    if cell == 'gru':
        gi_r, gi_z, gi_n = np.split(gi, 3, axis=1)
        gh_r, gh_z, gh_n = np.split(gh, 3, axis=1)
        r = _sigmoid(gi_r + gh_r)
        z = _sigmoid(gi_z + gh_z)
        n = np.tanh(gi_n + r * gh_n)  # r scales the recurrent term *including* b_hn
        h = (1 - z) * n + z * h_prev
        return h, None, (r, z, n, gh_n, h_prev)
    raise ValueError(cell)


def _step_backward(cell, sc, dh, dc):
    """Backward of _step_forward. dh, dc: total gradients on this step's h and c.
    Returns dgi, dgh, dh_prev_direct (None if h_prev only enters through gh), dc_prev."""
    if cell in ('rnn', 'rnn_relu'):
        a, h = sc
        # relu'(0) = 0, like torch's threshold backward
        da = dh * (1 - h * h) if cell == 'rnn' else dh * (a > 0)
        return da, da, None, None
    if cell == 'lstm':
        i, f, g, o, c_prev, tc = sc
        do = dh * tc
        dc = dc + dh * o * (1 - tc * tc)  # c feeds h through tanh, plus the path from c_{t+1}
        di, df, dg = dc * g, dc * c_prev, dc * i
        da = np.concatenate([di * i * (1 - i), df * f * (1 - f),
                             dg * (1 - g * g), do * o * (1 - o)], axis=1)
        return da, da, None, dc * f
    if cell == 'gru':
        r, z, n, gh_n, h_prev = sc
        dn = dh * (1 - z)
        dz = dh * (h_prev - n)
        dan = dn * (1 - n * n)
        dr = dan * gh_n
        dar, daz = dr * r * (1 - r), dz * z * (1 - z)
        dgi = np.concatenate([dar, daz, dan], axis=1)
        dgh = np.concatenate([dar, daz, dan * r], axis=1)  # r gates the whole recurrent n-term
        return dgi, dgh, dh * z, None  # h_prev also reaches h directly through z*h_prev
    raise ValueError(cell)


def bf16_round(a):
    """a rounded to bfloat16, to nearest even (NaN stays NaN), in a's dtype: C's bf16_bits."""
    a = np.asarray(a)
    f = a.astype(np.float32)
    u = f.view(np.uint32).astype(np.uint64)
    r = (((u + 0x7FFF + ((u >> 16) & 1)) >> 16) << 16).astype(np.uint32).view(np.float32)
    return np.where(np.isnan(f), f, r).astype(a.dtype)


def _mm(a, b, bf16):
    """a @ b; in bf16 mode of operands rounded to bfloat16 first (products in full precision), as
    every matmul of the C model's bf16 precision."""
    return bf16_round(a) @ bf16_round(b) if bf16 else a @ b


def _layer_forward(cell, W_ih, W_hh, b_ih, b_hh, x, h, c, reverse=False, active=None, bf16=False):
    """One direction of one layer. reverse runs t = T-1 .. 0. active (T, B) bool or None: where
    False a sequence has ended, so its state holds and its output is 0 (packed-sequence rules;
    the reverse direction then starts at each sequence's own last step)."""
    T = x.shape[0]
    outs, steps = [None] * T, [None] * T
    for t in (reversed(range(T)) if reverse else range(T)):
        gi = _mm(x[t], W_ih.T, bf16)
        gh = _mm(h, W_hh.T, bf16)
        if b_ih is not None:
            gi = gi + b_ih
            gh = gh + b_hh
        h_prev, c_prev = h, c
        h, c, sc = _step_forward(cell, gi, gh, h, c)
        out = h
        if active is not None:
            a = active[t][:, None]
            h = np.where(a, h, h_prev)
            c = None if c is None else np.where(a, c, c_prev)
            out = np.where(a, h, 0)
        outs[t] = out
        steps[t] = (h_prev, sc)
    return np.stack(outs), h, c, steps


def _layer_backward(cell, W_ih, W_hh, has_bias, x, steps, dout, dh, dc, reverse=False, active=None, bf16=False,
                    by_token=False):
    """BPTT through one direction of one layer (see _layer_forward). dout: (T,B,H) grads on the
    outputs; dh, dc: grads on the final states. Returns dx, dh0, dc0, and the four parameter grads.
    by_token: the caller takes the input projection's gradients from the gate gradients itself
    (lm_backward in bf16), so dW_ih stays zero and dx holds those gate gradients (T, B, G*H)."""
    T = x.shape[0]
    dW_ih, dW_hh = np.zeros_like(W_ih), np.zeros_like(W_hh)
    db_ih = np.zeros(W_ih.shape[0], dtype=W_ih.dtype) if has_bias else None
    db_hh = np.zeros(W_hh.shape[0], dtype=W_hh.dtype) if has_bias else None
    dx = np.zeros_like(x)
    for t in (range(T) if reverse else reversed(range(T))):
        h_prev, sc = steps[t]
        dh_t = dout[t] + dh  # output grad plus what flowed back from the next step
        if active is None:
            dgi, dgh, dh_direct, dc = _step_backward(cell, sc, dh_t, dc)
        else:
            # an ended sequence's step is the identity on (h, c): its gradient passes straight through
            a = active[t][:, None]
            dgi, dgh, dh_direct, dc_prev = _step_backward(cell, sc, np.where(a, dh_t, 0),
                                                          None if dc is None else np.where(a, dc, 0))
            dgi, dgh = np.where(a, dgi, 0), np.where(a, dgh, 0)
            skip = np.where(a, 0, dh)
            dh_direct = skip if dh_direct is None else np.where(a, dh_direct, 0) + skip
            dc = None if dc is None else np.where(a, dc_prev, 0) + np.where(a, 0, dc)
        if by_token:
            if t == (0 if reverse else T - 1):
                dx = np.zeros((T,) + dgi.shape, dgi.dtype)
            dx[t] = dgi
        else:
            dW_ih += _mm(dgi.T, x[t], bf16)
            dx[t] = _mm(dgi, W_ih, bf16)
        dW_hh += _mm(dgh.T, h_prev, bf16)
        if has_bias:
            db_ih += dgi.sum(0)
            db_hh += dgh.sum(0)
        dh = _mm(dgh, W_hh, bf16)
        if dh_direct is not None:
            dh = dh + dh_direct
    return dx, dh, dc, (dW_ih, dW_hh, db_ih, db_hh)


# ----------------------------------------------------------------------------- stack

def stack_shape(params):
    """(num_layers, directions, hidden_size) of a stack's parameter dict."""
    L = sum(1 for k in params if k.startswith('weight_ih_l') and not k.endswith('_reverse'))
    D = 2 if 'weight_ih_l0_reverse' in params else 1
    return L, D, params['weight_hh_l0'].shape[1]


def active_steps(lengths, T):
    """(T, B) bool: step t of sequence b is valid, t < lengths[b]."""
    return np.arange(T)[:, None] < np.asarray(lengths)[None, :]


def stack_forward(params, cell, x, h0=None, c0=None, dropout=0.0, masks=None, lengths=None, bf16=False):
    """x: (T, B, In) time-major. h0/c0: (L*D, B, H) or None (zeros), index l*D + d as torch.
    Dropout like torch: on the output of every layer except the last, as out * mask / (1-p);
    masks: L-1 keep-masks (T, B, D*H) of 0/1 (dropout_masks, sites 1..L-1), required when dropout > 0.
    lengths: B ints in [1, T] or None (all T), with pack_padded_sequence's semantics.
    bf16: every matmul's operands rounded to bfloat16 (_mm).
    Returns out (T, B, D*H), h_n (L*D, B, H), c_n (None unless lstm), cache."""
    cell = _cell_name(cell)
    dt = x.dtype
    L, D, H = stack_shape(params)
    T, B = x.shape[:2]
    active = None
    if lengths is not None:
        active = active_steps(lengths, T)
        x = np.where(active[..., None], x, 0).astype(dt)   # padding is never read
    if h0 is None:
        h0 = np.zeros((L * D, B, H), dtype=dt)
    if cell == 'lstm' and c0 is None:
        c0 = np.zeros((L * D, B, H), dtype=dt)
    if dropout > 0 and L > 1 and masks is None:
        raise ValueError('dropout needs its masks: draw them with oracle.dropout_masks')
    scale = dropout_scale(dropout, dt)
    inp, layers, h_n, c_n = x, [], [], []
    for l in range(L):
        outs = []
        for d in range(D):
            s, k = layer_suffix(l, d), l * D + d
            out, h, c, steps = _layer_forward(
                cell, params['weight_ih' + s], params['weight_hh' + s], params.get('bias_ih' + s),
                params.get('bias_hh' + s), inp, h0[k], None if c0 is None else c0[k], d == 1, active, bf16)
            layers.append((inp, steps))
            h_n.append(h)
            c_n.append(c)
            outs.append(out)
        out = np.concatenate(outs, axis=-1) if D == 2 else outs[0]
        if masks is not None and l < L - 1:
            out = out * (masks[l] * scale).astype(dt)
        inp = out
    cache = dict(params=params, cell=cell, layers=layers, masks=masks, scale=scale, active=active,
                 shape=(L, D, H), bf16=bf16)
    c_n = np.stack(c_n) if cell == 'lstm' else None
    return inp, np.stack(h_n), c_n, cache


def stack_backward(cache, dout, dh_n=None, dc_n=None, by_token=False):
    """Returns dx (T,B,In), dh0 (L*D,B,H), dc0 (L*D,B,H) or None, grads (same names as params).
    dout at the padding of a shorter sequence is ignored (no output there). by_token: layer 0
    returns its gate gradients in place of dx and leaves weight_ih_l0's gradient zero (see
    _layer_backward)."""
    params, cell, masks, active = cache['params'], cache['cell'], cache['masks'], cache['active']
    L, D, H = cache['shape']
    grads, dh0, dc0 = {}, [None] * (L * D), [None] * (L * D)
    for l in reversed(range(L)):
        if masks is not None and l < L - 1:
            dout = dout * (masks[l] * cache['scale']).astype(dout.dtype)
        dinp = None
        for d in range(D):
            s, k = layer_suffix(l, d), l * D + d
            inp, steps = cache['layers'][k]
            dout_d = dout[..., d * H:(d + 1) * H]
            dh = np.zeros_like(dout_d[0]) if dh_n is None else dh_n[k]
            dc = None
            if cell == 'lstm':
                dc = np.zeros_like(dout_d[0]) if dc_n is None else dc_n[k]
            dx, dh0[k], dc0[k], g = _layer_backward(
                cell, params['weight_ih' + s], params['weight_hh' + s], 'bias_ih' + s in params,
                inp, steps, dout_d, dh, dc, d == 1, active, cache.get('bf16', False), by_token and l == 0)
            dinp = dx if dinp is None else dinp + dx
            for name, gr in zip(('weight_ih', 'weight_hh', 'bias_ih', 'bias_hh'), g):
                if gr is not None:
                    grads[name + s] = gr
        dout = dinp  # d(input of layer l)
    grads = {k: grads[k] for k in params}  # same order as params
    return dout, np.stack(dh0), (np.stack(dc0) if cell == 'lstm' else None), grads


# ----------------------------------------------------------------------------- cells

def cell_forward(params, cell, x, h=None, c=None):
    """One step of nn.RNNCell / LSTMCell / GRUCell. params: weight_ih, weight_hh[, bias_ih,
    bias_hh]; x (B, In); h, c (B, H) or None (zeros). Returns h', c' (None unless lstm), cache."""
    cell = _cell_name(cell)
    H = params['weight_hh'].shape[1]
    h = np.zeros((x.shape[0], H), x.dtype) if h is None else h
    if cell == 'lstm' and c is None:
        c = np.zeros_like(h)
    out, h, c, steps = _layer_forward(cell, params['weight_ih'], params['weight_hh'],
                                      params.get('bias_ih'), params.get('bias_hh'), x[None], h, c)
    return h, c, dict(params=params, cell=cell, x=x[None], steps=steps)


def cell_backward(cache, dh, dc=None):
    """Backward of cell_forward given dh (and dc for lstm; None = zeros) on its outputs.
    Returns dx, dh_prev, dc_prev (None unless lstm), grads (same names as params)."""
    params, cell = cache['params'], cache['cell']
    if cell == 'lstm' and dc is None:
        dc = np.zeros_like(dh)
    dx, dh_prev, dc_prev, g = _layer_backward(cell, params['weight_ih'], params['weight_hh'],
                                              'bias_ih' in params, cache['x'], cache['steps'],
                                              dh[None], np.zeros_like(dh), dc)
    grads = dict(zip(('weight_ih', 'weight_hh', 'bias_ih', 'bias_hh'), g))
    return dx[0], dh_prev, dc_prev, {k: grads[k] for k in params}


# ----------------------------------------------------------------------------- char LM

def lm_forward(params, cell, inputs, targets, h0=None, c0=None, dropout=0.0, masks=None, bf16=False,
               weight_drop=0.0, weight_masks=None, embed_dropout=0.0, embedding_mask=None):
    """inputs/targets: int (B, T). masks: L keep-masks (T,B,H), the first L-1 between layers,
    the last on the top layer's output before the head (dropout_masks, sites 1..L); required
    when dropout > 0. bf16: every matmul's operands rounded to bfloat16. weight_masks: L keep-masks
    of W_hh (weight drop, one per layer: oracle.weight_masks); embedding_mask: (V,) keep-mask of the
    embedding's rows (oracle.embedding_mask); each scaled by 1 / (1 - its rate).
    Returns loss (mean CE over B*T), logits (T,B,V), h_n, c_n, cache."""
    cell = _cell_name(cell)
    emb = params['embedding.weight']
    stack = {k[4:]: v for k, v in params.items() if k.startswith('rnn.')}
    L = stack_shape(stack)[0]
    if dropout > 0 and masks is None:
        raise ValueError('dropout needs its masks: draw them with oracle.dropout_masks')
    if weight_masks is not None:   # DropConnect: the stack runs on masked copies of W_hh
        weight_masks = [(m * dropout_scale(weight_drop, emb.dtype)).astype(emb.dtype) for m in weight_masks]
        for l, m in enumerate(weight_masks):
            stack[f'weight_hh_l{l}'] = stack[f'weight_hh_l{l}'] * m
    if embedding_mask is not None:   # whole rows of the table dropped
        embedding_mask = (embedding_mask * dropout_scale(embed_dropout, emb.dtype)).astype(emb.dtype)
        emb = emb * embedding_mask[:, None]
    x = emb[inputs.T]  # (T, B, E): the stack runs time-major
    y, h_n, c_n, scache = stack_forward(stack, cell, x, h0, c0, dropout,
                                        None if masks is None else masks[:L - 1], bf16=bf16)
    scale = dropout_scale(dropout, y.dtype)
    if masks is not None:
        y = y * (masks[L - 1] * scale).astype(y.dtype)
    logits = _mm(y, params['head.weight'].T, bf16) + params['head.bias']  # (T, B, V)
    # stable log-softmax
    z = logits - logits.max(-1, keepdims=True)
    ez = np.exp(z)
    sumexp = ez.sum(-1, keepdims=True)
    tgt = targets.T  # (T, B)
    logp = np.take_along_axis(z, tgt[..., None], -1)[..., 0] - np.log(sumexp[..., 0])
    loss = -logp.mean()
    cache = dict(params=params, inputs=inputs, tgt=tgt, y=y, probs=ez / sumexp, emb=emb,
                 scache=scache, masks=masks, scale=scale, cell=cell, bf16=bf16, weight_masks=weight_masks,
                 embedding_mask=embedding_mask)
    return loss, logits, h_n, c_n, cache


def lm_backward(cache):
    """Gradient of the mean loss (d loss = 1). Returns grads (LM names), dh0, dc0."""
    params, tgt, y = cache['params'], cache['tgt'], cache['y']
    T, B = tgt.shape
    # d(mean CE)/d(logits) = (softmax - onehot) / (B*T)
    dlogits = cache['probs'].copy()
    np.put_along_axis(dlogits, tgt[..., None],
                      np.take_along_axis(dlogits, tgt[..., None], -1) - 1, -1)
    dlogits /= B * T
    V, H = params['head.weight'].shape
    bf16 = cache['bf16']
    d2 = dlogits.reshape(-1, V)
    dhead_w = _mm(d2.T, y.reshape(-1, H), bf16)
    dhead_b = d2.sum(0)
    dy = _mm(dlogits, params['head.weight'], bf16)
    masks = cache['masks']
    if masks is not None:
        dy = dy * (masks[-1] * cache['scale']).astype(dy.dtype)
    # In bf16 the embedding's projection takes its gradients as the C model does for a batch of at
    # least V rows: layer 0's gate gradients summed by token, then rounded (one matmul row a token)
    by_token = bf16 and T * B >= V
    dx, dh0, dc0, sgrads = stack_backward(cache['scache'], dy, by_token=by_token)
    emb, tokens = cache['emb'], cache['inputs'].T   # emb: the table as the forward read it
    demb = np.zeros_like(emb)
    if by_token:
        seen = np.unique(tokens)
        dproj = np.zeros((V, dx.shape[-1]), dx.dtype)
        np.add.at(dproj, tokens, dx)
        W_ih = params['rnn.weight_ih_l0']
        sgrads['weight_ih_l0'] = _mm(dproj[seen].T, emb[seen], True)
        demb[seen] = _mm(dproj[seen], W_ih, True)
    else:
        np.add.at(demb, tokens, dx)  # repeated tokens accumulate
    if cache['embedding_mask'] is not None:
        demb *= cache['embedding_mask'][:, None]
    for l, m in enumerate(cache['weight_masks'] or []):
        sgrads[f'weight_hh_l{l}'] = sgrads[f'weight_hh_l{l}'] * m
    grads = {'embedding.weight': demb}
    for k, v in sgrads.items():
        grads['rnn.' + k] = v
    grads['head.weight'] = dhead_w
    grads['head.bias'] = dhead_b
    return grads, dh0, dc0


# ----------------------------------------------------------------------------- optimizer

def clip_grad_norm(grads, max_norm):
    """torch.nn.utils.clip_grad_norm_ (L2, global). Scales grads in place; returns the
    norm before clipping. max_norm None or <= 0 means no clipping."""
    norm = np.sqrt(sum(np.sum(g * g) for g in grads.values()))
    if max_norm and max_norm > 0:
        coef = max_norm / (norm + 1e-6)
        if coef < 1:
            for g in grads.values():
                g *= g.dtype.type(coef)
    return float(norm)


def adamw_step(params, grads, m, v, t, lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
    """One torch.optim.AdamW step, in place on params, m, v, in torch's order of operations (so
    float32 rounds as torch does). t starts at 1. Decoupled weight decay applies to every
    parameter, biases and embedding included (torch with a single param group)."""
    b1, b2 = betas
    bc1, bc2 = 1 - b1 ** t, 1 - b2 ** t
    step_size, bc2_sqrt = lr / bc1, bc2 ** 0.5
    for k in params:
        p, g = params[k], grads[k]
        p *= p.dtype.type(1 - lr * weight_decay)  # decay uses the pre-update p
        m[k] += (g - m[k]) * p.dtype.type(1 - b1)  # torch: exp_avg.lerp_(grad, 1 - beta1)
        v[k] *= p.dtype.type(b2)
        v[k] += p.dtype.type(1 - b2) * g * g
        p += p.dtype.type(-step_size) * (m[k] / (np.sqrt(v[k]) / p.dtype.type(bc2_sqrt) + p.dtype.type(eps)))


def train_steps(params, cell, inputs, targets, h0, c0, n_steps, lr, betas, eps,
                weight_decay, max_grad_norm, bf16=False):
    """n_steps of forward, backward, clip, AdamW on one fixed batch and fixed h0/c0.
    Returns (step_losses, step_norms, params_after); the given params are not modified."""
    params = {k: p.copy() for k, p in params.items()}
    m = {k: np.zeros_like(p) for k, p in params.items()}
    v = {k: np.zeros_like(p) for k, p in params.items()}
    losses, norms = [], []
    for step in range(1, n_steps + 1):
        loss, _, _, _, cache = lm_forward(params, cell, inputs, targets, h0, c0, bf16=bf16)
        grads, _, _ = lm_backward(cache)
        norms.append(clip_grad_norm(grads, max_grad_norm))
        losses.append(float(loss))
        adamw_step(params, grads, m, v, step, lr, betas, eps, weight_decay)
    return np.array(losses), np.array(norms), params
