"""The layer and cell API (pyrnn.RNN/LSTM/GRU, pyrnn.RNNCell/LSTMCell/GRUCell) on both backends:
bidirectional stacks, variable lengths, dropout, one backward per forward, cells unwinding LIFO.

Against torch in float32 (skipped when torch is missing) at relative error < 1e-5 per tensor, and
against the float64 oracle at the same tolerance. The largest error against torch per case is
printed at the end (pytest -s)."""
import os

import numpy as np
import pytest

import pyrnn
from helpers import assert_close, worst_errors
from pyrnn import oracle

TOL = 1e-5
WORST, report_worst = worst_errors('largest relative error per comparison (against torch unless named)')


def close(key, name, a, b, tol=TOL):
    assert_close(f'{key} {name}', a, b, tol, WORST, key)


def layer(cell, *args, **kw):
    if cell in ('rnn', 'rnn_relu'):
        return pyrnn.RNN(*args, nonlinearity='relu' if cell == 'rnn_relu' else 'tanh', **kw)
    return {'lstm': pyrnn.LSTM, 'gru': pyrnn.GRU}[cell](*args, **kw)


def cell_module(cell, *args, **kw):
    if cell in ('rnn', 'rnn_relu'):
        return pyrnn.RNNCell(*args, nonlinearity='relu' if cell == 'rnn_relu' else 'tanh', **kw)
    return {'lstm': pyrnn.LSTMCell, 'gru': pyrnn.GRUCell}[cell](*args, **kw)


def data(rng, T, B, I, H, LD, D, batch_first):
    f = lambda *s: rng.normal(size=s).astype(np.float32)
    x = f(B, T, I) if batch_first else f(T, B, I)
    dout = f(B, T, D * H) if batch_first else f(T, B, D * H)
    return x, f(LD, B, H), f(LD, B, H), dout, f(LD, B, H), f(LD, B, H)


# (B, T, I, H, L, bidirectional, batch_first, lengths): B = 1, a length of 1, lengths all T, 3 layers
CASES = [(4, 6, 5, 7, 3, True, True, [6, 1, 3, 6]), (1, 5, 3, 4, 2, True, False, [2]),
         (3, 4, 2, 5, 1, False, False, [4, 4, 4]), (5, 3, 4, 3, 2, False, True, [1, 3, 2, 1, 3]),
         (2, 1, 3, 6, 3, True, False, [1, 1])]


@pytest.mark.parametrize('cell', oracle.CELLS)
@pytest.mark.parametrize('B,T,I,H,L,bidirectional,batch_first,lengths', CASES)
def test_stack_with_lengths_matches_torch(cell, B, T, I, H, L, bidirectional, batch_first, lengths):
    """Both backends against torch.nn.RNN/LSTM/GRU through pack_padded_sequence."""
    torch = pytest.importorskip('torch', reason='torch is not installed: the parity tests need it')
    lstm, D = cell == 'lstm', 2 if bidirectional else 1
    for backend in ('c', 'numpy'):
        m = layer(cell, I, H, L, batch_first=batch_first, bidirectional=bidirectional, seed=1, backend=backend)
        ref = pyrnn.to_torch(m)
        x, h0, c0, dout, dh_n, dc_n = data(np.random.default_rng(0), T, B, I, H, L * D, D, batch_first)
        out, hn = m(x, (h0, c0) if lstm else h0, lengths=lengths)
        dx, dh = m.backward(dout, (dh_n, dc_n) if lstm else dh_n)
        tx, th0, tc0 = (torch.tensor(a, requires_grad=True) for a in (x, h0, c0))
        packed = torch.nn.utils.rnn.pack_padded_sequence(tx, torch.tensor(lengths), batch_first=batch_first,
                                                         enforce_sorted=False)
        tout, ts = ref(packed, (th0, tc0) if lstm else th0)
        tout = torch.nn.utils.rnn.pad_packed_sequence(tout, batch_first=batch_first, total_length=T)[0]
        thn = ts[0] if lstm else ts
        obj = (tout * torch.from_numpy(dout)).sum() + (thn * torch.from_numpy(dh_n)).sum()
        if lstm:
            obj = obj + (ts[1] * torch.from_numpy(dc_n)).sum()
        obj.backward()
        key = f'{"bidirectional" if bidirectional else "stack"}+lengths {backend}'
        close(key, 'output', out, tout)
        close(key, 'h_n', hn[0] if lstm else hn, thn)
        close(key, 'dx', dx, tx.grad)
        close(key, 'dh0', dh[0] if lstm else dh, th0.grad)
        if lstm:
            close(key, 'c_n', hn[1], ts[1])
            close(key, 'dc0', dh[1], tc0.grad)
        for name, p in ref.named_parameters():
            close(key, f'grad {name}', m.grad[name], p.grad)


@pytest.mark.parametrize('cell', oracle.CELLS)
@pytest.mark.parametrize('B,T,I,H,L', [(1, 1, 3, 4, 3), (3, 5, 4, 37, 2), (19, 3, 300, 6, 2)])
def test_c_bidirectional_dropout_against_oracle(cell, B, T, I, H, L):
    """C (per-layer, per-direction Layers) against the float64 oracle with variable lengths and the
    masks the module drew, which are oracle.dropout_masks from its seed: the same on both backends."""
    lstm, p = cell == 'lstm', 0.3
    m = layer(cell, I, H, L, bidirectional=True, dropout=p, seed=5)
    rng = np.random.default_rng(1)
    x, h0, c0, dout, dh_n, dc_n = data(rng, T, B, I, H, 2 * L, 2, False)
    lengths = np.maximum(1, rng.integers(0, T + 1, B))
    lengths[0] = T
    out, hn = m(x, (h0, c0) if lstm else h0, lengths=lengths)
    dx, dh = m.backward(dout, (dh_n, dc_n) if lstm else dh_n)
    masks = oracle.dropout_masks(oracle.dropout_state(5), range(1, L), T, B, 2 * H, p)[0]
    f64 = lambda a: None if a is None else np.asarray(a, np.float64)
    r_out, r_hn, r_cn, cache = oracle.stack_forward({k: f64(v) for k, v in m.state_dict().items()}, cell, f64(x),
                                                    f64(h0), f64(c0) if lstm else None, p, [f64(k) for k in masks],
                                                    lengths)
    r_dx, r_dh0, r_dc0, grads = oracle.stack_backward(cache, f64(dout), f64(dh_n), f64(dc_n) if lstm else None)
    close('c vs oracle', 'output', out, r_out)
    close('c vs oracle', 'h_n', hn[0] if lstm else hn, r_hn)
    close('c vs oracle', 'dx', dx, r_dx)
    close('c vs oracle', 'dh0', dh[0] if lstm else dh, r_dh0)
    if lstm:
        close('c vs oracle', 'c_n', hn[1], r_cn)
        close('c vs oracle', 'dc0', dh[1], r_dc0)
    for k, g in grads.items():
        close('c vs oracle', f'grad {k}', m.grad[k], g)
    # the numpy backend draws the same masks: the same answer in float32
    n = layer(cell, I, H, L, bidirectional=True, dropout=p, seed=5, backend='numpy')
    n_out, _ = n(x, (h0, c0) if lstm else h0, lengths=lengths)
    close('c vs numpy', 'output with dropout', out, n_out)


def test_dropout_train_and_eval():
    m = pyrnn.GRU(3, 8, 3, dropout=0.5, seed=2)
    x = np.random.default_rng(0).normal(size=(4, 2, 3)).astype(np.float32)
    plain = pyrnn.GRU(3, 8, 3, seed=2)
    assert m.training
    a, b = m(x)[0], m(x)[0]
    ref = plain(x)[0]
    assert not np.allclose(a, ref) and not np.allclose(a, b)   # masks in training, fresh each forward
    m.eval()
    np.testing.assert_array_equal(m(x)[0], ref)                # none in eval, as torch
    np.testing.assert_array_equal(pyrnn.GRU(3, 8, 1, dropout=0.5, seed=2)(x)[0],
                                  pyrnn.GRU(3, 8, 1, seed=2)(x)[0])   # one layer: nothing between layers
    assert m.train() is m and m.training


@pytest.mark.parametrize('backend', ['c', 'numpy'])
def test_one_backward_per_forward(backend):
    m = pyrnn.LSTM(3, 4, 2, bidirectional=True, backend=backend, seed=0)
    x = np.ones((5, 2, 3), np.float32)
    out, _ = m(x)
    m.backward(np.ones_like(out))
    g = {k: v.copy() for k, v in m.grad.items()}
    with pytest.raises(RuntimeError, match='one backward per forward'):
        m.backward(np.ones_like(out))
    assert all(np.array_equal(g[k], v) for k, v in m.grad.items())   # nothing doubled
    # a failed backward (bad shape) keeps the forward: the right call still works
    m(x)
    with pytest.raises(ValueError, match=r'doutput has shape \(5, 2, 4\), expected \(5, 2, 8\)'):
        m.backward(np.ones((5, 2, 4), np.float32))
    dx, (dh0, dc0) = m.backward(np.ones_like(out), (None, np.ones((4, 2, 4), np.float32)))
    assert dx.shape == (5, 2, 3) and dh0.shape == dc0.shape == (4, 2, 4)


@pytest.mark.parametrize('backend', ['c', 'numpy'])
def test_lengths_errors(backend):
    n = pyrnn.GRU(3, 4, bidirectional=True, seed=0, backend=backend)
    x = np.random.default_rng(0).normal(size=(5, 2, 3)).astype(np.float32)
    out, hn = n(x, lengths=[5, 5])          # every sequence full: the plain stack
    np.testing.assert_array_equal(out, n(x)[0])
    np.testing.assert_array_equal(hn, n(x)[1])
    out, hn = n(x, lengths=[5, 3])
    n.zero_grad()
    n.backward(np.ones_like(out), np.ones_like(hn))
    grads = {k: g.copy() for k, g in n.grad.items()}
    x[3:, 1] = np.nan                       # padding is never read, whatever it holds
    np.testing.assert_array_equal(n(x, lengths=[5, 3])[0], out)
    n.zero_grad()
    n.backward(np.ones_like(out), np.ones_like(hn))
    assert all(np.array_equal(g, grads[k]) for k, g in n.grad.items())
    for bad, err, msg in [([5], ValueError, r'lengths has shape \(1,\), expected \(2,\)'),
                          ([0, 5], ValueError, r'lengths must lie in \[1, 5\].*got 0'),
                          ([6, 5], ValueError, r'lengths must lie in \[1, 5\].*got 6'),
                          ([1.5, 2.0], TypeError, 'lengths must be integers')]:
        with pytest.raises(err, match=msg):
            n(x, lengths=bad)
    with pytest.raises(ValueError, match='lengths needs batched input'):
        n(x[:, 0], lengths=[5])
    with pytest.raises(ValueError, match=r'hx has shape \(1, 2, 4\), expected \(2, 2, 4\)'):
        n(x, np.zeros((1, 2, 4), np.float32))   # bidirectional: 2 * num_layers states


@pytest.mark.parametrize('backend', ['c', 'numpy'])
def test_parameters_are_views(backend):
    m = pyrnn.LSTM(3, 4, 2, bidirectional=True, backend=backend, seed=0)
    x = np.random.default_rng(0).normal(size=(3, 2, 3)).astype(np.float32)
    before = m(x)[0]
    p = m.parameters()
    assert list(p) == list(m.state_dict()) == oracle.stack_param_names(2, bidirectional=True)
    p['weight_ih_l1_reverse'][...] *= 2       # in place: the next forward sees it
    after = m(x)[0]
    assert np.array_equal(after[..., :4], before[..., :4]) and not np.allclose(after[..., 4:], before[..., 4:])
    assert np.array_equal(m.state_dict()['weight_ih_l1_reverse'], p['weight_ih_l1_reverse'])
    m.backward(np.ones_like(after))
    g = m.grad
    assert g['bias_hh_l0'].any()
    m.zero_grad()
    assert not any(v.any() for v in g.values())   # the same views, zeroed


# ----------------------------------------------------------------------------- cells

@pytest.mark.parametrize('backend', ['c', 'numpy'])
@pytest.mark.parametrize('cell', oracle.CELLS)
def test_cell_bptt_loop_matches_torch(cell, backend):
    """A Python loop of cells, unwound by as many backward calls, is torch's autograd through it."""
    torch = pytest.importorskip('torch', reason='torch is not installed: the parity tests need it')
    I, H, B, T = 5, 6, 3, 4
    lstm = cell == 'lstm'
    m = cell_module(cell, I, H, seed=2, backend=backend)
    ref = pyrnn.to_torch(m)
    rng = np.random.default_rng(3)
    xs, douts = rng.normal(size=(T, B, I)).astype(np.float32), rng.normal(size=(T, B, H)).astype(np.float32)
    h0 = rng.normal(size=(B, H)).astype(np.float32)
    c0 = rng.normal(size=(B, H)).astype(np.float32)
    state, hs = ((h0, c0) if lstm else h0), []
    for t in range(T):
        state = m(xs[t], state)
        hs.append(state[0] if lstm else state)
    dh, dc, dxs = np.zeros((B, H), np.float32), None, [None] * T
    for t in reversed(range(T)):
        dx, dprev = m.backward((dh + douts[t], dc) if lstm else dh + douts[t])
        dxs[t] = dx
        dh, dc = dprev if lstm else (dprev, None)
    with pytest.raises(RuntimeError, match='every forward call has been undone'):
        m.backward((dh, dc) if lstm else dh)
    tx = torch.tensor(xs, requires_grad=True)
    th0, tc0 = torch.tensor(h0, requires_grad=True), torch.tensor(c0, requires_grad=True)
    state, obj, ths = ((th0, tc0) if lstm else th0), 0, []
    for t in range(T):
        state = ref(tx[t], state)
        ths.append(state[0] if lstm else state)
        obj = obj + (ths[-1] * torch.from_numpy(douts[t])).sum()
    obj.backward()
    key = f'cells {backend}'
    close(key, 'h', np.stack(hs), torch.stack(ths))
    close(key, 'dx', np.stack(dxs), tx.grad)
    close(key, 'dh0', dh, th0.grad)
    if lstm:
        close(key, 'dc0', dc, tc0.grad)
    for name, p in ref.named_parameters():
        close(key, f'grad {name}', m.grad[name], p.grad)


@pytest.mark.parametrize('cell', oracle.CELLS)
def test_cell_lifo_interleaved_c_equals_numpy(cell):
    """Two calls, undone last in, first out: the C cell runs the older call forward again before its
    backward; every result equals the numpy cell's (float32 rounding apart)."""
    lstm = cell == 'lstm'
    rng = np.random.default_rng(4)
    x1, x2 = rng.normal(size=(2, 3)).astype(np.float32), rng.normal(size=(2, 3)).astype(np.float32)
    h = rng.normal(size=(2, 5)).astype(np.float32)
    hx = (h, h * 0.5) if lstm else h
    d = rng.normal(size=(2, 5)).astype(np.float32)
    results = []
    for backend in ('c', 'numpy'):
        m = cell_module(cell, 3, 5, seed=9, backend=backend)
        x = x1.copy()
        a = m(x, hx)
        b = m(x2, hx)                         # an independent call on the same state
        x[...] = 0                            # the cell recorded a copy
        rb = m.backward((d, d) if lstm else d)
        ra = m.backward((d, None) if lstm else d)
        results.append((a, b, rb, ra, {k: v.copy() for k, v in m.grad.items()}))
    flat = lambda r: np.concatenate([np.ravel(v) for v in _leaves(r)])
    np.testing.assert_allclose(flat(results[0]), flat(results[1]), rtol=1e-5, atol=1e-6)


def _leaves(r):
    if isinstance(r, dict):
        for v in r.values():
            yield from _leaves(v)
    elif isinstance(r, (tuple, list)):
        for v in r:
            yield from _leaves(v)
    elif r is not None:
        yield r


def test_cell_unbatched_eval_and_errors():
    m = pyrnn.GRUCell(3, 4, seed=0)
    x = np.ones(3, np.float32)
    h = m(x)
    assert h.shape == (4,)
    np.testing.assert_array_equal(h, m(x[None])[0])
    dx, dh = m.backward(np.ones((1, 4), np.float32))     # the batched call, the latest
    assert dx.shape == (1, 3) and dh.shape == (1, 4)
    with pytest.raises(ValueError, match=r'dh has shape \(1, 4\), expected \(4,\)'):
        m.backward(np.ones((1, 4), np.float32))          # the unbatched one is next: (4,)
    dx, dh = m.backward(np.ones(4, np.float32))
    assert dx.shape == (3,) and dh.shape == (4,)
    m.eval()
    m(x)
    with pytest.raises(RuntimeError, match='only in training mode'):
        m.backward(np.ones(4, np.float32))
    with pytest.raises(ValueError, match=r'x has shape \(2,\), expected \(B, 3\) or \(3,\)'):
        m(np.ones(2, np.float32))
    with pytest.raises(TypeError, match=r'hx must be a pair \(h, c\) for an LSTM'):
        pyrnn.LSTMCell(3, 4)(x, np.zeros(4, np.float32))
    assert list(m.parameters()) == ['weight_ih', 'weight_hh', 'bias_ih', 'bias_hh']
    assert list(pyrnn.RNNCell(3, 4, bias=False, nonlinearity='relu').parameters()) == ['weight_ih', 'weight_hh']


@pytest.mark.parametrize('backend', ['c', 'numpy'])
def test_padding_is_never_read(backend):
    # NaN past each sequence's end changes nothing: not the outputs, states or any gradient
    rng = np.random.default_rng(3)
    x = rng.standard_normal((6, 4, 3)).astype(np.float32)
    lengths = np.array([6, 1, 4, 2])
    padded = x.copy()
    padded[np.arange(6)[:, None] >= lengths[None, :]] = np.nan
    results = []
    for inp in (x, padded):
        m = pyrnn.LSTM(3, 5, 2, bidirectional=True, seed=1, backend=backend)
        out, (h_n, c_n) = m.forward(inp, lengths=lengths)
        m.zero_grad()
        dx, _ = m.backward(np.ones_like(out))
        results.append([out, h_n, c_n, dx[np.arange(6)[:, None] < lengths[None, :]], *m.grad.values()])
    for a, b in zip(*results):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize('make', [lambda: pyrnn.LSTM(3, 4, 2, bidirectional=True, seed=0),
                                  lambda: pyrnn.CharLM('gru', vocab_size=7, embed_size=3, hidden_size=4, seed=0)])
def test_views_outlive_their_module(make):
    # parameters() and grad point into C memory: the views keep the module's C object alive
    import gc
    m = make()
    params, grads = m.parameters(), m.grad
    expected = {k: v.copy() for k, v in params.items()}
    del m
    gc.collect()
    for _ in range(20):   # reuse of freed memory would overwrite what the views read
        make()
    for k, v in params.items():
        np.testing.assert_array_equal(v, expected[k])
        assert np.all(grads[k] == 0)


def test_nested_thread_setting_keeps_one_projection_plan():
    # OMP_NUM_THREADS=1,8 reads 1 thread outside a parallel region and 8 inside: forward and backward
    # must decide the per-step projection once (outside), or the gates and dx go stale
    import subprocess
    import sys
    code = ('import numpy as np, pyrnn\n'
            'm = pyrnn.LSTM(20, 64, seed=0)\n'
            'x = np.random.default_rng(0).standard_normal((5, 16, 20)).astype(np.float32)\n'
            'out, _ = m.forward(x)\n'
            'dx, _ = m.backward(np.ones_like(out))\n'
            'print(repr(float(out.sum())), repr(float(dx.sum())), repr(float(m.grad["weight_ih_l0"].sum())))\n')
    runs = [subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=120,
                           env=dict(os.environ, OMP_NUM_THREADS=threads)) for threads in ('1', '1,8')]
    for r in runs:
        assert r.returncode == 0, r.stderr
    assert runs[0].stdout == runs[1].stdout


def test_a_failed_forward_leaves_nothing_for_backward():
    # the C layer API: a forward that fails (here: a bad length) must not let backward read its buffers
    from pyrnn._crnn import ffi, lib
    m = ffi.gc(lib.layer_new(2, 3, 4, 1, 1), lib.layer_free)
    x = np.ones((2, 1, 3), np.float32)
    out, hn, cn = (np.zeros((2, 1, 4), np.float32) for _ in range(3))
    f = lambda a: ffi.from_buffer('float[]', a)
    assert lib.layer_forward_api(m, f(out), f(hn), f(cn), f(x), ffi.NULL, ffi.NULL, ffi.NULL, 1, 2) == 0
    bad = np.array([3], np.int32)   # longer than T
    assert lib.layer_forward_api(m, f(out), f(hn), f(cn), f(x), ffi.NULL, ffi.NULL, ffi.from_buffer('int[]', bad), 1, 2) == -1
    assert b'outside [1, 2]' in ffi.string(lib.pyrnn_last_error())
    dx, dh0, dc0 = np.zeros_like(x), np.zeros_like(hn), np.zeros_like(cn)
    assert lib.layer_backward_api(m, f(dx), f(dh0), f(dc0), f(out), ffi.NULL, ffi.NULL) == -1
    assert b'before forward' in ffi.string(lib.pyrnn_last_error())


@pytest.mark.parametrize('bias', [True, False])
def test_layer_bind_computes_with_caller_tensors(bias):
    # layer_bind (pyrnn.torch's way in): a Layer bound to tensors of its caller computes exactly what one
    # holding the same values in its own buffers does, and its gradients land in the caller's tensors only
    from pyrnn._crnn import ffi, lib
    from pyrnn.engine_c import c_view
    cell, I, H, B, T = oracle.cell_id('gru'), 3, 5, 2, 4
    own, bound = (ffi.gc(lib.layer_new(cell, I, H, 1, int(bias)), lib.layer_free) for _ in range(2))
    n = int(own.num_params)
    shapes = oracle.layer_param_shapes('gru', I, H, bias)
    rng = np.random.default_rng(0)
    params = {k: rng.uniform(-0.5, 0.5, s).astype(np.float32) for k, s in shapes.items()}
    c_view(ffi, own.params, n, own)[...] = oracle.flatten(params)
    grads = {k: np.zeros(s, np.float32) for k, s in shapes.items()}
    ptrs = lambda d: [ffi.from_buffer('float[]', d[k]) if k in d else ffi.NULL
                      for k in ('weight_ih', 'weight_hh', 'bias_ih', 'bias_hh')]
    lib.layer_bind(bound, ffi.new('float*[4]', ptrs(params)), ffi.new('float*[4]', ptrs(grads)))
    f = lambda a: ffi.from_buffer('float[]', a)
    x, dout = rng.standard_normal((T, B, I)).astype(np.float32), rng.standard_normal((T, B, H)).astype(np.float32)
    lengths = ffi.from_buffer('int[]', np.array([4, 2], np.int32))
    res = []
    for m in (own, bound):
        out, hn, dx, dh0 = (np.zeros(s, np.float32) for s in ((T, B, H), (B, H), (T, B, I), (B, H)))
        assert lib.layer_forward_api(m, f(out), f(hn), ffi.NULL, f(x), ffi.NULL, ffi.NULL, lengths, B, T) == 0
        assert lib.layer_backward_api(m, f(dx), f(dh0), ffi.NULL, f(dout), ffi.NULL, ffi.NULL) == 0
        res.append((out, hn, dx, dh0))
    for a, b in zip(*res):
        assert np.array_equal(a, b)
    assert np.abs(res[0][2]).sum() > 0
    assert np.array_equal(oracle.flatten(grads), c_view(ffi, own.grads, n, own))
    assert not np.any(c_view(ffi, bound.grads, n, bound))   # its own buffers were not touched
    lib.layer_bind(bound, ffi.NULL, ffi.NULL)   # back to its own (zero) weights: the output is zero
    out, hn = np.ones((T, B, H), np.float32), np.ones((B, H), np.float32)
    assert lib.layer_forward_api(bound, f(out), f(hn), ffi.NULL, f(x), ffi.NULL, ffi.NULL, ffi.NULL, B, T) == 0
    assert not np.any(out) and not np.any(hn)
