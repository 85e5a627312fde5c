"""Bad input to the Python API raises a clear ValueError / TypeError naming the argument and
the shapes, before anything reaches C; a rejected call leaves the module usable."""
import importlib
import os
import sys

import numpy as np
import pytest

import pyrnn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from helpers import reload_cuda_module  # noqa: E402

BACKENDS = ['c', 'numpy']
V, E, H, L, B, T = 7, 4, 5, 2, 3, 4


@pytest.fixture(params=BACKENDS)
def lm(request):
    return pyrnn.CharLM('lstm', V, E, H, L, seed=0, backend=request.param)


@pytest.fixture(params=BACKENDS)
def gru(request):
    return pyrnn.GRU(3, H, L, backend=request.param, seed=0)


def tokens(shape=(B, T), dtype=np.int64):
    return (np.arange(np.prod(shape)) % V).reshape(shape).astype(dtype)


# ----------------------------------------------------------------------------- CharLM inputs

@pytest.mark.parametrize('arg', ['inputs', 'targets'])
def test_float_tokens_rejected(lm, arg):
    kw = dict(inputs=tokens(), targets=tokens())
    kw[arg] = kw[arg].astype(np.float32)
    with pytest.raises(TypeError, match=f'{arg} must be an integer array.*float32'):
        lm.forward(**kw)


@pytest.mark.parametrize('shape', [(B * T,), (1, B, T), (B, 0)])
def test_token_rank_and_empty(lm, shape):
    with pytest.raises(ValueError, match=r'inputs must be a non-empty \(B, T\) array, got shape'):
        lm.forward(np.zeros(shape, np.int64), np.zeros(shape, np.int64))


def test_targets_shape_must_match_inputs(lm):
    with pytest.raises(ValueError, match=r'targets has shape \(3, 5\), expected \(3, 4\)'):
        lm.forward(tokens(), tokens((B, T + 1)))


@pytest.mark.parametrize('bad', [V, -1, 2**40])
@pytest.mark.parametrize('arg', ['inputs', 'targets'])
def test_token_out_of_range(lm, arg, bad):
    kw = dict(inputs=tokens(), targets=tokens())
    kw[arg][1, 2] = bad
    with pytest.raises(ValueError, match=rf'{arg} holds token id {bad}, outside the vocabulary \[0, {V}\)'):
        lm.forward(**kw)
    assert np.isfinite(lm.forward(tokens(), tokens()))  # still usable


def test_hx_shape_and_kind(lm):
    h = np.zeros((L, B, H), np.float32)
    with pytest.raises(TypeError, match=r'hx must be a pair \(h0, c0\) for an LSTM'):
        lm.forward(tokens(), tokens(), hx=h)
    with pytest.raises(ValueError, match=r'hx\[1\] \(c0\) has shape \(2, 3, 6\), expected \(2, 3, 5\)'):
        lm.forward(tokens(), tokens(), hx=(h, np.zeros((L, B, H + 1), np.float32)))
    with pytest.raises(TypeError, match=r'hx\[0\] \(h0\) must be a floating-point array, got dtype int'):
        lm.forward(tokens(), tokens(), hx=(h.astype(np.int32), h))
    gru_lm = pyrnn.CharLM('gru', V, E, H, L)
    with pytest.raises(TypeError, match='only LSTMs take a pair'):
        gru_lm.forward(tokens(), tokens(), hx=(h, h))
    with pytest.raises(ValueError, match=r'hx has shape \(3, 5\), expected \(2, 3, 5\)'):
        gru_lm.forward(tokens(), tokens(), hx=h[0])


def test_backward_without_forward(lm):
    with pytest.raises(RuntimeError, match='backward needs a forward with targets'):
        lm.backward()
    lm.forward(tokens())  # no targets: logits only
    assert lm.logits.shape == (B, T, V)
    with pytest.raises(RuntimeError, match='backward needs a forward with targets'):
        lm.backward()


def test_step_rejects_negative_clip(lm):
    with pytest.raises(ValueError, match='max_grad_norm'):
        lm.step(1e-3, max_grad_norm=-1.0)


# ----------------------------------------------------------------------------- constructors

@pytest.mark.parametrize('kw,match', [
    (dict(cell='transformer'), "unknown cell 'transformer'"),
    (dict(cell='lstm', nonlinearity='relu'), "nonlinearity='relu' only applies to cell 'rnn'"),
    (dict(cell='rnn', nonlinearity='sigmoid'), "unknown nonlinearity 'sigmoid'"),
    (dict(cell='gru', backend='tpu'), "unknown backend 'tpu'"),
    (dict(cell='gru', hidden_size=0), 'hidden_size must be a positive int, got 0'),
    (dict(cell='gru', vocab_size=2.5), 'vocab_size must be a positive int, got 2.5'),
    (dict(cell='gru', dropout=1.0), r'dropout must be in \[0, 1\)'),
])
def test_bad_constructor_args(kw, match):
    args = dict(vocab_size=V, embed_size=E, hidden_size=H)
    args.update(kw)
    with pytest.raises(ValueError, match=match):
        pyrnn.CharLM(**args)


def test_relu_rnn_cell_names():
    assert pyrnn.CharLM('rnn', V, E, H, nonlinearity='relu').cell == 'rnn_relu'
    assert pyrnn.CharLM('rnn_relu', V, E, H).cell == 'rnn_relu'
    assert pyrnn.RNN(3, H, nonlinearity='relu').cell == 'rnn_relu'
    with pytest.raises(ValueError, match="unknown nonlinearity 'gelu'"):
        pyrnn.RNN(3, H, nonlinearity='gelu')
    with pytest.raises(ValueError, match="unknown backend 'gpu'"):
        pyrnn.LSTM(3, H, backend='gpu')


def test_cuda_backend_errors_are_clear(monkeypatch):
    """Without the GPU library: 'not built'. With it but no usable GPU: the CUDA error, at the first
    forward. The layer API never takes 'cuda'."""
    with pytest.raises(ValueError, match="backend='cuda' is for CharLM"):
        pyrnn.GRU(3, H, backend='cuda')
    reload_cuda_module(monkeypatch)   # whatever an earlier test loaded, the library as this process finds it
    try:
        importlib.import_module('pyrnn._cuda')
    except ImportError:
        with pytest.raises(RuntimeError, match='the cuda backend is not built'):
            pyrnn.CharLM('gru', V, E, H, backend='cuda')
        return
    model = pyrnn.CharLM('gru', V, E, H, backend='cuda')
    x = np.zeros((2, 3), np.int32)
    try:
        model.forward(x, x)
    except RuntimeError as e:   # no GPU here: the message names the failing CUDA call
        assert 'gpu_lm_new' in str(e) and 'cuda' in str(e).lower()
    else:
        pytest.skip('a GPU is present: the cuda backend is exercised by the GPU checks instead')


@pytest.mark.parametrize('n', [0, -2, 1.5, True])
def test_set_num_threads(n):
    with pytest.raises(ValueError, match='positive int'):
        pyrnn.set_num_threads(n)


def test_set_num_threads_ok():
    old = pyrnn.get_num_threads()
    pyrnn.set_num_threads(1)
    assert pyrnn.get_num_threads() == 1
    pyrnn.set_num_threads(old)


# ----------------------------------------------------------------------------- state dicts

def test_state_dict_missing_and_extra_keys(lm):
    sd = lm.state_dict()
    sd.pop('rnn.bias_hh_l1')
    sd['rnn.weight_ih_l2'] = np.zeros((4 * H, H), np.float32)
    with pytest.raises(ValueError, match=r"missing \['rnn.bias_hh_l1'\], unexpected \['rnn.weight_ih_l2'\]"):
        lm.load_state_dict(sd)


def test_state_dict_wrong_shape_changes_nothing(lm):
    before = lm.state_dict()
    sd = {k: v + 1 for k, v in before.items()}
    sd['head.weight'] = np.zeros((H, V), np.float32)  # transposed
    with pytest.raises(ValueError, match=r"state_dict\['head.weight'\] has shape \(5, 7\), expected \(7, 5\)"):
        lm.load_state_dict(sd)
    after = lm.state_dict()
    assert all(np.array_equal(before[k], after[k]) for k in before)


def test_state_dict_wrong_dtype_and_type(lm):
    sd = lm.state_dict()
    sd['head.bias'] = sd['head.bias'].astype(np.int32)
    with pytest.raises(TypeError, match=r"state_dict\['head.bias'\] must be a floating-point array"):
        lm.load_state_dict(sd)
    with pytest.raises(TypeError, match='state_dict must be a mapping'):
        lm.load_state_dict([1, 2])


def test_state_dict_returns_copies_parameters_and_grad_views(lm, gru):
    for m in (lm, gru):
        sd = m.state_dict()
        name = next(iter(sd))
        sd[name][...] = 42
        assert not np.any(m.state_dict()[name] == 42)
        # parameters() and .grad are views of the module's own buffers: writes go through
        m.parameters()[name][...] = 42
        assert np.all(m.state_dict()[name] == 42)
        g = m.grad
        g[name][...] = 7
        assert np.all(m.grad[name] == 7)
        m.zero_grad()
        assert not np.any(g[name])


def test_layer_state_dict_keys(gru):
    sd = gru.state_dict()
    assert list(sd) == ['weight_ih_l0', 'weight_hh_l0', 'bias_ih_l0', 'bias_hh_l0',
                        'weight_ih_l1', 'weight_hh_l1', 'bias_ih_l1', 'bias_hh_l1']
    assert sd['weight_ih_l0'].shape == (3 * H, 3) and sd['weight_ih_l1'].shape == (3 * H, H)
    assert all(v.dtype == np.float32 for v in sd.values())
    nobias = pyrnn.GRU(3, H, L, bias=False)
    with pytest.raises(ValueError, match=r"unexpected \['bias_ih_l0'"):
        nobias.load_state_dict(sd)


# ----------------------------------------------------------------------------- layer inputs

def test_layer_input_dtype(gru):
    with pytest.raises(TypeError, match='x must be a floating-point array, got dtype int64'):
        gru(np.zeros((T, B, 3), np.int64))


@pytest.mark.parametrize('shape', [(T, B, 4), (T,), (1, T, B, 3)])
def test_layer_input_shape(gru, shape):
    with pytest.raises(ValueError, match=rf'x .*shape {tuple(shape)}'.replace('(', r'\(').replace(')', r'\)')):
        gru(np.zeros(shape, np.float32))


def test_layer_hx_and_backward_shapes(gru):
    x = np.zeros((T, B, 3), np.float32)
    with pytest.raises(ValueError, match=r'hx has shape \(2, 5\), expected \(2, 3, 5\)'):
        gru(x, np.zeros((L, H), np.float32))
    with pytest.raises(RuntimeError, match='backward needs a forward first'):
        gru.backward(np.zeros((T, B, H), np.float32))
    gru(x)
    with pytest.raises(ValueError, match=r'doutput has shape \(3, 4, 5\), expected \(4, 3, 5\)'):
        gru.backward(np.zeros((B, T, H), np.float32))
    with pytest.raises(ValueError, match=r'dh_n has shape \(1, 3, 5\), expected \(2, 3, 5\)'):
        gru.backward(np.zeros((T, B, H), np.float32), dh_n=np.zeros((1, B, H), np.float32))
    dx, dh0 = gru.backward(np.ones((T, B, H), np.float32))  # still usable
    assert dx.shape == (T, B, 3) and dh0.shape == (L, B, H)
    with pytest.raises(RuntimeError, match=r'one backward per forward'):
        gru.backward(np.ones((T, B, H), np.float32))   # would double the gradients


def test_layer_batch_first_shapes():
    m = pyrnn.LSTM(3, H, L, batch_first=True, seed=0)
    out, (h_n, c_n) = m(np.zeros((B, T, 3), np.float32))
    assert out.shape == (B, T, H) and h_n.shape == c_n.shape == (L, B, H)
    with pytest.raises(ValueError, match=r'doutput has shape \(4, 3, 5\), expected \(3, 4, 5\)'):
        m.backward(np.zeros((T, B, H), np.float32))
    with pytest.raises(TypeError, match=r'dh_n must be a pair \(dh_n, dc_n\) for an LSTM'):
        m.backward(np.zeros((B, T, H), np.float32), dh_n=np.zeros((L, B, H), np.float32))


def test_c_errors_become_runtime_errors(monkeypatch):
    # with the Python range check bypassed, C's own check answers: -1 -> RuntimeError(its message)
    from pyrnn import validate
    lm = pyrnn.CharLM('rnn', V, E, H)
    monkeypatch.setattr(validate, 'tokens', lambda a, name, V, shape=None: np.ascontiguousarray(a, np.int32))
    bad = tokens()
    bad[2, 3] = V
    with pytest.raises(RuntimeError, match=rf'input token {V} at position 11 is outside the vocabulary \[0, {V}\)'):
        lm.forward(bad, tokens())
    with pytest.raises(RuntimeError, match='backward needs a forward'):
        lm.backward()
