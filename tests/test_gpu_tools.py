"""The GPU side's tools that run without a GPU: make gpu_verify's no-GPU path, the driver checks
of scripts/gpu_env.py and of train_gpu against a stand-in libcuda.so.1 (a few C functions that
report a chosen driver version and device count), the cuDNN / cuBLAS pins per CUDA version and the
wheels' folders, the benchmark's record of loaded libraries and its targets, and its torch side
against the C backend. Then what the first run on a lent GPU machine needs (issue 20), each against a
stand-in: gpu_verify with that machine's Python (a fake one that sees only some of this one's packages)
offline, its stages apart, its deadline, its build (outputs from elsewhere removed, runpaths checked),
the benchmark's targets as TARGET lines, its charlm check; cuBLAS's workspace fixed before any handle
(the stand-in driver records the environment); the cuDNN algorithm fallback's rules (compiled with
nvcc against scripted outcomes); make gpu_wheels."""
import ctypes
import ctypes.util
import glob
import importlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
import zipfile

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = os.path.join(ROOT, 'scripts')
sys.path.insert(0, SCRIPTS)
gpu_env = importlib.import_module('gpu_env')
bench_gpu = importlib.import_module('bench_gpu')
gpu_verify = importlib.import_module('gpu_verify')
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from helpers import build_cuda_stand_in  # noqa: E402

# the driver API calls cudart (statically linked into train_gpu) and gpu_env.probe make before any
# device work: the version from FAKE_CUDA_VERSION, cuInit's status from FAKE_CUDA_INIT (100 = no device),
# the device count from FAKE_CUDA_COUNT (gpu_env.probe then sees an sm_90 "Fake GPU")
FAKE_LIBCUDA = r'''
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
typedef int CUresult;
static int env(const char* name, int dflt) { const char* v = getenv(name); return v ? atoi(v) : dflt; }
// what the process had set when it first asked the driver anything: FAKE_CUDA_ENV_LOG gets a line
static void log_env(void) {
    const char* path = getenv("FAKE_CUDA_ENV_LOG");
    FILE* f = path ? fopen(path, "a") : NULL;
    if (!f) return;
    const char* v = getenv("CUBLAS_WORKSPACE_CONFIG");
    fprintf(f, "CUBLAS_WORKSPACE_CONFIG=%s\n", v ? v : "(unset)");
    fclose(f);
}
CUresult cuDriverGetVersion(int* v) { log_env(); *v = env("FAKE_CUDA_VERSION", 13000); return 0; }
CUresult cuInit(unsigned flags) { (void)flags; return env("FAKE_CUDA_INIT", 100); }
CUresult cuDeviceGetCount(int* n) { *n = env("FAKE_CUDA_COUNT", 0); return env("FAKE_CUDA_INIT", 100); }
CUresult cuDeviceGet(int* d, int i) { *d = i; return 0; }
CUresult cuDeviceGetName(char* name, int len, int d) { (void)d; snprintf(name, len, "Fake GPU"); return 0; }
CUresult cuDeviceGetAttribute(int* v, int attr, int d) { (void)d; *v = attr == 75 ? 9 : 0; return 0; }
CUresult cuGetProcAddress_v2(const char* s, void** p, int ver, unsigned long long flags, int* status);
static void* lookup(const char* s) {
    if (!strcmp(s, "cuGetProcAddress")) return (void*)cuGetProcAddress_v2;
    if (!strcmp(s, "cuDriverGetVersion")) return (void*)cuDriverGetVersion;
    if (!strcmp(s, "cuInit")) return (void*)cuInit;
    if (!strcmp(s, "cuDeviceGetCount")) return (void*)cuDeviceGetCount;
    return 0;
}
CUresult cuGetProcAddress_v2(const char* s, void** p, int ver, unsigned long long flags, int* status) {
    (void)ver; (void)flags; *p = lookup(s); if (status) *status = *p != 0; return *p ? 0 : 500;
}
CUresult cuGetProcAddress(const char* s, void** p, int ver, unsigned long long flags) {
    return cuGetProcAddress_v2(s, p, ver, flags, 0);
}
'''


@pytest.fixture(scope='module')
def fake_libcuda(tmp_path_factory):
    cc = os.environ.get('CC', 'cc')
    if not shutil.which(cc):
        pytest.skip('no C compiler for the stand-in libcuda.so.1')
    d = tmp_path_factory.mktemp('fakecuda')
    (d / 'fake.c').write_text(FAKE_LIBCUDA)
    r = subprocess.run([cc, '-shared', '-fPIC', str(d / 'fake.c'), '-o', str(d / 'libcuda.so.1')],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return d / 'libcuda.so.1'


def fake_env(version, init):
    return dict(os.environ, FAKE_CUDA_VERSION=str(version), FAKE_CUDA_INIT=str(init))


# ---- make gpu_verify without a GPU

def test_gpu_verify_without_a_driver_stops_at_once_with_one_line(tmp_path):
    env = dict(os.environ, PYRNN_LIBCUDA=str(tmp_path / 'missing' / 'libcuda.so.1'),
               GPU_VERIFY_OUT=str(tmp_path / 'out'))
    t = time.time()
    r = subprocess.run([sys.executable, os.path.join(SCRIPTS, 'gpu_verify.py')], env=env, capture_output=True,
                       text=True, timeout=60)
    assert time.time() - t < 20
    assert r.returncode == 1 and r.stderr == ''
    lines = r.stdout.splitlines()
    assert len(lines) == 1 and lines[0].startswith('gpu_verify: no NVIDIA driver: '), r.stdout
    assert lines[0].endswith('nothing was verified (' + os.path.relpath(tmp_path / 'out' / 'summary.txt', ROOT) + ')')
    summary = (tmp_path / 'out' / 'summary.txt').read_text().splitlines()
    assert summary[0].startswith('# make gpu_verify')
    assert summary[1].startswith('FAIL gpu: no NVIDIA driver: ') and summary[-1] == '0 passed, 1 failed'
    assert not (tmp_path / 'out' / 'deps.log').exists()   # stopped before anything was installed


def test_gpu_verify_with_a_driver_but_no_device(tmp_path, fake_libcuda):
    env = dict(fake_env(13000, 100), PYRNN_LIBCUDA=str(fake_libcuda), GPU_VERIFY_OUT=str(tmp_path))
    r = subprocess.run([sys.executable, os.path.join(SCRIPTS, 'gpu_verify.py')], env=env, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 1
    summary = os.path.relpath(tmp_path / 'summary.txt', ROOT)
    assert r.stdout.splitlines() == [f'gpu_verify: no CUDA device: the NVIDIA driver is installed ({_driver("13.0")}) '
                                     f'but sees no GPU; nothing was verified ({summary})']


def _driver(cuda):
    release = gpu_env.driver_release()
    return f'driver {release} for CUDA {cuda}' if release else f'a driver for CUDA {cuda}'


# ---- the driver checks

def test_probe_tells_an_old_driver_from_no_device_from_no_driver(tmp_path, fake_libcuda):
    ok, line, info = gpu_env.probe((13, 0), str(tmp_path / 'none.so'))
    assert not ok and line.startswith('no NVIDIA driver: ') and 'needs driver R580 or newer' in line
    os.environ.update(FAKE_CUDA_VERSION='12040', FAKE_CUDA_INIT='0')
    try:
        ok, line, info = gpu_env.probe((13, 0), str(fake_libcuda))
        assert not ok and line == (f'the NVIDIA driver is too old: found {_driver("12.4")}, but the CUDA 13.0 toolkit '
                                   '(nvcc) needs driver R580 or newer; update the driver or use a CUDA 12 toolkit')
        assert info['driver_cuda'] == '12.4'
        ok, line, _ = gpu_env.probe((12, 4), str(fake_libcuda))   # a CUDA 12 toolkit is fine with it: no device then
        assert not ok and line.startswith('no CUDA device: ')
        os.environ['FAKE_CUDA_INIT'] = '999'
        ok, line, _ = gpu_env.probe(None, str(fake_libcuda))
        assert not ok and line.startswith('the NVIDIA driver does not start: cuInit / cuDeviceGetCount error 999')
    finally:
        del os.environ['FAKE_CUDA_VERSION'], os.environ['FAKE_CUDA_INIT']


def binary_args(binary, tmp_path):
    """A command line of train_gpu or test_gpu (built by make gpu_build_check) that reaches the GPU."""
    path = os.path.join(ROOT, binary)
    if not os.access(path, os.X_OK):
        pytest.skip(f'{binary} is not built (make gpu_build_check)')
    if binary == 'test_gpu':   # it reads a reference first: make a small one
        ref = str(tmp_path / 'ref.bin')
        if not os.path.exists(ref):
            subprocess.run([sys.executable, '-m', 'pyrnn.reference', '--steps', '1', '-o', ref], cwd=ROOT, check=True,
                           capture_output=True)
        return [path, ref]
    from pyrnn import data
    data.prepare(bytes(range(97, 123)) * 400, str(tmp_path / 'd'))
    return [path, '-i', str(tmp_path / 'd' / 'train.bin'), '-j', '', '-o', str(tmp_path / 'o'), '-b', '2', '-t', '8',
            '-n', '1', '-H', '8', '-E', '4', '-L', '1']


@pytest.mark.parametrize('binary', ['train_gpu', 'test_gpu'])
def test_gpu_binaries_name_the_driver_problem(tmp_path, fake_libcuda, binary):
    """train_gpu / test_gpu (built by make gpu_build_check) against the stand-in driver: one line each
    for a driver too old for the build and for a driver without a device."""
    args = binary_args(binary, tmp_path)
    runtime = None
    for version, init, expect in ((12040, 0, 'error: the NVIDIA driver is too old: found '),
                                  (99000, 100, 'error: no CUDA device found: the NVIDIA driver is installed')):
        env = dict(fake_env(version, init), LD_LIBRARY_PATH=str(fake_libcuda.parent))
        r = subprocess.run(args, env=env, capture_output=True, text=True, timeout=120)
        assert r.returncode == 1 and r.stderr.count('\n') == 1 and r.stderr.startswith(expect), r.stderr
        if version == 12040:
            assert 'for CUDA 12.4, this build uses CUDA 1' in r.stderr and 'which needs driver R' in r.stderr
            runtime = r.stderr
    assert runtime and ('rebuild with a CUDA 12 toolkit (nvcc 12: make cuda_deps then installs the -cu12 wheels)'
                        in runtime)


# ---- make cuda_deps: the pins follow nvcc's CUDA major version

NVCC_13 = ('nvcc: NVIDIA (R) Cuda compiler driver\nCuda compilation tools, release 13.0, V13.0.88\n'
           'Build cuda_13.0.r13.0\n')
NVCC_12 = 'nvcc: NVIDIA (R) Cuda compiler driver\nCuda compilation tools, release 12.4, V12.4.131\n'


def test_wheels_follow_the_cuda_major_version():
    assert gpu_env.parse_nvcc_version(NVCC_13) == (13, 0)
    assert gpu_env.parse_nvcc_version(NVCC_12) == (12, 4)
    assert gpu_env.wheels_for((13, 0)) == ['nvidia-cudnn-cu13==9.28.1.4', 'nvidia-cublas==13.0.2.14']
    assert gpu_env.wheels_for((13, 2)) == gpu_env.wheels_for((13, 0))
    assert gpu_env.wheels_for((12, 4)) == ['nvidia-cudnn-cu12==9.28.0.42', 'nvidia-cublas-cu12==12.9.1.4']
    with pytest.raises(ValueError, match='CUDA 11.8 is not supported'):
        gpu_env.wheels_for((11, 8))
    with pytest.raises(ValueError, match='no "release X.Y"'):
        gpu_env.parse_nvcc_version('nvcc: command not found')


@pytest.mark.parametrize('text, wheel', [(NVCC_12, 'nvidia-cudnn-cu12==9.28.0.42'),
                                         (NVCC_13, 'nvidia-cudnn-cu13==9.28.1.4')])
def test_cuda_deps_asks_pip_for_the_pins_of_nvcc(tmp_path, text, wheel):
    nvcc = tmp_path / 'nvcc'
    nvcc.write_text('#!/bin/sh\ncat <<EOF\n' + text + 'EOF\n')
    nvcc.chmod(0o755)
    r = subprocess.run([sys.executable, os.path.join(SCRIPTS, 'gpu_env.py'), 'deps', '--nvcc', str(nvcc), '--dry-run'],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    pip_line = r.stdout.splitlines()[-1].split()
    assert pip_line[:3] == [sys.executable, '-m', 'pip'] and wheel in pip_line
    assert [w for w in pip_line if w.startswith('nvidia-')] == gpu_env.wheels_for(gpu_env.parse_nvcc_version(text))


def test_make_cuda_deps_calls_the_selection():
    r = subprocess.run(['make', '-n', 'cuda_deps', 'NVCC=/opt/cuda/bin/nvcc'], cwd=ROOT, capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f'make -n failed: {r.stderr.strip()[-200:]}')
    assert 'scripts/gpu_env.py deps --nvcc /opt/cuda/bin/nvcc' in r.stdout


def test_wheel_root_is_the_folder_with_the_header(tmp_path):
    # the Makefile's last resort for cuDNN, cuBLAS and NCCL; -S keeps the installed wheels out of sight
    for folder, header in [('cudnn', 'cudnn.h'), ('cublas', None), ('cu13', 'cublas_v2.h')]:
        (tmp_path / 'nvidia' / folder / 'include').mkdir(parents=True)
        if header:
            (tmp_path / 'nvidia' / folder / 'include' / header).write_text('')

    def root(library):
        r = subprocess.run([sys.executable, '-S', os.path.join(SCRIPTS, 'gpu_env.py'), 'root', library],
                           env=dict(os.environ, PYTHONPATH=str(tmp_path)), capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        return r.stdout.strip()
    assert root('cudnn') == str(tmp_path / 'nvidia' / 'cudnn')
    assert root('cublas') == str(tmp_path / 'nvidia' / 'cu13')   # nvidia/cublas has no header
    assert root('nccl') == ''


# ---- the benchmark's records

MAPS = '''\
7f0000000000-7f0000001000 r-xp 00000000 08:01 1 /venv/lib/python3.12/site-packages/nvidia/cudnn/lib/libcudnn.so.9
7f0000001000-7f0000002000 r--p 00001000 08:01 1 /venv/lib/python3.12/site-packages/nvidia/cudnn/lib/libcudnn.so.9
7f0000002000-7f0000003000 r-xp 00000000 08:01 2 /venv/lib/python3.12/site-packages/nvidia/cudnn/lib/libcudnn_ops.so.9
7f0000003000-7f0000004000 r-xp 00000000 08:01 3 /venv/lib/python3.12/site-packages/nvidia/cu13/lib/libcublasLt.so.13
7f0000004000-7f0000005000 r-xp 00000000 08:01 4 /venv/lib/python3.12/site-packages/nvidia/cu13/lib/libcublas.so.13
7f0000005000-7f0000006000 r-xp 00000000 08:01 5 /usr/lib/x86_64-linux-gnu/libcudnnx.so
7f0000006000-7f0000007000 rw-p 00000000 00:00 0 [heap]
7f0000007000-7f0000008000 rw-p 00000000 00:00 0
'''


def test_loaded_libraries_from_maps():
    got = gpu_env.loaded_libraries(maps=MAPS)
    d = '/venv/lib/python3.12/site-packages/nvidia/'
    assert got == {'libcudnn': [d + 'cudnn/lib/libcudnn.so.9', d + 'cudnn/lib/libcudnn_ops.so.9'],
                   'libcublas': [d + 'cu13/lib/libcublas.so.13', d + 'cu13/lib/libcublasLt.so.13']}


def test_loaded_libraries_of_this_process():
    libm = ctypes.util.find_library('m')
    if not libm:
        pytest.skip('no libm to look for')
    ctypes.CDLL(libm)
    paths = gpu_env.loaded_libraries(('libm',))['libm']
    assert paths and all(os.path.basename(p).startswith('libm') and os.path.isabs(p) for p in paths)
    assert gpu_env.library_versions({'libcudnn': [], 'libcublas': []}) == {}


def row(B, x, cell='lstm', algo='auto'):
    return dict(cell=cell, math='fp32', B=B, H=256, algo=algo, x_torch=x)


def test_bench_targets():
    t = bench_gpu.check_targets([row(32, 1.6), row(64, 1.0), row(256, 1.2)])
    assert t['ok'] and [x['met'] for x in t['targets']] == [True, True]
    assert t['lines'][0] == 'target met: >= 1.0x torch at every shape: min 1.00x (lstm fp32 B=64 H=256) over 3 shapes'
    t = bench_gpu.check_targets([row(32, 1.4), row(64, 1.1)])
    assert not t['ok'] and [x['met'] for x in t['targets']] == [True, False]
    assert t['lines'][1] == ('target missed: >= 1.5x torch at B=32: min 1.40x (lstm fp32 B=32 H=256) over 1 shapes; '
                             'short: lstm fp32 B=32 H=256 1.40x (by 0.10x)')
    t = bench_gpu.check_targets([row(32, 1.6), row(128, 0.9), row(128, 0.5, algo='standard')])
    assert not t['ok'] and t['targets'][0]['detail'].endswith('short: lstm fp32 B=128 H=256 0.90x (by 0.10x)')  # auto
    missing = dict(row(32, 0), B=32)
    del missing['x_torch']
    t = bench_gpu.check_targets([row(64, 1.2), missing])
    assert not t['ok'] and t['targets'][1] == {'target': '>= 1.5x torch at B=32', 'met': False,
                                               'detail': 'not measured'}
    assert t['notes'][0] == '1 shape(s) without a pyrnn / torch ratio (an error, or no torch)'
    assert not bench_gpu.check_targets([])['ok']


def test_bench_without_a_gpu_says_so(tmp_path):
    env = dict(os.environ, PYRNN_LIBCUDA=str(tmp_path / 'libcuda.so.1'))
    r = subprocess.run([sys.executable, os.path.join(SCRIPTS, 'bench_gpu.py'), '--out', str(tmp_path / 'b.json')],
                       env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and r.stdout.startswith('bench_gpu: no NVIDIA driver: ') and r.stdout.count('\n') == 1
    assert not (tmp_path / 'b.json').exists()


@pytest.mark.parametrize('cell', ['lstm', 'gru'])
def test_bench_torch_side_trains_the_same_model_as_pyrnn(tmp_path, cell):
    """The torch worker, on the CPU, from the bench's shared weight and token files: its first loss
    is the C backend's on the same files (so the two sides of the benchmark train one model)."""
    pytest.importorskip('torch')
    from pyrnn import CharLM
    V, H, L, B, T = 65, 32, 2, 4, 8
    p, t = bench_gpu.draw_inputs(str(tmp_path), cell, V, H, H, L, B, T)
    w = bench_gpu.Worker('torch', sys.executable, device='cpu')
    try:
        r = w.ask(op='setup', warmup=1, torch_compile=False, cell=cell, math='fp32', B=B, H=H, E=H, L=L, T=T, V=V,
                  algo='auto', params=p, tokens=t)
        assert 'error' not in r, r
        timed = w.ask(op='time', steps=2)
        assert timed['s'] > 0
        libs = w.ask(op='libs')
        assert set(libs['libraries']) == {'libcudnn', 'libcublas'} and libs['torch']
    finally:
        w.close()
    m = CharLM(cell, V, H, H, L, backend='c')
    flat, sd, off = np.fromfile(p, np.float32), {}, 0
    for k, x in m.state_dict().items():
        sd[k] = flat[off:off + x.size].reshape(x.shape)
        off += x.size
    assert off == flat.size
    m.load_state_dict(sd)
    tokens = np.fromfile(t, np.int32).reshape(2, B, T)
    assert abs(m.forward(tokens[0], tokens[1]) - r['first_loss']) < 1e-5


# ---- issue 20: cuBLAS's workspace, fixed before any handle exists

@pytest.mark.parametrize('user', [None, ':16:8'])
def test_cublas_workspace_is_fixed_before_any_handle(tmp_path, fake_libcuda, user):
    """train_gpu, test_gpu and the library set CUBLAS_WORKSPACE_CONFIG=:4096:8 (a value the user set
    stays) before they ask the driver anything, so before cuBLAS or cuDNN has a handle: the stand-in
    driver writes down what the process had set at its first call."""
    log = tmp_path / 'env.log'
    env = dict(fake_env(12040, 0), LD_LIBRARY_PATH=str(fake_libcuda.parent), FAKE_CUDA_ENV_LOG=str(log))
    env.pop('CUBLAS_WORKSPACE_CONFIG', None)
    if user:
        env['CUBLAS_WORKSPACE_CONFIG'] = user
    ran = []
    for binary in ('train_gpu', 'test_gpu'):
        if os.access(os.path.join(ROOT, binary), os.X_OK):
            r = subprocess.run(binary_args(binary, tmp_path), env=env, capture_output=True, text=True, timeout=120)
            assert r.returncode == 1 and 'driver is too old' in r.stderr, r.stderr
            ran.append(binary)
    if os.path.exists(os.path.join(ROOT, 'lib', 'libpyrnn_cuda.so')):
        code = ("from pyrnn import _cuda\ntry:\n    _cuda.GpuLM('lstm', 5, 4, 8, 1, 2, 3)\n"
                "except RuntimeError as e:\n    print(e)")
        r = subprocess.run([sys.executable, '-c', code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0 and r.stdout.startswith('gpu_lm_new: the NVIDIA driver is too old'), \
            r.stdout + r.stderr
        ran.append('lib')
    if not ran:
        pytest.skip('no GPU binary is built (make gpu_build_check)')
    lines = log.read_text().splitlines()
    assert len(lines) >= len(ran) and set(lines) == {f'CUBLAS_WORKSPACE_CONFIG={user or ":4096:8"}'}


# ---- issue 20: the cuDNN algorithm fallback, against scripted outcomes

POLICY_PROGRAM = r'''
#include "cudnn_rnn.cuh"
// outcomes by algorithm id: o runs, i inexact (when checked), r refused, s / l sticky (illegal address /
// launch failure); the fake sticky-error test returns the sticky error the last outcome left
static const char* script;
static cudaError_t sticky = cudaSuccess;
static char tried[256];
static int fake_trial(void* ctx, int algo, int check, double* err) {
    (void)ctx;
    size_t n = strlen(tried);
    snprintf(tried + n, sizeof(tried) - n, "%s%s%s", n ? "," : "", gpu_algo_name(algo), check ? "+check" : "");
    char o = script[algo];
    if (o == 'i' && check) { *err = 3.2e-3; return 1; }
    if (o == 'r') return fail("cudnnRNNForward: CUDNN_STATUS_NOT_SUPPORTED");
    if (o == 's' || o == 'l') {
        sticky = o == 's' ? cudaErrorIllegalAddress : cudaErrorLaunchFailure;
        return fail("cudaStreamSynchronize: %s", cudaGetErrorString(sticky));
    }
    return 0;
}
static cudaError_t fake_sticky(void) { return sticky; }

int main(int argc, char** argv) {
    if (argc == 6 && strcmp(argv[1], "auto") == 0) {   // auto CELL E H B: the candidates, best first
        int out[4], cell = cell_from_name(argv[2]);
        char why[128];
        int n = gpu_auto_algos(out, why, sizeof(why), cell, atoi(argv[3]), atoi(argv[4]), atoi(argv[5]));
        for (int i = 0; i < n; i++) printf("%s ", gpu_algo_name(out[i]));
        printf("| %s\n", why);
        return 0;
    }
    script = argv[1];   // SCRIPT CANDIDATES ASKED CHECK
    int cands[4], n = 0, chosen = -1;
    for (const char* p = argv[2]; *p; p++) cands[n++] = *p - '0';
    char note[900];
    int rc = rnn_fallback(&chosen, note, sizeof(note), cands, n, "H=128 <= 128 for lstm", atoi(argv[3]),
                          atoi(argv[4]), fake_trial, NULL, fake_sticky);
    printf("%d %s %d\n%s\n%s\n", rc, rc ? "-" : gpu_algo_name(chosen), gpu_algo_refused, tried,
           rc ? pyrnn_last_error() : note);
    return 0;
}
'''
ALGO_ID = {'standard': 0, 'persist_static': 1, 'persist_small_h': 3}   # cudnnRNNAlgo_t
AUTO = 'persist_small_h persist_static standard'.split()


def gpu_make_info():
    r = subprocess.run(['make', '-s', 'gpu_info'], cwd=ROOT, capture_output=True, text=True, timeout=120)
    return dict(re.findall(r'^(\w+)=(.*)$', r.stdout, re.M)) if r.returncode == 0 else {}


@pytest.fixture(scope='module')
def policy(tmp_path_factory):
    info = gpu_make_info()
    if not info.get('NVCC') or not info.get('CUDNN_ROOT'):
        pytest.skip('no nvcc or no cuDNN headers here (make cuda_deps)')
    d = tmp_path_factory.mktemp('policy')
    (d / 'policy.cu').write_text(POLICY_PROGRAM)
    r = subprocess.run([info['NVCC'], '-std=c++17', '-I', os.path.join(ROOT, 'cuda'), str(d / 'policy.cu'), '-o',
                        str(d / 'policy'), *info['GPU_LDLIBS'].split()], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]

    def run(outcomes, candidates, asked=False, check=True):
        script = ['-'] * 4
        for name, o in outcomes.items():
            script[ALGO_ID[name]] = o
        cands = ''.join(str(ALGO_ID[c]) for c in candidates)
        r = subprocess.run([str(d / 'policy'), ''.join(script), cands, str(int(asked)), str(int(check))],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        first, tried, text = r.stdout.split('\n', 2)
        rc, chosen, refused = first.split()
        return int(rc), chosen, int(refused), tried.split(','), text.rstrip('\n')
    run.binary = str(d / 'policy')
    return run


REFUSED = 'cudnnRNNForward: CUDNN_STATUS_NOT_SUPPORTED'


def test_fp32_auto_keeps_only_an_exact_algorithm_and_says_what_it_rejected(policy):
    rc, chosen, _, tried, note = policy({'persist_small_h': 'i', 'persist_static': 'r', 'standard': 'o'}, AUTO)
    assert (rc, chosen) == (0, 'standard')
    assert tried == ['persist_small_h+check', 'persist_static+check', 'standard']   # standard is the reference
    assert note == ('standard (auto: H=128 <= 128 for lstm; rejected persist_small_h: relative error 3.2e-03 against '
                    f'standard, over the 1e-04 of fp32 (not exact); cuDNN refused persist_static: {REFUSED})')
    rc, chosen, _, tried, note = policy({'persist_small_h': 'i', 'standard': 'o'}, AUTO, check=False)   # tf32
    assert (rc, chosen, tried, note) == (0, 'persist_small_h', ['persist_small_h'],
                                         'persist_small_h (auto: H=128 <= 128 for lstm)')


@pytest.mark.parametrize('first, error, text', [
    ('persist_small_h', 's', 'cudaErrorIllegalAddress (an illegal memory access was encountered)'),
    ('persist_static', 'l', 'cudaErrorLaunchFailure (unspecified launch failure)')])
def test_a_sticky_error_stops_the_fallback_with_its_own_message(policy, first, error, text):
    """Any sticky error, not only cudaErrorIllegalAddress: the next candidate would fail with it and be blamed."""
    outcomes = {'persist_small_h': 'r', 'persist_static': 'o', 'standard': 'o', first: error}
    rc, chosen, _, tried, message = policy(outcomes, AUTO)
    assert rc == -1 and 'standard' not in tried and tried[-1] == first + '+check'
    assert message.startswith(f"trying cuDNN's {first} algorithm left a sticky CUDA error, {text}, after: "
                              'cudaStreamSynchronize: ')
    assert message.endswith('the CUDA context is lost, so no other algorithm was tried (--cudnn-algo or '
                            'PYRNN_CUDNN_ALGO standard avoids it)')


def test_refusals_asked_for_and_auto(policy):
    rc, _, refused, tried, message = policy({'persist_static': 'r'}, ['persist_static'], asked=True, check=False)
    assert (rc, refused, tried) == (-1, 1, ['persist_static'])
    assert message == (f'cuDNN does not run the persist_static algorithm for this model: cuDNN refused persist_static: '
                       f'{REFUSED}; --cudnn-algo auto picks one that runs')
    rc, _, refused, tried, message = policy({a: 'r' for a in AUTO}, AUTO)
    assert (rc, refused) == (-1, 0) and message.startswith('cuDNN runs no RNN algorithm for this model: cuDNN '
                                                           'refused persist_small_h: ')


@pytest.mark.parametrize('shape, expect', [
    (('lstm', 128, 128, 32), 'persist_small_h persist_static standard | H=128 <= 128 for lstm'),
    (('lstm', 128, 256, 256), 'standard | H=256 > 128 for lstm'),          # B > 128: not persist_static
    (('gru', 128, 256, 32), 'standard | H=256 > 128 for gru'),             # never persist_static for a GRU
    (('rnn', 64, 256, 48), 'persist_small_h standard | H=256 <= 256 for rnn'),
    (('rnn', 128, 1024, 96), 'standard | H=1024 > 256 for rnn')])          # torch's large-RNN exception
def test_auto_candidates_follow_torch(policy, shape, expect):
    r = subprocess.run([policy.binary, 'auto', *map(str, shape)], capture_output=True, text=True, timeout=60)
    assert r.stdout.strip() == expect


# ---- issue 20: gpu_verify with the GPU machine's Python, offline, its stages apart

REAL_SITE = next(os.path.dirname(os.path.dirname(m.__file__)) for m in [importlib.import_module('numpy')])


def fake_python(folder, packages, torch=False):
    """A Python that sees of this one's site-packages only these packages, and with torch=True a
    stub torch that sees a GPU: the lent GPU machine's Python (numpy, pytest, torch and the nvidia
    wheels, no cffi or pycparser), or one that lacks something."""
    site = folder / 'site-packages'
    site.mkdir(parents=True)
    for name in packages:
        for path in glob.glob(os.path.join(REAL_SITE, name)) + glob.glob(os.path.join(REAL_SITE, name + '.libs')) + \
                glob.glob(os.path.join(REAL_SITE, name + '.py')):
            os.symlink(path, site / os.path.basename(path))
    if torch:
        (site / 'torch').mkdir()
        (site / 'torch' / '__init__.py').write_text("__version__ = '2.11.0+cu130'\n\n\nclass cuda:\n"
                                                    "    is_available = staticmethod(lambda: True)\n")
    py = folder / 'python'
    py.write_text(f'#!/bin/sh\nPYTHONPATH="${{PYTHONPATH:+$PYTHONPATH:}}{site}" exec {sys.executable} -S "$@"\n')
    py.chmod(0o755)
    return str(py)


GPU_MACHINE = ['numpy', 'pytest', '_pytest', 'pluggy', 'iniconfig', 'packaging', 'pygments', 'pip', 'setuptools',
               '_distutils_hack', 'nvidia']


def fake_wheel(folder, name, version='9.9'):
    """A pure-Python wheel of an empty package: what gpu_verify installs from GPU_VERIFY_WHEELS."""
    info = f'{name}-{version}.dist-info'
    with zipfile.ZipFile(folder / f'{name}-{version}-py3-none-any.whl', 'w') as z:
        z.writestr(f'{name}/__init__.py', f'__version__ = {version!r}\n')
        z.writestr(f'{info}/METADATA', f'Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n')
        z.writestr(f'{info}/WHEEL', 'Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n')
        z.writestr(f'{info}/RECORD', '')


def test_choose_python_prefers_the_gpu_machines_python(tmp_path):
    bare = fake_python(tmp_path / 'bare', [])
    plain = fake_python(tmp_path / 'plain', ['numpy'])
    gpu = fake_python(tmp_path / 'gpu', GPU_MACHINE, torch=True)
    missing = str(tmp_path / 'missing' / 'python')
    assert gpu_verify.choose_python(candidates=[missing, bare, plain, gpu]) == (gpu, f'{gpu} (Python 3.11, with torch)')
    assert gpu_verify.choose_python(candidates=[bare, plain])[0] == plain
    py, why = gpu_verify.choose_python(candidates=[missing, bare])
    assert py is None and why == f'no Python with numpy: {missing}: does not run; {bare}: no numpy'
    assert gpu_verify.choose_python(bare) == (None, f'{bare} (Python 3.11) has no numpy')
    assert gpu_verify.choose_python(plain) == (plain, f'{plain} (Python 3.11, as asked)')


@pytest.mark.parametrize('has_pytest', [True, False])
def test_gpu_verify_deps_offline_with_the_gpu_machines_python(tmp_path, fake_libcuda, has_pytest):
    """--only deps on a stand-in GPU: the given Python, the missing cffi and pycparser from the wheels
    folder into build/gpu_verify/site, no package index asked; without pytest only a note (the
    numerics stage alone needs it)."""
    if not gpu_env.find_nvcc():
        pytest.skip('no nvcc: the gpu stage stops before deps')
    packages = [p for p in GPU_MACHINE if has_pytest or 'pytest' not in p]
    py = fake_python(tmp_path / 'gpu', packages, torch=True)
    wheels = tmp_path / 'whl'
    wheels.mkdir()
    fake_wheel(wheels, 'cffi')
    fake_wheel(wheels, 'pycparser')
    cudnn, cublas = tmp_path / 'cudnn', tmp_path / 'cublas'   # headers only: this Python may lack the wheels
    (cudnn / 'include').mkdir(parents=True)
    (cudnn / 'include' / 'cudnn.h').write_text('')
    (cudnn / 'include' / 'cudnn_version.h').write_text(
        '#define CUDNN_MAJOR 9\n#define CUDNN_MINOR 7\n#define CUDNN_PATCHLEVEL 1\n')
    (cublas / 'include').mkdir(parents=True)
    (cublas / 'include' / 'cublas_v2.h').write_text('')
    (cublas / 'include' / 'cublas_api.h').write_text(
        '#define CUBLAS_VER_MAJOR 13\n#define CUBLAS_VER_MINOR 1\n#define CUBLAS_VER_PATCH 0\n')
    env = dict(fake_env(13000, 0), FAKE_CUDA_COUNT='1', PYRNN_LIBCUDA=str(fake_libcuda), GPU_VERIFY_PYTHON=py,
               GPU_VERIFY_WHEELS=str(wheels), GPU_VERIFY_OFFLINE='1', GPU_VERIFY_OUT=str(tmp_path / 'out'),
               GPU_VERIFY_BUILD=str(tmp_path / 'build'), PIP_INDEX_URL='http://127.0.0.1:9/simple',
               CUDNN_PATH=str(cudnn), CUBLAS_PATH=str(cublas))
    t = time.time()
    r = subprocess.run([sys.executable, os.path.join(SCRIPTS, 'gpu_verify.py'), '--only', 'deps'], env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert time.time() - t < 120
    summary = (tmp_path / 'out' / 'summary.txt').read_text().splitlines()
    assert summary[1].startswith('PASS gpu: Fake GPU (sm_90, 1 device(s)), ')
    assert 'INFO deps: cffi pycparser: from the wheels in ' + os.path.relpath(wheels, ROOT) in summary
    assert 'INFO deps: no package index (or GPU_VERIFY_OFFLINE=1): nothing was downloaded' in summary
    assert any(line.startswith('INFO deps: pytest is missing: the numerics stage will fail') for line in summary) \
        == (not has_pytest)
    deps = [line for line in summary if line.startswith('PASS deps: ')]
    assert deps == [f'PASS deps: python {py} (Python 3.11, as asked); cuDNN 9.7.1 at {cudnn}; cuBLAS 13.1.0 at '
                    f'{cublas}; not the pinned wheels (no index, or CUDNN_PATH)']
    assert summary[-1] == '3 passed, 0 failed'
    assert (tmp_path / 'build' / 'site' / 'cffi' / '__init__.py').exists()
    pip_runs = [line for line in (tmp_path / 'out' / 'deps.log').read_text().splitlines()
                if line.startswith('$ ') and ' pip install' in line]
    assert pip_runs and all('--no-index' in line for line in pip_runs)   # offline: never an index


def test_numerics_alone_needs_pytest(tmp_path, monkeypatch):
    py = fake_python(tmp_path / 'nopytest', ['numpy'])
    monkeypatch.setattr(gpu_verify, 'OUT', str(tmp_path / 'out'))
    v = gpu_verify.Verify()
    v.py, v.stage = py, 'numerics'
    assert gpu_verify.stage_numerics(v) is False
    assert v.lines == [f'FAIL numerics: pytest is not installed for {py}: put its wheel (and those it needs) in '
                       'GPU_VERIFY_WHEELS, or install it']
    assert not os.path.exists(v.log_path())   # nothing ran


def test_stages_apart_and_what_they_build():
    sel = gpu_verify.selected_stages
    assert sel([], ['bench']) == ['gpu', 'deps', 'build', 'bench']
    assert sel(['bench'], None) == gpu_verify.STAGES[:-1]
    assert sel([], ['charlm']) == ['gpu', 'deps', 'build', 'data', 'checkpoint', 'charlm']
    assert sel(['numerics', 'bench', 'charlm'], None) == ['gpu', 'deps', 'build', 'data', 'harness', 'train',
                                                          'checkpoint']
    v = gpu_verify.Verify.__new__(gpu_verify.Verify)
    for only, builds in ((['bench'], ['lib_gpu']), (['harness'], ['test_gpu']),
                         (['numerics', 'harness'], ['test_gpu', 'train_gpu']),
                         (['charlm'], ['extension', 'lib_gpu', 'train_cpu', 'train_gpu'])):
        v.stages = sel([], only)
        assert v.builds() == builds, only


def test_deadline_bounds_every_command(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_verify, 'OUT', str(tmp_path))
    v = gpu_verify.Verify(deadline=2)
    t = time.time()
    r = v.run(['sleep', '30'], timeout=600)
    assert r.returncode == 124 and time.time() - t < 10 and '[timed out after ' in r.stdout


def test_builds_from_elsewhere_are_removed_first(tmp_path):
    outputs = ['train_cpu', 'train_gpu', 'test_gpu', 'lib/libpyrnn_cuda.so', 'build/cflags', 'build/nvccflags',
               'pyrnn/_crnn.cpython-312-x86_64-linux-gnu.so']
    kept = ['data/train.bin', 'build/gpu_verify/site/cffi/__init__.py', '.whl/cffi-2.0.0-cp312.whl', 'pyrnn/nn.py']
    for f in outputs + kept:
        (tmp_path / f).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / f).write_text('x')
    assert sorted(gpu_verify.forget_foreign_builds(str(tmp_path), 'here')) == sorted(outputs)   # no stamp: foreign
    assert all((tmp_path / f).exists() for f in kept) and not any((tmp_path / f).exists() for f in outputs)
    (tmp_path / 'train_gpu').write_text('built here')
    assert gpu_verify.forget_foreign_builds(str(tmp_path), 'here') == []   # same machine: make decides
    assert gpu_verify.forget_foreign_builds(str(tmp_path), 'elsewhere') == ['train_gpu']


def test_runpath_problems_name_a_folder_that_is_not_here(tmp_path):
    cc = os.environ.get('CC', 'cc')
    if not shutil.which(cc) or not shutil.which('readelf'):
        pytest.skip('no C compiler or readelf')
    lib = tmp_path / 'venv' / 'lib'
    lib.mkdir(parents=True)
    (tmp_path / 'dep.c').write_text('int dep(void) { return 1; }\n')
    (tmp_path / 'main.c').write_text('int dep(void);\nint main(void) { return dep() - 1; }\n')
    subprocess.run([cc, '-shared', '-fPIC', str(tmp_path / 'dep.c'), '-o', str(lib / 'libdep.so')], check=True)
    subprocess.run([cc, str(tmp_path / 'main.c'), '-o', str(tmp_path / 'main'), f'-L{lib}', '-ldep',
                    f'-Wl,-rpath,{lib}'], check=True)
    assert gpu_verify.runpath_problems(str(tmp_path / 'main')) == []
    shutil.rmtree(tmp_path / 'venv')   # the machine it was built on
    problems = gpu_verify.runpath_problems(str(tmp_path / 'main'))
    assert problems[0] == f'its runpath names {lib}, which does not exist here'
    assert 'libdep.so not found' in problems[1:] or not shutil.which('ldd')


def test_bench_stage_reports_targets_not_failures(tmp_path, monkeypatch):
    """A missed speed target is a TARGET line with the shortfall, not a FAIL; the stage runs the
    reduced grid under a time limit that fits 4 minutes, with torch from the given Python."""
    monkeypatch.setattr(gpu_verify, 'OUT', str(tmp_path))
    monkeypatch.setenv('TORCH_PYTHON', fake_python(tmp_path / 'torch', ['numpy'], torch=True))
    v = gpu_verify.Verify()
    v.py, v.stage = sys.executable, 'bench'
    calls = []

    def fake_run(cmd, env=None, timeout=600, cwd=None):
        calls.append((cmd, timeout))
        if '--no-torch' in cmd:
            rows = [dict(cell='lstm', math='fp32', B=32, H=256, algo=a, pyrnn={'ms': 1.0 + i})
                    for i, a in enumerate(['standard', 'persist_static'])]
        else:
            rows = [dict(row(32, 1.4), pyrnn={'ms': 1.0, 'algo': 'persist_small_h'}, torch={'ms': 1.4}),
                    dict(row(256, 1.1), pyrnn={'ms': 2.0, 'algo': 'standard'}, torch={'ms': 2.2})]
        with open(cmd[cmd.index('--out') + 1], 'w') as f:
            json.dump(dict(results=rows, sides={}, targets=bench_gpu.check_targets(rows)), f)
        return subprocess.CompletedProcess(cmd, 0, '')
    monkeypatch.setattr(v, 'run', fake_run)
    assert gpu_verify.stage_bench(v) is True
    assert v.count('FAIL') == 0 and v.count('PASS') == 1
    assert [line for line in v.lines if line.startswith('TARGET')] == [
        'TARGET met: >= 1.0x torch at every shape: min 1.10x (lstm fp32 B=256 H=256) over 2 shapes',
        'TARGET missed: >= 1.5x torch at B=32: min 1.40x (lstm fp32 B=32 H=256) over 1 shapes; short: lstm fp32 B=32 '
        'H=256 1.40x (by 0.10x)']
    assert 'INFO bench algorithms lstm B=32 H=256: standard 1.00 ms, persist_static 2.00 ms' in v.lines
    (grid, t1), (algos, t2) = calls
    assert grid[grid.index('--torch-python') + 1] == os.environ['TORCH_PYTHON']
    assert ' '.join(gpu_verify.BENCH_GRID) in ' '.join(grid) and '--time-limit' in grid and '--no-torch' in algos
    assert t1 + t2 <= 240   # the stage's 4 minutes, even if both hit their timeouts


def test_charlm_check_on_the_stand_in(tmp_path):
    """gpu_verify's charlm check (scripts/gpu_charlm_check.py), run here on the stand-in library: CharLM(backend='cuda') agrees with
    backend 'c', and a cuda model saved with dropout and loaded again continues exactly."""
    so, why = build_cuda_stand_in(str(tmp_path))
    if not so:
        pytest.skip(why)
    import pyrnn
    from pyrnn import data
    text = b'ROMEO: But soft, what light through yonder window breaks?\n' * 40
    data.prepare(text, str(tmp_path / 'd'))
    vocab = pyrnn.Vocab.from_text(text.decode())
    lm = pyrnn.CharLM('lstm', len(vocab), 8, 16, 2, vocab=vocab, seed=1)
    lm.save(tmp_path / 'ck.bin')
    env = dict(os.environ, PYRNN_CUDA_LIB=so, OMP_NUM_THREADS='1')
    r = subprocess.run([sys.executable, gpu_verify.CHARLM_CHECK, str(tmp_path / 'ck.bin'),
                        str(tmp_path / 'd' / 'train.bin')], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res.pop('save / load exact') == 0.0
    assert set(res) >= {'loss', 'logits', 'h_n', 'c_n', 'grads', 'dh0', 'norm', 'params after a step'}
    assert all(x <= 1e-6 for x in res.values()), res


def test_make_gpu_wheels_downloads_for_the_gpu_machine():
    r = subprocess.run(['make', '-n', 'gpu_wheels'], cwd=ROOT, capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f'make -n failed: {r.stderr.strip()[-200:]}')
    cmd = ' '.join(r.stdout.replace('\\\n', ' ').split())
    for part in ('pip download', '--only-binary=:all:', '--python-version 3.12', '--implementation cp',
                 '--platform manylinux2014_x86_64', '-d .whl', 'cffi==', 'pycparser=='):
        assert part in cmd, part
    # the folder is ignored: it travels to the GPU machine only when carried
    r = subprocess.run(['git', 'check-ignore', '-q', '.whl/cffi.whl'], cwd=ROOT)
    assert r.returncode == 0
