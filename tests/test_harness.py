"""The C compare-outputs harness (./test_cpu) on reference files written by pyrnn.reference:
passes on good files, names the tensor on a perturbed one, fails cleanly on broken files."""
import os
import shutil
import subprocess

import numpy as np
import pytest

from pyrnn import oracle
from pyrnn.reference import HEADER_WORDS, HPARAM_WORDS, _array_specs, read_reference, write_reference

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BINARY = os.path.join(ROOT, 'test_cpu')
SIZES = dict(V=13, E=6, H=16, L=2, B=3, T=5, steps=4, seed=1)


@pytest.fixture(scope='module')
def harness():
    # make is a no-op when ./test_cpu is newer than its sources, and rebuilds a stale one
    if shutil.which('make'):
        r = subprocess.run(['make', '-s', 'test_cpu'], cwd=ROOT, capture_output=True, text=True)
        assert r.returncode == 0, f'make test_cpu failed:\n{r.stdout}{r.stderr}'
    elif not os.path.exists(BINARY):
        pytest.skip('make is not available and ./test_cpu is not built')
    return BINARY


def run(binary, path):
    r = subprocess.run([binary, str(path)], capture_output=True, text=True, timeout=60)
    assert r.returncode >= 0, f'killed by signal {-r.returncode}:\n{r.stdout}{r.stderr}'
    return r


def write(path, cell, **kw):
    s = dict(SIZES, **kw)
    return write_reference(str(path), cell, s['V'], s['E'], s['H'], s['L'], s['B'], s['T'],
                           s['steps'], s['seed'], max_grad_norm=s.get('max_grad_norm', 1.0))


@pytest.mark.parametrize('cell', oracle.CELLS)
def test_reference_passes(harness, tmp_path, cell):
    write(tmp_path / 'ref.bin', cell)
    r = run(harness, tmp_path / 'ref.bin')
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    checks = [ln for ln in lines if 'rel err' in ln and ln.endswith(' OK')]
    # logits, loss, h_n (+c_n), P grads, dh0 (+dc0), losses, norms, P params after
    n_tensors = 2 + 4 * SIZES['L'] + 1
    lstm = cell == 'lstm'
    assert len(checks) == 3 + lstm + n_tensors + 1 + lstm + 2 + n_tensors, r.stdout
    assert not any('NOT OK' in ln for ln in lines)
    assert lines[-1] == 'overall: OK'


def test_reference_with_active_clipping_passes(harness, tmp_path):
    r = write(tmp_path / 'ref.bin', 'gru', max_grad_norm=0.05)
    assert (r['step_norms'] > 0.05).all()  # every step clips
    out = run(harness, tmp_path / 'ref.bin')
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.splitlines()[-1] == 'overall: OK'


def grads_offset(r):
    """Byte offset of the grads array in a reference file (docs/formats.md order)."""
    off = 4 * (HEADER_WORDS + HPARAM_WORDS)
    for name, _, shape in _array_specs(r):
        if name == 'grads':
            return off
        if shape is not None:
            off += 4 * int(np.prod(shape))
    raise AssertionError('no grads array')


def test_perturbed_gradient_is_named(harness, tmp_path):
    path = tmp_path / 'ref.bin'
    write(path, 'lstm')
    r = read_reference(str(path))
    shapes = oracle.lm_param_shapes('lstm', r['V'], r['E'], r['H'], r['L'])
    names = list(shapes)
    target = 'rnn.weight_hh_l1'
    start = sum(int(np.prod(shapes[k])) for k in names[:names.index(target)])
    g = r['grads'][start:start + int(np.prod(shapes[target]))]
    data = bytearray(path.read_bytes())
    pos = grads_offset(r) + 4 * (start + 3)  # element 3 of the tensor
    value = np.frombuffer(data, '<f4', 1, pos)[0] + 1e-2 * np.linalg.norm(g)
    data[pos:pos + 4] = np.float32(value).tobytes()
    path.write_bytes(bytes(data))
    assert read_reference(str(path))['grads'][start + 3] == np.float32(value)  # edit landed

    out = run(harness, path)
    assert out.returncode > 0
    bad = [ln for ln in out.stdout.splitlines() if ln.endswith('NOT OK')]
    assert len(bad) == 1 and bad[0].startswith(f'grad {target} '), out.stdout
    assert out.stdout.splitlines()[-1].startswith('FAILED')


@pytest.mark.parametrize('damage', ['truncated', 'bad magic', 'trailing bytes', 'empty', 'missing'])
def test_broken_file_fails_cleanly(harness, tmp_path, damage):
    path = tmp_path / 'ref.bin'
    write(path, 'rnn')
    data = path.read_bytes()
    if damage == 'truncated':
        path.write_bytes(data[:len(data) // 2])
    elif damage == 'bad magic':
        path.write_bytes(np.int32(12345).tobytes() + data[4:])
    elif damage == 'trailing bytes':
        path.write_bytes(data + b'\0' * 8)
    elif damage == 'empty':
        path.write_bytes(b'')
    else:
        path.unlink()
    out = run(harness, path)
    assert out.returncode > 0
    err = out.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith('error: ') and str(path) in err[0], out.stderr
    expect = {'truncated': 'truncated', 'bad magic': 'bad magic', 'trailing bytes': 'trailing',
              'empty': 'truncated', 'missing': 'cannot open'}[damage]
    assert expect in err[0]
