"""pyrnn.AdamW and pyrnn.clip_grad_norm_ on every module kind and backend: against torch.optim.AdamW
and torch.nn.utils.clip_grad_norm_ (skipped when torch is missing), torch's ValueErrors for bad
hyperparameters, state dicts, and a non-finite gradient that raises FloatingPointError and
changes nothing."""
import copy
import math

import numpy as np
import pytest

import pyrnn
from helpers import note, rel_err, worst_errors

BACKENDS = ['c', 'numpy']
WORST, report_worst = worst_errors('largest relative error of the parameters after AdamW steps against torch')


def make(kind, backend):
    """A module, a function running forward + backward on fixed data, and the same for its torch twin."""
    rng = np.random.default_rng(0)
    if kind == 'lstm-bidirectional':
        m = pyrnn.LSTM(4, 8, 2, bidirectional=True, seed=0, backend=backend)
        x, dout = rng.normal(size=(5, 3, 4)).astype(np.float32), rng.normal(size=(5, 3, 16)).astype(np.float32)

        def run(mod):
            mod(x)
            mod.backward(dout)

        def run_torch(tm, torch):
            (tm(torch.from_numpy(x))[0] * torch.from_numpy(dout)).sum().backward()
    elif kind == 'gru-cell':
        m = pyrnn.GRUCell(4, 6, seed=0, backend=backend)
        xs, d = rng.normal(size=(3, 2, 4)).astype(np.float32), rng.normal(size=(2, 6)).astype(np.float32)

        def run(mod):
            h = None
            for x in xs:
                h = mod(x, h)
            dh = d
            for _ in xs:
                dh = mod.backward(dh)[1]

        def run_torch(tm, torch):
            h = None
            for x in xs:
                h = tm(torch.from_numpy(x), h)
            (h * torch.from_numpy(d)).sum().backward()
    else:
        m = pyrnn.CharLM('gru', 11, 5, 8, 2, seed=0, backend=backend)
        inp, tgt = rng.integers(0, 11, (3, 6)), rng.integers(0, 11, (3, 6))

        def run(mod):
            mod.forward(inp, tgt)
            mod.backward()

        def run_torch(tm, torch):
            logits = tm(torch.from_numpy(inp))[0]
            torch.nn.functional.cross_entropy(logits.reshape(-1, 11), torch.from_numpy(tgt).reshape(-1)).backward()
    return m, run, run_torch


KINDS = ['lstm-bidirectional', 'gru-cell', 'charlm']


@pytest.mark.parametrize('backend', BACKENDS)
@pytest.mark.parametrize('kind', KINDS)
def test_adamw_and_clipping_match_torch(kind, backend):
    torch = pytest.importorskip('torch', reason='torch is not installed: the parity tests need it')
    m, run, run_torch = make(kind, backend)
    tm = pyrnn.to_torch(m)
    opt = pyrnn.AdamW(m, lr=1e-2, betas=(0.8, 0.99), eps=1e-7, weight_decay=0.1)
    topt = torch.optim.AdamW(tm.parameters(), lr=1e-2, betas=(0.8, 0.99), eps=1e-7, weight_decay=0.1)
    for step in range(6):
        max_norm = (1e3, 1e-2)[step % 2]   # every other step clips
        opt.zero_grad()
        run(m)
        norm = pyrnn.clip_grad_norm_(m, max_norm)
        opt.step()
        topt.zero_grad()
        run_torch(tm, torch)
        tnorm = float(torch.nn.utils.clip_grad_norm_(tm.parameters(), max_norm))
        topt.step()
        assert abs(norm - tnorm) <= 2e-6 * tnorm and 1e-2 < norm < 1e3   # so the clip acts on odd steps only
        for k, p in tm.named_parameters():   # the clipped gradients, in place, as torch's
            g = p.grad.numpy()
            assert rel_err(m.grad[k], g) <= 1e-5, k
    ref, err = tm.state_dict(), 0.0
    for k, v in m.state_dict().items():
        e = rel_err(v, ref[k])
        err = max(err, e)
        assert e < 1e-5, f'{k}: relative error {e:.2e}'
    note(WORST, f'{kind} {backend}', err)
    st, tst = opt.state_dict(), topt.state_dict()
    assert st['param_groups'][0]['params'] == tst['param_groups'][0]['params']
    for i, s in st['state'].items():
        assert s['step'] == int(tst['state'][i]['step']) == 6
        np.testing.assert_allclose(s['exp_avg_sq'], tst['state'][i]['exp_avg_sq'].numpy(), rtol=1e-4, atol=1e-12)


@pytest.mark.parametrize('kw', [dict(lr=-1.0), dict(lr=float('nan')), dict(betas=(1.0, 0.9)), dict(betas=(0.9, -0.1)),
                                dict(eps=-1e-8), dict(weight_decay=-0.1)])
def test_bad_hyperparameters_raise_as_torch(kw):
    m = pyrnn.GRU(2, 3, seed=0)
    with pytest.raises(ValueError, match='Invalid'):
        pyrnn.AdamW(m, **kw)
    lm = pyrnn.CharLM('rnn', 5, 3, 4, seed=0)
    lm.forward(np.zeros((1, 2), np.int32), np.zeros((1, 2), np.int32))
    lm.backward()
    before = lm.state_dict()
    with pytest.raises(ValueError, match='Invalid'):
        lm.step(kw.get('lr', 1e-3), kw.get('betas', (0.9, 0.999)), kw.get('eps', 1e-8), kw.get('weight_decay', 0.0))
    assert all(np.array_equal(v, lm.state_dict()[k]) for k, v in before.items())
    opt = pyrnn.AdamW(m)
    opt.param_groups[0].update(kw)       # a bad schedule is caught at the step
    with pytest.raises(ValueError, match='Invalid'):
        opt.step()
    try:
        import torch
    except ImportError:
        return
    with pytest.raises(ValueError):      # and torch says no to the same
        torch.optim.AdamW(torch.nn.Linear(1, 1).parameters(), **kw)


def snapshot(m, opt):
    return m.state_dict(), copy.deepcopy(opt.state_dict())


def same(a, b):
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, np.ndarray):
        return np.array_equal(a, b)
    return a == b


@pytest.mark.parametrize('bad', [np.nan, np.inf])
@pytest.mark.parametrize('backend', BACKENDS)
@pytest.mark.parametrize('kind', KINDS)
def test_nonfinite_gradient_raises_and_changes_nothing(kind, backend, bad):
    m, run, _ = make(kind, backend)
    opt = pyrnn.AdamW(m, lr=1e-2)
    for first in (True, False):          # before any step (no moments yet), and after one
        if not first:
            opt.zero_grad()
            run(m)
            opt.step()
        before = snapshot(m, opt)
        opt.zero_grad()
        run(m)
        name = list(m.grad)[-1]
        m.grad[name].flat[0] = bad
        with pytest.raises(FloatingPointError, match='not finite'):
            opt.step()
        assert same(snapshot(m, opt), before)
        if kind == 'charlm':             # CharLM.step, on C's own optimizer for backend='c'
            with pytest.raises(FloatingPointError):
                m.step(1e-2, max_grad_norm=1.0)
            assert same(snapshot(m, opt), before)
    opt.zero_grad()                      # and the module trains on
    run(m)
    opt.step()
    assert opt.state_dict()['state'][0]['step'] == 2


@pytest.mark.parametrize('backend', BACKENDS)
@pytest.mark.parametrize('kind', KINDS)
def test_state_dict_continues_bit_identically(kind, backend):
    a, run, _ = make(kind, backend)
    b, _, _ = make(kind, backend)
    oa = pyrnn.AdamW(a, lr=1e-2, weight_decay=0.05)
    ob = pyrnn.AdamW(b)
    run(a)
    oa.step()
    fresh = oa.state_dict()
    fresh['state'] = {}
    oa.load_state_dict(fresh)            # an empty state starts afresh, as in torch
    assert oa.state_dict()['state'] == {}
    for _ in range(2):
        oa.zero_grad()
        run(a)
        oa.step()
    b.load_state_dict(a.state_dict())
    ob.load_state_dict(oa.state_dict())
    assert ob.param_groups == oa.param_groups
    for mod, opt in ((a, oa), (b, ob)):
        opt.zero_grad()
        run(mod)
        opt.step()
    assert same(snapshot(a, oa), snapshot(b, ob))
    bad = oa.state_dict()
    bad['state'][0]['exp_avg'] = bad['state'][0]['exp_avg'][:1]
    with pytest.raises(ValueError, match='exp_avg of'):
        ob.load_state_dict(bad)
    assert same(snapshot(a, oa), snapshot(b, ob))   # a rejected state dict changes nothing


def test_charlm_step_is_adamw_step():
    """CharLM.step(lr, ...) == pyrnn.AdamW(lm, lr, ...).step(), with clipping on a copy of the grads."""
    for backend in BACKENDS:
        a = pyrnn.CharLM('lstm', 9, 4, 6, 2, seed=1, backend=backend)
        b = pyrnn.CharLM('lstm', 9, 4, 6, 2, seed=1, backend=backend)
        x = np.random.default_rng(0).integers(0, 9, (2, 5))
        opt = pyrnn.AdamW(b, lr=1e-2, weight_decay=0.1)
        for _ in range(3):
            for m in (a, b):
                m.forward(x, x)
                m.zero_grad()
                m.backward()
            g = {k: v.copy() for k, v in a.grad.items()}
            a.step(1e-2, weight_decay=0.1)
            opt.step()
            assert same({k: v.copy() for k, v in a.grad.items()}, g)   # step leaves .grad alone
        assert same(a.state_dict(), b.state_dict()), backend
        # clipping: the gradient norm returned is the norm before clipping
        norm = a.step(1e-2, max_grad_norm=1e-3)
        assert math.isclose(norm, np.sqrt(sum(float((v.astype(np.float64) ** 2).sum()) for v in g.values())),
                            rel_tol=1e-5)


def test_clip_grad_norm_edges():
    m = pyrnn.GRU(2, 3, seed=0)
    for g in m.grad.values():
        g[...] = 1.0
    n = sum(g.size for g in m.grad.values())
    assert pyrnn.clip_grad_norm_(m, 1e9) == pytest.approx(math.sqrt(n))
    assert all((g == 1.0).all() for g in m.grad.values())          # below max_norm: untouched
    norm = pyrnn.clip_grad_norm_(m, 1.0)
    assert norm == pytest.approx(math.sqrt(n))
    total = math.sqrt(sum(float((g.astype(np.float64) ** 2).sum()) for g in m.grad.values()))
    assert total == pytest.approx(1.0 / (1 + 1e-6 / math.sqrt(n)), rel=1e-6)
    with pytest.raises(ValueError, match='max_norm must be >= 0'):
        pyrnn.clip_grad_norm_(m, -1.0)
    m.grad['weight_ih_l0'][0, 0] = np.inf
    assert pyrnn.clip_grad_norm_(m, 1.0) == math.inf
    assert np.isnan(m.grad['bias_hh_l0']).all()                    # scaled by nan, as torch does
