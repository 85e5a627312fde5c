"""Numerical faults in ./train_cpu: a NaN gradient (injected through the PYRNN_FAULT_NAN_GRAD_STEP
test hook of the CPU backend) and an exploding learning rate stop the run with one clear line and
a non-zero exit, leaving the last good checkpoint byte for byte as it was and loadable; with -N skip
the poisoned step is skipped and training goes on to the end. Long sequences (T=4096) and the full
byte vocabulary (V=256) train without overflow."""
import math
import os
import re
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from helpers import run, snapshot, synthetic_text, write_split  # noqa: E402

from pyrnn import data  # noqa: E402
from pyrnn.checkpoint import read_checkpoint  # noqa: E402

MODEL = ['-c', 'lstm', '-L', '1', '-E', '8', '-H', '16', '-b', '4', '-t', '16', '-v', '0', '-s', '0', '-m', '0',
         '-P', '1']
FAULT = 'PYRNN_FAULT_NAN_GRAD_STEP'


@pytest.fixture(scope='module')
def dataset(tmp_path_factory):
    d = tmp_path_factory.mktemp('num')
    write_split(d / 'data', synthetic_text(4000))
    return d


def args(d, out, *extra):
    return ['-i', d / 'data' / 'train.bin', '-j', '', '-o', d / out] + MODEL + [str(x) for x in extra]


def all_finite(path):
    k = read_checkpoint(str(path))
    flat = np.concatenate([p.ravel() for p in k['params'].values()])
    return k, bool(np.isfinite(flat).all() and np.isfinite(k['m']).all() and np.isfinite(k['v']).all())


def one_error_line(r):
    lines = r.stderr.splitlines()
    assert r.returncode > 0, f'exit status {r.returncode}\n{r.stdout}{r.stderr}'
    assert len(lines) == 1 and lines[0].startswith('error: '), r.stderr
    assert 'Traceback' not in r.stdout + r.stderr
    return lines[0]


def losses(stdout):
    return {int(m.group(1)): float(m.group(2)) for m in re.finditer(r'^step +(\d+)/\d+ \| loss (\S+)', stdout, re.M)}


def test_nan_gradient_stops_and_keeps_the_last_checkpoint(dataset):
    d = dataset
    r = run(args(d, 'nan_stop', '-n', 5, '-k', 1))
    assert r.returncode == 0, r.stderr
    before = snapshot(d / 'nan_stop')
    # resuming at step 5, the very next step (6) is poisoned: nothing may change
    r = run(args(d, 'nan_stop', '-n', 10, '-k', 1, '-r', 'latest'), env={FAULT: '6'})
    line = one_error_line(r)
    assert line == (f'error: step 6: the gradient norm is NaN; stopping (the last checkpoint in {d / "nan_stop"} '
                    'is intact; -N skip skips such steps)')
    after = snapshot(d / 'nan_stop')
    assert {k: v for k, v in after.items() if k != 'log.jsonl'} == {k: v for k, v in before.items() if k != 'log.jsonl'}
    assert after['log.jsonl'] == before['log.jsonl']   # step 6 never logged
    assert (d / 'nan_stop' / 'latest').read_text() == 'ckpt_00000005.bin\n'
    k, finite = all_finite(d / 'nan_stop' / 'ckpt_00000005.bin')
    assert finite and k['step'] == 5
    # and the run goes on from it once the fault is gone
    r = run(args(d, 'nan_stop', '-n', 7, '-k', 1, '-r', 'latest'))
    assert r.returncode == 0 and 'resuming from' in r.stdout and 'at step 5' in r.stdout, r.stdout + r.stderr


def test_nan_gradient_mid_run_checkpoints_match_a_clean_run(dataset):
    d = dataset
    clean = run(args(d, 'clean', '-n', 6, '-k', 1))
    assert clean.returncode == 0, clean.stderr
    r = run(args(d, 'nan_mid', '-n', 10, '-k', 1), env={FAULT: '7'})
    assert 'step 7: the gradient norm is NaN' in one_error_line(r)
    assert (d / 'nan_mid' / 'latest').read_text() == 'ckpt_00000006.bin\n'
    assert not (d / 'nan_mid' / 'ckpt_00000007.bin').exists()
    assert not [f for f in os.listdir(d / 'nan_mid') if f.endswith('.tmp')]
    # the last checkpoint before the fault is the one a run without the fault writes
    assert (d / 'nan_mid' / 'ckpt_00000006.bin').read_bytes() == (d / 'clean' / 'ckpt_00000006.bin').read_bytes()


def test_nan_gradient_skipped_with_N_skip(dataset):
    d = dataset
    r = run(args(d, 'nan_skip', '-n', 10, '-k', 5, '-N', 'skip'), env={FAULT: '4'})
    assert r.returncode == 0, r.stdout + r.stderr
    assert 'step 4: non-finite gradient, update skipped and state reset' in r.stdout
    seen = losses(r.stdout)
    assert sorted(seen) == [1, 2, 3, 5, 6, 7, 8, 9, 10] and all(math.isfinite(x) for x in seen.values())
    k, finite = all_finite(d / 'nan_skip' / 'ckpt_00000010.bin')
    assert finite and k['step'] == 10 and k['adam_t'] == 9   # one optimizer step fewer than training steps


@pytest.mark.parametrize('lr', ['1e30', '1e20'])
def test_exploding_learning_rate_stops(dataset, lr):
    d = dataset
    out = d / f'lr_{lr}'
    r = run(args(d, out.name, '-n', 3, '-k', 1))
    assert r.returncode == 0, r.stderr
    good = (out / 'ckpt_00000003.bin').read_bytes()
    r = run(args(d, out.name, '-n', 40, '-k', 1, '-l', lr, '-r', 'latest'))
    line = one_error_line(r)
    assert re.fullmatch(r'error: step \d+: (the (loss|gradient norm) is (NaN|Inf)|the parameters or AdamW state '
                        r'overflowed in the update); stopping.*is intact.*', line), line
    assert (out / 'ckpt_00000003.bin').read_bytes() == good   # the last good checkpoint: untouched, loads
    assert all_finite(out / 'ckpt_00000003.bin')[1]
    # whatever latest names loads (CRC) and holds finite numbers: a blown-up state is never saved
    name = (out / 'latest').read_text().strip()
    assert re.fullmatch(r'ckpt_\d{8}\.bin', name)
    for f in os.listdir(out):
        if f.endswith('.bin'):
            assert all_finite(out / f)[1], f
    assert not [f for f in os.listdir(out) if f.endswith('.tmp')]


@pytest.mark.parametrize('cell', ['rnn', 'rnn_relu', 'lstm', 'gru'])
def test_long_sequences_and_full_byte_vocabulary(tmp_path, cell):
    # every byte value 0..255 in the text, so V = 256; B=2, T=4096 needs 8193 tokens a batch
    rng = np.random.default_rng(1)
    text = bytes(range(256)) + rng.integers(0, 256, 2 * 4096 * 2 + 100).astype(np.uint8).tobytes()
    vocab = data.build_vocab(text)
    assert len(vocab) == 256
    data.write_tokens(str(tmp_path / 'train.bin'), data.encode(text, vocab), vocab)
    r = run(['-i', tmp_path / 'train.bin', '-j', '', '-o', tmp_path / 'out', '-c', cell, '-L', '2', '-E', '16',
             '-H', '32', '-b', '2', '-t', '4096', '-n', '3', '-k', '0', '-v', '0', '-s', '0', '-m', '40', '-K', '10',
             '-P', '1'], timeout=300)   # one thread: a busy second core makes per-step barriers slow
    assert r.returncode == 0, r.stdout + r.stderr
    assert 'V=256' in r.stdout
    seen = losses(r.stdout)
    assert sorted(seen) == [1, 2, 3] and all(math.isfinite(x) for x in seen.values()), r.stdout
    assert abs(seen[1] - math.log(256)) < 0.15, seen   # near-uniform predictions at the start
    k, finite = all_finite(tmp_path / 'out' / 'ckpt_00000003.bin')
    assert finite and k['vocab_size'] == 256 and k['T'] == 4096
