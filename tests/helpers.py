"""What the test modules share (no test module imports another): the relative error every comparison
uses, the largest errors a module saw (printed when it ends: pytest -s), the oracle's check against
central finite differences, and the runner of the tests that run the ./train_cpu binary
(test_cli_errors, test_numerics, test_kill_resume, test_mpi).

PYRNN_TRAIN_CPU=/path/to/train_cpu runs those against another build (`make test_asan` points it at the
sanitized one); otherwise ./train_cpu is (re)built with make when make is there.
"""
import os
import shutil
import subprocess
import threading
from collections import defaultdict

import numpy as np
import pytest

from pyrnn import data

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------------------- comparisons

def _float64(x):
    return np.asarray(x.detach().numpy() if hasattr(x, 'detach') else x, np.float64)   # torch tensors too


def rel_err(a, b):
    """||a - b|| / ||b|| in float64. The shapes must agree, and b must not be all zeros (the comparison
    would be vacuous)."""
    a, b = _float64(a), _float64(b)
    assert a.shape == b.shape, (a.shape, b.shape)
    norm = np.linalg.norm(b)
    assert norm > 0, 'the reference is all zeros: the comparison would be vacuous'
    return np.linalg.norm(a - b) / norm


def assert_close(what, a, b, tol, errors=None, key=None):
    """rel_err(a, b) < tol, and returns it; errors[key] keeps the largest. A reference of all zeros
    (a relu unit that never fires, grad weight_hh with T = 1 and h0 = 0) asks for exact zeros."""
    a, b = _float64(a), _float64(b)
    if not np.any(b):
        assert a.shape == b.shape and not np.any(a), f'{what}: expected all zeros'
        return 0.0
    err = rel_err(a, b)
    if errors is not None:
        note(errors, key, err)
    assert err < tol, f'{what}: relative error {err:.3e} >= {tol:.0e}'
    return err


def worst_errors(title):
    """(errors, fixture): record with note(errors, key, err); bind the fixture to a module-level name."""
    errors = defaultdict(float)

    @pytest.fixture(scope='module', autouse=True)
    def report_worst():
        yield
        if errors:
            print(f'\n{title}: ' + ', '.join(f'{k} {e:.2e}' for k, e in sorted(errors.items())))
    return errors, report_worst


def note(errors, key, err):
    errors[key] = max(errors[key], err)


# ---------------------------------------------------------------------------- finite differences

FD_EPS, FD_TOL = 1e-5, 1e-6  # 1e-5: truncation ~1e-10, roundoff ~1e-11; worst case seen ~5e-8


def fd_grad(f, arr):
    """Central differences of scalar f() w.r.t. every element of arr (perturbed in place)."""
    g = np.zeros_like(arr)
    flat, gflat = arr.reshape(-1), g.reshape(-1)
    for i in range(flat.size):
        old = flat[i]
        flat[i] = old + FD_EPS
        fp = f()
        flat[i] = old - FD_EPS
        fm = f()
        flat[i] = old
        gflat[i] = (fp - fm) / (2 * FD_EPS)
    return g


def fd_check(name, analytic, f, arr):
    """The analytic gradient of f() w.r.t. arr against central differences: relative error < FD_TOL."""
    num = fd_grad(f, arr)
    assert analytic.shape == arr.shape, name
    assert np.linalg.norm(num) > 0, f'{name}: zero finite-difference gradient, test is vacuous'
    err = rel_err(analytic, num)
    assert err < FD_TOL, f'{name}: relative error {err:.3e}'
    return err


# ---------------------------------------------------------------------------- the ./train_cpu binary

_lock = threading.Lock()
_binary = None


def train_cpu():
    """Absolute path of the trainer under test; builds ./train_cpu once per session if needed."""
    global _binary
    with _lock:
        if _binary is None:
            env_path = os.environ.get('PYRNN_TRAIN_CPU')
            if env_path:
                _binary = os.path.abspath(env_path)
            else:
                if shutil.which('make'):
                    r = subprocess.run(['make', '-s', 'train_cpu'], cwd=ROOT, capture_output=True, text=True)
                    assert r.returncode == 0, f'make train_cpu failed:\n{r.stdout}{r.stderr}'
                _binary = os.path.join(ROOT, 'train_cpu')
            assert os.access(_binary, os.X_OK), f'{_binary} is not built'
        return _binary


def synthetic_text(n, alphabet=b'abcdefghijklmnopqrst \n', seed=0):
    rng = np.random.default_rng(seed)
    return rng.choice(np.frombuffer(alphabet, np.uint8), n).tobytes()


def write_split(folder, text, val_frac=0.1):
    """folder/train.bin and folder/val.bin from text; returns the vocabulary."""
    return data.prepare(text, str(folder), val_frac=val_frac)


def run(args, cwd=None, env=None, timeout=120):
    """Runs train_cpu with args (a list of str); returns the CompletedProcess (text mode)."""
    full_env = dict(os.environ, **(env or {}))
    return subprocess.run([train_cpu()] + [str(a) for a in args], cwd=cwd, env=full_env, capture_output=True,
                          text=True, errors='replace', timeout=timeout)   # samples may hold any byte


def snapshot(folder):
    """{relative path: bytes} of every file under folder."""
    out = {}
    for dirpath, _, files in os.walk(folder):
        for f in files:
            p = os.path.join(dirpath, f)
            with open(p, 'rb') as fh:
                out[os.path.relpath(p, folder)] = fh.read()
    return out
