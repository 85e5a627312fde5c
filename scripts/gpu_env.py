#!/usr/bin/env python3
"""The GPU side's environment: which cuDNN / cuBLAS wheels go with the CUDA toolkit, whether this
machine has a usable NVIDIA GPU, and which libraries a process really loaded. Standard library
only, so it runs in any Python (the torch environment of scripts/bench_gpu.py too).

    python3 scripts/gpu_env.py deps [--nvcc PATH] [--dry-run]   # make cuda_deps: pip-install the pinned wheels
    python3 scripts/gpu_env.py probe [--nvcc PATH]              # one line about the GPU; exit 1 when there is none
    python3 scripts/gpu_env.py root cudnn|cublas|nccl           # the wheel's folder (include/, lib/), or nothing

The pins are the versions this project was checked against, one set per CUDA major version,
chosen by the major version of nvcc (`nvcc --version`): CUDA 13 toolkits (R580 drivers or newer)
take the -cu13 cuDNN and cuBLAS 13.0 (CUDA 13.0's own, so no newer driver is needed), CUDA 12
toolkits (R525 or newer) the -cu12 wheels.
"""
import argparse
import ctypes
import importlib.util
import os
import re
import shutil
import subprocess
import sys

PINNED = {
    13: ['nvidia-cudnn-cu13==9.28.1.4', 'nvidia-cublas==13.0.2.14'],
    12: ['nvidia-cudnn-cu12==9.28.0.42', 'nvidia-cublas-cu12==12.9.1.4'],
}
DRIVER_BRANCH = {13: 'R580', 12: 'R525'}   # the oldest driver of each CUDA major version (its x.0)


# ---- the toolkit and its wheels

def find_nvcc():
    """nvcc from $NVCC, the PATH, $CUDA_HOME/bin or /usr/local/cuda/bin; None if none."""
    for cand in (os.environ.get('NVCC'), shutil.which('nvcc'),
                 os.path.join(os.environ.get('CUDA_HOME', '/usr/local/cuda'), 'bin', 'nvcc'),
                 '/usr/local/cuda/bin/nvcc'):
        if cand and os.access(cand, os.X_OK):
            return cand
    return None


def parse_nvcc_version(text):
    """(major, minor) from `nvcc --version` output ('... release 13.0, V13.0.88')."""
    m = re.search(r'release (\d+)\.(\d+)', text)
    if not m:
        raise ValueError(f'no "release X.Y" in nvcc --version output: {text.strip()[-200:]!r}')
    return int(m.group(1)), int(m.group(2))


def nvcc_version(nvcc):
    r = subprocess.run([nvcc, '--version'], capture_output=True, text=True, timeout=60)
    if r.returncode != 0:
        raise ValueError(f'{nvcc} --version failed: {(r.stderr or r.stdout).strip()[-200:]}')
    return parse_nvcc_version(r.stdout)


def wheels_for(version):
    """The pinned pip requirements for a CUDA (major, minor)."""
    major = version[0]
    if major not in PINNED:
        raise ValueError(f'CUDA {version[0]}.{version[1]} is not supported: the GPU trainer needs a CUDA 12 or 13 '
                         f'toolkit (nvcc), with cuDNN 9')
    return list(PINNED[major])


def install_deps(nvcc, dry_run=False, pip_args=()):
    version = nvcc_version(nvcc)
    wheels = wheels_for(version)
    print(f'cuda_deps: nvcc {version[0]}.{version[1]} ({nvcc}) -> {" ".join(wheels)}', flush=True)
    cmd = [sys.executable, '-m', 'pip', 'install', '-q', '--disable-pip-version-check', *pip_args, *wheels]
    if dry_run:
        print(' '.join(cmd))
        return 0
    return subprocess.run(cmd).returncode


# the header each wheel ships, and the packages that may hold it (nvidia is a namespace package: the
# CUDA 13 cuBLAS wheel installs into nvidia/cu13, the CUDA 12 one into nvidia/cublas)
WHEEL_HEADERS = {
    'cudnn': ('cudnn.h', ('nvidia.cudnn',)),
    'cublas': ('cublas_v2.h', ('nvidia.cu13', 'nvidia.cublas')),
    'nccl': ('nccl.h', ('nvidia.nccl', 'nvidia.cu13')),
}


def wheel_root(library):
    """The folder of an installed wheel with include/<its header> and lib/: the Makefile's fallback when
    neither the toolkit nor the system has the library; '' when no wheel has it."""
    header, packages = WHEEL_HEADERS[library]
    for name in packages:
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            continue
        for path in (spec.submodule_search_locations or []) if spec else []:
            if os.path.exists(os.path.join(path, 'include', header)):
                return path
    return ''


# ---- the driver and the GPU

def driver_release():
    """'580.159.03' from the kernel module, or nvidia-smi; '' if neither says."""
    try:
        with open('/proc/driver/nvidia/version') as f:
            m = re.search(r'Kernel Module\s+(\S+)', f.readline())
            if m:
                return m.group(1)
    except OSError:
        pass
    if shutil.which('nvidia-smi'):
        try:
            r = subprocess.run(['nvidia-smi', '--query-gpu=driver_version', '--format=csv,noheader'],
                               capture_output=True, text=True, timeout=20)
            if r.returncode == 0 and r.stdout.strip():
                return r.stdout.strip().splitlines()[0]
        except (OSError, subprocess.TimeoutExpired):
            pass
    return ''


def probe(toolkit=None, libcuda=None):
    """(ok, line, info) about GPU 0 through the driver API, without building anything. toolkit:
    nvcc's (major, minor), to tell a driver too old for it. libcuda: the driver library to load
    ($PYRNN_LIBCUDA, else libcuda.so.1). Three failures are told apart: no driver, a driver too
    old for the toolkit, no device."""
    libcuda = libcuda or os.environ.get('PYRNN_LIBCUDA') or 'libcuda.so.1'
    need = (f'; the CUDA {toolkit[0]}.{toolkit[1]} toolkit here needs driver {DRIVER_BRANCH.get(toolkit[0], "?")} '
            'or newer') if toolkit else ''
    try:
        lib = ctypes.CDLL(libcuda)
    except OSError as e:
        return False, f'no NVIDIA driver: {libcuda} cannot be loaded ({e}){need}', {}
    version = ctypes.c_int(0)
    if lib.cuDriverGetVersion(ctypes.byref(version)) != 0:
        return False, f'no NVIDIA driver: cuDriverGetVersion failed in {libcuda}', {}
    release = driver_release()
    v = version.value
    cuda = f'CUDA {v // 1000}.{v % 1000 // 10}'
    driver = f'driver {release} for {cuda}' if release else f'a driver for {cuda}'
    info = {'driver': release, 'driver_cuda': f'{v // 1000}.{v % 1000 // 10}'}
    if toolkit and v // 1000 < toolkit[0]:
        return False, (f'the NVIDIA driver is too old: found {driver}, but the CUDA {toolkit[0]}.{toolkit[1]} toolkit '
                       f'(nvcc) needs driver {DRIVER_BRANCH.get(toolkit[0], "?")} or newer; update the driver or use a '
                       f'CUDA {v // 1000} toolkit'), info
    rc = lib.cuInit(0)
    count = ctypes.c_int(0)
    if rc == 0:
        rc = lib.cuDeviceGetCount(ctypes.byref(count))
    if rc == 100 or (rc == 0 and count.value < 1):   # CUDA_ERROR_NO_DEVICE
        return False, f'no CUDA device: the NVIDIA driver is installed ({driver}) but sees no GPU', info
    if rc != 0:
        return False, f'the NVIDIA driver does not start: cuInit / cuDeviceGetCount error {rc} ({driver})', info
    dev, name, major, minor = ctypes.c_int(0), ctypes.create_string_buffer(256), ctypes.c_int(0), ctypes.c_int(0)
    if lib.cuDeviceGet(ctypes.byref(dev), 0) == 0:
        lib.cuDeviceGetName(name, 256, dev)
        lib.cuDeviceGetAttribute(ctypes.byref(major), 75, dev)   # CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR
        lib.cuDeviceGetAttribute(ctypes.byref(minor), 76, dev)   # ..._MINOR
    info.update(name=name.value.decode(errors='replace'), count=count.value, sm=f'{major.value}{minor.value}')
    return True, f'{info["name"]} (sm_{info["sm"]}, {count.value} device(s)), {driver}', info


# ---- what a process loaded

def loaded_libraries(names=('libcudnn', 'libcublas'), maps=None):
    """{name: [paths]} of the shared libraries whose file name starts with each name, as mapped
    into this process (/proc/self/maps, or the text given)."""
    if maps is None:
        with open('/proc/self/maps') as f:
            maps = f.read()
    found = {n: set() for n in names}
    for line in maps.splitlines():
        parts = line.split(None, 5)
        if len(parts) < 6 or not parts[5].startswith('/'):
            continue
        path = parts[5].strip()
        base = os.path.basename(path)
        for n in names:
            if base.startswith(n + '.') or base.startswith(n + '_') or base.startswith(n + 'Lt'):
                found[n].add(path)
    return {n: sorted(p) for n, p in found.items()}


def library_versions(libraries):
    """cuDNN and cuBLAS versions ('9.28.1') of libraries already loaded in this process, asked
    through their own version calls; missing ones are left out."""
    out = {}
    for path in libraries.get('libcudnn', []):
        if os.path.basename(path).startswith('libcudnn.so'):
            try:
                v = ctypes.CDLL(path).cudnnGetVersion()
                out['cudnn'] = f'{v // 10000}.{v % 10000 // 100}.{v % 100}'
            except (OSError, AttributeError):
                pass
    for path in libraries.get('libcublas', []):
        if os.path.basename(path).startswith('libcublas.so'):
            try:
                lib, parts = ctypes.CDLL(path), []
                for prop in (0, 1, 2):   # MAJOR_VERSION, MINOR_VERSION, PATCH_LEVEL
                    x = ctypes.c_int(0)
                    if lib.cublasGetProperty(prop, ctypes.byref(x)) != 0:
                        raise OSError
                    parts.append(str(x.value))
                out['cublas'] = '.'.join(parts)
            except (OSError, AttributeError):
                pass
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    sub = ap.add_subparsers(dest='cmd', required=True)
    d = sub.add_parser('deps', help='pip-install the pinned cuDNN / cuBLAS wheels for nvcc\'s CUDA version')
    d.add_argument('--nvcc', default=None)
    d.add_argument('--dry-run', action='store_true', help='print the pip command only')
    p = sub.add_parser('probe', help='one line about GPU 0; exit status 1 without a usable one')
    p.add_argument('--nvcc', default=None)
    r = sub.add_parser('root', help='the folder of the wheel with this library, or nothing')
    r.add_argument('library', choices=sorted(WHEEL_HEADERS))
    args, rest = ap.parse_known_args(argv)
    if args.cmd == 'root':
        print(wheel_root(args.library))
        return 0
    nvcc = args.nvcc or find_nvcc()
    if args.cmd == 'deps':
        if not nvcc:
            print('error: nvcc not found (PATH, $NVCC, $CUDA_HOME/bin): the wheels follow its CUDA version',
                  file=sys.stderr)
            return 1
        try:
            return install_deps(nvcc, args.dry_run, rest)
        except ValueError as e:
            print(f'error: {e}', file=sys.stderr)
            return 1
    try:
        toolkit = nvcc_version(nvcc) if nvcc else None
    except (OSError, ValueError, subprocess.TimeoutExpired):
        toolkit = None
    ok, line, _ = probe(toolkit)
    print(line)
    return 0 if ok else 1


if __name__ == '__main__':
    sys.exit(main())
