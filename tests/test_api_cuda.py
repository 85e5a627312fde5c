"""CharLM(backend='cuda') and its binding, without a GPU. The binding's one call table
(pyrnn._cuda.CALLS) against the extern "C" signatures of cuda/lib_rnn.cu and against the exports of
the real lib/libpyrnn_cuda.so (built here by nvcc when nvcc and cuDNN are there). Then the cuda
engine against backend 'c' through a stand-in for the library: the C model behind the same call
table, compiled here with the C extension's flags, so that everything the engine moves between the
host and the device (parameters, gradients, AdamW's moments and step count, the generator, the
dropout rate, a new batch shape) must come out as backend 'c' has it, to the bit."""
import ctypes
import importlib
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

import pyrnn
from pyrnn import checkpoint

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from helpers import build_cuda_stand_in, reload_cuda_module  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LIB_SOURCE = os.path.join(ROOT, 'cuda', 'lib_rnn.cu')
TEXT = "ROMEO: But soft, what light through yonder window breaks?\n" * 8


def _calls():
    """CALLS without importing pyrnn._cuda (which loads the library): its source, evaluated."""
    src = open(os.path.join(ROOT, 'pyrnn', '_cuda.py')).read()
    block = re.search(r'^_F, _I = .*?^\]\n', src, re.M | re.S).group(0)
    scope = {k: getattr(ctypes, k) for k in ('POINTER', 'c_char_p', 'c_float', 'c_int', 'c_uint64', 'c_void_p')}
    exec(block, scope)
    return scope['CALLS']


C_TYPES = {'void': None, 'void*': ctypes.c_void_p, 'const char*': ctypes.c_char_p, 'int': ctypes.c_int,
           'float': ctypes.c_float, 'uint64_t': ctypes.c_uint64, 'float*': ctypes.POINTER(ctypes.c_float),
           'int*': ctypes.POINTER(ctypes.c_int), 'uint64_t*': ctypes.POINTER(ctypes.c_uint64)}


def _c_type(decl):
    t = ' '.join(decl.replace('*', '* ').split()).replace(' *', '*')
    t = t[len('const '):] if t.startswith('const ') and t != 'const char*' else t
    return C_TYPES[t]


def source_signatures():
    """{name: (restype, [argtypes])} of the functions defined in cuda/lib_rnn.cu's extern "C" block."""
    text = open(LIB_SOURCE).read()
    text = text[text.index('extern "C" {'):]
    out = {}
    for m in re.finditer(r'^(\w[\w \*]*?)\b(gpu_\w+)\(([^)]*)\)\s*\{', text, re.M):
        params = [p.strip() for p in m.group(3).split(',') if p.strip() and p.strip() != 'void']
        out[m.group(2)] = (_c_type(m.group(1)), [_c_type(re.sub(r'\w+$', '', p)) for p in params])
    return out


def test_call_table_is_the_extern_c_block():
    table = {name: (res, list(args)) for name, res, args in _calls()}
    src = source_signatures()
    assert len(src) >= 20
    assert sorted(table) == sorted(src), (set(table) ^ set(src))
    for name in src:
        assert table[name] == src[name], name


def _gpu_info():
    if not shutil.which('make'):
        return {}
    r = subprocess.run(['make', '-s', 'gpu_info'], cwd=ROOT, capture_output=True, text=True, timeout=120)
    return dict(re.findall(r'^(\w+)=(.*)$', r.stdout, re.M)) if r.returncode == 0 else {}


@pytest.fixture(scope='module')
def built_library():
    """lib/libpyrnn_cuda.so, built (or brought up to date) by make with nvcc; skips without nvcc or cuDNN."""
    info = _gpu_info()
    if not info.get('NVCC') or not info.get('CUDNN_ROOT'):
        pytest.skip('no nvcc or no cuDNN here (make cuda_deps): lib/libpyrnn_cuda.so cannot be built')
    r = subprocess.run(['make', 'lib_gpu'], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return os.path.join(ROOT, 'lib', 'libpyrnn_cuda.so')


def test_the_built_library_exports_the_call_table(built_library):
    if shutil.which('nm'):
        r = subprocess.run(['nm', '-D', '--defined-only', built_library], capture_output=True, text=True)
        exported = {line.split()[-1] for line in r.stdout.splitlines() if line.split()[1:2] == ['T']}
        assert {name for name, _, _ in _calls()} <= exported
    # and pyrnn._cuda loads it: the runpath finds cuDNN and cuBLAS, every name of CALLS resolves
    code = 'import pyrnn._cuda as c; print(len(c.CALLS), c.library_path())'
    env = {k: v for k, v in os.environ.items() if k != 'PYRNN_CUDA_LIB'}
    r = subprocess.run([sys.executable, '-c', code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [str(len(_calls())), built_library]


def test_an_old_library_is_refused_by_name(tmp_path, monkeypatch):
    """A library without a function of the table (built from older sources) is an ImportError that
    names the function, not a crash at its first call."""
    cc = os.environ.get('CC', 'cc')
    if not shutil.which(cc):
        pytest.skip('no C compiler')
    (tmp_path / 'old.c').write_text('int gpu_lm_new(void) { return 0; }\n')
    r = subprocess.run([cc, '-shared', '-fPIC', str(tmp_path / 'old.c'), '-o', str(tmp_path / 'old.so')],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    monkeypatch.setenv('PYRNN_CUDA_LIB', str(tmp_path / 'old.so'))
    reload_cuda_module(monkeypatch)
    with pytest.raises(ImportError, match=r'lacks gpu_lm_free, gpu_last_error, .*rebuild it with `make lib_gpu`'):
        importlib.import_module('pyrnn._cuda')
    with pytest.raises(RuntimeError, match='the cuda backend is not built: .*lacks gpu_lm_free'):
        pyrnn.CharLM('gru', 5, 3, 4, backend='cuda')


# ---- the engine, through a CPU stand-in for the library (helpers.build_cuda_stand_in)

@pytest.fixture(scope='module')
def stand_in(tmp_path_factory):
    so, why = build_cuda_stand_in(str(tmp_path_factory.mktemp('stand_in')))
    if not so:
        pytest.skip(why)
    return so


@pytest.fixture
def cuda(stand_in, monkeypatch):
    """backend='cuda' runs on the stand-in for this test."""
    monkeypatch.setenv('PYRNN_CUDA_LIB', stand_in)
    reload_cuda_module(monkeypatch)   # the next import loads the stand-in, and no later test sees it
    threads = pyrnn.get_num_threads()
    pyrnn.set_num_threads(1)   # the stand-in is single-threaded: the C side too, for the same sums
    yield
    pyrnn.set_num_threads(threads)


def batch(vocab, B=3, T=12, seed=0):
    ids = vocab.encode(TEXT)
    starts = np.random.default_rng(seed).integers(0, len(ids) - T - 1, B)
    b = np.stack([ids[s:s + T + 1] for s in starts])
    return b[:, :-1], b[:, 1:]


def pair(cell, dropout=0.0, seed=4):
    vocab = pyrnn.Vocab.from_text(TEXT)
    return [pyrnn.CharLM(cell, len(vocab), 6, 16, 2, dropout=dropout, vocab=vocab, seed=seed, backend=b)
            for b in ('c', 'cuda')], vocab


def same_state(a, b):
    for k, v in a.state_dict().items():
        assert np.array_equal(b.state_dict()[k], v), k
    sa, sb = pyrnn.AdamW(a).state_dict()['state'], pyrnn.AdamW(b).state_dict()['state']
    assert sorted(sa) == sorted(sb)
    for i in sa:
        assert sa[i]['step'] == sb[i]['step']
        assert np.array_equal(sa[i]['exp_avg'], sb[i]['exp_avg']) and np.array_equal(sa[i]['exp_avg_sq'],
                                                                                   sb[i]['exp_avg_sq'])
    assert a._engine.rng == b._engine.rng


def step(lm, x, y, hx=None, clip=0.5):
    loss = lm.forward(x, y, hx)
    lm.zero_grad()
    lm.backward()
    return loss, lm.step(1e-2, weight_decay=0.01, max_grad_norm=clip)


@pytest.mark.parametrize('cell, dropout', [('lstm', 0.0), ('lstm', 0.3), ('gru', 0.2), ('rnn', 0.0)])
def test_cuda_engine_trains_as_c(cuda, cell, dropout):
    (c, g), vocab = pair(cell, dropout)
    x, y = batch(vocab)
    hx = {}
    for k in range(4):
        outs = []
        for lm in (c, g):
            outs.append(step(lm, x, y, hx.get(lm.backend)))
            hx[lm.backend] = lm.state
        assert outs[0] == outs[1], k
        assert np.array_equal(c.logits, g.logits) and np.array_equal(c.dh0, g.dh0)
        for name, grad in c.grad.items():
            assert np.array_equal(g.grad[name], grad), name
    for lm in (c, g):   # eval mode: no dropout, and backward still works
        lm.eval()
        lm.forward(x, y)
        lm.zero_grad()
        lm.backward()
        lm.train()
    assert c.loss == g.loss and np.array_equal(c.grad['head.weight'], g.grad['head.weight'])
    assert step(c, x, y) == step(g, x, y)   # and dropout is back, from the same generator state
    same_state(c, g)


def test_cuda_save_load_continues_exactly(cuda, tmp_path):
    (c, g), vocab = pair('lstm', dropout=0.3)
    x, y = batch(vocab)
    for _ in range(3):
        assert step(c, x, y) == step(g, x, y)
    g.save(tmp_path / 'g.bin')
    ck = checkpoint.read_checkpoint(tmp_path / 'g.bin')
    assert ck['adam_t'] == 3 and ck['dropout'] == 0.3 and ck['m'] is not None
    back = {b: pyrnn.CharLM.load(tmp_path / 'g.bin', backend=b) for b in ('c', 'cuda')}
    for _ in range(2):   # moments, step count, generator: the next steps are the same bits everywhere
        ref = step(g, x, y)
        assert step(back['cuda'], x, y) == ref and step(back['c'], x, y) == ref and step(c, x, y) == ref
    same_state(g, back['cuda'])
    same_state(c, back['cuda'])


def test_cuda_gradients_are_writable_views(cuda):
    """clip_grad_norm_ and edits of .grad reach the GPU's gradients before the step."""
    (c, g), vocab = pair('gru')
    x, y = batch(vocab)
    for lm in (c, g):
        lm.forward(x, y)
        lm.zero_grad()
        lm.backward()
    assert pyrnn.clip_grad_norm_(c, 0.1) == pyrnn.clip_grad_norm_(g, 0.1)
    for lm in (c, g):
        lm.grad['head.bias'][...] = 0.0
        pyrnn.AdamW(lm, lr=1e-2).step()
    same_state(c, g)
    assert not np.any(g.grad['head.bias'])


def test_cuda_optimizer_state_moves_both_ways(cuda):
    (c, g), vocab = pair('lstm')
    x, y = batch(vocab)
    for _ in range(2):
        assert step(c, x, y) == step(g, x, y)
    fresh = pair('lstm', seed=9)[0][1]
    fresh.load_state_dict(g.state_dict())
    pyrnn.AdamW(fresh).load_state_dict(pyrnn.AdamW(c).state_dict())   # before its GPU model exists
    fresh._engine.set_rng(g._engine.rng)
    assert step(fresh, x, y) == step(c, x, y)
    pyrnn.AdamW(fresh).load_state_dict(pyrnn.AdamW(c).state_dict())   # and after
    assert step(fresh, x, y) == step(c, x, y)
    same_state(c, fresh)


def test_cuda_new_batch_shape_keeps_the_state(cuda):
    """A batch of another shape makes a new GPU model; parameters, moments and the generator move to it."""
    (c, g), vocab = pair('lstm', dropout=0.2)
    for shape, seed in (((3, 12), 0), ((2, 5), 1), ((3, 12), 2)):
        x, y = batch(vocab, *shape, seed=seed)
        assert step(c, x, y) == step(g, x, y)
    same_state(c, g)
    assert c.sample('RO', 20, seed=3) == g.sample('RO', 20, seed=3)
