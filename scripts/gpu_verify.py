#!/usr/bin/env python3
"""make gpu_verify: every promise of pyrnn's GPU trainer, checked on a machine with an NVIDIA GPU,
from a fresh checkout, offline if need be. You need not know the project: run `make gpu_verify`
and read out/gpu_verify/summary.txt (docs/gpu.md explains each line and gives the commands for a
GPU machine lent for 15 minutes).

Needs: the NVIDIA driver (R580 or newer for a CUDA 13 toolkit, R525 for CUDA 12), nvcc (CUDA 12 or
13), a C compiler, make, and a Python 3 with numpy. Everything is built here, on this machine;
nothing is installed outside the repository.

The Python that runs the checks: --python / $GPU_VERIFY_PYTHON, else the first with numpy of
$TORCH_PYTHON, /opt/torch/.venv/bin/python (the GPU machine's), this Python and python3 on the PATH,
preferring one that also has torch (the benchmark's other side). What it lacks of pytest, cffi,
pycparser and setuptools is installed into build/gpu_verify/site (on PYTHONPATH for every command):
from the wheels in $GPU_VERIFY_WHEELS (default .whl/, which `make gpu_wheels` fills), else from the
package index when one answers; never from an index when $GPU_VERIFY_OFFLINE=1. Only numpy is needed
by everything; pytest only by the numerics stage, cffi and pycparser only by the C extension (the
checkpoint sample and charlm checks).

Stages, in order; each writes PASS / FAIL / INFO / TARGET lines to out/gpu_verify/summary.txt and its
commands' output to out/gpu_verify/<stage>.log:
  gpu        the driver and GPU 0; without a usable GPU, one line saying why, and stop
  deps       the Python, its packages, cuDNN and cuBLAS (the pinned wheels when an index answers)
  build      what the selected stages need of train_cpu, test_cpu, train_gpu, test_gpu,
             lib/libpyrnn_cuda.so and the C extension, built here (outputs built elsewhere are removed
             first: another CPU's -march, another machine's runpath)
  data       tiny-shakespeare ($TINYSHAKESPEARE, else a download), else a generated corpus
  harness    test_gpu against the NumPy oracle: every cell, two shapes, each cuDNN algorithm in fp32
             (relative error <= 1e-4), and TF32 (error reported)
  train      train_gpu against train_cpu, same seed, data and flags, for lstm, gru and rnn: step 1
             within 1e-4, every step within CURVE_BOUND, final val within 0.03; and with dropout
  checkpoint a train_gpu checkpoint: `python -m pyrnn sample` gives train_gpu's own sample; train_cpu
             resumes it (step 101 within 1e-4); train_gpu resumes it exactly (same bytes), with dropout too
  charlm     CharLM(backend='cuda') against backend='c' on that checkpoint's weights: loss, logits,
             states, gradients, one AdamW step
  numerics   tests/test_numerics.py against train_gpu: a NaN gradient (PYRNN_FAULT_NAN_GRAD_STEP), an
             exploding learning rate, T=4096, V=256
  bench      scripts/bench_gpu.py on a reduced grid: train_gpu's step against PyTorch, its targets
             (>= 1.0x at every shape, >= 1.5x at B=32) as TARGET lines, then pyrnn's cuDNN algorithms
             against each other; at most 4 minutes
Every stage but bench takes 6 minutes together on an H200, builds included; bench is its own command
there (--only bench).

Options: --only STAGE... (these and what they need), --skip STAGE..., --python PY, --deadline S (no
command runs past S seconds from the start; the stages not reached are FAIL lines, and the summary
is written in time). Environment: GPU_VERIFY_PYTHON, TORCH_PYTHON (a Python with torch and CUDA for
the benchmark), GPU_VERIFY_WHEELS, GPU_VERIFY_OFFLINE=1, TINYSHAKESPEARE=input.txt, CUDNN_PATH /
CUBLAS_PATH as for make, GPU_VERIFY_OUT=folder for the results (GPU_VERIFY_BUILD for build/gpu_verify,
its scratch). Exit status 0 when no line is FAIL
(a missed speed target is a TARGET line, not a failure).
"""
import argparse
import concurrent.futures
import glob
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time

SCRIPTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(SCRIPTS)
sys.path.insert(0, SCRIPTS)
import gpu_env  # noqa: E402

OUT = os.environ.get('GPU_VERIFY_OUT') or os.path.join(ROOT, 'out', 'gpu_verify')
BUILD = os.environ.get('GPU_VERIFY_BUILD') or os.path.join(ROOT, 'build', 'gpu_verify')
SITE = os.path.join(BUILD, 'site')
STAGES = ['gpu', 'deps', 'build', 'data', 'harness', 'train', 'checkpoint', 'charlm', 'numerics', 'bench']
NEEDS = {'deps': ['gpu'], 'build': ['deps'], 'data': ['deps'], 'harness': ['build'], 'train': ['build', 'data'],
         'checkpoint': ['build', 'data'], 'charlm': ['checkpoint'], 'numerics': ['build'], 'bench': ['build']}
# what each stage runs, of the build's products ('extension': pyrnn/_crnn, the C extension)
BUILDS = {'harness': ['test_gpu'], 'train': ['train_cpu', 'train_gpu'],
          'checkpoint': ['train_cpu', 'train_gpu', 'extension'], 'charlm': ['lib_gpu', 'extension'],
          'numerics': ['train_gpu'], 'bench': ['lib_gpu']}
# what the build leaves in the checkout: removed first when it was built on another machine
OUTPUTS = ['train_cpu', 'test_cpu', 'train_gpu', 'test_gpu', 'lib/libpyrnn_cuda.so', 'build/cflags',
           'build/nvccflags', 'pyrnn/_crnn*.so', 'pyrnn/_crnn*.o']
KNOWN_PYTHONS = ['/opt/torch/.venv/bin/python']   # the lent GPU machine's Python (torch, numpy, pytest)
MODULES = ['numpy', 'pytest', 'cffi', 'pycparser', 'setuptools']
WHEEL_OF = {'numpy': 'numpy', 'pytest': 'pytest', 'cffi': 'cffi', 'pycparser': 'pycparser',
            'setuptools': 'setuptools'}
CELLS = ['rnn', 'rnn_relu', 'lstm', 'gru']
ALGOS = ['auto', 'standard', 'persist_static', 'persist_small_h']
HARNESS_TOL = 1e-4
STEP1_BOUND = 1e-4
# The C trainer and the NumPy oracle (different exp / tanh / sigmoid, different sum orders) stay
# within 7.2e-7 of each other over 300 steps of these models; cuDNN sums in other orders again,
# so the bound on any step's train loss is 10^4 times that, and the final val loss is the issue's.
CURVE_BOUND = 0.01
VAL_BOUND = 0.03
DROPOUT_VAL_BOUND = 0.05   # different masks on each side: the two runs are two draws
# train_gpu vs train_cpu: one model per cell, so that auto picks each cuDNN algorithm once
# (persist_static: H, E multiples of 128 for an LSTM; standard: a GRU with H > 128; small_h: H <= 256 RNN)
PARITY = {'lstm': ['-E', '128', '-H', '256'], 'gru': ['-E', '64', '-H', '256'], 'rnn': ['-E', '64', '-H', '128']}
PARITY_COMMON = ['-L', '2', '-b', '32', '-t', '64', '-n', '300', '-l', '2e-3', '-v', '100', '-s', '0', '-m', '0',
                 '-k', '0', '-S', '7']
# dropout on both trainers: the recipe's schedule (warmup, cosine) on a model the CPU trains in a minute
DROPOUT_RUN = ['-c', 'lstm', '-L', '2', '-E', '64', '-H', '256', '-b', '32', '-t', '64', '-l', '2e-3', '-u', '50',
               '-q', '0.1', '-p', '0.2', '-n', '300', '-v', '150', '-s', '0', '-m', '0', '-k', '0', '-S', '3']
CKPT_COMMON = ['-c', 'lstm', '-L', '2', '-E', '64', '-H', '128', '-b', '16', '-t', '64', '-n', '200', '-k', '100',
               '-v', '100', '-s', '0', '-S', '11']
SAMPLE = ['-m', '300', '-e', '0.8']
# the benchmark's reduced grid: both cells and both maths at the smallest and largest B and H of
# bench_gpu's full grid (B=32 for the 1.5x target), in at most BENCH_LIMIT s; then the algorithms
BENCH_GRID = ['--cells', 'lstm', 'gru', '--batch', '32', '256', '--hidden', '256', '1024', '--math', 'fp32', 'tf32']
BENCH_ALGOS = ['--cells', 'lstm', 'gru', '--batch', '32', '128', '--hidden', '256', '1024', '--math', 'fp32',
               '--algos', 'standard', 'persist_static', 'persist_small_h', '--no-torch']
# seconds of timing (no shape starts later), then what a command may take beyond that to start (torch's
# import), finish its last shape and report: 235 s together at most, within the stage's 4 minutes
BENCH_LIMIT, BENCH_ALGOS_LIMIT, BENCH_SLACK, BENCH_ALGOS_SLACK = 120, 40, 45, 30


class Verify:
    def __init__(self, deadline=None):
        os.makedirs(OUT, exist_ok=True)
        self.lines, self.t0 = [], time.time()
        self.deadline = self.t0 + deadline if deadline else None
        self.summary = os.path.join(OUT, 'summary.txt')
        self.env = dict(os.environ)
        self.py = None          # the Python that runs the checks
        self.nvcc = None
        self.toolkit = None
        self.gpu = {}
        self.data = None        # folder with train.bin / val.bin
        self.checkpoint = None
        self.stages = []        # the stages selected
        self.stage = 'gpu'
        with open(self.summary, 'w') as f:
            f.write(f'# make gpu_verify, {time.strftime("%Y-%m-%d %H:%M:%S")}, {git_rev()}\n')

    # -- results
    def record(self, status, name, detail, echo=True):
        line = f'{status} {name}: {detail}'
        self.lines.append(line)
        if echo:
            print(line, flush=True)
        with open(self.summary, 'a') as f:
            f.write(line + '\n')

    def check(self, ok, name, detail, echo=True):
        self.record('PASS' if ok else 'FAIL', name, detail, echo)
        return ok

    def count(self, status):
        return sum(line.startswith(status + ' ') for line in self.lines)

    def time_left(self):
        return None if self.deadline is None else self.deadline - time.time()

    # -- commands: output to the stage's log, never to the screen
    def log_path(self):
        return os.path.join(OUT, f'{self.stage}.log')

    def run(self, cmd, env=None, timeout=600, cwd=ROOT):
        """CompletedProcess with .stdout (stdout + stderr text); a timeout comes back as returncode 124.
        No command runs past the deadline."""
        cmd = [str(c) for c in cmd]
        left = self.time_left()
        if left is not None:
            timeout = max(1, min(timeout, int(left)))
        full_env = dict(self.env, **(env or {}))
        t = time.time()
        try:
            r = subprocess.run(cmd, cwd=cwd, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               timeout=timeout, text=True, errors='replace')
            rc, out = r.returncode, r.stdout
        except subprocess.TimeoutExpired as e:
            rc, out = 124, (e.stdout.decode(errors='replace') if isinstance(e.stdout, bytes) else e.stdout or '') + \
                f'\n[timed out after {timeout} s]'
        except OSError as e:
            rc, out = 127, str(e)
        with open(self.log_path(), 'a') as f:
            extra = ' '.join(f'{k}={v}' for k, v in (env or {}).items())
            f.write(f'$ {extra + " " if extra else ""}{shlex.join(cmd)}   # rc {rc}, {time.time() - t:.1f} s\n{out}\n')
        return subprocess.CompletedProcess(cmd, rc, out)

    def tail(self, r, n=2):
        lines = [line for line in r.stdout.strip().splitlines() if line.strip()]
        return ' | '.join(lines[-n:])[-400:] or f'exit status {r.returncode}'

    def builds(self):
        """What the selected stages need built."""
        return sorted({b for s in self.stages for b in BUILDS.get(s, [])})


def git_rev():
    try:
        r = subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], cwd=ROOT, capture_output=True, text=True,
                           timeout=10)
        return f'commit {r.stdout.strip()}' if r.returncode == 0 else 'not a git checkout'
    except OSError:
        return 'git not found'


# ---------------------------------------------------------------------------- stages

def stage_gpu(v):
    v.nvcc = gpu_env.find_nvcc()
    toolkit = None
    if v.nvcc:
        try:
            toolkit = gpu_env.nvcc_version(v.nvcc)
        except (OSError, ValueError, subprocess.TimeoutExpired):
            toolkit = None
    ok, line, info = gpu_env.probe(toolkit)
    if not ok:
        return v.check(False, 'gpu', line, echo=False)
    v.gpu = info
    v.check(True, 'gpu', line)
    if not v.nvcc or not toolkit:
        return v.check(False, 'gpu', 'nvcc not found or not working (PATH, $NVCC, $CUDA_HOME/bin): install the CUDA '
                                     'toolkit 12 or 13')
    v.toolkit = toolkit
    return v.check(True, 'nvcc', f'{v.nvcc}, CUDA {toolkit[0]}.{toolkit[1]}')


# -- deps: the Python, its packages, cuDNN and cuBLAS

PROBE = ('import importlib.util as u, sys; print("%d.%d" % sys.version_info[:2], '
         '" ".join(m for m in sys.argv[1:] if u.find_spec(m)))')


def python_has(py, modules, env=None):
    """(version, the modules of the list that py finds), or (None, set()) when py does not run."""
    try:
        r = subprocess.run([py, '-c', PROBE, *modules], capture_output=True, text=True, timeout=120, env=env,
                           cwd=BUILD if os.path.isdir(BUILD) else None)
    except (OSError, subprocess.TimeoutExpired):
        return None, set()
    if r.returncode != 0 or not r.stdout.split():
        return None, set()
    words = r.stdout.split()
    return words[0], set(words[1:])


def choose_python(explicit=None, candidates=None):
    """(python, why) to run the checks: explicit (--python, $GPU_VERIFY_PYTHON) when given, else of the
    candidates the first that has numpy, preferring one that has torch as well; (None, why) if none."""
    if explicit:
        version, has = python_has(explicit, ['numpy'])
        if version is None:
            return None, f'{explicit} does not run'
        if 'numpy' not in has:
            return None, f'{explicit} (Python {version}) has no numpy'
        return explicit, f'{explicit} (Python {version}, as asked)'
    if candidates is None:
        candidates = [os.environ.get('TORCH_PYTHON'), *KNOWN_PYTHONS, sys.executable, shutil.which('python3')]
    found, tried = [], []
    for py in dict.fromkeys(c for c in candidates if c):
        version, has = python_has(py, ['numpy', 'torch'])
        if version is None:
            tried.append(f'{py}: does not run')
        elif 'numpy' not in has:
            tried.append(f'{py}: no numpy')
        else:
            found.append((py, version, 'torch' in has))
    if not found:
        return None, 'no Python with numpy: ' + '; '.join(tried)
    py, version, torch = next((f for f in found if f[2]), found[0])
    return py, f'{py} (Python {version}{", with torch" if torch else ", no torch"})'


def wheels_folder():
    folder = os.environ.get('GPU_VERIFY_WHEELS') or os.path.join(ROOT, '.whl')
    return folder if os.path.isdir(folder) else None


def wheels_for(folder, modules):
    """The wheel files in folder for those modules (by distribution name)."""
    out = []
    for m in modules:
        dist = WHEEL_OF[m].replace('-', '_').lower()
        out += sorted(p for p in glob.glob(os.path.join(folder, '*.whl'))
                      if os.path.basename(p).split('-')[0].replace('-', '_').lower() == dist)
    return out


def header_version(root, header, names):
    """'9.28.1' from #defines in root/include/header, or '?'."""
    try:
        with open(os.path.join(root, 'include', header)) as f:
            text = f.read()
    except OSError:
        return '?'
    vals = [re.search(rf'#define\s+{n}\s+(\d+)', text) for n in names]
    return '.'.join(m.group(1) for m in vals) if all(vals) else '?'


def index_reachable(py):
    """Whether pip's package index answers (a machine without network fails fast here, not after
    pip's retries): a file:// index always does, an http(s) one if its host takes a connection."""
    import socket
    import urllib.parse
    url = os.environ.get('PIP_INDEX_URL')
    if not url:
        r = subprocess.run([py, '-m', 'pip', 'config', 'get', 'global.index-url'], capture_output=True, text=True,
                           timeout=60)
        url = r.stdout.strip() if r.returncode == 0 and r.stdout.strip() else 'https://pypi.org/simple'
    u = urllib.parse.urlparse(url)
    if u.scheme == 'file':
        return True
    try:
        socket.create_connection((u.hostname, u.port or (443 if u.scheme == 'https' else 80)), timeout=5).close()
        return True
    except OSError:
        return False


def stage_deps(v, explicit_python=None):
    py, why = choose_python(explicit_python or os.environ.get('GPU_VERIFY_PYTHON'))
    if not py:
        return v.check(False, 'deps', f'{why}; give one with --python or GPU_VERIFY_PYTHON')
    v.py = py
    os.makedirs(SITE, exist_ok=True)
    v.env['PYTHONPATH'] = os.pathsep.join(p for p in (SITE, os.environ.get('PYTHONPATH')) if p)
    pip = [py, '-m', 'pip', 'install', '-q', '--disable-pip-version-check', '--no-compile', '--upgrade',
           '--target', SITE]
    notes = []
    _, has = python_has(py, MODULES, v.env)
    missing = [m for m in MODULES if m not in has]
    folder = wheels_folder()
    if missing and folder:
        files = wheels_for(folder, missing)
        if files:
            v.run(pip + ['--no-index', '--no-deps'] + files, timeout=300)
            _, has = python_has(py, MODULES, v.env)
            got = [m for m in missing if m in has]
            if got:
                notes.append(f'{" ".join(got)}: from the wheels in {os.path.relpath(folder, ROOT)}')
            missing = [m for m in missing if m not in has]
    online = os.environ.get('GPU_VERIFY_OFFLINE') != '1' and index_reachable(py)
    if missing and online:
        v.run(pip + ['--retries', '1', '--timeout', '30'] + [WHEEL_OF[m] for m in missing], timeout=300)
        _, has = python_has(py, MODULES, v.env)
        got = [m for m in missing if m in has]
        if got:
            notes.append(f'{" ".join(got)}: from the package index')
        missing = [m for m in missing if m not in has]
    if not online:
        notes.append('no package index (or GPU_VERIFY_OFFLINE=1): nothing was downloaded')
    if 'numpy' in missing:
        return v.check(False, 'deps', f'{py} has no numpy, and it could not be installed (deps.log)')
    if 'pytest' in missing:
        notes.append('pytest is missing: the numerics stage will fail (a pytest wheel in GPU_VERIFY_WHEELS brings it)')
    ext = [m for m in ('cffi', 'pycparser', 'setuptools') if m in missing]
    if ext:
        notes.append(f'{" ".join(ext)} missing: the C extension cannot be built, so the checkpoint sample and charlm '
                     'checks will fail (`make gpu_wheels` downloads the wheels into .whl/)')
    # cuDNN and cuBLAS: the pinned wheels when an index answers, else whatever make finds (CUDNN_PATH, the
    # toolkit, the system, the Python's own nvidia wheels)
    pinned = False
    if not os.environ.get('CUDNN_PATH') and online:
        r = v.run(pip + ['--retries', '1', '--timeout', '60'] + gpu_env.wheels_for(v.toolkit), timeout=900)
        pinned = r.returncode == 0
    r = v.run(['make', '-s', 'gpu_info', f'PYTHON={py}'])
    roots = dict(re.findall(r'^(CUDNN_ROOT|CUBLAS_ROOT)=(.*)$', r.stdout, re.M))
    cudnn_root, cublas_root = roots.get('CUDNN_ROOT', ''), roots.get('CUBLAS_ROOT', '')
    for n in notes:
        v.record('INFO', 'deps', n)
    if not cudnn_root and not os.path.exists('/usr/include/cudnn.h'):
        return v.check(False, 'deps', f'cuDNN not found for {py}: set CUDNN_PATH, or install nvidia-cudnn-cu'
                                      f'{v.toolkit[0]} in it (make cuda_deps)')
    cudnn = header_version(cudnn_root, 'cudnn_version.h', ['CUDNN_MAJOR', 'CUDNN_MINOR', 'CUDNN_PATCHLEVEL'])
    cublas = header_version(cublas_root, 'cublas_api.h', ['CUBLAS_VER_MAJOR', 'CUBLAS_VER_MINOR', 'CUBLAS_VER_PATCH'])
    return v.check(True, 'deps', f'python {why}; cuDNN {cudnn} at {cudnn_root or "/usr"}; cuBLAS {cublas} at '
                                 f'{cublas_root or "/usr"}; ' + ('the pinned wheels' if pinned else 'not the pinned '
                                                                 'wheels (no index, or CUDNN_PATH)'))


# -- build: here, for this GPU

def machine_key(v):
    """What a build depends on beyond the sources: this CPU (-march=native), nvcc, the Python."""
    cpu = ''
    try:
        with open('/proc/cpuinfo') as f:
            text = f.read()
        cpu = ' '.join(re.findall(r'^(?:model name|flags)\s*:\s*(.*)$', text, re.M)[:2])
    except OSError:
        pass
    raw = f'{os.uname().machine}|{cpu}|{v.nvcc}|{v.py}'
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


def forget_foreign_builds(root, key):
    """Removes the build's outputs when they were not built with this key (on this machine, by this
    nvcc and Python): carried from another machine they would run another CPU's code or look for
    libraries where that machine had them, and make would take them as up to date. Returns them."""
    stamp = os.path.join(root, 'build', 'gpu_verify', 'built_on')
    try:
        with open(stamp) as f:
            if f.read().strip() == key:
                return []
    except OSError:
        pass
    removed = []
    for pattern in OUTPUTS:
        for path in glob.glob(os.path.join(root, pattern)):
            os.remove(path)
            removed.append(os.path.relpath(path, root))
    os.makedirs(os.path.dirname(stamp), exist_ok=True)
    with open(stamp, 'w') as f:
        f.write(key + '\n')
    return removed


def runpath_problems(path):
    """What keeps a built binary from loading its libraries here: RUNPATH folders that do not exist
    and libraries the loader cannot find (readelf / ldd; nothing said where they are missing)."""
    problems = []
    if shutil.which('readelf'):
        r = subprocess.run(['readelf', '-d', path], capture_output=True, text=True, timeout=60)
        for m in re.finditer(r'\((?:RUNPATH|RPATH)\)\s+Library r(?:un)?path: \[(.*)\]', r.stdout):
            problems += [f'its runpath names {d}, which does not exist here' for d in m.group(1).split(':')
                         if d and '$ORIGIN' not in d and not os.path.isdir(d)]
    if shutil.which('ldd'):
        r = subprocess.run(['ldd', path], capture_output=True, text=True, timeout=60)
        problems += [f'{line.split()[0]} not found' for line in r.stdout.splitlines() if 'not found' in line]
    return problems


def stage_build(v):
    wanted = v.builds()
    targets = [t for t in ('train_cpu', 'test_cpu', 'train_gpu', 'test_gpu', 'lib_gpu') if t in wanted]
    removed = forget_foreign_builds(ROOT, machine_key(v))
    if removed:
        v.record('INFO', 'build', f'removed what was built elsewhere (or by another nvcc or Python): '
                                  f'{" ".join(removed)}')
    if targets:
        sm = v.gpu.get('sm', '90')
        arch = f'GPU_ARCH=-gencode arch=compute_{sm},code=[sm_{sm},compute_{sm}]'
        jobs = str(min(os.cpu_count() or 2, len(targets) + 2))
        r = v.run(['make', '-j', jobs, f'PYTHON={v.py}', arch, *targets], timeout=900)
        if r.returncode != 0:
            return v.check(False, 'build', f'make failed: {v.tail(r)} (build.log)')
        warnings = len(re.findall(r'warning', r.stdout, re.I))
        binaries = {'train_gpu': 'train_gpu', 'test_gpu': 'test_gpu', 'lib_gpu': 'lib/libpyrnn_cuda.so'}
        bad = [f'{b}: {p}' for t, b in binaries.items() if t in targets
               for p in runpath_problems(os.path.join(ROOT, b))]
        if bad:
            return v.check(False, 'build', '; '.join(bad))
        v.check(True, 'build', f'{" ".join(targets)} for sm_{sm}, here; {warnings} compiler warnings (build.log)')
    if 'extension' in wanted:   # in place: python -m pyrnn sample and CharLM(backend='c') need it
        r = v.run([v.py, os.path.join('pyrnn', '_build.py')], timeout=600)
        v.check(r.returncode == 0, 'build pyrnn._crnn', 'the C extension (pyrnn/_build.py)' if r.returncode == 0 else
                f'pyrnn/_build.py failed: {v.tail(r, 1)} (no cffi or pycparser? `make gpu_wheels` brings them)')
    return True


def generated_corpus(n_bytes=1_100_000, seed=0):
    """Text-like bytes without a download: sentences of Zipf-distributed words, some capitalised
    names and dialogue lines, so that a char LM has structure to learn."""
    import random
    rng = random.Random(seed)
    words = ('the of and to a in that is was he for it with as his on be at by i this had not are but from or have an '
             'they which one you were her all she there would their we him been has when who will more no if out so '
             'said what up its about into than them can only other new some could time these two may then do first '
             'any my now such like our over man me even most made after also did many before must through back years '
             'where much your way well down should because each just those people lord king good love come shall '
             'thou thy thee hath doth sir night day heart death life eyes hand blood sweet fair').split()
    names = ['ROMEO', 'JULIET', 'KING', 'QUEEN', 'DUKE', 'NURSE', 'FRIAR', 'CAPULET']
    out, size = [], 0
    while size < n_bytes:
        lines = [rng.choice(names) + ':\n']
        for _ in range(rng.randint(1, 4)):
            n = rng.randint(4, 12)
            w = [words[min(int(rng.paretovariate(1.1)) - 1, len(words) - 1)] for _ in range(n)]
            lines.append(' '.join(w).capitalize() + rng.choice(['.', ',', '!', '?', ';']) + '\n')
        block = ''.join(lines) + '\n'
        out.append(block)
        size += len(block)
    return ''.join(out).encode()


def stage_data(v):
    data = os.path.join(BUILD, 'data')
    marker = os.path.join(data, 'source.txt')
    if os.path.exists(os.path.join(data, 'val.bin')) and os.path.exists(marker):
        v.data = data
        return v.check(True, 'data', f'{open(marker).read().strip()} (prepared earlier, {os.path.relpath(data, ROOT)})')
    os.makedirs(data, exist_ok=True)
    local = os.environ.get('TINYSHAKESPEARE') or os.environ.get('PYRNN_TINYSHAKESPEARE')
    cmd = [v.py, '-m', 'pyrnn', 'prepare', '--dataset', 'tinyshakespeare', '--out-dir', data]
    r = v.run(cmd + (['--input', local] if local else []), timeout=120)
    source = f'tiny-shakespeare from {local}' if local else 'tiny-shakespeare (downloaded)'
    if r.returncode != 0:
        if local:
            return v.check(False, 'data', f'TINYSHAKESPEARE={local}: {v.tail(r, 1)}')
        text_path = os.path.join(data, 'generated.txt')
        with open(text_path, 'wb') as f:
            f.write(generated_corpus())
        r = v.run([v.py, '-m', 'pyrnn', 'prepare', '--input', text_path, '--out-dir', data], timeout=120)
        if r.returncode != 0:
            return v.check(False, 'data', f'could not prepare a generated corpus: {v.tail(r, 1)}')
        source = 'a generated corpus of 1.1 MB (no download; TINYSHAKESPEARE=input.txt uses the real one)'
    with open(marker, 'w') as f:
        f.write(source + '\n')
    v.data = data
    return v.check(True, 'data', source)


# -- the compare-outputs harness

HARNESS_SHAPES = {   # name: pyrnn.reference flags
    'small': [],                                                       # V=13 E=10 H=16 L=2 B=3 T=8, 10 steps
    'large': ['--vocab', '65', '--embed', '48', '--hidden', '96', '-B', '16', '-T', '24', '--steps', '3',
              '--max-grad-norm', '0.1'],                               # several blocks per kernel, clipping on
}


def parse_harness(out):
    """(max relative error over the tensors, the algorithm line)."""
    errs = [float(m.group(1)) for m in re.finditer(r'rel err (\S+)', out)]
    algo = re.search(r'cuDNN RNN algorithm (.*)$', out, re.M)
    return (max(errs) if errs else float('nan')), (algo.group(1) if algo else '?')


def stage_harness(v):
    refs = os.path.join(BUILD, 'ref')
    os.makedirs(refs, exist_ok=True)
    made = []
    for cell in CELLS:
        for shape, flags in HARNESS_SHAPES.items():
            ref = os.path.join(refs, f'ref_{cell}_{shape}.bin')
            made.append((cell, shape, ref, [v.py, '-m', 'pyrnn.reference', '--cell', cell, *flags, '-o', ref]))
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        refs_made = list(pool.map(lambda m: (m, v.run(m[3], timeout=300)), made))
    jobs = []
    for (cell, shape, ref, _), r in refs_made:
        if r.returncode != 0:
            v.check(False, f'harness {cell}/{shape}', f'pyrnn.reference failed: {v.tail(r, 1)}')
            continue
        for algo in ALGOS:
            jobs.append((cell, shape, 'fp32', algo, [os.path.join(ROOT, 'test_gpu'), ref, '-algo', algo]))
        jobs.append((cell, shape, 'tf32', 'auto', [os.path.join(ROOT, 'test_gpu'), ref, '-tf32', '-tol', '1']))
    with concurrent.futures.ThreadPoolExecutor(8) as pool:   # the GPU takes several processes at once
        results = list(pool.map(lambda j: (j, v.run(j[4], timeout=300)), jobs))
    for (cell, shape, math, algo, _), r in results:
        name = f'harness {cell}/{shape} {math} {algo}'
        err, chosen = parse_harness(r.stdout)
        if r.returncode == 3 and algo.startswith('persist'):   # standard runs everywhere
            v.record('INFO', name, 'cuDNN does not run this algorithm at this shape')
        elif math == 'tf32':
            v.record('INFO' if r.returncode == 0 else 'FAIL', name,
                     f'max relative error {err:.2e} (TF32: reported, no bound); algorithm {chosen}' if r.returncode == 0
                     else v.tail(r))
        else:
            v.check(r.returncode == 0 and err <= HARNESS_TOL, name,
                    f'max relative error {err:.2e} (bound {HARNESS_TOL:g}); algorithm {chosen}' if err == err
                    else v.tail(r))


# -- train_gpu against train_cpu

def read_log(path):
    """({step: train_loss}, [(step, val_loss)]) from a log.jsonl."""
    train, val = {}, []
    with open(path) as f:
        for line in f:
            rec = json.loads(line)
            if 'train_loss' in rec:
                train[rec['step']] = rec['train_loss']
            if 'val_loss' in rec:
                val.append((rec['step'], rec['val_loss']))
    return train, val


def trainers(v):
    return os.path.join(ROOT, 'train_cpu'), os.path.join(ROOT, 'train_gpu')


def data_flags(v):
    return ['-i', os.path.join(v.data, 'train.bin'), '-j', os.path.join(v.data, 'val.bin')]


def gpu_algo(out):
    m = re.search(r'cuDNN RNN algorithm (\S+)', out)
    return m.group(1) if m else '?'


def compare_runs(v, name, dir_a, dir_b, val_bound, first_step=1):
    """PASS / FAIL lines for two runs' logs: the first step, every step, the final val."""
    try:
        (ta, va), (tb, vb) = read_log(os.path.join(dir_a, 'log.jsonl')), read_log(os.path.join(dir_b, 'log.jsonl'))
    except (OSError, ValueError) as e:
        return v.check(False, name, f'no readable log: {e}')
    steps = sorted(set(ta) & set(tb))
    if not steps or first_step not in ta or first_step not in tb or not va or not vb:
        return v.check(False, name, f'missing steps or val losses in the logs ({dir_a}, {dir_b})')
    d1 = abs(ta[first_step] - tb[first_step])
    dmax, at = max((abs(ta[s] - tb[s]), s) for s in steps)
    dval = abs(va[-1][1] - vb[-1][1])
    ok1 = v.check(d1 <= STEP1_BOUND, f'{name} step {first_step}', f'loss {ta[first_step]:.6f} vs {tb[first_step]:.6f}, '
                                                                   f'|diff| {d1:.1e} (bound {STEP1_BOUND:g})')
    ok2 = v.check(dmax <= CURVE_BOUND, f'{name} curve', f'max |diff| of the train loss over {len(steps)} steps '
                                                        f'{dmax:.1e} at step {at} (bound {CURVE_BOUND:g})')
    ok3 = v.check(dval <= val_bound, f'{name} final val', f'{va[-1][1]:.4f} vs {vb[-1][1]:.4f}, |diff| {dval:.4f} '
                                                          f'(bound {val_bound:g})')
    return ok1 and ok2 and ok3


def stage_train(v):
    """All pairs at once: the CPU runs share the cores, the GPU runs the GPU."""
    cpu, gpu = trainers(v)
    runs = dict(PARITY, dropout=None)
    threads = ['-P', str(max(1, (os.cpu_count() or 1) // len(runs)))]
    jobs = {}
    for name, model in runs.items():
        out = os.path.join(OUT, 'runs', f'parity_{name}' if model else 'dropout')
        fresh(out + '_cpu', out + '_gpu')
        flags = data_flags(v) + (['-c', name] + model + PARITY_COMMON if model else DROPOUT_RUN)
        jobs[name] = (out, [cpu, *flags, '-o', out + '_cpu', *threads],
                      [gpu, *flags, '-o', out + '_gpu'] + (['--math', 'fp32'] if model else []))
    with concurrent.futures.ThreadPoolExecutor(2 * len(jobs)) as pool:
        done = {name: (pool.submit(v.run, c, None, 600), pool.submit(v.run, g, None, 600))
                for name, (_, c, g) in jobs.items()}
        done = {name: (c.result(), g.result()) for name, (c, g) in done.items()}
    for name, (rc, rg) in done.items():
        out, model = jobs[name][0], runs[name]
        label = f'train {name}' if model else 'train dropout'
        if rc.returncode != 0 or rg.returncode != 0:
            v.check(False, label, f'cpu: {v.tail(rc, 1)}; gpu: {v.tail(rg, 1)}')
            continue
        if model:
            v.record('INFO', label, f'cuDNN algorithm {gpu_algo(rg.stdout)}; flags {" ".join(model + PARITY_COMMON)}')
            compare_runs(v, f'{label} gpu vs cpu', out + '_gpu', out + '_cpu', VAL_BOUND)
            continue
        (_, va), (_, vb) = read_log(os.path.join(out + '_gpu', 'log.jsonl')), read_log(os.path.join(out + '_cpu',
                                                                                                   'log.jsonl'))
        d = abs(va[-1][1] - vb[-1][1])
        v.check(d <= DROPOUT_VAL_BOUND, f'{label} (-p 0.2, {" ".join(DROPOUT_RUN[:8])}) gpu vs cpu final val',
                f'{va[-1][1]:.4f} vs {vb[-1][1]:.4f}, |diff| {d:.4f} (bound {DROPOUT_VAL_BOUND:g}: the masks differ)')


# -- checkpoints: sampling, resuming on both trainers, dropout determinism

def last_sample(out):
    blocks = re.findall(r'---- sample ----\n(.*?)\n----------------', out, re.S)
    return blocks[-1] if blocks else None


def same_bytes(a, b):
    try:
        with open(a, 'rb') as fa, open(b, 'rb') as fb:
            return fa.read() == fb.read()
    except OSError:
        return False


def fresh(*paths):
    """Run folders start empty: a resumed run appends to its log, and an old checkpoint must not pass for a new one."""
    for p in paths:
        shutil.rmtree(p, ignore_errors=True)


def stage_checkpoint(v):
    cpu, gpu = trainers(v)
    runs = os.path.join(OUT, 'runs')
    a = os.path.join(runs, 'ckpt_gpu')
    fresh(*[os.path.join(runs, d) for d in os.listdir(runs) if d.startswith('ckpt_')] if os.path.isdir(runs) else [])
    r = v.run([gpu, *data_flags(v), *CKPT_COMMON, *SAMPLE, '-o', a])
    if r.returncode != 0:
        return v.check(False, 'checkpoint', f'train_gpu: {v.tail(r, 1)}')
    v.checkpoint = os.path.join(a, 'ckpt_00000200.bin')
    ck100 = os.path.join(a, 'ckpt_00000100.bin')
    # the sample train_gpu printed at its last step (seed -S + 199) against python -m pyrnn sample
    own = last_sample(r.stdout)
    s = v.run([v.py, '-m', 'pyrnn', 'sample', v.checkpoint, '--length', '300', '--temperature', '0.8', '--seed',
               str(11 + 199)])
    theirs = s.stdout[:-1] if s.returncode == 0 and s.stdout.endswith('\n') else None
    v.check(own is not None and own == theirs, 'checkpoint sample',
            'python -m pyrnn sample on the GPU checkpoint gives train_gpu\'s own sample (300 characters)'
            if own == theirs
            else f'differ: train_gpu {own!r:.80} vs pyrnn sample {theirs!r:.80}')
    # train_cpu resumes the GPU checkpoint
    rc = v.run([cpu, *data_flags(v), '-r', ck100, '-n', '200', '-v', '100', '-s', '0', '-m', '0', '-o',
                os.path.join(runs, 'ckpt_resumed_cpu')])
    if rc.returncode != 0 or 'resuming from' not in rc.stdout:
        v.check(False, 'checkpoint resume on train_cpu', v.tail(rc))
    else:
        compare_runs(v, 'checkpoint resume on train_cpu vs train_gpu', os.path.join(runs, 'ckpt_resumed_cpu'), a,
                     VAL_BOUND, first_step=101)
    # train_gpu resumes it exactly: the same losses and the same checkpoint bytes at step 200, with and without dropout
    for tag, extra in (('', []), (' with dropout', ['-p', '0.2'])):
        d = os.path.join(runs, 'ckpt_gpu' + tag.replace(' with ', '_'))
        if extra:
            r = v.run([gpu, *data_flags(v), *CKPT_COMMON, *extra, '-m', '0', '-o', d])
            if r.returncode != 0:
                v.check(False, f'checkpoint resume on train_gpu{tag}', v.tail(r))
                continue
        d_res, d_again = d + '_resumed', d + '_again'
        r1 = v.run([gpu, *data_flags(v), *CKPT_COMMON, *extra, '-m', '0', '-r', os.path.join(d, 'ckpt_00000100.bin'),
                    '-o', d_res])
        ok = r1.returncode == 0 and same_bytes(os.path.join(d, 'ckpt_00000200.bin'),
                                               os.path.join(d_res, 'ckpt_00000200.bin'))
        t_a = read_log(os.path.join(d, 'log.jsonl'))[0]
        t_b = read_log(os.path.join(d_res, 'log.jsonl'))[0] if ok else {}
        ok = ok and all(t_a.get(s) is not None and t_a.get(s) == t_b.get(s) for s in range(101, 201))
        v.check(ok, f'checkpoint resume on train_gpu{tag}', 'steps 101-200 and ckpt_00000200.bin identical to the '
                                                            'uninterrupted run' if ok else f'differ ({v.tail(r1, 1)})')
        if extra:   # determinism per seed: a second run from scratch
            r2 = v.run([gpu, *data_flags(v), *CKPT_COMMON, *extra, '-m', '0', '-o', d_again])
            ok = r2.returncode == 0 and same_bytes(os.path.join(d, 'ckpt_00000200.bin'),
                                                   os.path.join(d_again, 'ckpt_00000200.bin'))
            v.check(ok, f'checkpoint determinism{tag}', 'two runs from the same seed write the same ckpt_00000200.bin'
                    if ok else f'the checkpoints differ ({v.tail(r2, 1)})')


CHARLM_CHECK = os.path.join(SCRIPTS, 'gpu_charlm_check.py')


def stage_charlm(v):
    ckpt = getattr(v, 'checkpoint', None)
    if not ckpt or not os.path.exists(ckpt):
        return v.check(False, 'charlm', 'no GPU checkpoint (the checkpoint stage failed)')
    r = v.run([v.py, CHARLM_CHECK, ckpt, os.path.join(v.data, 'train.bin')], timeout=300)
    try:
        res = json.loads(r.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return v.check(False, 'charlm', v.tail(r))
    exact = res.pop('save / load exact', None)
    ok = v.check(all(x <= HARNESS_TOL for x in res.values()), "charlm CharLM(backend='cuda') vs backend='c'",
                 ', '.join(f'{k} {x:.1e}' for k, x in res.items()) + f' (relative errors; bound {HARNESS_TOL:g})')
    return v.check(exact == 0.0, "charlm CharLM(backend='cuda') save / load",
                   'saved with dropout 0.2 and loaded again, it continues exactly (3 steps, every parameter)'
                   if exact == 0.0 else 'the loaded model does not continue as the saved one does') and ok


def stage_numerics(v):
    _, has = python_has(v.py, ['pytest'], v.env)
    if 'pytest' not in has:   # the other stages never needed it
        return v.check(False, 'numerics', f'pytest is not installed for {v.py}: put its wheel (and those it needs) '
                                          'in GPU_VERIFY_WHEELS, or install it')
    r = v.run([v.py, '-m', 'pytest', '-q', '-p', 'no:cacheprovider', 'tests/test_numerics.py'],
              env={'PYRNN_TRAIN_CPU': os.path.join(ROOT, 'train_gpu')}, timeout=600)
    return v.check(r.returncode == 0, 'numerics tests/test_numerics.py on train_gpu', v.tail(r, 1))


# -- the benchmark: its own stage, at most 4 minutes

def torch_python(v):
    """A Python with torch and CUDA for the benchmark's torch side: TORCH_PYTHON, else the one that
    runs the checks. Nothing is installed: torch is gigabytes, and the GPU machine has it."""
    import bench_gpu
    explicit = os.environ.get('TORCH_PYTHON')
    return bench_gpu.find_torch_python(explicit or v.py)


def stage_bench(v):
    tpy, note = torch_python(v)
    v.record('INFO', 'bench torch', note if tpy else f'no torch with CUDA ({note}); TORCH_PYTHON=python names one')
    out = os.path.join(OUT, 'bench_gpu.json')
    args = [v.py, os.path.join(SCRIPTS, 'bench_gpu.py'), '--out', out, '--time-limit', str(BENCH_LIMIT), *BENCH_GRID]
    r = v.run(args + (['--torch-python', tpy] if tpy else ['--no-torch']), timeout=BENCH_LIMIT + BENCH_SLACK)
    if r.returncode != 0 or not os.path.exists(out):
        return v.check(False, 'bench', v.tail(r))
    with open(out) as f:
        res = json.load(f)
    for side, s in res.get('sides', {}).items():
        libs = '; '.join(p for paths in s.get('libraries', {}).values() for p in paths)
        v.record('INFO', f'bench {side} loaded', f'{libs} {s.get("versions")}')
    for row in res['results']:
        p, t = row['pyrnn'], row.get('torch') or {}
        v.record('INFO', f"bench {row['cell']} {row['math']} B={row['B']} H={row['H']}",
                 f"pyrnn {p.get('ms', float('nan')):.2f} ms ({p.get('algo', p.get('error', '?'))}), torch "
                 f"{t.get('ms', float('nan')):.2f} ms, {row.get('x_torch', float('nan')):.2f}x", echo=False)
    for t in res['targets']['targets']:   # a missed target is a finding about speed, not a broken trainer
        v.record('TARGET', 'met' if t['met'] else 'missed', f"{t['target']}: {t['detail']}")
    for line in res['targets']['notes']:
        v.record('INFO', 'bench', line)
    v.check(True, 'bench', f"{len(res['results'])} shapes timed (bench_gpu.json)")
    # pyrnn's cuDNN algorithms against each other, fp32
    out2 = os.path.join(OUT, 'bench_algos.json')
    r = v.run([v.py, os.path.join(SCRIPTS, 'bench_gpu.py'), '--out', out2, '--time-limit', str(BENCH_ALGOS_LIMIT),
               *BENCH_ALGOS], timeout=BENCH_ALGOS_LIMIT + BENCH_ALGOS_SLACK)
    if r.returncode != 0 or not os.path.exists(out2):
        return v.check(False, 'bench algorithms', v.tail(r))
    with open(out2) as f:
        rows = json.load(f)['results']
    shapes = {}
    for row in rows:
        key = f"{row['cell']} B={row['B']} H={row['H']}"
        ms = row['pyrnn'].get('ms')
        shapes.setdefault(key, []).append(f"{row['algo']} {ms:.2f} ms" if ms else f"{row['algo']} -")
    for key, vals in shapes.items():
        v.record('INFO', f'bench algorithms {key}', ', '.join(vals))
    return True


STAGE_FNS = {'gpu': stage_gpu, 'deps': stage_deps, 'build': stage_build, 'data': stage_data, 'harness': stage_harness,
             'train': stage_train, 'checkpoint': stage_checkpoint, 'charlm': stage_charlm, 'numerics': stage_numerics,
             'bench': stage_bench}


def selected_stages(skip, only):
    """The stages to run, in order: those asked for (--only, else all) but --skip's, and what they need."""
    chosen = {s for s in (only or STAGES) if s not in skip}
    todo = list(chosen)
    while todo:
        for need in NEEDS.get(todo.pop(), []):
            if need not in chosen:
                chosen.add(need)
                todo.append(need)
    return [s for s in STAGES if s in chosen]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0], epilog=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--skip', nargs='+', default=[], choices=STAGES, metavar='STAGE')
    ap.add_argument('--only', nargs='+', default=None, choices=STAGES, metavar='STAGE',
                    help='these stages and what they need (e.g. --only bench: gpu, deps, build, bench)')
    ap.add_argument('--python', help='the Python that runs the checks (default: see above; $GPU_VERIFY_PYTHON)')
    ap.add_argument('--deadline', type=float, default=None, metavar='S',
                    help='no command runs past S seconds from the start (e.g. the 600 s of a lent machine)')
    args = ap.parse_args(argv)
    v = Verify(args.deadline)
    v.stages = selected_stages(args.skip, args.only)
    if not stage_gpu(v):   # no usable GPU: one line, in a second
        print(f'gpu_verify: {v.lines[-1].split(": ", 1)[1]}; nothing was verified ({os.path.relpath(v.summary, ROOT)})')
        with open(v.summary, 'a') as f:
            f.write('0 passed, 1 failed\n')
        return 1
    print(f'gpu_verify: {" ".join(v.stages)}; logs and the summary go to {os.path.relpath(OUT, ROOT)}/', flush=True)
    failed = set()
    for stage in v.stages[1:]:
        v.stage = stage
        broken = [n for n in NEEDS.get(stage, []) if n in failed]
        left = v.time_left()
        if broken or (left is not None and left < 5):
            v.check(False, stage, f'not run: the {broken[0]} stage failed' if broken else
                    f'not run: the deadline of {args.deadline:g} s was reached')
            failed.add(stage)
            continue
        print(f'== {stage}', flush=True)
        t = time.time()
        try:
            ok = STAGE_FNS[stage](v, args.python) if stage == 'deps' else STAGE_FNS[stage](v)
        except Exception as e:   # noqa: BLE001: a broken stage is a FAIL line, and the others still run
            ok = v.check(False, stage, f'{type(e).__name__}: {e}')
        with open(v.log_path(), 'a') as f:
            f.write(f'# stage {stage}: {time.time() - t:.0f} s\n')
        v.record('INFO', 'time', f'{stage} {time.time() - t:.0f} s', echo=False)
        if ok is False or (stage == 'data' and not v.data) or (stage == 'checkpoint' and not v.checkpoint):
            failed.add(stage)   # what needs it is not run
    n_pass, n_fail = v.count('PASS'), v.count('FAIL')
    met = sum(line.startswith('TARGET met') for line in v.lines)
    missed = sum(line.startswith('TARGET missed') for line in v.lines)
    total = f'{n_pass} passed, {n_fail} failed'
    if met + missed:
        total += f'; speed targets: {met} met, {missed} missed'
    with open(v.summary, 'a') as f:
        f.write(f'# {time.time() - v.t0:.0f} s\n{total}\n')
    print(f'gpu_verify: {total} in {time.time() - v.t0:.0f} s; {os.path.relpath(v.summary, ROOT)}')
    return 1 if n_fail else 0


if __name__ == '__main__':
    sys.exit(main())
