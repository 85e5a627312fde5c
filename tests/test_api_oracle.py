"""The oracle's bidirectional stacks, variable lengths, dropout and cells: against central finite
differences in float64 (every element of every parameter, of x and of the initial states;
relative error < 1e-6 per tensor), against their definitions (a sequence run alone), and against
torch in float64 (skipped when torch is missing). The dropout generator against C's SplitMix64
written out with Python integers."""
import numpy as np
import pytest

from helpers import fd_check
from pyrnn import oracle

T, B, IN, H = 4, 3, 3, 3
LENGTHS = np.array([4, 1, 3])   # one full, one of length 1, one in between


def stack_case(cell, L, bidirectional, seed=0):
    rng = np.random.default_rng(seed)
    D = 2 if bidirectional else 1
    params = oracle.init_stack_params(cell, IN, H, L, rng=rng, dtype=np.float64, bidirectional=bidirectional)
    x = rng.normal(size=(T, B, IN))
    h0, c0 = rng.normal(0, 0.5, (L * D, B, H)), rng.normal(0, 0.5, (L * D, B, H))
    dout = rng.normal(size=(T, B, D * H))
    dh_n, dc_n = rng.normal(size=(L * D, B, H)), rng.normal(size=(L * D, B, H))
    if cell != 'lstm':
        c0 = dc_n = None
    return params, x, h0, c0, dout, dh_n, dc_n


def objective(params, cell, x, h0, c0, dout, dh_n, dc_n, **kw):
    out, h_n, c_n, _ = oracle.stack_forward(params, cell, x, h0, c0, **kw)
    s = np.sum(out * dout) + np.sum(h_n * dh_n)
    return s + (np.sum(c_n * dc_n) if c_n is not None else 0.0)


CASES = [(c, L, bidir, lengths, p) for c in oracle.CELLS
         for L, bidir, lengths, p in ((2, True, LENGTHS, 0.5), (1, False, LENGTHS, 0.0), (3, True, None, 0.4))]


@pytest.mark.parametrize('cell,L,bidirectional,lengths,p', CASES,
                         ids=[f'{c}-L{L}-{"bi" if bi else "uni"}-{"lengths" if n is not None else "full"}-p{p}'
                              for c, L, bi, n, p in CASES])
def test_stack_gradients(cell, L, bidirectional, lengths, p):
    params, x, h0, c0, dout, dh_n, dc_n = stack_case(cell, L, bidirectional)
    D = 2 if bidirectional else 1
    masks = oracle.dropout_masks(oracle.dropout_state(7), range(1, L), T, B, D * H, p)[0] if p else None
    kw = dict(dropout=p, masks=masks, lengths=lengths)
    out, h_n, c_n, cache = oracle.stack_forward(params, cell, x, h0, c0, **kw)
    assert out.shape == (T, B, D * H) and h_n.shape == (L * D, B, H)
    if lengths is not None:
        assert not out[1:, 1].any() and not out[3:, 2].any()   # nothing past a sequence's end
    dx, dh0, dc0, grads = oracle.stack_backward(cache, dout, dh_n, dc_n)
    assert list(grads) == list(params) == list(oracle.stack_param_shapes(cell, IN, H, L, True, bidirectional))
    f = lambda: objective(params, cell, x, h0, c0, dout, dh_n, dc_n, **kw)
    for name in params:
        fd_check(name, grads[name], f, params[name])
    if lengths is not None:   # padding is never read: its gradient is exactly zero
        assert not dx[1:, 1].any() and not dx[3:, 2].any()
        before, pad = f(), x[1:, 1].copy()
        x[1:, 1] = np.nan     # and whatever it holds changes nothing
        assert f() == before
        x[1:, 1] = pad
    fd_check('x', dx, f, x)
    fd_check('h0', dh0, f, h0)
    if cell == 'lstm':
        fd_check('c0', dc0, f, c0)


@pytest.mark.parametrize('cell', oracle.CELLS)
def test_lengths_mean_each_sequence_alone(cell):
    """A batch with lengths == each sequence run alone on its own steps: outputs, h_n (the reverse
    direction starting at its own last step) and every gradient, as through pack_padded_sequence."""
    L = 2
    params, x, h0, c0, dout, dh_n, dc_n = stack_case(cell, L, True, seed=2)
    lstm = cell == 'lstm'
    out, h_n, c_n, cache = oracle.stack_forward(params, cell, x, h0, c0, lengths=LENGTHS)
    dx, dh0, dc0, grads = oracle.stack_backward(cache, dout, dh_n, dc_n)
    total = {k: np.zeros_like(v) for k, v in grads.items()}
    for b, n in enumerate(LENGTHS):
        one = lambda a: None if a is None else a[:, b:b + 1]
        o, hb, cb, cb_cache = oracle.stack_forward(params, cell, x[:n, b:b + 1], one(h0), one(c0))
        np.testing.assert_allclose(out[:n, b:b + 1], o, rtol=1e-13, atol=1e-15)
        np.testing.assert_allclose(h_n[:, b:b + 1], hb, rtol=1e-13, atol=1e-15)
        if lstm:
            np.testing.assert_allclose(c_n[:, b:b + 1], cb, rtol=1e-13, atol=1e-15)
        dxb, dhb, dcb, gb = oracle.stack_backward(cb_cache, dout[:n, b:b + 1], one(dh_n), one(dc_n))
        np.testing.assert_allclose(dx[:n, b:b + 1], dxb, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(dh0[:, b:b + 1], dhb, rtol=1e-12, atol=1e-14)
        if lstm:
            np.testing.assert_allclose(dc0[:, b:b + 1], dcb, rtol=1e-12, atol=1e-14)
        for k in total:
            total[k] += gb[k]
    for k in grads:
        np.testing.assert_allclose(grads[k], total[k], rtol=1e-12, atol=1e-14, err_msg=k)
    # lengths all equal to T is the plain stack
    full = oracle.stack_forward(params, cell, x, h0, c0, lengths=[T] * B)
    plain = oracle.stack_forward(params, cell, x, h0, c0)
    assert all(a is None and b is None or np.array_equal(a, b) for a, b in zip(full[:3], plain[:3]))


@pytest.mark.parametrize('cell', oracle.CELLS)
def test_cell_gradients_and_equivalence_to_one_step(cell):
    rng = np.random.default_rng(3)
    params = oracle.init_uniform(oracle.layer_param_shapes(cell, IN, H), H, rng, np.float64)
    assert list(params) == ['weight_ih', 'weight_hh', 'bias_ih', 'bias_hh']
    x, h, c = rng.normal(size=(B, IN)), rng.normal(size=(B, H)), rng.normal(size=(B, H))
    c = c if cell == 'lstm' else None
    dh, dc = rng.normal(size=(B, H)), rng.normal(size=(B, H)) if cell == 'lstm' else None
    h1, c1, cache = oracle.cell_forward(params, cell, x, h, c)
    dx, dh_prev, dc_prev, grads = oracle.cell_backward(cache, dh, dc)
    f = lambda: np.sum(oracle.cell_forward(params, cell, x, h, c)[0] * dh) + \
        (np.sum(oracle.cell_forward(params, cell, x, h, c)[1] * dc) if c is not None else 0.0)
    for name in params:
        fd_check(name, grads[name], f, params[name])
    fd_check('x', dx, f, x)
    fd_check('h', dh_prev, f, h)
    if c is not None:
        fd_check('c', dc_prev, f, c)
    # a cell step is a one-layer stack of one step
    stack = {k + '_l0': v for k, v in params.items()}
    out, h_n, c_n, _ = oracle.stack_forward(stack, cell, x[None], h[None], None if c is None else c[None])
    assert np.array_equal(out[0], h1) and np.array_equal(h_n[0], h1)


class SplitMix64:
    """C's rng_next and rng_uniform, one Python integer at a time."""
    M = (1 << 64) - 1

    def __init__(self, state):
        self.state = state

    def next(self):
        self.state = (self.state + 0x9E3779B97F4A7C15) & self.M
        z = self.state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & self.M
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & self.M
        return z ^ (z >> 31)

    def uniform(self):
        return (self.next() >> 40) / 16777216.0


def c_dropout_mask(key, site, T, B, H, p, first):
    """c/train_rnn.c's dropout_forward, written out element by element."""
    site_key = SplitMix64(key + site).next()
    mask = np.zeros((T, B, H), np.float32)
    for t in range(T):
        for b in range(B):
            draws = SplitMix64(site_key ^ ((t << 32) | ((first + b) & 0xFFFFFFFF))).next()
            g = SplitMix64(draws)
            for j in range(H):
                mask[t, b, j] = 0.0 if g.uniform() < np.float32(p) else 1.0
    return mask


@pytest.mark.parametrize('state', [0, 1, oracle.dropout_state(7), (1 << 64) - 5])
def test_dropout_generator_is_c(state):
    g = SplitMix64(state)
    key = g.next()
    masks, after = oracle.dropout_masks(state, [1, 3], 3, 4, 5, 0.3)
    assert after == g.state == oracle.dropout_skip(state, 1)   # one draw per pass
    for site, mask in zip([1, 3], masks):
        np.testing.assert_array_equal(mask, c_dropout_mask(key, site, 3, 4, 5, 0.3, 0))
    assert not np.array_equal(masks[0], masks[1])
    # a data-parallel rank holding streams 2..3 draws rows 2..3 of the whole batch
    whole = oracle.dropout_mask(key, 2, 3, 4, 5, 0.3)
    np.testing.assert_array_equal(oracle.dropout_mask(key, 2, 3, 2, 5, 0.3, first_stream=2), whole[:, 2:])
    big = oracle.dropout_masks(state, [1], 50, 20, 30, 0.3)[0][0]
    assert 0.67 < big.mean() < 0.73


def test_dropout_needs_masks():
    params, x, h0, c0, *_ = stack_case('gru', 2, False)
    with pytest.raises(ValueError, match='dropout needs its masks'):
        oracle.stack_forward(params, 'gru', x, dropout=0.5)
    assert oracle.dropout_scale(0.2, np.float32) == np.float32(1) / (np.float32(1) - np.float32(0.2))


def test_parameter_counts_in_one_place():
    for cell in oracle.CELLS:
        for bidir in (False, True):
            shapes = oracle.stack_param_shapes(cell, 5, 7, 3, True, bidir)
            assert oracle.num_params(shapes) == oracle.stack_num_params(cell, 5, 7, 3, True, bidir)
        assert oracle.num_params(oracle.lm_param_shapes(cell, 11, 4, 6, 2)) == oracle.lm_num_params(cell, 11, 4, 6, 2)
    # a billion layers: counted, not built
    assert oracle.stack_num_params('gru', 3, 10, 10**9) == 3 * 10 * (3 + 10 + 2) + (10**9 - 1) * 3 * 10 * (10 + 10 + 2)
    assert oracle.stack_param_names(1, bidirectional=True) == [
        'weight_ih_l0', 'weight_hh_l0', 'bias_ih_l0', 'bias_hh_l0',
        'weight_ih_l0_reverse', 'weight_hh_l0_reverse', 'bias_ih_l0_reverse', 'bias_hh_l0_reverse']
    assert [oracle.cell_id(c) for c in oracle.CELLS] == [0, 1, 2, 3] and oracle._cell_name(2) == 'lstm'


# ----------------------------------------------------------------------------- torch, float64

def torch_twins(cell, L=None, **kw):
    torch = pytest.importorskip('torch', reason='torch is not installed: the oracle-vs-torch checks need it')
    nl = {'nonlinearity': 'relu' if cell == 'rnn_relu' else 'tanh'} if cell.startswith('rnn') else {}
    if L is None:
        cls = {'rnn': torch.nn.RNNCell, 'rnn_relu': torch.nn.RNNCell, 'lstm': torch.nn.LSTMCell,
               'gru': torch.nn.GRUCell}[cell]
        return torch, cls(IN, H, **nl).double()
    cls = {'rnn': torch.nn.RNN, 'rnn_relu': torch.nn.RNN, 'lstm': torch.nn.LSTM, 'gru': torch.nn.GRU}[cell]
    return torch, cls(IN, H, L, **nl, **kw).double()


@pytest.mark.parametrize('cell', oracle.CELLS)
def test_bidirectional_lengths_match_torch_float64(cell):
    L = 3
    torch, ref = torch_twins(cell, L, bidirectional=True)
    params, x, h0, c0, dout, dh_n, dc_n = stack_case(cell, L, True, seed=4)
    assert list(ref.state_dict()) == list(params)
    ref.load_state_dict({k: torch.from_numpy(v) for k, v in params.items()})
    lstm = cell == 'lstm'
    out, h_n, c_n, cache = oracle.stack_forward(params, cell, x, h0, c0, lengths=LENGTHS)
    dx, dh0, dc0, grads = oracle.stack_backward(cache, dout, dh_n, dc_n)
    tx, th0 = torch.tensor(x, requires_grad=True), torch.tensor(h0, requires_grad=True)
    tc0 = torch.tensor(c0, requires_grad=True) if lstm else None
    packed = torch.nn.utils.rnn.pack_padded_sequence(tx, torch.from_numpy(LENGTHS), enforce_sorted=False)
    tout, ts = ref(packed, (th0, tc0) if lstm else th0)
    tout = torch.nn.utils.rnn.pad_packed_sequence(tout, total_length=T)[0]
    thn = ts[0] if lstm else ts
    obj = (tout * torch.from_numpy(dout)).sum() + (thn * torch.from_numpy(dh_n)).sum()
    if lstm:
        obj = obj + (ts[1] * torch.from_numpy(dc_n)).sum()
    obj.backward()
    pairs = [(out, tout), (h_n, thn), (dx, tx.grad), (dh0, th0.grad)] + \
        [(grads[k], p.grad) for k, p in ref.named_parameters()]
    if lstm:
        pairs += [(c_n, ts[1]), (dc0, tc0.grad)]
    for a, b in pairs:
        np.testing.assert_allclose(a, b.detach().numpy(), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize('cell', oracle.CELLS)
def test_cells_match_torch_float64(cell):
    torch, ref = torch_twins(cell)
    rng = np.random.default_rng(5)
    params = {k: v.detach().numpy().copy() for k, v in ref.state_dict().items()}
    x, h, c, dh, dc = (rng.normal(size=s) for s in ((B, IN), (B, H), (B, H), (B, H), (B, H)))
    lstm = cell == 'lstm'
    h1, c1, cache = oracle.cell_forward(params, cell, x, h, c if lstm else None)
    dx, dh_prev, dc_prev, grads = oracle.cell_backward(cache, dh, dc if lstm else None)
    tx, th, tc = (torch.tensor(a, requires_grad=True) for a in (x, h, c))
    r = ref(tx, (th, tc) if lstm else th)
    obj = ((r[0] if lstm else r) * torch.from_numpy(dh)).sum() + ((r[1] * torch.from_numpy(dc)).sum() if lstm else 0)
    obj.backward()
    pairs = [(h1, r[0] if lstm else r), (dx, tx.grad), (dh_prev, th.grad)] + \
        [(grads[k], p.grad) for k, p in ref.named_parameters()]
    if lstm:
        pairs += [(c1, r[1]), (dc_prev, tc.grad)]
    for a, b in pairs:
        np.testing.assert_allclose(a, b.detach().numpy(), rtol=1e-10, atol=1e-12)
