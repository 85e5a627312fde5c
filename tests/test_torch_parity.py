"""pyrnn (C backend) against PyTorch itself: same weights, same outputs and gradients.

Everything in float32 on both sides; relative error ||pyrnn - torch|| / ||torch|| < 1e-5.
"""
import numpy as np
import pytest

torch = pytest.importorskip('torch', reason='torch is not installed: the parity tests need it')
import torch.nn.functional as F  # noqa: E402

import pyrnn  # noqa: E402
from helpers import assert_close  # noqa: E402
from pyrnn import oracle  # noqa: E402

TOL = 1e-5
torch.set_default_dtype(torch.float32)


def close(name, a, b, tol=TOL):
    assert_close(name, a, b, tol)


def torch_stack(cell, *args, **kw):
    if cell in ('rnn', 'rnn_relu'):
        return torch.nn.RNN(*args, nonlinearity='relu' if cell == 'rnn_relu' else 'tanh', **kw)
    return {'lstm': torch.nn.LSTM, 'gru': torch.nn.GRU}[cell](*args, **kw)


def ours_stack(cell, *args, **kw):
    if cell in ('rnn', 'rnn_relu'):
        return pyrnn.RNN(*args, nonlinearity='relu' if cell == 'rnn_relu' else 'tanh', **kw)
    return {'lstm': pyrnn.LSTM, 'gru': pyrnn.GRU}[cell](*args, **kw)


@pytest.mark.parametrize('cell', oracle.CELLS)
@pytest.mark.parametrize('batch_first', [False, True])
def test_layer_matches_torch(cell, batch_first):
    B, T, In, H, L = 3, 6, 5, 37, 2
    lstm = cell == 'lstm'
    ours = ours_stack(cell, In, H, L, batch_first=batch_first, seed=0)
    ref = torch_stack(cell, In, H, L, batch_first=batch_first)
    ref.load_state_dict({k: torch.from_numpy(v) for k, v in ours.state_dict().items()})
    rng = np.random.default_rng(0)
    x = rng.normal(size=(B, T, In) if batch_first else (T, B, In)).astype(np.float32)
    h0, c0, dh_n, dc_n = (rng.normal(0, 0.5, (L, B, H)).astype(np.float32) for _ in range(4))
    dout = rng.normal(size=x.shape[:2] + (H,)).astype(np.float32)

    out, hn = ours(x, (h0, c0) if lstm else h0)
    dx, dh = ours.backward(dout, (dh_n, dc_n) if lstm else dh_n)

    tx, th0, tc0 = (torch.tensor(a, requires_grad=True) for a in (x, h0, c0))
    tout, thn = ref(tx, (th0, tc0) if lstm else th0)
    obj = (tout * torch.from_numpy(dout)).sum()
    if lstm:
        obj = obj + (thn[0] * torch.from_numpy(dh_n)).sum() + (thn[1] * torch.from_numpy(dc_n)).sum()
    else:
        obj = obj + (thn * torch.from_numpy(dh_n)).sum()
    obj.backward()

    close('output', out, tout)
    close('dx', dx, tx.grad)
    if lstm:
        close('h_n', hn[0], thn[0])
        close('c_n', hn[1], thn[1])
        close('dh0', dh[0], th0.grad)
        close('dc0', dh[1], tc0.grad)
    else:
        close('h_n', hn, thn)
        close('dh0', dh, th0.grad)
    grads = ours.grad
    for name, p in ref.named_parameters():
        close(f'grad {name}', grads[name], p.grad)


def test_layer_unbatched_matches_torch():
    ours = pyrnn.GRU(4, 6, 2, seed=1)
    ref = torch.nn.GRU(4, 6, 2)
    ref.load_state_dict({k: torch.from_numpy(v) for k, v in ours.state_dict().items()})
    x = np.random.default_rng(1).normal(size=(5, 4)).astype(np.float32)
    out, hn = ours(x)
    tout, thn = ref(torch.from_numpy(x))
    assert out.shape == tuple(tout.shape) and hn.shape == tuple(thn.shape) == (2, 6)
    close('unbatched output', out, tout)
    close('unbatched h_n', hn, thn)


class TorchLM(torch.nn.Module):
    """The torch twin of pyrnn.CharLM: names embedding / rnn / head, batch_first stack."""

    def __init__(self, cell, V, E, H, L):
        super().__init__()
        self.embedding = torch.nn.Embedding(V, E)
        self.rnn = torch_stack(cell, E, H, L, batch_first=True)
        self.head = torch.nn.Linear(H, V)

    def forward(self, inputs, targets, hx=None):
        y, hn = self.rnn(self.embedding(inputs), hx)
        logits = self.head(y)  # (B, T, V)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
        return loss, logits, hn


@pytest.mark.parametrize('cell', oracle.CELLS)
def test_lm_matches_torch(cell):
    B, T, V, E, H, L = 4, 7, 65, 8, 37, 2
    lstm = cell == 'lstm'
    lm = pyrnn.CharLM(cell, V, E, H, L, seed=0)
    ref = TorchLM(cell, V, E, H, L)
    ref.load_state_dict({k: torch.from_numpy(v) for k, v in lm.state_dict().items()})
    rng = np.random.default_rng(0)
    inputs, targets = rng.integers(0, V, (B, T)), rng.integers(0, V, (B, T))
    h0, c0 = (rng.normal(0, 0.5, (L, B, H)).astype(np.float32) for _ in range(2))

    loss = lm.forward(inputs, targets, (h0, c0) if lstm else h0)
    lm.backward()
    th0, tc0 = torch.tensor(h0, requires_grad=True), torch.tensor(c0, requires_grad=True)
    tloss, tlogits, thn = ref(torch.from_numpy(inputs), torch.from_numpy(targets),
                              (th0, tc0) if lstm else th0)
    tloss.backward()

    close('loss', loss, tloss.detach().numpy().reshape(()))
    close('logits', lm.logits, tlogits)   # both (B, T, V)
    close('h_n', lm.h_n, thn[0] if lstm else thn)
    close('dh0', lm.dh0, th0.grad)
    if lstm:
        close('c_n', lm.c_n, thn[1])
        close('dc0', lm.dc0, tc0.grad)
    grads = lm.grad
    for name, p in ref.named_parameters():
        close(f'grad {name}', grads[name], p.grad)


def test_lm_adamw_with_clipping_matches_torch():
    # three steps of clip_grad_norm_ + torch.optim.AdamW (one param group, decay on everything)
    B, T, V, E, H, L, lr, wd, max_norm = 3, 5, 11, 6, 16, 2, 1e-2, 0.1, 0.24
    lm = pyrnn.CharLM('lstm', V, E, H, L, seed=1)
    ref = TorchLM('lstm', V, E, H, L)
    ref.load_state_dict({k: torch.from_numpy(v) for k, v in lm.state_dict().items()})
    opt = torch.optim.AdamW(ref.parameters(), lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=wd)
    rng = np.random.default_rng(1)
    inputs, targets = rng.integers(0, V, (B, T)), rng.integers(0, V, (B, T))
    norms = []
    for _ in range(3):
        lm.forward(inputs, targets)
        lm.zero_grad()
        lm.backward()
        norm = lm.step(lr, weight_decay=wd, max_grad_norm=max_norm)
        opt.zero_grad()
        ref(torch.from_numpy(inputs), torch.from_numpy(targets))[0].backward()
        tnorm = torch.nn.utils.clip_grad_norm_(ref.parameters(), max_norm)
        opt.step()
        norms.append(float(tnorm))
        assert abs(norm - float(tnorm)) < 1e-5 * float(tnorm)
    assert min(norms) < max_norm < max(norms)  # clipping active on some steps
    sd = lm.state_dict()
    for name, p in ref.state_dict().items():
        close(f'after {name}', sd[name], p)


def test_torch_saved_state_dict_loads_unchanged(tmp_path):
    B, T, V, E, H, L = 2, 9, 30, 7, 12, 3
    torch.manual_seed(0)
    ref = TorchLM('gru', V, E, H, L)
    torch.save(ref.state_dict(), tmp_path / 'lm.pt')
    sd = torch.load(tmp_path / 'lm.pt')
    lm = pyrnn.CharLM('gru', V, E, H, L, seed=123)
    lm.load_state_dict(sd)  # torch tensors, torch's names and order
    for k, v in sd.items():
        assert np.array_equal(lm.state_dict()[k], v.numpy())
    rng = np.random.default_rng(2)
    inputs, targets = rng.integers(0, V, (B, T)), rng.integers(0, V, (B, T))
    loss = lm.forward(inputs, targets)
    with torch.no_grad():
        tloss = ref(torch.from_numpy(inputs), torch.from_numpy(targets))[0].item()
    assert abs(loss - tloss) < 1e-5 * abs(tloss)
    # and back: our state_dict loads into torch unchanged
    ref2 = TorchLM('gru', V, E, H, L)
    ref2.load_state_dict({k: torch.from_numpy(v) for k, v in lm.state_dict().items()})
    with torch.no_grad():
        assert ref2(torch.from_numpy(inputs), torch.from_numpy(targets))[0].item() == tloss
