"""NumPy oracle for pyrnn: the ground truth the C and CUDA trainers are tested against.

Recurrent stacks with exactly PyTorch's nn.RNN / nn.LSTM / nn.GRU semantics (time-major,
double bias, gate orders LSTM i,f,g,o and GRU r,z,n), a char LM around them
(Embedding -> stack -> Linear -> mean cross-entropy), explicit per-timestep BPTT,
torch-style global-norm clipping and torch.optim.AdamW.

Everything is computed in the dtype of the inputs (float64 for references and
finite-difference tests, float32 to mimic the C code). No autograd anywhere: each
backward is written out by hand, min-char-rnn style.
"""
import numpy as np

CELLS = ('rnn', 'rnn_relu', 'lstm', 'gru')  # the cell id stored in files is the index here
_GATES = {'rnn': 1, 'rnn_relu': 1, 'lstm': 4, 'gru': 3}


def _cell_name(cell):
    # accept a name or the integer id used in files
    if isinstance(cell, (int, np.integer)):
        return CELLS[int(cell)]
    if cell not in _GATES:
        raise ValueError(f'unknown cell {cell!r}, expected one of {CELLS}')
    return cell


def gates(cell):
    """Number of stacked gate blocks G: weight_ih is (G*H, in)."""
    return _GATES[_cell_name(cell)]


# ----------------------------------------------------------------------------- parameters

def stack_param_names(num_layers, bias=True):
    names = []
    for l in range(num_layers):
        names += [f'weight_ih_l{l}', f'weight_hh_l{l}']
        if bias:
            names += [f'bias_ih_l{l}', f'bias_hh_l{l}']
    return names


def stack_param_shapes(cell, input_size, hidden_size, num_layers, bias=True):
    G, H = gates(cell), hidden_size
    shapes = {}
    for l in range(num_layers):
        shapes[f'weight_ih_l{l}'] = (G * H, input_size if l == 0 else H)
        shapes[f'weight_hh_l{l}'] = (G * H, H)
        if bias:
            shapes[f'bias_ih_l{l}'] = (G * H,)
            shapes[f'bias_hh_l{l}'] = (G * H,)
    return shapes


def lm_param_shapes(cell, V, E, H, L):
    """Shapes of the char LM in torch state_dict order (docs/formats.md)."""
    shapes = {'embedding.weight': (V, E)}
    for name, shape in stack_param_shapes(cell, E, H, L).items():
        shapes['rnn.' + name] = shape
    shapes['head.weight'] = (V, H)
    shapes['head.bias'] = (V,)
    return shapes


def init_stack_params(cell, input_size, hidden_size, num_layers, bias=True, rng=None,
                      dtype=np.float32):
    # torch's default: every tensor of the stack ~ U(-1/sqrt(H), 1/sqrt(H))
    rng = np.random.default_rng() if rng is None else rng
    k = 1.0 / np.sqrt(hidden_size)
    return {name: rng.uniform(-k, k, size=shape).astype(dtype)
            for name, shape in stack_param_shapes(cell, input_size, hidden_size,
                                                  num_layers, bias).items()}


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


# ----------------------------------------------------------------------------- cells
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


def _layer_forward(cell, W_ih, W_hh, b_ih, b_hh, x, h, c):
    T = x.shape[0]
    outs, steps = [], []
    for t in range(T):
        gi = x[t] @ W_ih.T
        gh = h @ W_hh.T
        if b_ih is not None:
            gi = gi + b_ih
            gh = gh + b_hh
        h_prev = h
        h, c, sc = _step_forward(cell, gi, gh, h, c)
        outs.append(h)
        steps.append((h_prev, sc))
    return np.stack(outs), h, c, steps


def _layer_backward(cell, W_ih, W_hh, has_bias, x, steps, dout, dh, dc):
    """BPTT through one layer. dout: (T,B,H) grads on the outputs; dh, dc: grads on the
    final states. Returns dx, dh0, dc0, and the four parameter grads."""
    T = x.shape[0]
    dW_ih, dW_hh = np.zeros_like(W_ih), np.zeros_like(W_hh)
    db_ih = np.zeros(W_ih.shape[0], dtype=W_ih.dtype) if has_bias else None
    db_hh = np.zeros(W_hh.shape[0], dtype=W_hh.dtype) if has_bias else None
    dx = np.zeros_like(x)
    for t in reversed(range(T)):
        h_prev, sc = steps[t]
        dh_t = dout[t] + dh  # output grad plus what flowed back from step t+1
        dgi, dgh, dh_direct, dc = _step_backward(cell, sc, dh_t, dc)
        dW_ih += dgi.T @ x[t]
        dW_hh += dgh.T @ h_prev
        if has_bias:
            db_ih += dgi.sum(0)
            db_hh += dgh.sum(0)
        dx[t] = dgi @ W_ih
        dh = dgh @ W_hh
        if dh_direct is not None:
            dh = dh + dh_direct
    return dx, dh, dc, (dW_ih, dW_hh, db_ih, db_hh)


# ----------------------------------------------------------------------------- stack

def _num_layers(params):
    return sum(1 for k in params if k.startswith('weight_ih_l'))


def stack_forward(params, cell, x, h0=None, c0=None, dropout=0.0, masks=None):
    """x: (T, B, In) time-major. h0/c0: (L, B, H) or None (zeros).
    Dropout like torch: on the output of every layer except the last, as x * mask / (1-p).
    masks: L-1 arrays (T,B,H) of 0/1; if None and dropout > 0 they are drawn at random
    (unseeded) and kept in the cache. Returns out (T,B,H), h_n, c_n (None unless lstm), cache."""
    cell = _cell_name(cell)
    dt = x.dtype
    L = _num_layers(params)
    H = params['weight_hh_l0'].shape[1]
    B = x.shape[1]
    if h0 is None:
        h0 = np.zeros((L, B, H), dtype=dt)
    if cell == 'lstm' and c0 is None:
        c0 = np.zeros((L, B, H), dtype=dt)
    if masks is None and dropout > 0 and L > 1:
        rng = np.random.default_rng()
        masks = [(rng.random((x.shape[0], B, H)) >= dropout).astype(dt) for _ in range(L - 1)]
    scale = 1.0 / (1.0 - dropout)
    inp, layers, h_n, c_n = x, [], [], []
    for l in range(L):
        W_ih, W_hh = params[f'weight_ih_l{l}'], params[f'weight_hh_l{l}']
        b_ih, b_hh = params.get(f'bias_ih_l{l}'), params.get(f'bias_hh_l{l}')
        out, h, c, steps = _layer_forward(cell, W_ih, W_hh, b_ih, b_hh, inp,
                                          h0[l], None if c0 is None else c0[l])
        layers.append((inp, steps))
        h_n.append(h)
        c_n.append(c)
        if masks is not None and l < L - 1:
            out = out * (masks[l] * scale).astype(dt)
        inp = out
    cache = dict(params=params, cell=cell, layers=layers, masks=masks, scale=scale)
    c_n = np.stack(c_n) if cell == 'lstm' else None
    return inp, np.stack(h_n), c_n, cache


def stack_backward(cache, dout, dh_n=None, dc_n=None):
    """Returns dx (T,B,In), dh0 (L,B,H), dc0 (L,B,H) or None, grads (same names as params)."""
    params, cell, masks = cache['params'], cache['cell'], cache['masks']
    L = len(cache['layers'])
    grads, dh0, dc0 = {}, [None] * L, [None] * L
    for l in reversed(range(L)):
        inp, steps = cache['layers'][l]
        if masks is not None and l < L - 1:
            dout = dout * (masks[l] * cache['scale']).astype(dout.dtype)
        dh = np.zeros_like(dout[0]) if dh_n is None else dh_n[l]
        dc = None
        if cell == 'lstm':
            dc = np.zeros_like(dout[0]) if dc_n is None else dc_n[l]
        has_bias = f'bias_ih_l{l}' in params
        dout, dh0[l], dc0[l], g = _layer_backward(
            cell, params[f'weight_ih_l{l}'], params[f'weight_hh_l{l}'], has_bias,
            inp, steps, dout, dh, dc)  # dout becomes d(input of layer l)
        for name, d in zip(('weight_ih', 'weight_hh', 'bias_ih', 'bias_hh'), g):
            if d is not None:
                grads[f'{name}_l{l}'] = d
    grads = {k: grads[k] for k in params}  # same order as params
    return dout, np.stack(dh0), (np.stack(dc0) if cell == 'lstm' else None), grads


# ----------------------------------------------------------------------------- char LM

def lm_forward(params, cell, inputs, targets, h0=None, c0=None, dropout=0.0, masks=None):
    """inputs/targets: int (B, T). masks: L arrays (T,B,H), the first L-1 between layers,
    the last on the top layer's output before the head.
    Returns loss (mean CE over B*T), logits (T,B,V), h_n, c_n, cache."""
    cell = _cell_name(cell)
    emb = params['embedding.weight']
    stack = {k[4:]: v for k, v in params.items() if k.startswith('rnn.')}
    L = _num_layers(stack)
    B, T = inputs.shape
    H = stack['weight_hh_l0'].shape[1]
    if masks is None and dropout > 0:
        rng = np.random.default_rng()
        masks = [(rng.random((T, B, H)) >= dropout).astype(emb.dtype) for _ in range(L)]
    x = emb[inputs.T]  # (T, B, E): the stack runs time-major
    y, h_n, c_n, scache = stack_forward(stack, cell, x, h0, c0, dropout,
                                        None if masks is None else masks[:L - 1])
    scale = 1.0 / (1.0 - dropout)
    if masks is not None:
        y = y * (masks[L - 1] * scale).astype(y.dtype)
    logits = y @ params['head.weight'].T + params['head.bias']  # (T, B, V)
    # stable log-softmax
    z = logits - logits.max(-1, keepdims=True)
    ez = np.exp(z)
    sumexp = ez.sum(-1, keepdims=True)
    tgt = targets.T  # (T, B)
    logp = np.take_along_axis(z, tgt[..., None], -1)[..., 0] - np.log(sumexp[..., 0])
    loss = -logp.mean()
    cache = dict(params=params, inputs=inputs, tgt=tgt, y=y, probs=ez / sumexp,
                 scache=scache, masks=masks, scale=scale, cell=cell)
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
    d2 = dlogits.reshape(-1, V)
    dhead_w = d2.T @ y.reshape(-1, H)
    dhead_b = d2.sum(0)
    dy = dlogits @ params['head.weight']
    masks = cache['masks']
    if masks is not None:
        dy = dy * (masks[-1] * cache['scale']).astype(dy.dtype)
    dx, dh0, dc0, sgrads = stack_backward(cache['scache'], dy)
    demb = np.zeros_like(params['embedding.weight'])
    np.add.at(demb, cache['inputs'].T, dx)  # repeated tokens accumulate
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
    """One torch.optim.AdamW step, in place on params, m, v. t starts at 1.
    Decoupled weight decay applies to every parameter, biases and embedding included
    (a documented choice: simpler, and what torch does with a single param group)."""
    b1, b2 = betas
    bc1, bc2 = 1 - b1 ** t, 1 - b2 ** t
    for k in params:
        p, g = params[k], grads[k]
        p *= p.dtype.type(1 - lr * weight_decay)  # decay uses the pre-update p
        m[k] *= b1
        m[k] += (1 - b1) * g
        v[k] *= b2
        v[k] += (1 - b2) * g * g
        p -= lr * (m[k] / bc1) / (np.sqrt(v[k] / bc2) + eps)


def train_steps(params, cell, inputs, targets, h0, c0, n_steps, lr, betas, eps,
                weight_decay, max_grad_norm):
    """n_steps of forward, backward, clip, AdamW on one fixed batch and fixed h0/c0.
    Returns (step_losses, step_norms, params_after); the given params are not modified."""
    params = {k: p.copy() for k, p in params.items()}
    m = {k: np.zeros_like(p) for k, p in params.items()}
    v = {k: np.zeros_like(p) for k, p in params.items()}
    losses, norms = [], []
    for step in range(1, n_steps + 1):
        loss, _, _, _, cache = lm_forward(params, cell, inputs, targets, h0, c0)
        grads, _, _ = lm_backward(cache)
        norms.append(clip_grad_norm(grads, max_grad_norm))
        losses.append(float(loss))
        adamw_step(params, grads, m, v, step, lr, betas, eps, weight_decay)
    return np.array(losses), np.array(norms), params
