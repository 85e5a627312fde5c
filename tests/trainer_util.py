"""Shared by the tests that run the ./train_cpu binary (test_cli_errors, test_numerics,
test_kill_resume): which binary, small synthetic token files, and a run helper.

PYRNN_TRAIN_CPU=/path/to/train_cpu runs them against another build (`make test_asan` points it at
the sanitized one); otherwise ./train_cpu is (re)built with make when make is there.
"""
import os
import shutil
import subprocess
import threading

import numpy as np

from pyrnn import data

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
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
