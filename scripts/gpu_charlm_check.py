#!/usr/bin/env python3
"""gpu_verify's charlm stage: CharLM(backend='cuda') against backend='c' on a checkpoint's weights
(loss, logits, states, gradients, dh0, one AdamW step), and a cuda model with dropout saved and
loaded again, which must continue exactly. Prints one JSON line: the relative errors, and
'save / load exact' (0.0 when it does, else 1.0).

    python3 scripts/gpu_charlm_check.py CHECKPOINT TRAIN_BIN
"""
import json
import os
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # this checkout's pyrnn
from pyrnn import CharLM, data  # noqa: E402
from pyrnn.checkpoint import read_checkpoint  # noqa: E402

B, T = 8, 64


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def flat(tensors):
    return np.concatenate([t.ravel() for t in tensors.values()])


def train(lm, x, y, n):
    losses = []
    for _ in range(n):
        losses.append(lm.forward(x, y))
        lm.zero_grad()
        lm.backward()
        lm.step(2e-3, max_grad_norm=1.0)
    return losses


def main(ckpt, train_bin):
    ids, _ = data.read_tokens(train_bin)
    x = np.asarray(ids[:B * T], np.int32).reshape(B, T)
    y = np.asarray(ids[1:B * T + 1], np.int32).reshape(B, T)
    ck = read_checkpoint(ckpt)
    out, m = {}, {}
    for b in ('c', 'cuda'):   # the checkpoint's weights, fresh AdamW state on both
        m[b] = CharLM(ck['cell'], ck['vocab_size'], ck['embed_size'], ck['hidden_size'], ck['num_layers'], backend=b)
        m[b].load_state_dict(ck['params'])
    loss = {b: m[b].forward(x, y) for b in m}
    out['loss'] = rel(loss['cuda'], loss['c'])
    out['logits'] = rel(m['cuda'].logits, m['c'].logits)
    out['h_n'] = rel(m['cuda'].h_n, m['c'].h_n)
    if m['c'].c_n is not None:
        out['c_n'] = rel(m['cuda'].c_n, m['c'].c_n)
    for lm in m.values():
        lm.zero_grad()
        lm.backward()
    out['grads'] = rel(flat(m['cuda'].grad), flat(m['c'].grad))
    out['dh0'] = rel(m['cuda'].dh0, m['c'].dh0)
    norm = {b: m[b].step(2e-3, weight_decay=0.01, max_grad_norm=1.0) for b in m}
    out['norm'] = rel(norm['cuda'], norm['c'])
    out['params after a step'] = rel(flat(m['cuda'].state_dict()), flat(m['c'].state_dict()))
    # complete save / load on the GPU, with dropout: moments, step count and generator continue exactly
    a = CharLM.load(ckpt, backend='cuda')
    a.dropout = 0.2
    train(a, x, y, 2)
    path = os.path.join(tempfile.mkdtemp(), 'resumed.bin')
    a.save(path)
    b = CharLM.load(path, backend='cuda')
    same = train(a, x, y, 3) == train(b, x, y, 3) and np.array_equal(flat(a.state_dict()), flat(b.state_dict()))
    out['save / load exact'] = 0.0 if same else 1.0
    print(json.dumps(out))


if __name__ == '__main__':
    main(*sys.argv[1:3])
