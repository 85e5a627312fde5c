"""pyrnn.to_torch / pyrnn.from_torch for layers (bidirectional included), cells and CharLM, both
directions, and torch's load_state_dict taking pyrnn's state dict (skipped when torch is missing)."""
import numpy as np
import pytest

import pyrnn
from pyrnn import oracle

torch = pytest.importorskip('torch', reason='torch is not installed: the interop tests need it')


def nonlinearity(cell):
    return {'nonlinearity': 'relu' if cell == 'rnn_relu' else 'tanh'} if cell.startswith('rnn') else {}


def weights_equal(ours, theirs):
    sd = theirs.state_dict()
    assert list(ours.state_dict()) == [k for k in sd if not k.startswith('drop')]
    return all(np.array_equal(v, sd[k].numpy()) for k, v in ours.state_dict().items())


@pytest.mark.parametrize('cell', oracle.CELLS)
def test_layers_both_ways(cell):
    kind = {'rnn': 'RNN', 'rnn_relu': 'RNN', 'lstm': 'LSTM', 'gru': 'GRU'}[cell]
    m = getattr(pyrnn, kind)(3, 5, 2, **nonlinearity(cell), bias=cell != 'gru', batch_first=True,
                             dropout=0.25, bidirectional=True, seed=0)
    t = pyrnn.to_torch(m)
    assert type(t) is getattr(torch.nn, kind) and t.training
    assert (t.input_size, t.hidden_size, t.num_layers, t.bias, t.batch_first, t.dropout, t.bidirectional) == \
        (3, 5, 2, cell != 'gru', True, 0.25, True)
    assert weights_equal(m, t)
    x = np.random.default_rng(0).normal(size=(2, 4, 3)).astype(np.float32)
    m.eval()
    out = m(x)[0]
    t.eval()
    np.testing.assert_allclose(out, t(torch.from_numpy(x))[0].detach().numpy(), rtol=1e-5, atol=1e-6)
    back = pyrnn.from_torch(t, backend='numpy')
    assert type(back) is type(m) and back.cell == cell and back.backend == 'numpy' and not back.training
    assert (back.bias, back.batch_first, back.dropout, back.bidirectional, back.num_layers) == \
        (cell != 'gru', True, 0.25, True, 2)
    assert weights_equal(back, t)
    # torch's own module, straight in
    tl = torch.nn.LSTM(4, 6, 3, dropout=0.1)
    ours = pyrnn.from_torch(tl)
    assert isinstance(ours, pyrnn.LSTM) and ours.dropout == 0.1 and weights_equal(ours, tl)


@pytest.mark.parametrize('cell', oracle.CELLS)
def test_cells_both_ways(cell):
    kind = {'rnn': 'RNNCell', 'rnn_relu': 'RNNCell', 'lstm': 'LSTMCell', 'gru': 'GRUCell'}[cell]
    m = getattr(pyrnn, kind)(3, 5, **nonlinearity(cell), seed=1)
    t = pyrnn.to_torch(m)
    assert type(t) is getattr(torch.nn, kind) and weights_equal(m, t)
    back = pyrnn.from_torch(getattr(torch.nn, kind)(4, 2, bias=False, **nonlinearity(cell)))
    assert type(back) is type(m) and back.cell == cell and not back.bias and back.input_size == 4
    x = np.random.default_rng(1).normal(size=(2, 3)).astype(np.float32)
    ours = m(x)
    theirs = t(torch.from_numpy(x))
    for a, b in zip(ours if cell == 'lstm' else [ours], theirs if cell == 'lstm' else [theirs]):
        np.testing.assert_allclose(a, b.detach().numpy(), rtol=1e-5, atol=1e-6)


def test_charlm_both_ways_keeps_dropout():
    lm = pyrnn.CharLM('gru', 11, 4, 6, 2, dropout=0.2, seed=0)
    t = pyrnn.to_torch(lm)
    assert t.drop.p == 0.2 and t.rnn.dropout == 0.2 and t.training and weights_equal(lm, t)
    back = pyrnn.from_torch(t.eval())
    assert isinstance(back, pyrnn.CharLM) and back.dropout == 0.2 and not back.training and weights_equal(back, t)


def test_torch_load_state_dict_takes_pyrnn_state_dicts():
    """The README's promise: torch.from_numpy on each value, and torch's load_state_dict accepts it."""
    for m, t in [(pyrnn.LSTM(3, 4, 2, bidirectional=True, seed=0), torch.nn.LSTM(3, 4, 2, bidirectional=True)),
                 (pyrnn.GRUCell(3, 4, seed=0), torch.nn.GRUCell(3, 4)),
                 (pyrnn.CharLM('lstm', 9, 3, 4, 2, seed=0), pyrnn.interop.torch_char_lm('lstm', 9, 3, 4, 2))]:
        result = t.load_state_dict({k: torch.from_numpy(v) for k, v in m.state_dict().items()})
        assert not result.missing_keys and not result.unexpected_keys and weights_equal(m, t)
        m2 = pyrnn.from_torch(t)
        m2.load_state_dict(t.state_dict())    # and torch's, as it is, into pyrnn
        assert weights_equal(m2, t)


def test_from_torch_refuses_what_has_no_equivalent():
    with pytest.raises(ValueError, match='proj_size'):
        pyrnn.from_torch(torch.nn.LSTM(3, 4, proj_size=2))
    with pytest.raises(TypeError, match='from_torch takes'):
        pyrnn.from_torch(torch.nn.Linear(3, 4))
    with pytest.raises(TypeError, match='to_torch takes a pyrnn module'):
        pyrnn.to_torch(torch.nn.GRU(3, 4))
