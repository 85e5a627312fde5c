"""The regularisers for small corpora (weight drop on W_hh, locked dropout, embedding dropout) and the
wall-clock budget (-x): C against the oracle with the same masks, the oracle against finite
differences, eval free of all of them, the masks' shapes, resume and MPI equality, and the budget."""
import json
import os
import sys

import numpy as np
import pytest

import pyrnn
from pyrnn import oracle
from pyrnn.checkpoint import read_checkpoint

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from helpers import fd_check, rel_err, run, synthetic_text, write_split  # noqa: E402

CELLS = ('rnn', 'rnn_relu', 'lstm', 'gru')
REGULARISERS = {
    'weight_drop': dict(weight_drop=0.3),
    'embed_dropout': dict(embed_dropout=0.3),
    'locked': dict(dropout=0.3, locked_dropout=True),
    'all_bf16': dict(dropout=0.2, weight_drop=0.2, embed_dropout=0.2, locked_dropout=True, precision='bf16'),
}
V = 20


def two_steps(cell, backend, B, **kw):
    """loss and gradients of the second of two training passes (the generator moved on once)"""
    rng = np.random.default_rng(1)
    x, y = rng.integers(0, V, (B, 12)), rng.integers(0, V, (B, 12))
    lm = pyrnn.CharLM(cell, V, 6, 10, 2, seed=5, backend=backend, **kw)
    for _ in range(2):
        loss = lm.forward(x, y)
        lm.zero_grad()
        lm.backward()
    return loss, {k: g.copy() for k, g in lm.grad.items()}


@pytest.mark.parametrize('reg', REGULARISERS)
@pytest.mark.parametrize('cell', CELLS)
@pytest.mark.parametrize('B', [1, 16])   # 1 x 12 rows < V: the embedded path; 16 x 12: looked up by token
def test_c_matches_the_oracle_with_the_same_masks(cell, reg, B):
    assert (B * 12 >= V) == (B == 16)   # the C model looks layer 0 up by token from V rows on
    (lc, gc), (ln, gn) = (two_steps(cell, be, B, **REGULARISERS[reg]) for be in ('c', 'numpy'))
    tol = 2e-3 if 'precision' in REGULARISERS[reg] else 2e-5
    assert abs(lc - ln) < tol * abs(ln)
    for k in gn:
        assert rel_err(gc[k], gn[k]) < tol, k


def test_the_regularisers_change_training_and_each_other():
    base = two_steps('lstm', 'c', 16)
    runs = [two_steps('lstm', 'c', 16, **kw) for kw in REGULARISERS.values()]
    for r in [base] + runs:
        others = [o for o in [base] + runs if o is not r]
        assert all(r[0] != o[0] for o in others)


def test_the_oracle_gradients_with_masks_against_finite_differences():
    cell, L, H, E = 'lstm', 2, 5, 4
    p = {k: v.astype(np.float64) for k, v in oracle.init_lm_params(cell, 7, E, H, L, seed=2).items()}
    rng = np.random.default_rng(3)
    x, y = rng.integers(0, 7, (3, 5)), rng.integers(0, 7, (3, 5))
    key = 12345
    masks = [oracle.dropout_mask(key, s, 5, 3, H, 0.3, locked=True) for s in range(1, L + 1)]
    wmasks = oracle.weight_masks(key, L, 4 * H, H, 0.4)
    emask = oracle.embedding_mask(key, 7, 0.4)
    assert 0 < emask.sum() < 7 and all(0 < m.mean() < 1 for m in wmasks)
    kw = dict(dropout=0.3, masks=masks, weight_drop=0.4, weight_masks=wmasks, embed_dropout=0.4,
              embedding_mask=emask)
    loss = lambda: oracle.lm_forward(p, cell, x, y, **kw)[0]
    grads, _, _ = oracle.lm_backward(oracle.lm_forward(p, cell, x, y, **kw)[4])
    for name in ('rnn.weight_hh_l0', 'rnn.weight_hh_l1', 'embedding.weight', 'rnn.weight_ih_l0'):
        fd_check(name, grads[name], loss, p[name])
    # a dropped weight and a dropped embedding row get no gradient
    assert np.all(grads['rnn.weight_hh_l0'][wmasks[0] == 0] == 0)
    assert np.all(grads['embedding.weight'][emask == 0] == 0)


def test_masks_are_what_they_say():
    key = 99
    locked = oracle.dropout_mask(key, 1, 6, 4, 50, 0.5, locked=True)
    assert all(np.array_equal(locked[t], locked[0]) for t in range(6))
    per_step = oracle.dropout_mask(key, 1, 6, 4, 50, 0.5)
    assert not np.array_equal(per_step[1], per_step[0])
    w = oracle.weight_masks(key, 2, 400, 100, 0.25)
    assert abs(w[0].mean() - 0.75) < 0.01 and not np.array_equal(w[0], w[1])


def test_eval_uses_none_of_them():
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, V, (8, 10)), rng.integers(0, V, (8, 10))
    for backend in ('c', 'numpy'):
        plain = pyrnn.CharLM('gru', V, 6, 10, 2, seed=4, backend=backend)
        reg = pyrnn.CharLM('gru', V, 6, 10, 2, seed=4, backend=backend, **REGULARISERS['all_bf16'] | {
            'precision': 'fp32'})
        assert reg.forward(x, y) != plain.forward(x, y)
        state = reg._engine.rng
        assert reg.eval().forward(x, y) == plain.eval().forward(x, y)
        assert reg._engine.rng == state   # eval drew no masks


def test_setting_them_later_reaches_the_engine():
    rng = np.random.default_rng(2)
    x, y = rng.integers(0, V, (16, 12)), rng.integers(0, V, (16, 12))
    for backend in ('c', 'numpy'):
        later = pyrnn.CharLM('lstm', V, 6, 10, 2, seed=3, backend=backend)
        later.weight_drop, later.embed_dropout, later.locked_dropout, later.dropout = 0.2, 0.2, True, 0.2
        made = pyrnn.CharLM('lstm', V, 6, 10, 2, seed=3, backend=backend, **REGULARISERS['all_bf16'] | {
            'precision': 'fp32'})
        assert later.forward(x, y) == made.forward(x, y)


def test_save_and_load_keep_them(tmp_path):
    lm = pyrnn.CharLM('lstm', V, 6, 10, 1, seed=1, vocab=bytes(range(97, 97 + V)), **REGULARISERS['all_bf16'])
    lm.save(tmp_path / 'lm.bin')
    back = pyrnn.CharLM.load(tmp_path / 'lm.bin')
    assert (back.weight_drop, back.embed_dropout, back.locked_dropout, back.precision) == (0.2, 0.2, True, 'bf16')
    with pytest.raises(ValueError, match='weight_drop must be in'):
        pyrnn.CharLM('lstm', V, 6, 10, weight_drop=1.0)


# ---------------------------------------------------------------------------- train_cpu

REG_FLAGS = ['-p', '0.1', '-d', 'locked', '-W', '0.2', '-D', '0.1']


@pytest.fixture(scope='module')
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp('corpus')
    write_split(d, synthetic_text(6000))
    return d


def flags(corpus, out, *extra, regularisers=True):
    return ['-i', corpus / 'train.bin', '-j', corpus / 'val.bin', '-o', out, '-c', 'lstm', '-L', '2', '-E', '8',
            '-H', '16', '-b', '4', '-t', '16', '-v', '4', '-s', '0', '-m', '0', '-P', '2',
            *(REG_FLAGS if regularisers else []), *extra]


def logged(out, field):
    with open(out / 'log.jsonl') as f:
        return [r[field] for r in map(json.loads, f) if field in r]


def test_resume_with_the_regularisers_is_bit_identical(corpus, tmp_path):
    a, b = tmp_path / 'a', tmp_path / 'b'
    assert run(flags(corpus, a, '-n', '10', '-k', '5')).returncode == 0
    assert run(flags(corpus, b, '-n', '5')).returncode == 0
    r = run(flags(corpus, b, '-n', '10', '-r', 'latest', regularisers=False))
    assert r.returncode == 0, r.stderr   # the regularisers come back from the checkpoint, unsaid
    assert logged(a, 'train_loss') == logged(b, 'train_loss')
    assert (a / 'ckpt_00000010.bin').read_bytes() == (b / 'ckpt_00000010.bin').read_bytes()
    k = read_checkpoint(a / 'ckpt_00000010.bin')
    assert (k['locked_dropout'], k['weight_drop'], k['embed_dropout']) == (True, 0.2, 0.1)


def test_a_long_warmup_cannot_outrun_the_budget(corpus, tmp_path):
    # the count is fixed only after the warmup; until then the guard alone keeps the run inside -x
    out = tmp_path / 'warm'
    r = run(flags(corpus, out, '-x', '2', '-u', '100000', '-v', '0'), timeout=60)
    assert r.returncode == 0, r.stderr
    assert 'budget: out of time, ending at step' in r.stdout and 'training to step' not in r.stdout
    assert logged(out, 'elapsed_s')[-1] <= 2.0


@pytest.mark.parametrize('bad, message', [
    (['-W', '1'], '-W weight drop must be in [0, 1), got 1'),
    (['-D', '-0.5'], '-D embedding dropout must be in [0, 1), got -0.5'),
    (['-d', 'sometimes'], "-d must be step or locked, got 'sometimes'"),
    (['-x', '-1'], '-x budget must be >= 0 seconds (0 = none), got -1'),
])
def test_bad_flags_are_one_line(corpus, tmp_path, bad, message):
    r = run(flags(corpus, tmp_path / 'o', '-n', '1') + bad)
    assert r.returncode == 2 and r.stderr.strip() == f'error: {message}'


def test_budget_fits_the_run_and_a_resume_keeps_its_count(corpus, tmp_path):
    out = tmp_path / 'budget'
    r = run(flags(corpus, out, '-x', '4', '-u', '5', '-k', '3'), timeout=60)
    assert r.returncode == 0, r.stderr
    assert logged(out, 'elapsed_s')[-1] <= 4.0   # the final evaluation ended inside the budget
    planned = logged(out, 'planned_steps')
    assert len(planned) == 1 and planned[0] > 10 and 'training to step' in r.stdout
    ran = logged(out, 'train_loss')
    assert len(ran) <= planned[0]
    first = sorted(out.glob('ckpt_*.bin'))[0]   # checkpoints are kept two at a time
    k = read_checkpoint(first)
    assert k['planned_steps'] == planned[0]
    # resumed from there, the run goes on to the count the budget fixed, not to -n's default
    r = run(flags(corpus, tmp_path / 'again', '-r', str(first)), timeout=120)
    assert r.returncode == 0, r.stderr
    assert f'step {k["step"] + 1:5d}/{planned[0]} ' in r.stdout
