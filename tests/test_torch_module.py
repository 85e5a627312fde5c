"""pyrnn.torch against torch.nn itself: the same module run by torch and on pyrnn's C kernels gives the
same outputs and the same gradients (input, hx, every parameter) within 1e-5 relative per tensor, in
float32, for every cell, 1-3 layers, both directions, batch_first, unbatched and packed input; a
20-step AdamW + clip_grad_norm_ loop gives the same losses and weights to 1e-4; dropout in training
mode draws torch's masks (the same generator calls as torch's own forward), and drops at rate p;
central differences of the float32 function agree with its gradients; accelerate / restore, state
dicts, pickling, deepcopy, retain_graph, fallbacks and threads behave as torch users expect.
Largest errors seen: pytest -s prints them."""
import copy
import pickle
import re

import numpy as np
import pytest

torch = pytest.importorskip('torch', reason='torch is not installed: pyrnn.torch needs it')
import pyrnn.torch as pt  # noqa: E402
from torch.nn.utils.rnn import pack_padded_sequence  # noqa: E402
from helpers import rel_err, worst_errors, note  # noqa: E402

TOL = 1e-5
WORST, report_worst = worst_errors('pyrnn.torch: largest relative error against torch.nn per comparison')
CELLS = ('rnn', 'rnn_relu', 'lstm', 'gru')


def close(key, a, b, tol=TOL):
    err = rel_err(a, b)
    note(WORST, key, err)
    assert err < tol, f'{key}: relative error {err:.3e}'


def torch_module(cell, *args, **kw):
    if cell in ('rnn', 'rnn_relu'):
        kw['nonlinearity'] = 'relu' if cell == 'rnn_relu' else 'tanh'
    kind = {'rnn': 'RNN', 'rnn_relu': 'RNN', 'lstm': 'LSTM', 'gru': 'GRU'}[cell]
    return getattr(torch.nn, kind)(*args, **kw)


def pair(cell, *args, **kw):
    """(torch's module, pyrnn's with the same weights): torch's initialisation, pyrnn's class."""
    torch.manual_seed(0)
    ref = torch_module(cell, *args, **kw)
    ours = pt.accelerate(copy.deepcopy(ref))
    assert type(ours) is getattr(pt, type(ref).__name__)
    return ref, ours


def ran_on_c(module):
    """Whether the module's forward has used C Layers (not torch's fallback): a comparison with torch is
    only worth something if it did."""
    return bool(pt._POOLS.get(module))   # made by the first forward on C


def states(lstm, shape, requires_grad=True):
    make = lambda: (0.5 * torch.randn(shape)).requires_grad_(requires_grad)
    return (make(), make()) if lstm else make()


def flat(hidden):
    return list(hidden) if isinstance(hidden, tuple) else [hidden]


def run(module, x, hx, weights):
    """Outputs and the gradients of a loss touching every output, w.r.t. x, hx and every parameter."""
    out, hidden = module(x, hx)
    data = out.data if hasattr(out, 'batch_sizes') else out
    outs = [data] + flat(hidden)
    loss = sum((o * w).sum() for o, w in zip(outs, weights))
    leaves = [x] + ([] if hx is None else flat(hx)) + list(module.parameters())
    return outs, torch.autograd.grad(loss, leaves)


def compare(key, ref, ours, make_input, hx):
    torch.manual_seed(1)
    x = make_input()
    outs_ref, _ = ref(x, hx)
    weights = [torch.randn_like(o) for o in [outs_ref.data if hasattr(outs_ref, 'batch_sizes') else outs_ref]]
    weights += [torch.randn_like(h) for h in flat(_)]
    outs_t, grads_t = run(ref, make_input(), hx, weights)
    outs_o, grads_o = run(ours, make_input(), hx, weights)
    names = ['output', 'h_n', 'c_n'][:len(outs_t)]
    assert ran_on_c(ours) and not ran_on_c(ref)
    for name, a, b in zip(names, outs_o, outs_t):
        close(f'{key} {name}', a, b)
    leaves = ['x'] + ([] if hx is None else ['h0', 'c0'][:len(flat(hx))]) + [n for n, _ in ref.named_parameters()]
    for name, a, b in zip(leaves, grads_o, grads_t):
        close(f'{key} d{re.sub(r"(_l[0-9]+)?(_reverse)?$", "", name)}', a, b)   # d{weight_ih, h0, ...}


@pytest.mark.parametrize('cell', CELLS)
@pytest.mark.parametrize('L', [1, 2, 3])
@pytest.mark.parametrize('bidirectional', [False, True])
@pytest.mark.parametrize('batch_first', [False, True])
def test_matches_torch(cell, L, bidirectional, batch_first):
    B, T, I, H = 3, 5, 4, 7
    ref, ours = pair(cell, I, H, L, batch_first=batch_first, bidirectional=bidirectional)
    D = 2 if bidirectional else 1
    x0 = torch.randn((B, T, I) if batch_first else (T, B, I))
    hx = states(cell == 'lstm', (L * D, B, H))
    compare(cell, ref, ours, lambda: x0.clone().requires_grad_(), hx)


@pytest.mark.parametrize('cell', CELLS)
@pytest.mark.parametrize('with_hx', [False, True])
def test_unbatched_input(cell, with_hx):
    T, I, H, L = 6, 3, 5, 2
    ref, ours = pair(cell, I, H, L, bidirectional=True, batch_first=True)   # batch_first does not apply
    x0 = torch.randn(T, I)
    hx = states(cell == 'lstm', (2 * L, H)) if with_hx else None
    compare(f'{cell} unbatched', ref, ours, lambda: x0.clone().requires_grad_(), hx)
    out, hidden = ours(x0, hx)
    assert out.shape == (T, 2 * H) and all(h.shape == (2 * L, H) for h in flat(hidden))


@pytest.mark.parametrize('cell', CELLS)
@pytest.mark.parametrize('enforce_sorted', [False, True])
def test_packed_sequences(cell, enforce_sorted):
    # unsorted lengths (enforce_sorted=False: the module sorts hx and unsorts h_n), or sorted ones
    T, B, I, H, L = 6, 4, 3, 5, 2
    lengths = torch.tensor([6, 5, 3, 1] if enforce_sorted else [3, 6, 1, 5])
    ref, ours = pair(cell, I, H, L, bidirectional=True)
    x0 = torch.randn(T, B, I)
    hx = states(cell == 'lstm', (2 * L, B, H))
    holder = {}

    def make_input():   # a fresh leaf and packing per run, so each graph is its own
        holder['x'] = x0.clone().requires_grad_()
        return pack_padded_sequence(holder['x'], lengths, enforce_sorted=enforce_sorted)

    torch.manual_seed(1)
    out_t, hid_t = ref(make_input(), hx)
    out_o, hid_o = ours(make_input(), hx)
    assert type(out_o) is type(out_t)
    assert torch.equal(out_o.batch_sizes, out_t.batch_sizes)
    for k in ('sorted_indices', 'unsorted_indices'):
        a, b = getattr(out_o, k), getattr(out_t, k)
        assert (a is None and b is None) or torch.equal(a, b)
    key = f'{cell} packed sorted={int(enforce_sorted)}'
    close(f'{key} output', out_o.data, out_t.data)
    for a, b in zip(flat(hid_o), flat(hid_t)):
        close(f'{key} h_n', a, b)
    w = [torch.randn_like(out_t.data)] + [torch.randn_like(h) for h in flat(hid_t)]
    grads = []
    for module in (ref, ours):
        out, hid = module(make_input(), hx)
        loss = sum((o * v).sum() for o, v in zip([out.data] + flat(hid), w))
        grads.append(torch.autograd.grad(loss, [holder['x']] + flat(hx) + list(module.parameters())))
    assert ran_on_c(ours)
    for a, b in zip(*grads[::-1]):
        close(f'{key} grads', a, b)
    past_end = torch.arange(T)[:, None] >= lengths   # (T, B): padding, which no output depends on
    assert not grads[1][0][past_end].any() and grads[1][0][~past_end].abs().min() > 0


@pytest.mark.parametrize('cell', CELLS)
def test_dropout_in_eval_mode_is_off(cell):
    ref, ours = pair(cell, 4, 6, 3, dropout=0.5, bidirectional=True)
    ref.eval()
    ours.eval()
    x0 = torch.randn(5, 3, 4)
    compare(f'{cell} dropout eval', ref, ours, lambda: x0.clone().requires_grad_(), None)


@pytest.mark.parametrize('cell', CELLS)
@pytest.mark.parametrize('bidirectional', [False, True])
def test_dropout_in_training_draws_torchs_masks(cell, bidirectional):
    # F.dropout on each layer's (T, B, D*H) output makes the generator calls torch's forward makes, so
    # under the same seed the masks are torch's: outputs and gradients match, and differ from eval mode
    ref, ours = pair(cell, 4, 6, 3, dropout=0.4, bidirectional=bidirectional)
    x0 = torch.randn(5, 3, 4)
    D = 2 if bidirectional else 1
    outs = []
    for module in (ref, ours):
        torch.manual_seed(7)
        x = x0.clone().requires_grad_()
        out, _ = module(x)
        grads = torch.autograd.grad(out.square().sum(), [x] + list(module.parameters()))
        outs.append((out, grads))
    (out_t, g_t), (out_o, g_o) = outs
    assert ran_on_c(ours)
    assert out_o.shape == (5, 3, D * 6)
    close(f'{cell} D={D} dropout train output', out_o, out_t)
    for a, b in zip(g_o, g_t):
        close(f'{cell} D={D} dropout train grads', a, b)
    assert not torch.allclose(out_o, ours.eval()(x0)[0], atol=1e-3)


def test_dropout_rate_and_scale():
    # a relu RNN that shows layer 1 its dropped input: layer 0 outputs relu(b) = 1 everywhere, layer 1
    # is the identity, so every output is 0 (dropped, rate p) or 1 / (1 - p) (kept and scaled)
    p, H = 0.3, 64
    m = pt.RNN(2, H, 2, nonlinearity='relu', dropout=p)
    with torch.no_grad():
        for name, w in m.named_parameters():
            w.zero_()
        m.bias_ih_l0.fill_(1.0)
        m.weight_ih_l1.copy_(torch.eye(H))
    x = torch.randn(20, 16, 2)
    out, _ = m(x)
    assert out.shape == (20, 16, H)
    kept = out != 0
    assert torch.allclose(out[kept], torch.full_like(out[kept], 1 / (1 - p)))
    n = out.numel()
    rate = 1 - kept.float().mean().item()
    assert abs(rate - p) < 4 * (p * (1 - p) / n) ** 0.5, rate   # 4 sigma of a binomial
    assert not torch.equal(kept, m(x)[0] != 0)   # a new mask each forward
    assert torch.equal(m.eval()(x)[0], torch.ones(20, 16, H)) and ran_on_c(m)


def char_lm(cell, V=11, E=6, H=9, L=2):
    torch.manual_seed(3)
    rnn = torch_module(cell, E, H, L, batch_first=True)

    class LM(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embedding, self.rnn, self.head = torch.nn.Embedding(V, E), rnn, torch.nn.Linear(H, V)

        def forward(self, ids, hx=None):
            out, hx = self.rnn(self.embedding(ids), hx)
            return self.head(out), hx

    return LM()


@pytest.mark.parametrize('cell', ['lstm', 'gru'])
def test_adamw_clip_loop_equals_torch(cell):
    ref = char_lm(cell)
    ours = pt.accelerate(copy.deepcopy(ref))
    g = torch.Generator().manual_seed(0)
    starts = [torch.randint(0, 11, (4, 1), generator=g) for _ in range(20)]
    batches = [(s + 3 * torch.arange(13)) % 11 for s in starts]   # learnable: each id follows from the last
    losses = []
    for model in (ref, ours):
        opt = torch.optim.AdamW(model.parameters(), lr=5e-2, weight_decay=0.01)
        run_losses, norms = [], []
        for ids in batches:
            logits, _ = model(ids[:, :-1])
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 11), ids[:, 1:].reshape(-1))
            opt.zero_grad()
            loss.backward()
            norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)))
            opt.step()
            run_losses.append(loss.item())
        losses.append(run_losses)
    assert ran_on_c(ours.rnn)
    assert losses[0][-1] < losses[0][0] - 0.5   # it learned something, so the weights moved
    assert sum(n > 0.1 for n in norms) > 5   # and clipping took part
    assert np.allclose(losses[1], losses[0], rtol=1e-4, atol=0), (losses[1], losses[0])
    for (name, a), b in zip(ours.named_parameters(), ref.parameters()):
        close(f'{cell} 20 AdamW steps {name}', a, b, 1e-4)


@pytest.fixture
def fused(monkeypatch):
    """The embeddings pyrnn.torch read by token in this test: one entry per forward, True when it did."""
    seen, real = [], pt._embedding_rows
    monkeypatch.setattr(pt, '_embedding_rows', lambda *a: seen.append(real(*a) is not None) or real(*a))
    return seen


@pytest.mark.parametrize('cell', CELLS)
@pytest.mark.parametrize('shape', ['batch_first', 'time_major', 'unbatched'])
@pytest.mark.parametrize('bidirectional', [False, True])
@pytest.mark.parametrize('V', [5, 300])   # fewer ids than rows: the rows are embedded; more: looked up by token
def test_an_embeddings_output_is_read_by_token(fused, cell, shape, bidirectional, V):
    """nn.Embedding -> the module: layer 0 reads the table by token and the table's gradient is torch's,
    with the embedding's output used a second time as well (both gradients add up on the table)."""
    T, B, E, H = 7, 3, 4, 5
    torch.manual_seed(2)
    ref_emb, ref = torch.nn.Embedding(V, E), torch_module(cell, E, H, 2, batch_first=shape == 'batch_first',
                                                          bidirectional=bidirectional)
    ours_emb, ours = copy.deepcopy(ref_emb), pt.accelerate(copy.deepcopy(ref))
    ids = torch.randint(0, V, {'batch_first': (B, T), 'time_major': (T, B), 'unbatched': (T,)}[shape])
    w_emb = torch.randn(ids.shape + (E,))
    grads, outs = [], []
    for emb, rnn in ((ref_emb, ref), (ours_emb, ours)):
        torch.manual_seed(4)
        x = emb(ids)
        out, hidden = rnn(x)
        loss = sum((o * torch.randn_like(o)).sum() for o in [out] + flat(hidden)) + (x * w_emb).sum()
        params = [emb.weight, *rnn.parameters()]
        outs.append([out] + flat(hidden))
        grads.append(torch.autograd.grad(loss, params))
    assert fused == [True] and ran_on_c(ours)
    for a, b in zip(outs[1], outs[0]):
        close(f'embedding -> {cell} output', a, b)
    for name, a, b in zip(['embedding.weight'] + [n for n, _ in ref.named_parameters()], grads[1], grads[0]):
        close(f'embedding -> {cell} d{name}', a, b)


@pytest.mark.parametrize('embedding', ['padding_idx', 'frozen', 'scale_grad_by_freq'])
def test_embeddings_the_lookup_does_not_serve_run_as_rows(fused, embedding):
    """A padding row (its gradient is zero), a frozen table or gradients scaled by frequency: the stack reads
    the embedding's output as any input, and the gradients are torch's."""
    V, T, B, E, H = 9, 6, 4, 3, 5
    kw = {'padding_idx': 0} if embedding == 'padding_idx' else \
        {'scale_grad_by_freq': True} if embedding == 'scale_grad_by_freq' else {}
    torch.manual_seed(5)
    ref_emb, ref = torch.nn.Embedding(V, E, **kw), torch.nn.LSTM(E, H)
    ref_emb.weight.requires_grad_(embedding != 'frozen')
    ours_emb, ours = copy.deepcopy(ref_emb), pt.accelerate(copy.deepcopy(ref))
    ids = torch.randint(0, V, (T, B))
    ids[0] = 0
    grads = []
    for emb, rnn in ((ref_emb, ref), (ours_emb, ours)):
        params = [p for p in [emb.weight, *rnn.parameters()] if p.requires_grad]
        grads.append(torch.autograd.grad(rnn(emb(ids))[0].square().sum(), params))
    assert fused == [False] and ran_on_c(ours)
    for a, b in zip(grads[1], grads[0]):
        close(f'{embedding} embedding -> lstm gradient', a, b)
    if embedding == 'padding_idx':
        assert not grads[1][0][0].any()


def test_accelerate_keeps_outputs_and_parameters_and_restore_goes_back():
    model = char_lm('gru')
    model.extra = torch.nn.LSTM(3, 4, proj_size=2)   # projections: left to torch
    ids = torch.randint(0, 11, (3, 8))
    before = model(ids)[0]
    params = list(model.parameters())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)   # built before: must still train the same tensors
    assert pt.accelerate(model) is model
    assert type(model.rnn) is pt.GRU and isinstance(model.rnn, torch.nn.GRU)
    assert type(model.extra) is torch.nn.LSTM
    assert all(a is b for a, b in zip(model.parameters(), params))
    after = model(ids)[0]
    close('accelerate logits', after, before)
    assert ran_on_c(model.rnn)
    w0 = model.rnn.weight_hh_l1.detach().clone()
    after.sum().backward()
    opt.step()
    assert not torch.equal(model.rnn.weight_hh_l1, w0)
    assert pt.restore(model) is model and type(model.rnn) is torch.nn.GRU
    close('restore logits', model(ids)[0], torch.nn.GRU.forward(model.rnn, model.embedding(ids))[0] @
          model.head.weight.T + model.head.bias)


def test_state_dict_pickle_and_deepcopy():
    ref, ours = pair('lstm', 3, 5, 2, bidirectional=True)
    x = torch.randn(4, 2, 3)
    expected = ref(x)[0]
    fresh = pt.LSTM(3, 5, 2, bidirectional=True)
    assert list(fresh.state_dict()) == list(ref.state_dict())
    fresh.load_state_dict(ref.state_dict(), strict=True)
    torch.nn.LSTM(3, 5, 2, bidirectional=True).load_state_dict(fresh.state_dict(), strict=True)
    for m in (fresh, pickle.loads(pickle.dumps(ours)), copy.deepcopy(ours)):
        assert type(m) is pt.LSTM
        close('state_dict / pickle / deepcopy output', m(x)[0], expected)
        assert ran_on_c(m)


def test_interleaved_forwards_and_retain_graph():
    # two forwards before their backwards, undone in either order, and a second backward of a kept graph
    ref, ours = pair('gru', 3, 5, 2)
    xs = [torch.randn(4, 2, 3) for _ in range(2)]
    expected = []
    for x in xs:
        out, _ = ref(x)
        expected.append(torch.autograd.grad(out.square().sum(), list(ref.parameters())))
    outs = [ours(x)[0].square().sum() for x in xs]
    got = [None, torch.autograd.grad(outs[1], list(ours.parameters()), retain_graph=True)]
    got[0] = torch.autograd.grad(outs[0], list(ours.parameters()))
    again = torch.autograd.grad(outs[1], list(ours.parameters()))
    for g, e in zip(got + [again], expected + expected[1:]):
        for a, b in zip(g, e):
            close('interleaved / retained backward', a, b)
    # a kept graph whose Layer a later forward took: its second backward runs its forward again
    loss = ours(xs[0])[0].square().sum()
    torch.autograd.grad(loss, list(ours.parameters()), retain_graph=True)
    ours(xs[1])[0].sum().backward()
    for a, b in zip(torch.autograd.grad(loss, list(ours.parameters())), expected[0]):
        close('backward after its Layer was reused', a, b)


def test_layers_are_reused():
    _, ours = pair('lstm', 3, 5, 2, bidirectional=True)
    x = torch.randn(4, 2, 3, requires_grad=True)
    for _ in range(3):
        ours(x)[0].sum().backward()
    with torch.no_grad():
        ours(x)
    with torch.inference_mode():
        ours(x)
    pools = pt._POOLS[ours]
    assert sum(len(p.idle) for p in pools.values()) == 4   # one per layer and direction


def test_gradients_against_central_differences():
    # directional derivatives of the float32 function along a random unit direction per tensor, by
    # central differences in float64 (step 1e-2: truncation and float32 rounding each ~1e-5 of the loss)
    T, B, I, H = 4, 3, 2, 3
    torch.manual_seed(0)
    for cell in ('rnn', 'lstm', 'gru'):   # not relu: a step across its kink is no derivative
        m = pt.accelerate(torch_module(cell, I, H, 2, bidirectional=True))
        lstm = cell == 'lstm'
        x = torch.randn(T, B, I, requires_grad=True)
        hx = states(lstm, (4, B, H))
        lengths = torch.tensor([2, 4, 3])
        w = torch.randn(T, B, 2 * H)
        tensors = [x] + flat(hx) + list(m.parameters())

        def f():
            out, hid = m(pack_padded_sequence(x, lengths, enforce_sorted=False), hx)
            return (torch.nn.utils.rnn.pad_packed_sequence(out)[0] * w[:int(lengths.max())]).sum() + \
                sum(h.square().sum() for h in flat(hid))

        grads = torch.autograd.grad(f(), tensors)
        assert ran_on_c(m)
        for t, g in zip(tensors, grads):
            v = torch.randn_like(t)
            v /= v.norm()
            with torch.no_grad():
                t += 1e-2 * v
                up = f().double()
                t -= 2e-2 * v
                down = f().double()
                t += 1e-2 * v
            fd = float((up - down) / 2e-2)
            an = float((g.double() * v.double()).sum())
            err = abs(fd - an) / max(abs(an), 1.0)   # relative, absolute below 1
            note(WORST, f'{cell} central differences', err)
            assert err < 2e-3, (cell, t.shape, fd, an)


def test_double_backward_is_refused():
    _, ours = pair('gru', 3, 4, 1)
    x = torch.randn(5, 2, 3, requires_grad=True)
    (dx,) = torch.autograd.grad(ours(x)[0].square().sum(), x, create_graph=True)   # first order: fine
    with pytest.raises(RuntimeError, match='once_differentiable'):
        dx.sum().backward()


@pytest.mark.filterwarnings('ignore:LSTM with projections')
def test_what_c_does_not_serve_runs_on_torch():
    ref, ours = pair('lstm', 3, 4, 2)
    x = torch.randn(5, 2, 3)
    for m in (ref, ours):   # float64: torch's own forward, the same numbers
        m.double()
    close('float64 fallback', ours(x.double())[0], ref(x.double())[0])
    assert not ran_on_c(ours)
    torch.manual_seed(0)
    proj = pt.LSTM(3, 4, proj_size=2)
    torch.manual_seed(0)
    assert torch.equal(proj(x)[0], torch.nn.LSTM(3, 4, proj_size=2)(x)[0])
    _, ours = pair('gru', 3, 4, 1)
    for bad in (torch.randn(5, 2, 4), torch.randn(5, 2), torch.randn(5), torch.randn(2, 5, 2, 3)):   # torch's errors
        with pytest.raises((RuntimeError, ValueError)) as ours_err:
            ours(bad)
        with pytest.raises((RuntimeError, ValueError)) as torch_err:
            torch.nn.GRU(3, 4)(bad)
        assert str(ours_err.value) == str(torch_err.value)
    with pytest.raises(RuntimeError, match='Expected hidden size'):
        ours(torch.randn(5, 2, 3), torch.zeros(1, 3, 4))


def test_threads_follow_torch():
    import pyrnn
    _, ours = pair('gru', 3, 4, 1)
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        ours(torch.randn(2, 2, 3))
        assert pyrnn.get_num_threads() == 1
    finally:
        torch.set_num_threads(n)
    ours(torch.randn(2, 2, 3))
    assert pyrnn.get_num_threads() == n

