"""What the test modules share (no test module imports another): the relative error every comparison
uses, the largest errors a module saw (printed when it ends: pytest -s), the oracle's check against
central finite differences, and the runner of the tests that run the ./train_cpu binary
(test_cli_errors, test_numerics, test_kill_resume, test_mpi), and a CPU stand-in for the CUDA library
(test_api_cuda, test_gpu_tools).

PYRNN_TRAIN_CPU=/path/to/train_cpu runs those against another build (`make test_asan` points it at the
sanitized one); otherwise ./train_cpu is (re)built with make when make is there.
"""
import os
import shlex
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


# ---------------------------------------------------------------------------- a CPU stand-in for lib/libpyrnn_cuda.so
# A stand-in for lib/libpyrnn_cuda.so that runs without a GPU: the C model of c/train_rnn.c behind
# the library's call table (pyrnn._cuda.CALLS), built with the C extension's own flags so that its
# arithmetic is the extension's. CharLM(backend='cuda') on it must be backend 'c' to the bit, which
# checks everything the cuda engine moves between the host and the device. Shared by the test
# modules that drive the cuda backend without a GPU.

STAND_IN = r'''
// the C model behind the call table of lib/libpyrnn_cuda.so; its dropout masks are the C model's
#define PYRNN_LIBRARY
#include "train_rnn.c"

typedef struct { Model* m; int B, T, cur; float *h[2], *c[2]; } Fake;
static size_t lbh(const Fake* f) { return (size_t)f->m->config.n_layers * f->B * f->m->config.hidden_size; }
static int lstm(const Fake* f) { return f->m->config.cell == CELL_LSTM; }
static size_t P(void* self) { return ((Fake*)self)->m->num_params * sizeof(float); }

void* gpu_lm_new(int cell, int V, int E, int H, int L, int B, int T, int tf32, const char* algo, float dropout) {
    (void)tf32; (void)algo;
    Config c = { cell, V, E, H, L };
    Fake* f = (Fake*)calloc(1, sizeof(Fake));
    if (!f || !(f->m = model_new(c)) || model_adam_alloc(f->m)) return NULL;
    f->B = B; f->T = T;
    for (int i = 0; i < 2; i++) { f->h[i] = (float*)alloc_floats(lbh(f)); f->c[i] = (float*)alloc_floats(lbh(f)); }
    model_set_training(f->m, 1, dropout);
    return f;
}
void gpu_lm_free(void* self) {
    Fake* f = (Fake*)self;
    model_free(f->m);
    for (int i = 0; i < 2; i++) { free(f->h[i]); free(f->c[i]); }
    free(f);
}
const char* gpu_last_error(void) { return pyrnn_last_error(); }
const char* gpu_lm_about(void* self) { (void)self; return "a CPU stand-in"; }
const char* gpu_lm_algo(void* self) { (void)self; return "standard"; }
int gpu_lm_set_params(void* self, const float* p) { memcpy(((Fake*)self)->m->params, p, P(self)); return 0; }
int gpu_lm_get_params(void* self, float* p) { memcpy(p, ((Fake*)self)->m->params, P(self)); return 0; }
int gpu_lm_get_grads(void* self, float* g) { memcpy(g, ((Fake*)self)->m->grads, P(self)); return 0; }
int gpu_lm_set_grads(void* self, const float* g) { memcpy(((Fake*)self)->m->grads, g, P(self)); return 0; }
int gpu_lm_set_adam(void* self, const float* m, const float* v, int t) {
    Model* md = ((Fake*)self)->m;
    if (m) memcpy(md->m, m, P(self)); else memset(md->m, 0, P(self));
    if (v) memcpy(md->v, v, P(self)); else memset(md->v, 0, P(self));
    md->adam_t = t;
    return 0;
}
int gpu_lm_get_adam(void* self, float* m, float* v, int* t) {
    Model* md = ((Fake*)self)->m;
    memcpy(m, md->m, P(self)); memcpy(v, md->v, P(self)); *t = md->adam_t;
    return 0;
}
int gpu_lm_set_rng(void* self, uint64_t rng) { ((Fake*)self)->m->rng = rng; return 0; }
int gpu_lm_get_rng(void* self, uint64_t* rng) { *rng = ((Fake*)self)->m->rng; return 0; }
int gpu_lm_set_dropout(void* self, float p) { model_set_training(((Fake*)self)->m, 1, p); return 0; }
static int forward(Fake* f, float* loss, const int* x, const int* y, const float* h0, const float* c0, int to) {
    if (model_forward(f->m, x, y, h0, c0, f->B, f->T)) return -1;
    memcpy(f->h[to], f->m->h_n, lbh(f) * 4); memcpy(f->c[to], f->m->c_n, lbh(f) * 4);
    if (loss) *loss = f->m->loss;
    return 0;
}
int gpu_lm_forward(void* self, float* loss, const int* x, const int* y, const float* h0, const float* c0) {
    Fake* f = (Fake*)self;
    f->cur = 1;
    return forward(f, loss, x, y, h0, c0, 1);
}
int gpu_lm_get_logits(void* self, float* out) {
    Fake* f = (Fake*)self;
    memcpy(out, f->m->logits, (size_t)f->B * f->T * f->m->config.vocab_size * 4);
    return 0;
}
int gpu_lm_get_final_state(void* self, float* h, float* c) {
    Fake* f = (Fake*)self;
    if (h) memcpy(h, f->m->h_n, lbh(f) * 4);
    if (c && lstm(f)) memcpy(c, f->m->c_n, lbh(f) * 4);
    return 0;
}
int gpu_lm_backward(void* self) { return model_backward(((Fake*)self)->m); }
int gpu_lm_get_dstate(void* self, float* dh, float* dc) {
    Fake* f = (Fake*)self;
    if (dh) memcpy(dh, f->m->dh0, lbh(f) * 4);
    if (dc && lstm(f)) memcpy(dc, f->m->dc0, lbh(f) * 4);
    return 0;
}
int gpu_lm_zero_grad(void* self) { model_zero_grad(((Fake*)self)->m); return 0; }
int gpu_lm_step(void* self, float* norm, float lr, float b1, float b2, float eps, float wd, float clip) {
    return model_step(((Fake*)self)->m, lr, b1, b2, eps, wd, clip, norm);
}
int gpu_lm_train_step(void* self, float* loss, float* norm, const int* x, const int* y, float lr, float b1,
                      float b2, float eps, float wd, float clip) {
    Fake* f = (Fake*)self;
    if (forward(f, loss, x, y, f->h[f->cur], lstm(f) ? f->c[f->cur] : NULL, 1 - f->cur)) return -1;
    model_zero_grad(f->m);
    if (model_backward(f->m) || model_step(f->m, lr, b1, b2, eps, wd, clip, norm)) return -1;
    f->cur = 1 - f->cur;
    return 0;
}
'''


def reload_cuda_module(monkeypatch):
    """The next import of pyrnn._cuda loads the library anew (PYRNN_CUDA_LIB as set now), and the test's end
    restores the module: both sys.modules and the package attribute, which `from . import _cuda` reads."""
    import sys

    import pyrnn
    monkeypatch.delitem(sys.modules, 'pyrnn._cuda', raising=False)
    monkeypatch.delattr(pyrnn, '_cuda', raising=False)


def build_cuda_stand_in(folder):
    """The stand-in's path, built in folder; None (with the reason) when it cannot be built here."""
    try:
        from pyrnn import _crnn
    except ImportError:
        return None, 'the C extension is not built (python3 pyrnn/_build.py)'
    cc = shlex.split(os.environ.get('CC', 'cc'))
    if not shutil.which(cc[0]):
        return None, 'no C compiler for the stand-in library'
    flags = [f for f in _crnn.ffi.string(_crnn.lib.pyrnn_build_flags()).decode().split() if f != '-fopenmp']
    src, so = os.path.join(folder, 'stand_in.c'), os.path.join(folder, 'libpyrnn_cuda_stand_in.so')
    with open(src, 'w') as f:
        f.write(STAND_IN)
    r = subprocess.run([*cc, *flags, '-Wno-unknown-pragmas', '-shared', '-fPIC', '-I', os.path.join(ROOT, 'c'), src,
                        '-o', so, '-lm'], capture_output=True, text=True, timeout=300)
    if r.returncode != 0:
        raise RuntimeError(f'the stand-in library does not build: {r.stderr[-3000:]}')
    return so, None
