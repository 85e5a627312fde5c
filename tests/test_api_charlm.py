"""CharLM as a scripting library: save / load that continue bit-identically, the vocabulary and text
sampling, one seed default, dropout masks from one generator on every backend, and sizes refused
with a clear error before anything is allocated."""
import inspect
import math

import numpy as np
import pytest

import pyrnn
from pyrnn import checkpoint, oracle, validate

BACKENDS = ['c', 'numpy']
TEXT = "ROMEO: But soft, what light through yonder window breaks?\n" * 8


def batch(vocab, B=3, T=12, seed=0):
    ids = vocab.encode(TEXT)
    starts = np.random.default_rng(seed).integers(0, len(ids) - T - 1, B)
    b = np.stack([ids[s:s + T + 1] for s in starts])
    return b[:, :-1], b[:, 1:]


def train_step(lm, x, y, hx=None):
    loss = lm.forward(x, y, hx)
    lm.zero_grad()
    lm.backward()
    lm.step(1e-2, weight_decay=0.01, max_grad_norm=0.5)
    return loss


@pytest.mark.parametrize('backend', BACKENDS)
@pytest.mark.parametrize('cell', ['lstm', 'gru'])
def test_save_load_continues_bit_identically(tmp_path, cell, backend):
    vocab = pyrnn.Vocab.from_text(TEXT)
    lm = pyrnn.CharLM(cell, len(vocab), 6, 16, 2, dropout=0.3, vocab=vocab, seed=4, backend=backend)
    x, y = batch(vocab)
    for _ in range(3):
        train_step(lm, x, y)
    lm.save(tmp_path / 'lm.bin')
    back = pyrnn.CharLM.load(tmp_path / 'lm.bin', backend=backend)
    assert (back.cell, back.dropout, back.vocab, back.training) == (cell, 0.3, vocab, True)
    assert pyrnn.AdamW(back).state_dict()['state'][0]['step'] == 3
    for k, v in pyrnn.AdamW(lm).state_dict()['state'].items():
        w = pyrnn.AdamW(back).state_dict()['state'][k]
        assert np.array_equal(v['exp_avg'], w['exp_avg']) and np.array_equal(v['exp_avg_sq'], w['exp_avg_sq'])
    for _ in range(2):   # dropout masks, moments, step count: the next steps are the same bits
        assert train_step(lm, x, y) == train_step(back, x, y)
    for k, v in lm.state_dict().items():
        assert np.array_equal(back.state_dict()[k], v), k
    ck = checkpoint.read_checkpoint(tmp_path / 'lm.bin')
    assert ck['dropout'] == 0.3 and ck['adam_t'] == 3 and ck['vocab'] == vocab.symbols


def test_load_without_steps_and_old_files(tmp_path):
    lm = pyrnn.CharLM('rnn', 5, 3, 4, seed=1, vocab=b'abcde')
    lm.save(tmp_path / 'a.bin')
    back = pyrnn.CharLM.load(tmp_path / 'a.bin')
    assert back.dropout == 0.0 and pyrnn.AdamW(back).state_dict()['state'] == {}
    # files written before word 12 held the dropout rate read as dropout 0
    checkpoint.write_checkpoint(tmp_path / 'b.bin', 'rnn', lm.state_dict(), b'abcde')
    assert pyrnn.CharLM.load(tmp_path / 'b.bin').dropout == 0.0


def test_save_needs_a_vocabulary(tmp_path):
    lm = pyrnn.CharLM('gru', 7, 3, 4, seed=0)
    with pytest.raises(ValueError, match='this model has no vocabulary'):
        lm.save(tmp_path / 'x.bin')
    assert not (tmp_path / 'x.bin').exists()
    lm.save(tmp_path / 'x.bin', vocab=b'abcdefg')
    assert pyrnn.CharLM.load(tmp_path / 'x.bin').vocab == pyrnn.Vocab(b'abcdefg')
    with pytest.raises(ValueError, match='vocab has 3 symbols, the model 7'):
        lm.save(tmp_path / 'y.bin', vocab=b'abc')
    with pytest.raises(ValueError, match='vocab has 3 symbols, vocab_size is 7'):
        pyrnn.CharLM('gru', 7, 3, 4, vocab=b'abc')


def test_vocab():
    v = pyrnn.Vocab.from_text('naïve café')
    assert v.symbols == bytes(sorted(set('naïve café'.encode())))
    ids = v.encode('café')
    assert ids.dtype == np.int32 and v.decode(ids) == 'café' and len(v) == len(v.symbols)
    assert pyrnn.Vocab(v) == v and pyrnn.Vocab(v.symbols) == v
    with pytest.raises(ValueError, match=r"byte b'z' is not in the vocabulary"):
        v.encode('zebra')
    with pytest.raises(ValueError, match='must be distinct'):
        pyrnn.Vocab(b'aba')
    with pytest.raises(TypeError, match='Vocab.from_text'):
        pyrnn.Vocab('abc')


@pytest.mark.parametrize('backend', BACKENDS)
def test_sample_text_prime_and_checks(backend):
    vocab = pyrnn.Vocab.from_text(TEXT)
    lm = pyrnn.CharLM('lstm', len(vocab), 6, 16, vocab=vocab, seed=2, backend=backend)
    out = lm.sample('ROMEO:', 25, seed=3)
    assert isinstance(out, str) and len(out) == 25 and set(out) <= set(TEXT)
    ids = lm.sample(vocab.encode('ROMEO:'), 25, seed=3)
    assert vocab.decode(ids) == out                 # the same draw as from the token ids
    for bad in (0.0, -1.0, math.nan, math.inf):
        with pytest.raises(ValueError, match='temperature must be > 0 and finite'):
            lm.sample('R', 5, temperature=bad)
    for bad in (-1, 1.5):
        with pytest.raises(ValueError, match='top_k must be an int >= 0'):
            lm.sample('R', 5, top_k=bad)
    with pytest.raises(ValueError, match=r"byte b'Z' is not in the vocabulary"):
        lm.sample('Zounds', 5)
    with pytest.raises(ValueError, match='prime needs at least one token'):
        lm.sample('', 5)
    plain = pyrnn.CharLM('lstm', len(vocab), 6, 16, seed=2, backend=backend)
    with pytest.raises(ValueError, match='a str prime needs a model with a vocabulary'):
        plain.sample('ROMEO:', 5)
    np.testing.assert_array_equal(plain.sample(vocab.encode('ROMEO:'), 25, seed=3), ids)


@pytest.mark.parametrize('backend', BACKENDS)
def test_logits_are_batch_first(backend):
    lm = pyrnn.CharLM('gru', 9, 4, 6, 2, seed=0, backend=backend)
    x = np.random.default_rng(0).integers(0, 9, (2, 5))
    lm.forward(x)
    assert lm.logits.shape == (2, 5, 9)
    lm.forward(x[:1, :3])                            # the logits of a prefix are the prefix of the logits
    first = lm.logits.copy()
    lm.forward(x)
    np.testing.assert_allclose(lm.logits[:1, :3], first, rtol=1e-5, atol=1e-6)


def test_one_seed_default():
    defaults = {cls: inspect.signature(cls).parameters['seed'].default
                for cls in (pyrnn.RNN, pyrnn.LSTM, pyrnn.GRU, pyrnn.RNNCell, pyrnn.LSTMCell, pyrnn.GRUCell,
                            pyrnn.CharLM)}
    assert set(defaults.values()) == {None}, defaults
    a, b = pyrnn.CharLM('gru', 7, 3, 4), pyrnn.CharLM('gru', 7, 3, 4)
    assert a.seed != b.seed and not np.array_equal(a.state_dict()['head.weight'], b.state_dict()['head.weight'])
    again = pyrnn.CharLM('gru', 7, 3, 4, seed=a.seed)   # .seed repeats the draw
    assert all(np.array_equal(v, again.state_dict()[k]) for k, v in a.state_dict().items())
    g = pyrnn.GRU(3, 4)
    assert all(np.array_equal(v, pyrnn.GRU(3, 4, seed=g.seed).state_dict()[k]) for k, v in g.state_dict().items())


@pytest.mark.parametrize('cell', oracle.CELLS)
def test_dropout_masks_are_the_oracle_generator_on_both_backends(cell):
    """C draws its masks from SplitMix64 seeded with seed ^ 0x5DEECE66D, the numpy backend with the
    oracle's transcription of it: the same masks, forward after forward, so the backends agree."""
    V, E, H, L, B, T, p = 11, 4, 6, 3, 3, 5, 0.4
    x = np.random.default_rng(1).integers(0, V, (B, T))
    c = pyrnn.CharLM(cell, V, E, H, L, seed=7, dropout=p)
    n = pyrnn.CharLM(cell, V, E, H, L, seed=7, dropout=p, backend='numpy')
    state = oracle.dropout_state(7)
    for _ in range(2):
        lc, ln = c.forward(x, x), n.forward(x, x)
        ref, state = oracle.dropout_masks(state, range(1, L + 1), T, B, H, p)
        for a, b, r in zip(c._dropout_masks(), n._dropout_masks(), ref):
            assert np.array_equal(a, r) and np.array_equal(b, r)
        assert abs(lc - ln) < 1e-5 * abs(ln)


def test_sizes_are_checked_before_allocation(monkeypatch):
    # whatever the machine: far beyond any memory, and at once (no hang, no kernel kill)
    for make, size in [(lambda: pyrnn.GRU(3, 10**5), '30,001,500,000 parameters'),
                       (lambda: pyrnn.GRU(3, 10, num_layers=10**9), '659,999,999,790 parameters'),
                       (lambda: pyrnn.LSTMCell(3, 10**5, backend='numpy'), '40,002,000,000 parameters'),
                       (lambda: pyrnn.CharLM('lstm', 65, 10**5, 10**5), 'parameters')]:
        with pytest.raises(MemoryError, match=rf'{size} \(weights and gradients\) needs [\d,]+ bytes'):
            make()
    # LSTM(3, 30000) needs 28.8 GB: refused where that is more than the memory available
    monkeypatch.setattr(validate, 'available_bytes', lambda: 8 * 2**30)
    with pytest.raises(MemoryError, match=r'LSTM\(3, 30000.* needs 28,804,800,000 bytes \(26.8 GiB\), more than the 8.0 GiB'):
        pyrnn.LSTM(3, 30000)
    m = pyrnn.GRU(3, 512, seed=0)        # activations are checked at each forward
    monkeypatch.setattr(validate, 'available_bytes', lambda: 2**26)
    with pytest.raises(MemoryError, match=r'a forward of 100 steps x 50 sequences through GRU\(3, 512.* needs '
                                          r'[\d,]+ bytes \(0.\d GiB\), more than the 0.1 GiB'):
        m(np.zeros((100, 50, 3), np.float32))
    lm = pyrnn.CharLM('gru', 50, 8, 512, seed=0)
    with pytest.raises(MemoryError, match=r'a forward of 50 x 100 tokens'):
        lm.forward(np.zeros((50, 100), np.int32))
    m(np.zeros((10, 5, 3), np.float32))   # small passes are not even measured
    for kw, msg in [(dict(hidden_size=2**31), 'hidden_size=2147483648 is too large'),
                    (dict(hidden_size=0), 'hidden_size must be a positive int, got 0'),
                    (dict(num_layers=2.0), 'num_layers must be a positive int, got 2.0')]:
        with pytest.raises(ValueError, match=msg):
            pyrnn.GRU(**{'input_size': 3, 'hidden_size': 4, **kw})
