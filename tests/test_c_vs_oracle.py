"""The C backend (through the Python API) against the NumPy oracle.

Forward values and gradients are compared with the float64 oracle run on the same float32
parameters, at relative error ||c - oracle|| / ||oracle|| < 1e-5 per tensor. AdamW steps are
compared with the oracle run in float32 (see test_adamw_steps for why and at what tolerance).
Sizes are deliberately awkward: B = 1, T = 1, H in {3, 37}, V in {5, 65}, L in 1..3.
"""
import numpy as np
import pytest

import pyrnn
from helpers import assert_close, rel_err, worst_errors
from pyrnn import oracle

TOL = 1e-5
WORST, report_worst = worst_errors('largest C-vs-oracle relative error per cell')


def close(cell, name, a, b, tol=TOL):
    return assert_close(f'{cell} {name}', a, b, tol, WORST, cell)


def f64(d):
    return {k: np.asarray(v, np.float64) for k, v in d.items()}


# ----------------------------------------------------------------------------- char LM
# (B, T, E, H, V, L, with_hx): every awkward value appears at least once for every cell. With
# B*T >= V the C stack looks layer 0's projection up by token; (4, 1, ..., 65) has B*T < V and takes
# the embedding-then-GEMM path, so both are held to the oracle. Layers above 0 project all T inputs
# in one GEMM when B is small, and step by step inside the recurrence once every thread has a full
# register tile of rows (B >= 8 per thread, so B=19 on up to 2 threads).

LM_CASES = [(1, 5, 4, 3, 5, 1, True), (4, 1, 6, 37, 65, 2, False), (3, 7, 5, 37, 5, 3, True),
            (19, 3, 5, 37, 5, 2, True), (19, 1, 6, 37, 65, 2, False)]


@pytest.fixture(autouse=True)
def two_threads():
    # the per-step paths depend on the thread count: pin it, whatever machine runs the tests
    before = pyrnn.get_num_threads()
    pyrnn.set_num_threads(2)
    yield
    pyrnn.set_num_threads(before)


def lm_batch(cell, B, T, H, V, L, with_hx, seed=0):
    rng = np.random.default_rng(seed)
    inputs = rng.integers(0, V, (B, T))
    targets = rng.integers(0, V, (B, T))
    h0 = rng.normal(0, 0.5, (L, B, H)).astype(np.float32) if with_hx else None
    c0 = rng.normal(0, 0.5, (L, B, H)).astype(np.float32) if with_hx and cell == 'lstm' else None
    return inputs, targets, h0, c0


@pytest.mark.parametrize('cell', oracle.CELLS)
@pytest.mark.parametrize('B,T,E,H,V,L,with_hx', LM_CASES)
def test_lm_forward_backward(cell, B, T, E, H, V, L, with_hx):
    lm = pyrnn.CharLM(cell, V, E, H, L, seed=7)
    inputs, targets, h0, c0 = lm_batch(cell, B, T, H, V, L, with_hx)
    hx = None if h0 is None else (h0, c0) if cell == 'lstm' else h0
    loss = lm.forward(inputs, targets, hx)
    lm.backward()

    p = f64(lm.state_dict())
    ref_loss, logits, h_n, c_n, cache = oracle.lm_forward(
        p, cell, inputs, targets, None if h0 is None else h0.astype(np.float64),
        None if c0 is None else c0.astype(np.float64))
    grads, dh0, dc0 = oracle.lm_backward(cache)

    close(cell, 'loss', loss, ref_loss)
    close(cell, 'logits', lm.logits, logits.transpose(1, 0, 2))
    close(cell, 'h_n', lm.h_n, h_n)
    if cell == 'lstm':
        close(cell, 'c_n', lm.c_n, c_n)
        close(cell, 'dc0', lm.dc0, dc0)
    else:
        assert lm.c_n is None and lm.dc0 is None
    close(cell, 'dh0', lm.dh0, dh0)
    g = lm.grad
    assert list(g) == list(grads)
    for name in grads:
        if name == 'embedding.weight' and B * T < V:
            # rows of tokens never seen are exactly zero in both
            assert np.array_equal(g[name] == 0, grads[name] == 0)
        close(cell, f'grad {name}', g[name], grads[name])


@pytest.mark.parametrize('cell', oracle.CELLS)
def test_lm_unseen_nonfinite_embedding_row_touches_no_gradient(cell):
    # as in torch: a row of the embedding the batch never looks up takes no part in backward, even
    # when the lookup path multiplies whole tables
    lm = pyrnn.CharLM(cell, 9, 4, 6, 2, seed=3)
    sd = lm.state_dict()
    sd['embedding.weight'][7] = np.inf
    lm.load_state_dict(sd)
    rng = np.random.default_rng(2)
    inputs, targets = rng.integers(0, 7, (4, 5)), rng.integers(0, 9, (4, 5))   # B*T = 20 >= V, no 7
    lm.forward(inputs, targets)
    lm.backward()
    p = f64(lm.state_dict())
    *_, cache = oracle.lm_forward(p, cell, inputs, targets, None, None)
    grads, _, _ = oracle.lm_backward(cache)
    for name, g in lm.grad.items():
        assert np.isfinite(g).all(), name
        close(cell, f'grad {name}', g, grads[name])


def test_lm_backends_start_identical():
    for cell in oracle.CELLS:
        a = pyrnn.CharLM(cell, 11, 4, 6, 2, seed=3).state_dict()
        b = pyrnn.CharLM(cell, 11, 4, 6, 2, seed=3, backend='numpy').state_dict()
        ref = oracle.init_lm_params(cell, 11, 4, 6, 2, seed=3)
        assert all(np.array_equal(a[k], ref[k]) and np.array_equal(b[k], ref[k]) for k in ref)
        c = pyrnn.CharLM(cell, 11, 4, 6, 2, seed=4).state_dict()
        assert not np.array_equal(a['head.weight'], c['head.weight'])


@pytest.mark.parametrize('backend', ['c', 'numpy'])
def test_lm_gradients_accumulate_until_zero_grad(backend):
    lm = pyrnn.CharLM('gru', 5, 4, 5, 2, seed=1, backend=backend)   # B*T >= V: layer 0 by lookup
    rng = np.random.default_rng(0)
    batches = [(rng.integers(0, 5, (2, 3)), rng.integers(0, 5, (2, 3))) for _ in range(2)]
    single = []
    for inp, tgt in batches:
        lm.zero_grad()
        lm.forward(inp, tgt)
        lm.backward()
        single.append({k: g.copy() for k, g in lm.grad.items()})   # .grad holds views
    lm.zero_grad()
    assert all(not g.any() for g in lm.grad.values())
    for inp, tgt in batches:
        lm.forward(inp, tgt)
        lm.backward()
    for k, g in lm.grad.items():
        np.testing.assert_allclose(g, single[0][k] + single[1][k], rtol=1e-6, atol=1e-7, err_msg=k)
    with pytest.raises(RuntimeError, match='backward'):
        lm.backward()  # one backward per forward


def test_lm_carried_state_equals_one_long_sequence():
    # two halves with the state carried through hx == the whole sequence at once
    lm = pyrnn.CharLM('lstm', 13, 5, 8, 2, seed=2)
    rng = np.random.default_rng(5)
    inp, tgt = rng.integers(0, 13, (3, 10)), rng.integers(0, 13, (3, 10))
    lm.forward(inp, tgt)
    whole = lm.logits.copy()
    lm.forward(inp[:, :4], tgt[:, :4])
    first = lm.logits.copy()
    assert lm.state[0] is lm.h_n and lm.state[1] is lm.c_n
    lm.forward(inp[:, 4:], tgt[:, 4:], hx=lm.state)
    np.testing.assert_allclose(np.concatenate([first, lm.logits], axis=1), whole, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- layer API
# (B, T, In, H, L, with_hx, batch_first, bias)

LAYER_CASES = [(1, 5, 4, 3, 1, True, False, True), (4, 1, 6, 37, 2, False, True, True),
               (3, 6, 5, 37, 3, True, True, True), (2, 3, 3, 3, 2, True, False, False),
               (19, 3, 5, 37, 2, True, True, True), (19, 2, 300, 37, 2, False, False, True)]


def make_layer(cell, In, H, L, **kw):
    if cell in ('rnn', 'rnn_relu'):
        return pyrnn.RNN(In, H, L, nonlinearity='relu' if cell == 'rnn_relu' else 'tanh', **kw)
    return {'lstm': pyrnn.LSTM, 'gru': pyrnn.GRU}[cell](In, H, L, **kw)


@pytest.mark.parametrize('cell', oracle.CELLS)
@pytest.mark.parametrize('B,T,In,H,L,with_hx,batch_first,bias', LAYER_CASES)
def test_layer_forward_backward(cell, B, T, In, H, L, with_hx, batch_first, bias):
    lstm = cell == 'lstm'
    m = make_layer(cell, In, H, L, bias=bias, batch_first=batch_first, seed=11)
    rng = np.random.default_rng(1)
    x = rng.normal(size=(T, B, In)).astype(np.float32)  # time-major; transposed for batch_first
    h0 = rng.normal(0, 0.5, (L, B, H)).astype(np.float32)
    c0 = rng.normal(0, 0.5, (L, B, H)).astype(np.float32)
    dout = rng.normal(size=(T, B, H)).astype(np.float32)
    dh_n = rng.normal(size=(L, B, H)).astype(np.float32)
    dc_n = rng.normal(size=(L, B, H)).astype(np.float32)
    tr = (lambda a: a.transpose(1, 0, 2)) if batch_first else (lambda a: a)

    hx = ((h0, c0) if lstm else h0) if with_hx else None
    out, hn = m(tr(x), hx)
    h_n, c_n = hn if lstm else (hn, None)
    dx, dh = m.backward(tr(dout), ((dh_n, dc_n) if lstm else dh_n) if with_hx else None)
    dh0, dc0 = dh if lstm else (dh, None)

    p = f64(m.state_dict())
    assert sorted(p) == sorted(oracle.stack_param_names(L, bias))
    r_out, r_hn, r_cn, cache = oracle.stack_forward(
        p, cell, x.astype(np.float64), h0.astype(np.float64) if with_hx else None,
        c0.astype(np.float64) if with_hx and lstm else None)
    r_dx, r_dh0, r_dc0, grads = oracle.stack_backward(
        cache, dout.astype(np.float64), dh_n.astype(np.float64) if with_hx else None,
        dc_n.astype(np.float64) if with_hx and lstm else None)

    close(cell, 'output', out, tr(r_out))
    close(cell, 'h_n', h_n, r_hn)
    close(cell, 'dx', dx, tr(r_dx))
    close(cell, 'dh0', dh0, r_dh0)
    if lstm:
        close(cell, 'c_n', c_n, r_cn)
        close(cell, 'dc0', dc0, r_dc0)
    g = m.grad
    assert list(g) == list(grads)
    for name in grads:
        close(cell, f'grad {name}', g[name], grads[name])


@pytest.mark.parametrize('cell', oracle.CELLS)
def test_layer_unbatched_and_numpy_backend(cell):
    # unbatched (T, In) == batch of one; the numpy backend gives the float32 oracle's answer
    rng = np.random.default_rng(2)
    x = rng.normal(size=(4, 3)).astype(np.float32)
    h0 = rng.normal(size=(2, 5)).astype(np.float32)
    hx = (h0, h0 * 0.5) if cell == 'lstm' else h0
    outs = []
    for backend in ('c', 'numpy'):
        m = make_layer(cell, 3, 5, 2, seed=4, backend=backend)
        out, hn = m(x, hx)
        assert out.shape == (4, 5)
        dx, dh0 = m.backward(np.ones((4, 5), np.float32))
        assert dx.shape == x.shape
        outs.append((out, hn, dx, dh0, {k: g.copy() for k, g in m.grad.items()}))
        batched = make_layer(cell, 3, 5, 2, seed=4, backend=backend)
        hx1 = tuple(s[:, None] for s in hx) if cell == 'lstm' else hx[:, None]
        out1, _ = batched(x[:, None], hx1)
        np.testing.assert_array_equal(out1[:, 0], out)
    (oc, hc, dxc, dhc, gc), (on, hn_, dxn, dhn, gn) = outs
    close(cell, 'unbatched output', oc, on)
    close(cell, 'unbatched dx', dxc, dxn)
    for k in gc:
        close(cell, f'unbatched grad {k}', gc[k], gn[k])


def test_layer_gradients_accumulate():
    m = pyrnn.GRU(3, 4, 2, seed=0)
    x = np.random.default_rng(0).normal(size=(5, 2, 3)).astype(np.float32)
    dout = np.ones((5, 2, 4), np.float32)
    m(x)
    m.backward(dout)
    g1 = {k: g.copy() for k, g in m.grad.items()}   # .grad holds views
    m(x)
    m.backward(dout)
    for k, g in m.grad.items():
        np.testing.assert_allclose(g, 2 * g1[k], rtol=1e-6, err_msg=k)
    m.zero_grad()
    assert all(not g.any() for g in m.grad.values())


# ----------------------------------------------------------------------------- AdamW

N_STEPS, LR, WD = 10, 1e-2, 0.1
# per cell, a max_grad_norm inside the range of the step norms: some steps clip, some do not
MAX_NORM = {'rnn': 0.6, 'rnn_relu': 0.6, 'lstm': 0.25, 'gru': 0.35}
# C (float32) vs the oracle in float32 after 10 clipped AdamW steps. The parameter tensors agree
# to ~1e-6 relative (PARAM_TOL 1e-5). The *update* (after - before) is the stricter measure: it
# is a sum of lr * m / (sqrt(v) + eps) terms, and Adam's normalisation turns a rounding-level
# difference in a near-zero gradient into a difference of up to O(lr) in its step (m/sqrt(v) is
# ~sign(g) whatever |g|). Worst per-tensor update error seen: 1.8e-6 (rnn_relu weight_ih_l1);
# held at 1e-4, while dropping the clip or the weight decay moves the update by 1e-2..5e-2.
PARAM_TOL, UPDATE_TOL = 1e-5, 1e-4


def c_train(cell, backend, inputs, targets, h0, c0, dims, max_norm):
    lm = pyrnn.CharLM(cell, *dims, seed=3, backend=backend)
    before, losses, norms = lm.state_dict(), [], []
    for _ in range(N_STEPS):
        losses.append(lm.forward(inputs, targets, (h0, c0) if cell == 'lstm' else h0))
        lm.zero_grad()
        lm.backward()
        norms.append(lm.step(LR, weight_decay=WD, max_grad_norm=max_norm))
    return before, lm.state_dict(), losses, norms


@pytest.mark.parametrize('cell', oracle.CELLS)
def test_adamw_steps(cell):
    B, T, E, H, V, L = 2, 5, 4, 37, 5, 2
    inputs, targets, h0, c0 = lm_batch(cell, B, T, H, V, L, True, seed=4)
    before, after, losses, norms = c_train(cell, 'c', inputs, targets, h0, c0, (V, E, H, L),
                                           MAX_NORM[cell])
    run = lambda clip, wd: oracle.train_steps(before, cell, inputs, targets, h0, c0, N_STEPS, LR,
                                              (0.9, 0.999), 1e-8, wd, clip)
    r_losses, r_norms, r_after = run(MAX_NORM[cell], WD)
    assert r_after['head.bias'].dtype == np.float32
    # the run must exercise clipping: some steps clipped, some not
    assert (r_norms > MAX_NORM[cell]).any() and (r_norms < MAX_NORM[cell]).any(), r_norms
    assert r_losses[-1] < r_losses[0]
    close(cell, 'step losses', losses, r_losses)
    close(cell, 'step norms', norms, r_norms)
    worst_update = 0.0
    for k in before:
        close(cell, f'params after {k}', after[k], r_after[k], PARAM_TOL)
        err = rel_err(after[k] - before[k], r_after[k] - before[k])
        worst_update = max(worst_update, err)
        assert err < UPDATE_TOL, f'{cell} update of {k}: relative error {err:.3e}'
    # the tolerance is tight enough to see a missing clip or a missing weight decay
    update = lambda p: np.concatenate([(p[k] - before[k]).ravel() for k in before])
    for clip, wd in ((None, WD), (MAX_NORM[cell], 0.0)):
        assert rel_err(update(run(clip, wd)[2]), update(r_after)) > 10 * UPDATE_TOL

    # the numpy backend runs the same float32 oracle arithmetic (clipping a copy of the grads)
    _, after_np, _, norms_np = c_train(cell, 'numpy', inputs, targets, h0, c0, (V, E, H, L),
                                       MAX_NORM[cell])
    np.testing.assert_allclose(norms_np, r_norms, rtol=1e-6)
    for k, v in after_np.items():
        np.testing.assert_allclose(v, r_after[k], rtol=1e-6, atol=1e-7, err_msg=k)


# ----------------------------------------------------------------------------- dropout

@pytest.mark.parametrize('cell', oracle.CELLS)
def test_dropout_masks_from_c(cell):
    B, T, E, H, V, L, p = 4, 6, 5, 37, 65, 3, 0.3
    lm = pyrnn.CharLM(cell, V, E, H, L, seed=5, dropout=p)
    inputs, targets, h0, c0 = lm_batch(cell, B, T, H, V, L, True, seed=6)
    hx = (h0, c0) if cell == 'lstm' else h0
    loss = lm.forward(inputs, targets, hx)
    lm.backward()
    masks = lm._dropout_masks()
    assert len(masks) == L and all(mk.shape == (T, B, H) for mk in masks)
    for mk in masks:  # keep rate 0.7 within ~4 sigma for 888 draws
        assert abs(mk.mean() - (1 - p)) < 0.07, mk.mean()
    p64 = f64(lm.state_dict())
    r_loss, r_logits, r_hn, r_cn, cache = oracle.lm_forward(
        p64, cell, inputs, targets, h0.astype(np.float64),
        c0.astype(np.float64) if cell == 'lstm' else None, dropout=p,
        masks=[mk.astype(np.float64) for mk in masks])
    grads, dh0, _ = oracle.lm_backward(cache)
    close(cell, 'dropout loss', loss, r_loss)
    close(cell, 'dropout logits', lm.logits, r_logits.transpose(1, 0, 2))
    close(cell, 'dropout h_n', lm.h_n, r_hn)
    close(cell, 'dropout dh0', lm.dh0, dh0)
    g = lm.grad
    for k in grads:
        close(cell, f'dropout grad {k}', g[k], grads[k])

    # a new forward draws new masks; eval() turns dropout off (the oracle without dropout)
    lm.forward(inputs, targets, hx)
    assert not all(np.array_equal(a, b) for a, b in zip(masks, lm._dropout_masks()))
    lm.eval()
    loss_eval = lm.forward(inputs, targets, hx)
    assert lm._dropout_masks() is None
    ref = oracle.lm_forward(p64, cell, inputs, targets, h0.astype(np.float64),
                            c0.astype(np.float64) if cell == 'lstm' else None)[0]
    close(cell, 'eval loss', loss_eval, ref)
    assert abs(loss_eval - loss) > 1e-4


# ----------------------------------------------------------------------------- activations
ULP = 2.0 ** -23


def _signed_magnitudes():
    rng = np.random.default_rng(0)
    mags = np.concatenate([10.0 ** rng.uniform(-30, 0, 3000), rng.uniform(0, 60, 3000)])
    return np.concatenate([mags, -mags, [0.0]]).astype(np.float32)


def _rel(got, ref):
    return np.abs(got.astype(np.float64) - ref) / np.abs(ref)


def test_tanh_is_accurate_to_a_few_ulp():
    # h = tanh(x) through an RNN cell with W_ih = 1 and nothing else: the C cell's own vectorised tanh
    x = _signed_magnitudes()
    special = np.array([np.inf, -np.inf, np.nan], np.float32)
    rnn = pyrnn.RNN(1, 1)
    rnn.load_state_dict({'weight_ih_l0': np.ones((1, 1)), 'weight_hh_l0': np.zeros((1, 1)),
                         'bias_ih_l0': np.zeros(1), 'bias_hh_l0': np.zeros(1)})
    out, _ = rnn(np.concatenate([x, special]).reshape(1, -1, 1))   # one step, one row per value
    got = out.ravel()
    ref = np.tanh(x.astype(np.float64))
    nz = ref != 0
    assert _rel(got[:len(x)][nz], ref[nz]).max() < 3 * ULP
    assert np.array_equal(got[:len(x)][~nz], ref[~nz])
    assert got[-3] == 1.0 and got[-2] == -1.0 and np.isnan(got[-1])


def test_sigmoid_is_accurate_to_a_few_ulp():
    # c_1 = sigmoid(x) * tanh(20) = sigmoid(x) exactly, from c0 = 0: input gate weight 1, g's bias 20
    x = _signed_magnitudes()
    lstm = pyrnn.LSTM(1, 1)
    lstm.load_state_dict({'weight_ih_l0': np.array([[1.0], [0.0], [0.0], [0.0]]), 'weight_hh_l0': np.zeros((4, 1)),
                          'bias_ih_l0': np.array([0.0, 0.0, 20.0, 0.0]), 'bias_hh_l0': np.zeros(4)})
    _, (_, c_n) = lstm(np.concatenate([x, [np.nan]]).astype(np.float32).reshape(1, -1, 1))
    got = c_n.ravel()
    ref = 1.0 / (1.0 + np.exp(-x.astype(np.float64)))
    assert _rel(got[:-1], ref).max() < 3 * ULP
    assert np.isnan(got[-1])


@pytest.mark.parametrize('cell', oracle.CELLS)
@pytest.mark.parametrize('threads', [(2, 1), (1, 2)])
def test_thread_count_may_change_between_forward_and_backward(cell, threads):
    # forward and backward each choose per-step or whole-T projection from the thread count they see:
    # B=12 is per-step on 1 thread (>= 8 rows each) and whole-T on 2, so the two passes differ
    B, T, E, H, V, L = 12, 3, 5, 37, 5, 2
    lm = pyrnn.CharLM(cell, V, E, H, L, seed=7)
    inputs, targets, h0, c0 = lm_batch(cell, B, T, H, V, L, True)
    hx = (h0, c0) if cell == 'lstm' else h0
    pyrnn.set_num_threads(threads[0])
    lm.forward(inputs, targets, hx)
    pyrnn.set_num_threads(threads[1])
    lm.backward()
    p = f64(lm.state_dict())
    *_, cache = oracle.lm_forward(p, cell, inputs, targets, h0.astype(np.float64),
                                  None if c0 is None else c0.astype(np.float64))
    grads, dh0, _ = oracle.lm_backward(cache)
    close(cell, 'dh0', lm.dh0, dh0)
    for name, g in lm.grad.items():
        close(cell, f'grad {name}', g, grads[name])
