"""The kernel sets chosen at run time (c/isa.h) and the bf16 precision: every set this CPU runs
matches the oracle in fp32, bf16 matches the oracle's bf16 mode, and bf16 gives the same bits on
every set (its products are exact, its sums in one order)."""
import os
import subprocess
import sys

import numpy as np
import pytest

import pyrnn
from pyrnn import data

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from helpers import rel_err  # noqa: E402

CELLS = ('rnn', 'rnn_relu', 'lstm', 'gru')
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNNABLE = pyrnn.isa_list(cpu_only=True)


@pytest.fixture
def kernel_set():
    """set_isa for the test's duration, then back to the set the run started with"""
    before = pyrnn.isa()
    yield pyrnn.set_isa
    pyrnn.set_isa(before)


def lm_run(cell, backend, precision, V=23, B=5, T=9, seed=3):
    """loss, logits and every gradient of one forward / backward of a 2-layer CharLM"""
    rng = np.random.default_rng(seed)
    x, y = rng.integers(0, V, (B, T)), rng.integers(0, V, (B, T))
    lm = pyrnn.CharLM(cell, V, 7, 12, 2, seed=seed, backend=backend, precision=precision)
    loss = lm.forward(x, y)
    lm.zero_grad()
    lm.backward()
    return dict(loss=loss, logits=lm.logits, dh0=lm.dh0, **{k: g.copy() for k, g in lm.grad.items()})


def worst(a, b):
    return max(rel_err(a[k], b[k]) for k in a)


@pytest.mark.parametrize('isa', RUNNABLE)
@pytest.mark.parametrize('cell', CELLS)
def test_every_runnable_set_matches_the_oracle(kernel_set, isa, cell):
    kernel_set(isa)
    assert worst(lm_run(cell, 'c', 'fp32'), lm_run(cell, 'numpy', 'fp32')) < 2e-5


@pytest.mark.parametrize('cell', CELLS)
@pytest.mark.parametrize('B', [2, 19])   # below V rows: embedded input; above: looked up by token
def test_bf16_matches_the_oracle_bf16(cell, B):
    c, ref = lm_run(cell, 'c', 'bf16', B=B), lm_run(cell, 'numpy', 'bf16', B=B)
    assert worst(c, ref) < 2e-3
    # and the precision is really in use: fp32 is far from the bf16 reference
    assert worst(lm_run(cell, 'c', 'fp32', B=B), ref) > 3 * worst(c, ref)


@pytest.mark.skipif(len(RUNNABLE) < 2, reason='one kernel set runs here: nothing to compare')
def test_bf16_is_the_same_on_every_set(kernel_set):
    # the bf16 GEMMs give the same bits on every set: products of bf16 are exact, the sums run in one
    # order. The rest may not (a set with FMA fuses the multiply-adds of the cells, the softmax, AdamW),
    # so the model here is a ReLU RNN layer, forward and backward: GEMMs, and a cell that only adds
    x = np.random.default_rng(4).normal(size=(7, 19, 5)).astype(np.float32)
    runs = []
    for isa in RUNNABLE:
        kernel_set(isa)
        m = pyrnn.RNN(5, 24, 2, nonlinearity='relu', seed=0, precision='bf16')
        out, h = m(x)
        dx, dh0 = m.backward(np.cos(out))
        runs.append(dict(out=out, h=h, dx=dx, dh0=dh0, **{k: g.copy() for k, g in m.grad.items()}))
    for r in runs[1:]:
        for k in r:
            np.testing.assert_array_equal(r[k], runs[0][k], err_msg=k)


def test_bf16_layers_match_the_oracle():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(6, 19, 5)).astype(np.float32)
    outs = {}
    for backend in ('c', 'numpy'):
        m = pyrnn.LSTM(5, 16, 2, bidirectional=True, seed=0, backend=backend, precision='bf16')
        out, (h, c) = m(x)
        m.backward(np.ones_like(out))
        outs[backend] = dict(out=out, h=h, **{k: g.copy() for k, g in m.grad.items()})
    assert worst(outs['c'], outs['numpy']) < 2e-3


def test_unknown_or_unrunnable_sets_are_refused(kernel_set):
    with pytest.raises(ValueError, match="unknown kernel set"):
        kernel_set('mmx')
    missing = [s for s in pyrnn.isa_list() if s not in RUNNABLE]
    if missing:
        with pytest.raises(ValueError, match='this CPU cannot run'):
            kernel_set(missing[-1])
    assert pyrnn.isa() in RUNNABLE   # a refused set leaves the choice as it was


def test_precision_is_checked_and_kept_by_save(tmp_path):
    with pytest.raises(ValueError, match='precision'):
        pyrnn.CharLM('gru', 5, 4, 8, precision='fp16')
    lm = pyrnn.CharLM('gru', 5, 4, 8, seed=1, precision='bf16', vocab=b'abcde')
    lm.save(tmp_path / 'lm.bin')
    assert pyrnn.CharLM.load(tmp_path / 'lm.bin').precision == 'bf16'
    assert pyrnn.CharLM.load(tmp_path / 'lm.bin', precision='fp32').precision == 'fp32'


def test_train_cpu_names_its_kernels_and_refuses_a_bad_pyrnn_isa(tmp_path):
    binary = os.environ.get('PYRNN_TRAIN_CPU', os.path.join(ROOT, 'train_cpu'))
    if not os.path.exists(binary):
        pytest.skip('train_cpu is not built')
    data.prepare(b'the quick brown fox jumps over the lazy dog\n' * 80, str(tmp_path / 'd'))
    flags = [binary, '-i', str(tmp_path / 'd' / 'train.bin'), '-j', '', '-o', str(tmp_path / 'o'),
             '-c', 'gru', '-L', '1', '-E', '4', '-H', '8', '-b', '2', '-t', '8', '-n', '2', '-s', '0', '-m', '0']
    r = subprocess.run(flags + ['-M', 'bf16'], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert f'| {RUNNABLE[-1]} kernels, bf16' in r.stdout.splitlines()[0]
    r = subprocess.run(flags, capture_output=True, text=True, env=dict(os.environ, PYRNN_ISA='vax'))
    assert r.returncode == 1
    assert r.stderr.strip().startswith('error: PYRNN_ISA=vax: unknown kernel set'), r.stderr
