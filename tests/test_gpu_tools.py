"""The GPU side's tools that run without a GPU: make gpu_verify's no-GPU path, the driver checks
of scripts/gpu_env.py and of train_gpu against a stand-in libcuda.so.1 (a few C functions that
report a chosen driver version and device count), the cuDNN / cuBLAS pins per CUDA version and the
wheels' folders, the benchmark's record of loaded libraries and its targets, and its torch side
against the C backend."""
import ctypes
import ctypes.util
import importlib
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = os.path.join(ROOT, 'scripts')
sys.path.insert(0, SCRIPTS)
gpu_env = importlib.import_module('gpu_env')
bench_gpu = importlib.import_module('bench_gpu')

# the driver API calls cudart (statically linked into train_gpu) and gpu_env.probe make before any
# device work: the version from FAKE_CUDA_VERSION, cuInit's status from FAKE_CUDA_INIT (100 = no device)
FAKE_LIBCUDA = r'''
#include <stdlib.h>
#include <string.h>
typedef int CUresult;
static int env(const char* name, int dflt) { const char* v = getenv(name); return v ? atoi(v) : dflt; }
CUresult cuDriverGetVersion(int* v) { *v = env("FAKE_CUDA_VERSION", 13000); return 0; }
CUresult cuInit(unsigned flags) { (void)flags; return env("FAKE_CUDA_INIT", 100); }
CUresult cuDeviceGetCount(int* n) { *n = 0; return env("FAKE_CUDA_INIT", 100); }
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
    env = dict(os.environ, PYRNN_LIBCUDA=str(tmp_path / 'missing' / 'libcuda.so.1'), GPU_VERIFY_OUT=str(tmp_path / 'out'))
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
    assert r.stdout.splitlines() == [f'gpu_verify: no CUDA device: the NVIDIA driver is installed ({_driver("13.0")}) '
                                     f'but sees no GPU; nothing was verified ({os.path.relpath(tmp_path / "summary.txt", ROOT)})']


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


@pytest.mark.parametrize('binary', ['train_gpu', 'test_gpu'])
def test_gpu_binaries_name_the_driver_problem(tmp_path, fake_libcuda, binary):
    """train_gpu / test_gpu (built by make gpu_build_check) against the stand-in driver: one line each
    for a driver too old for the build and for a driver without a device."""
    path = os.path.join(ROOT, binary)
    if not os.access(path, os.X_OK):
        pytest.skip(f'{binary} is not built (make gpu_build_check)')
    args = [path, str(tmp_path / 'ref.bin')] if binary == 'test_gpu' else [path]
    if binary == 'test_gpu':   # it reads a reference first: make a small one
        subprocess.run([sys.executable, '-m', 'pyrnn.reference', '--steps', '1', '-o', args[1]], cwd=ROOT, check=True,
                       capture_output=True)
    else:
        from pyrnn import data
        data.prepare(bytes(range(97, 123)) * 400, str(tmp_path / 'd'))
        args += ['-i', str(tmp_path / 'd' / 'train.bin'), '-j', '', '-o', str(tmp_path / 'o'), '-b', '2', '-t', '8',
                 '-n', '1', '-H', '8', '-E', '4', '-L', '1']
    runtime = None
    for version, init, expect in ((12040, 0, 'error: the NVIDIA driver is too old: found '),
                                  (99000, 100, 'error: no CUDA device found: the NVIDIA driver is installed')):
        env = dict(fake_env(version, init), LD_LIBRARY_PATH=str(fake_libcuda.parent))
        r = subprocess.run(args, env=env, capture_output=True, text=True, timeout=120)
        assert r.returncode == 1 and r.stderr.count('\n') == 1 and r.stderr.startswith(expect), r.stderr
        if version == 12040:
            assert 'for CUDA 12.4, this build uses CUDA 1' in r.stderr and 'which needs driver R' in r.stderr
            runtime = r.stderr
    assert runtime and 'rebuild with a CUDA 12 toolkit (nvcc 12: make cuda_deps then installs the -cu12 wheels)' in runtime


# ---- make cuda_deps: the pins follow nvcc's CUDA major version

NVCC_13 = 'nvcc: NVIDIA (R) Cuda compiler driver\nCuda compilation tools, release 13.0, V13.0.88\nBuild cuda_13.0.r13.0\n'
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


@pytest.mark.parametrize('text, wheel', [(NVCC_12, 'nvidia-cudnn-cu12==9.28.0.42'), (NVCC_13, 'nvidia-cudnn-cu13==9.28.1.4')])
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
    assert bench_gpu.check_targets([row(32, 1.6), row(64, 1.0), row(256, 1.2)])['ok']
    t = bench_gpu.check_targets([row(32, 1.4), row(64, 1.1)])
    assert not t['ok'] and t['lines'][0] == 'below target: lstm fp32 B=32 H=256: 1.40x torch (needs 1.5x)'
    t = bench_gpu.check_targets([row(32, 1.6), row(128, 0.9), row(128, 0.5, algo='standard')])
    assert not t['ok'] and len([l for l in t['lines'] if l.startswith('below target')]) == 1   # auto rows only
    missing = dict(row(32, 0), B=32)
    del missing['x_torch']
    t = bench_gpu.check_targets([row(64, 1.2), missing])
    assert not t['ok'] and '1 shape(s) without a pyrnn / torch ratio' in t['lines'][0]
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
