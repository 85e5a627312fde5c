"""The NumPy oracle against central finite differences, in float64.

Every element of every parameter tensor, of the layer input x and of the initial states
is checked; the relative error ||analytic - fd|| / ||fd|| must be < 1e-6 per tensor.
"""
import math

import numpy as np
import pytest

from helpers import FD_TOL, fd_check, rel_err
from pyrnn import oracle
from pyrnn.reference import read_reference, write_reference

T, B, IN, H, V, E = 3, 2, 4, 3, 5, 4


def states(cell, L, given, rng):
    """h0/c0 for the forward: random if given, else None (the FD then perturbs zeros)."""
    h0 = rng.normal(0, 0.5, (L, B, H)) if given else None
    c0 = rng.normal(0, 0.5, (L, B, H)) if given and cell == 'lstm' else None
    return h0, c0


CASES = [(c, L, g) for c in oracle.CELLS for L in (1, 2) for g in (True, False)]
IDS = [f'{c}-L{L}-{"h0" if g else "zeros"}' for c, L, g in CASES]


# ----------------------------------------------------------------------------- layer API

def stack_setup(cell, L, given, seed=0):
    rng = np.random.default_rng(seed)
    params = oracle.init_stack_params(cell, IN, H, L, rng=rng, dtype=np.float64)
    x = rng.normal(size=(T, B, IN))
    h0, c0 = states(cell, L, given, rng)
    dout = rng.normal(size=(T, B, H))
    dh_n = rng.normal(size=(L, B, H))
    dc_n = rng.normal(size=(L, B, H)) if cell == 'lstm' else None
    return params, x, h0, c0, dout, dh_n, dc_n


def stack_objective(params, cell, x, h0, c0, dout, dh_n, dc_n, **kw):
    out, h_n, c_n, _ = oracle.stack_forward(params, cell, x, h0, c0, **kw)
    s = np.sum(out * dout) + np.sum(h_n * dh_n)
    if c_n is not None:
        s += np.sum(c_n * dc_n)
    return s


def check_stack(cell, L, given, **kw):
    params, x, h0, c0, dout, dh_n, dc_n = stack_setup(cell, L, given)
    out, h_n, c_n, cache = oracle.stack_forward(params, cell, x, h0, c0, **kw)
    assert out.shape == (T, B, H) and h_n.shape == (L, B, H)
    assert (c_n is not None) == (cell == 'lstm')
    dx, dh0, dc0, grads = oracle.stack_backward(cache, dout, dh_n, dc_n)
    assert list(grads) == list(params)
    # FD w.r.t. explicit arrays; zeros stand in for None (the forward must agree)
    h0a = np.zeros((L, B, H)) if h0 is None else h0
    c0a = (np.zeros((L, B, H)) if c0 is None else c0) if cell == 'lstm' else None
    f = lambda: stack_objective(params, cell, x, h0a, c0a, dout, dh_n, dc_n, **kw)
    assert f() == stack_objective(params, cell, x, h0, c0, dout, dh_n, dc_n, **kw)
    for name in params:
        fd_check(name, grads[name], f, params[name])
    fd_check('x', dx, f, x)
    fd_check('h0', dh0, f, h0a)
    if cell == 'lstm':
        fd_check('c0', dc0, f, c0a)
    else:
        assert dc0 is None


@pytest.mark.parametrize('cell,L,given', CASES, ids=IDS)
def test_stack_gradients(cell, L, given):
    check_stack(cell, L, given)


# ----------------------------------------------------------------------------- char LM

def lm_setup(cell, L, given, seed=0):
    params = oracle.init_lm_params(cell, V, E, H, L, seed=seed, dtype=np.float64)
    rng = np.random.default_rng(seed + 1)
    inputs = rng.integers(0, V, (B, T))
    targets = rng.integers(0, V, (B, T))
    h0, c0 = states(cell, L, given, rng)
    return params, inputs, targets, h0, c0


def check_lm(cell, L, given, **kw):
    params, inputs, targets, h0, c0 = lm_setup(cell, L, given)
    loss, logits, h_n, c_n, cache = oracle.lm_forward(params, cell, inputs, targets, h0, c0, **kw)
    assert logits.shape == (T, B, V) and np.ndim(loss) == 0
    grads, dh0, dc0 = oracle.lm_backward(cache)
    assert list(grads) == list(oracle.lm_param_shapes(cell, V, E, H, L))
    h0a = np.zeros((L, B, H)) if h0 is None else h0
    c0a = (np.zeros((L, B, H)) if c0 is None else c0) if cell == 'lstm' else None
    f = lambda: oracle.lm_forward(params, cell, inputs, targets, h0a, c0a, **kw)[0]
    assert f() == loss
    for name in params:
        fd_check(name, grads[name], f, params[name])
    fd_check('h0', dh0, f, h0a)
    if cell == 'lstm':
        fd_check('c0', dc0, f, c0a)
    else:
        assert dc0 is None


@pytest.mark.parametrize('cell,L,given', CASES, ids=IDS)
def test_lm_gradients(cell, L, given):
    check_lm(cell, L, given)


def test_lm_loss_is_mean_cross_entropy():
    params, inputs, targets, h0, c0 = lm_setup('gru', 2, True)
    loss, logits, *_ = oracle.lm_forward(params, 'gru', inputs, targets, h0, c0)
    # brute force, batch-major loop over (b, t); logits are time-major
    ce = [math.log(np.exp(logits[t, b]).sum()) - logits[t, b, targets[b, t]]
          for b in range(B) for t in range(T)]
    assert abs(loss - np.mean(ce)) < 1e-12
    # embeddings go in time-major: changing token (b=1, t=0) must only change logits[t>=0, b=1]
    inputs2 = inputs.copy()
    inputs2[1, 0] = (inputs[1, 0] + 1) % V
    logits2 = oracle.lm_forward(params, 'gru', inputs2, targets, h0, c0)[1]
    assert np.array_equal(logits[:, 0], logits2[:, 0]) and not np.allclose(logits[0, 1], logits2[0, 1])


# ----------------------------------------------------------------------------- dropout

def fixed_masks(n, p=0.5, seed=3):
    rng = np.random.default_rng(seed)
    return [(rng.random((T, B, H)) >= p).astype(np.float64) for _ in range(n)]


@pytest.mark.parametrize('cell', ['lstm', 'gru'])
def test_dropout_stack_gradients(cell):
    check_stack(cell, 3, True, dropout=0.5, masks=fixed_masks(2))


@pytest.mark.parametrize('cell', ['lstm', 'rnn'])
def test_dropout_lm_gradients(cell):
    check_lm(cell, 2, True, dropout=0.5, masks=fixed_masks(2))


def test_dropout_semantics():
    # masks scale by 1/(1-p); all-ones masks with p=0 are the identity
    params, x, h0, c0, *_ = stack_setup('rnn', 2, True)
    ref = oracle.stack_forward(params, 'rnn', x, h0)[0]
    same = oracle.stack_forward(params, 'rnn', x, h0, masks=[np.ones((T, B, H))])[0]
    assert np.array_equal(ref, same)
    # the top layer's output is never dropped by the stack (torch: no dropout after the last layer)
    out1, hn1, _, _ = oracle.stack_forward(params, 'rnn', x, h0, dropout=0.5,
                                           masks=[np.zeros((T, B, H))])
    # with layer 0 fully dropped, layer 1 sees only zeros: h_n[0] unchanged, out differs
    assert np.array_equal(hn1[0], oracle.stack_forward(params, 'rnn', x, h0)[1][0])
    assert not np.allclose(out1, ref)


# ----------------------------------------------------------------------------- the check can fail

def test_fd_check_detects_wrong_gradient():
    params, inputs, targets, h0, c0 = lm_setup('lstm', 2, True)
    _, _, _, _, cache = oracle.lm_forward(params, 'lstm', inputs, targets, h0, c0)
    grads, _, _ = oracle.lm_backward(cache)
    f = lambda: oracle.lm_forward(params, 'lstm', inputs, targets, h0, c0)[0]
    name = 'rnn.weight_hh_l0'
    good = fd_check(name, grads[name], f, params[name])
    bad = grads[name].copy()
    bad.flat[0] += 1e-4 * np.linalg.norm(bad)  # one element off by 1e-4 of the tensor norm
    with pytest.raises(AssertionError):
        fd_check(name, bad, f, params[name])
    assert good < FD_TOL / 10


def test_float32_follows_dtype():
    p64, inputs, targets, h0, c0 = lm_setup('lstm', 2, True)
    p32 = {k: v.astype(np.float32) for k, v in p64.items()}
    h32, c32 = h0.astype(np.float32), c0.astype(np.float32)
    loss32, logits32, hn32, cn32, cache = oracle.lm_forward(p32, 'lstm', inputs, targets, h32, c32)
    g32, dh32, dc32 = oracle.lm_backward(cache)
    assert logits32.dtype == hn32.dtype == cn32.dtype == dh32.dtype == dc32.dtype == np.float32
    assert all(g.dtype == np.float32 for g in g32.values())
    p64 = {k: v.astype(np.float64) for k, v in p32.items()}
    loss64, _, _, _, cache = oracle.lm_forward(p64, 'lstm', inputs, targets, h32.astype(np.float64),
                                               c32.astype(np.float64))
    g64, _, _ = oracle.lm_backward(cache)
    assert abs(loss32 - loss64) / loss64 < 1e-6
    for k in g64:
        assert rel_err(g32[k], g64[k]) < 1e-5, k


# ----------------------------------------------------------------------------- clip, AdamW

def make_grads():
    return {'a': np.array([3.0, 0.0]), 'b': np.array([[4.0]])}  # global norm 5


@pytest.mark.parametrize('max_norm,expect_scale', [
    (1.0, 1.0 / (5 + 1e-6)),  # clips: coef = max_norm / (norm + 1e-6)
    (10.0, 1.0),              # no clip
    (0.0, 1.0),               # 0 = clipping off
    (None, 1.0)])
def test_clip_grad_norm(max_norm, expect_scale):
    g = make_grads()
    norm = oracle.clip_grad_norm(g, max_norm)
    assert norm == 5.0  # norm before clipping
    ref = make_grads()
    for k in g:
        np.testing.assert_allclose(g[k], ref[k] * expect_scale, rtol=1e-15)


def test_adamw_two_steps_by_hand():
    lr, b1, b2, eps, wd = 0.1, 0.9, 0.999, 1e-8, 0.01
    p0, g1, g2 = 1.0, 0.5, -0.25
    # step 1, written out for a scalar
    p = p0 - lr * wd * p0
    m = (1 - b1) * g1
    v = (1 - b2) * g1 ** 2
    p = p - lr * (m / (1 - b1)) / (math.sqrt(v / (1 - b2)) + eps)
    # step 2
    p = p - lr * wd * p
    m = b1 * m + (1 - b1) * g2
    v = b2 * v + (1 - b2) * g2 ** 2
    p = p - lr * (m / (1 - b1 ** 2)) / (math.sqrt(v / (1 - b2 ** 2)) + eps)

    params = {'w': np.array([p0, -2.0])}
    mm, vv = {'w': np.zeros(2)}, {'w': np.zeros(2)}
    oracle.adamw_step(params, {'w': np.array([g1, 0.0])}, mm, vv, 1, lr, (b1, b2), eps, wd)
    oracle.adamw_step(params, {'w': np.array([g2, 0.0])}, mm, vv, 2, lr, (b1, b2), eps, wd)
    assert abs(params['w'][0] - p) < 1e-15
    assert abs(params['w'][1] - (-2.0 * (1 - lr * wd) ** 2)) < 1e-15  # zero grad: decay only
    assert abs(mm['w'][0] - m) < 1e-15 and abs(vv['w'][0] - v) < 1e-15


def test_train_steps_decreases_loss_and_keeps_params():
    params, inputs, targets, h0, c0 = lm_setup('gru', 2, True)
    before = {k: v.copy() for k, v in params.items()}
    losses, norms, after = oracle.train_steps(params, 'gru', inputs, targets, h0, c0, 5,
                                              1e-2, (0.9, 0.999), 1e-8, 0.01, 1.0)
    assert all(np.array_equal(before[k], params[k]) for k in params)
    assert losses.shape == norms.shape == (5,) and losses[-1] < losses[0]
    loss0, *_, cache = oracle.lm_forward(params, 'gru', inputs, targets, h0, c0)
    g, _, _ = oracle.lm_backward(cache)
    assert losses[0] == loss0
    assert abs(norms[0] - np.sqrt(sum((x ** 2).sum() for x in g.values()))) < 1e-12


# ----------------------------------------------------------------------------- layout, reference

def test_layout():
    assert oracle.stack_param_names(2) == ['weight_ih_l0', 'weight_hh_l0', 'bias_ih_l0',
                                           'bias_hh_l0', 'weight_ih_l1', 'weight_hh_l1',
                                           'bias_ih_l1', 'bias_hh_l1']
    assert [oracle.gates(c) for c in oracle.CELLS] == [1, 1, 4, 3]
    s = oracle.lm_param_shapes('gru', V, E, H, 2)
    assert list(s) == ['embedding.weight'] + ['rnn.' + n for n in oracle.stack_param_names(2)] \
        + ['head.weight', 'head.bias']
    assert s['rnn.weight_ih_l0'] == (3 * H, E) and s['rnn.weight_ih_l1'] == (3 * H, H)
    p = oracle.init_lm_params('gru', V, E, H, 2, seed=5)
    vec = oracle.flatten(p)
    assert vec.size == sum(int(np.prod(x)) for x in s.values())
    q = oracle.unflatten(vec, s)
    assert all(np.array_equal(p[k], q[k]) for k in p)
    assert all(np.abs(p[k]).max() <= 1 / np.sqrt(H) for k in p if k != 'embedding.weight')


def test_stack_without_bias():
    rng = np.random.default_rng(0)
    params = oracle.init_stack_params('gru', IN, H, 2, bias=False, rng=rng, dtype=np.float64)
    assert list(params) == ['weight_ih_l0', 'weight_hh_l0', 'weight_ih_l1', 'weight_hh_l1']
    x, dout = rng.normal(size=(T, B, IN)), rng.normal(size=(T, B, H))
    out, h_n, _, cache = oracle.stack_forward(params, 'gru', x)
    _, _, _, grads = oracle.stack_backward(cache, dout)
    f = lambda: np.sum(oracle.stack_forward(params, 'gru', x)[0] * dout)
    for k in params:
        fd_check(k, grads[k], f, params[k])


@pytest.mark.parametrize('cell', oracle.CELLS)
def test_reference_roundtrip(tmp_path, cell):
    path = str(tmp_path / f'{cell}.bin')
    w = write_reference(path, cell, V, E, H, 2, B, T, 3, seed=7)
    r = read_reference(path)
    for k in w:
        if isinstance(w[k], np.ndarray):
            assert np.array_equal(w[k], r[k]), k
        else:
            assert w[k] == r[k], k
    # the stored float32 params and states reproduce the stored loss (float32 rounding only)
    params = oracle.unflatten(r['params'].astype(np.float64), oracle.lm_param_shapes(cell, V, E, H, 2))
    c0 = None if r['c0'] is None else r['c0'].astype(np.float64)
    loss = oracle.lm_forward(params, cell, r['inputs'], r['targets'],
                             r['h0'].astype(np.float64), c0)[0]
    assert abs(loss - r['loss'][0]) < 1e-6 and r['step_losses'][0] == r['loss'][0]
    # malformed files are rejected with a clear message
    data = open(path, 'rb').read()
    for bad, msg in [(b'\0' * 4 + data[4:], 'magic'), (data[:4] + b'\2\0\0\0' + data[8:], 'version'),
                     (data + b'\0', 'trailing'), (data[:-4], 'short'), (data[:100], 'short')]:
        open(path, 'wb').write(bad)
        with pytest.raises(ValueError, match=msg):
            read_reference(path)
