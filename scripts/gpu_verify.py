#!/usr/bin/env python3
"""make gpu_verify: every promise of pyrnn's GPU trainer, checked in one command on a machine with
an NVIDIA GPU. You need not know the project: run `make gpu_verify` in a fresh clone and read
out/gpu_verify/summary.txt (docs/gpu.md explains each line).

Needs: the NVIDIA driver (R580 or newer for a CUDA 13 toolkit, R525 for CUDA 12), Python 3 with
venv and pip, nvcc (CUDA 12 or 13), a C compiler and make; internet for pip (else see docs/gpu.md). Nothing
is installed outside the repository: Python packages go into a venv of its own,
build/gpu_verify/venv, and torch (for the benchmark) into another, build/gpu_verify/venv-torch,
unless a Python that has torch with CUDA is found (TORCH_PYTHON, or python3).

Stages, in order; each writes PASS / FAIL / INFO lines to out/gpu_verify/summary.txt and its
commands' output to out/gpu_verify/<stage>.log:
  gpu        the driver and GPU 0; without a usable GPU, one line saying why, and stop
  deps       the venv: numpy, cffi, pytest, setuptools and the pinned cuDNN / cuBLAS wheels (make cuda_deps)
  build      train_cpu, test_cpu, the cffi extension, train_gpu, test_gpu, lib/libpyrnn_cuda.so
  data       tiny-shakespeare ($TINYSHAKESPEARE, else a download), else a generated corpus
  harness    test_gpu against the NumPy oracle: every cell, two shapes, each cuDNN algorithm in fp32
             (relative error <= 1e-4), and TF32 (error reported)
  train      train_gpu against train_cpu, same seed, data and flags, for lstm, gru and rnn: step 1
             within 1e-4, every step within CURVE_BOUND, final val within 0.03
  checkpoint a train_gpu checkpoint: `python -m pyrnn sample` gives train_gpu's own sample; train_cpu
             resumes it (step 101 within 1e-4); train_gpu resumes it exactly (same bytes), with dropout too
  charlm     CharLM(backend='cuda') against backend='c' on that checkpoint's weights: loss, logits,
             states, gradients, one AdamW step
  numerics   tests/test_numerics.py against train_gpu: a NaN gradient (PYRNN_FAULT_NAN_GRAD_STEP), an
             exploding learning rate, T=4096, V=256
  bench      scripts/bench_gpu.py: train_gpu's step against PyTorch (targets: >= 1.0x, >= 1.5x at B=32),
             then pyrnn's cuDNN algorithms against each other

Environment: TINYSHAKESPEARE=input.txt (a local copy); TORCH_PYTHON=python with torch (CUDA);
GPU_VERIFY_WHEELS=folder of wheels for what pip cannot download; GPU_VERIFY_OFFLINE=1 never downloads
(uses what the invoking python3 has, cuDNN included); CUDNN_PATH / CUBLAS_PATH as for make. Options:
--skip STAGE... (e.g. --skip bench), --only STAGE... GPU_VERIFY_OUT=folder writes the results there instead.
Exit status 0 when nothing failed, else 1.
"""
import argparse
import concurrent.futures
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
import time

SCRIPTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(SCRIPTS)
sys.path.insert(0, SCRIPTS)
import gpu_env  # noqa: E402

OUT = os.environ.get('GPU_VERIFY_OUT') or os.path.join(ROOT, 'out', 'gpu_verify')
BUILD = os.path.join(ROOT, 'build', 'gpu_verify')
STAGES = ['gpu', 'deps', 'build', 'data', 'harness', 'train', 'checkpoint', 'charlm', 'numerics', 'bench']
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
CKPT_COMMON = ['-c', 'lstm', '-L', '2', '-E', '64', '-H', '128', '-b', '16', '-t', '64', '-n', '200', '-k', '100',
               '-v', '100', '-s', '0', '-S', '11']
SAMPLE = ['-m', '300', '-e', '0.8']


class Verify:
    def __init__(self):
        os.makedirs(OUT, exist_ok=True)
        self.lines, self.t0 = [], time.time()
        self.summary = os.path.join(OUT, 'summary.txt')
        self.env = dict(os.environ)
        self.py = None          # the venv's python
        self.nvcc = None
        self.gpu = {}
        self.data = None        # folder with train.bin / val.bin
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

    def failed(self):
        return sum(l.startswith('FAIL') for l in self.lines)

    # -- commands: output to the stage's log, never to the screen
    def log_path(self):
        return os.path.join(OUT, f'{self.stage}.log')

    def run(self, cmd, env=None, timeout=600, cwd=ROOT):
        """CompletedProcess with .out (stdout + stderr text); a timeout comes back as returncode 124."""
        cmd = [str(c) for c in cmd]
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
        lines = [l for l in r.stdout.strip().splitlines() if l.strip()]
        return ' | '.join(lines[-n:])[-400:] or f'exit status {r.returncode}'


def git_rev():
    try:
        r = subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], cwd=ROOT, capture_output=True, text=True, timeout=10)
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
                                     'toolkit 12 or 13', echo=False)
    v.toolkit = toolkit
    return v.check(True, 'nvcc', f'{v.nvcc}, CUDA {toolkit[0]}.{toolkit[1]}')


def importable(py, modules):
    """The modules of the list that py cannot import."""
    code = 'import importlib.util as u, sys; print(" ".join(m for m in sys.argv[1:] if u.find_spec(m) is None))'
    r = subprocess.run([py, '-c', code, *modules], capture_output=True, text=True, timeout=120)
    return r.stdout.split() if r.returncode == 0 else list(modules)


def add_fallback_paths(v):
    """Lets the venv import what the invoking python3 has (numpy, cffi, a cuDNN wheel) when pip
    cannot fetch them: a .pth file listing that python's site-packages, after the venv's own."""
    r = subprocess.run([v.py, '-c', 'import sysconfig; print(sysconfig.get_paths()["purelib"])'],
                       capture_output=True, text=True, timeout=60)
    site = r.stdout.strip()
    paths = [p for p in dict.fromkeys([sysconfig.get_paths()['purelib'], sysconfig.get_paths()['platlib'],
                                        *sys.path]) if p and os.path.isdir(p) and 'site-packages' in p]
    with open(os.path.join(site, 'zz_gpu_verify_fallback.pth'), 'w') as f:
        f.write('\n'.join(paths) + '\n')
    return paths


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


def stage_deps(v):
    venv = os.path.join(BUILD, 'venv')
    v.py = os.path.join(venv, 'bin', 'python')
    if not os.path.exists(v.py):
        r = v.run([sys.executable, '-m', 'venv', venv], timeout=300)
        if r.returncode != 0:   # no ensurepip (Debian without python3-venv): a venv without pip, filled by ours
            r = v.run([sys.executable, '-m', 'venv', '--without-pip', venv], timeout=300)
        if r.returncode != 0:
            return v.check(False, 'deps', f'{sys.executable} -m venv failed ({v.tail(r, 1)}); on Debian / Ubuntu: '
                                          'apt-get install python3-venv')
    has_pip = not importable(v.py, ['pip'])
    pip = [v.py, '-m', 'pip'] if has_pip else [sys.executable, '-m', 'pip', '--python', v.py]
    pip += ['install', '-q', '--disable-pip-version-check', '--retries', '1', '--timeout', '30']
    notes = []
    wheels = os.environ.get('GPU_VERIFY_WHEELS')
    online = os.environ.get('GPU_VERIFY_OFFLINE') != '1' and index_reachable(v.py)
    if not online:
        notes.append('no package index reachable (or GPU_VERIFY_OFFLINE=1): nothing downloaded')
    # numpy and pytest are needed by every check; cffi (and setuptools, which builds with it) by the
    # checks of the Python bindings and `python -m pyrnn sample` only. Each comes from pip, else from
    # what the invoking python3 has, else from the wheels in GPU_VERIFY_WHEELS.
    base = ['numpy', 'pytest', 'cffi', 'setuptools']
    missing = importable(v.py, base)
    if missing and online:
        v.run(pip + (['--find-links', wheels] if wheels else []) + ['numpy', 'cffi', 'pytest', 'setuptools', 'pycparser'],
              timeout=600)
        missing = importable(v.py, base)
    fallback = False
    if missing:
        add_fallback_paths(v)
        fallback = True
        found = [m for m in missing if m not in importable(v.py, missing)]
        if found:
            notes.append(f'{" ".join(found)}: from {sys.executable}\'s site-packages')
        missing = importable(v.py, base)
    if missing and wheels:
        for m in missing:   # one at a time: a wheel missing from the folder must not stop the others
            v.run(pip + ['--no-index', '--find-links', wheels, m], timeout=300)
        found = [m for m in missing if m not in importable(v.py, missing)]
        if found:
            notes.append(f'{" ".join(found)}: from the wheels in {wheels}')
        missing = importable(v.py, base)
    if 'numpy' in missing or 'pytest' in missing:
        return v.check(False, 'deps', f'missing {" ".join(missing)}: pip could not install them (see deps.log); '
                                      'give GPU_VERIFY_WHEELS=folder with their wheels')
    if missing:
        v.check(False, 'deps', f'missing {" ".join(missing)}: the checks of the Python bindings will fail; give '
                               'GPU_VERIFY_WHEELS=folder with the cffi, pycparser (and setuptools) wheels')
    # cuDNN and cuBLAS: the pinned wheels (make cuda_deps's), else whatever make finds (CUDNN_PATH, the
    # toolkit, the system, a wheel the invoking python3 has)
    pinned = False
    if not os.environ.get('CUDNN_PATH'):
        wanted = gpu_env.wheels_for(v.toolkit)
        if online or wheels:
            links = ['--find-links', wheels] if wheels else []
            r = v.run(pip + links + ([] if online else ['--no-index']) + ['--timeout', '60'] + wanted, timeout=1200)
            pinned = r.returncode == 0
        if not pinned:
            if not fallback:
                add_fallback_paths(v)
                fallback = True
            notes.append(f'the pinned {" ".join(wanted)} could not be installed: using the cuDNN and cuBLAS that are there')
    r = v.run(['make', '-s', 'gpu_info', f'PYTHON={v.py}'])
    roots = dict(re.findall(r'^(CUDNN_ROOT|CUBLAS_ROOT)=(.*)$', r.stdout, re.M))
    cudnn_root, cublas_root = roots.get('CUDNN_ROOT', ''), roots.get('CUBLAS_ROOT', '')
    if not cudnn_root and not os.path.exists('/usr/include/cudnn.h'):
        return v.check(False, 'deps', 'cuDNN not found: no network for pip (see deps.log) and none installed; set '
                                      'CUDNN_PATH, or give GPU_VERIFY_WHEELS with the wheels of `make cuda_deps`')
    cudnn = header_version(cudnn_root, 'cudnn_version.h', ['CUDNN_MAJOR', 'CUDNN_MINOR', 'CUDNN_PATCHLEVEL'])
    cublas = header_version(cublas_root, 'cublas_api.h', ['CUBLAS_VER_MAJOR', 'CUBLAS_VER_MINOR', 'CUBLAS_VER_PATCH'])
    detail = (f'venv {os.path.relpath(venv, ROOT)}; cuDNN {cudnn} at {cudnn_root or "/usr"}; cuBLAS {cublas} at '
              f'{cublas_root or "/usr"}; ' + ('the pinned wheels' if pinned else 'not the pinned wheels'))
    for n in notes:
        v.record('INFO', 'deps', n)
    return v.check(True, 'deps', detail)


def stage_build(v):
    sm = v.gpu.get('sm', '90')
    arch = f'GPU_ARCH=-gencode arch=compute_{sm},code=[sm_{sm},compute_{sm}]'
    jobs = str(min(os.cpu_count() or 2, 8))
    r = v.run(['make', '-j', jobs, f'PYTHON={v.py}', arch, 'train_cpu', 'test_cpu', 'train_gpu', 'test_gpu', 'lib_gpu'],
              timeout=1200)
    if r.returncode != 0:
        return v.check(False, 'build', f'make failed: {v.tail(r)} (build.log)')
    warnings = len(re.findall(r'warning', r.stdout, re.I))
    v.check(True, 'build', f'train_cpu test_cpu train_gpu test_gpu lib/libpyrnn_cuda.so for sm_{sm}; {warnings} '
                           'compiler warnings (build.log)')
    # the cffi extension, in place: python -m pyrnn sample and the bindings need it (and cffi), the rest does not
    r = v.run([v.py, os.path.join('pyrnn', '_build.py')], timeout=600)
    v.check(r.returncode == 0, 'build pyrnn._crnn', 'the cffi extension (pyrnn/_build.py)' if r.returncode == 0 else
            f'pyrnn/_build.py failed: {v.tail(r, 1)} (no cffi? GPU_VERIFY_WHEELS=folder with the cffi and pycparser wheels)')
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
    jobs = []
    for cell in CELLS:
        for shape, flags in HARNESS_SHAPES.items():
            ref = os.path.join(refs, f'ref_{cell}_{shape}.bin')
            r = v.run([v.py, '-m', 'pyrnn.reference', '--cell', cell, *flags, '-o', ref], timeout=300)
            if r.returncode != 0:
                v.check(False, f'harness {cell}/{shape}', f'pyrnn.reference failed: {v.tail(r, 1)}')
                continue
            for algo in ALGOS:
                jobs.append((cell, shape, 'fp32', algo, [os.path.join(ROOT, 'test_gpu'), ref, '-algo', algo]))
            jobs.append((cell, shape, 'tf32', 'auto', [os.path.join(ROOT, 'test_gpu'), ref, '-tf32', '-tol', '1']))
    with concurrent.futures.ThreadPoolExecutor(4) as pool:   # the GPU takes a few processes at once
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


def run_pair(v, cpu_args, gpu_args, timeout=600):
    """train_cpu and train_gpu at once (the CPU run needs the cores, the GPU run the GPU)."""
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        cpu = pool.submit(v.run, cpu_args, None, timeout)
        gpu = pool.submit(v.run, gpu_args, None, timeout)
        return cpu.result(), gpu.result()


def gpu_algo(out):
    m = re.search(r'cuDNN RNN algorithm (\S+)', out)
    return m.group(1) if m else '?'


def compare_runs(v, name, dir_a, dir_b, val_bound, first_step=1):
    """PASS / FAIL lines for two runs' logs: the first step, every step, the final val."""
    (ta, va), (tb, vb) = read_log(os.path.join(dir_a, 'log.jsonl')), read_log(os.path.join(dir_b, 'log.jsonl'))
    steps = sorted(set(ta) & set(tb))
    if not steps or first_step not in ta or first_step not in tb or not va or not vb:
        return v.check(False, name, f'missing steps or val losses in the logs ({dir_a}, {dir_b})')
    d1 = abs(ta[first_step] - tb[first_step])
    dmax, at = max((abs(ta[s] - tb[s]), s) for s in steps)
    dval = abs(va[-1][1] - vb[-1][1])
    ok1 = v.check(d1 <= STEP1_BOUND, f'{name} step {first_step}', f'loss {ta[first_step]:.6f} vs {tb[first_step]:.6f}, '
                                                                   f'|diff| {d1:.1e} (bound {STEP1_BOUND:g})')
    ok2 = v.check(dmax <= CURVE_BOUND, f'{name} curve', f'max |diff| of the train loss over {len(steps)} steps {dmax:.1e} '
                                                        f'at step {at} (bound {CURVE_BOUND:g})')
    ok3 = v.check(dval <= val_bound, f'{name} final val', f'{va[-1][1]:.4f} vs {vb[-1][1]:.4f}, |diff| {dval:.4f} '
                                                          f'(bound {val_bound:g})')
    return ok1 and ok2 and ok3


def stage_train(v):
    cpu, gpu = trainers(v)
    threads = ['-P', str(os.cpu_count() or 1)]
    for cell, model in PARITY.items():
        out = os.path.join(OUT, 'runs', f'parity_{cell}')
        fresh(out + '_cpu', out + '_gpu')
        flags = data_flags(v) + ['-c', cell] + model + PARITY_COMMON
        rc, rg = run_pair(v, [cpu, *flags, '-o', out + '_cpu', *threads], [gpu, *flags, '-o', out + '_gpu', '--math', 'fp32'])
        if rc.returncode != 0 or rg.returncode != 0:
            v.check(False, f'train {cell}', f'cpu: {v.tail(rc, 1)}; gpu: {v.tail(rg, 1)}')
            continue
        v.record('INFO', f'train {cell}', f'cuDNN algorithm {gpu_algo(rg.stdout)}; flags {" ".join(model + PARITY_COMMON)}')
        compare_runs(v, f'train {cell} gpu vs cpu', out + '_gpu', out + '_cpu', VAL_BOUND)
    # dropout: the README's recipe shape, shortened; different masks, so the final val losses agree loosely
    out = os.path.join(OUT, 'runs', 'dropout')
    fresh(out + '_cpu', out + '_gpu')
    flags = data_flags(v) + ['-c', 'lstm', '-L', '2', '-E', '128', '-H', '512', '-b', '32', '-t', '128', '-l', '2e-3',
                             '-u', '100', '-q', '0.1', '-p', '0.2', '-n', '400', '-v', '200', '-s', '0', '-m', '0', '-S', '3']
    rc, rg = run_pair(v, [cpu, *flags, '-o', out + '_cpu', *threads], [gpu, *flags, '-o', out + '_gpu'])
    if rc.returncode != 0 or rg.returncode != 0:
        return v.check(False, 'train dropout', f'cpu: {v.tail(rc, 1)}; gpu: {v.tail(rg, 1)}')
    (_, va), (_, vb) = read_log(os.path.join(out + '_gpu', 'log.jsonl')), read_log(os.path.join(out + '_cpu', 'log.jsonl'))
    d = abs(va[-1][1] - vb[-1][1])
    v.check(d <= DROPOUT_VAL_BOUND, 'train dropout (-p 0.2, 2x512 LSTM, 400 steps) gpu vs cpu final val',
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
            'python -m pyrnn sample on the GPU checkpoint gives train_gpu\'s own sample (300 characters)' if own == theirs
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
        ok = r1.returncode == 0 and same_bytes(os.path.join(d, 'ckpt_00000200.bin'), os.path.join(d_res, 'ckpt_00000200.bin'))
        t_a, t_b = read_log(os.path.join(d, 'log.jsonl'))[0], read_log(os.path.join(d_res, 'log.jsonl'))[0] if ok else {}
        ok = ok and all(t_a.get(s) is not None and t_a.get(s) == t_b.get(s) for s in range(101, 201))
        v.check(ok, f'checkpoint resume on train_gpu{tag}', 'steps 101-200 and ckpt_00000200.bin identical to the '
                                                            'uninterrupted run' if ok else f'differ ({v.tail(r1, 1)})')
        if extra:   # determinism per seed: a second run from scratch
            r2 = v.run([gpu, *data_flags(v), *CKPT_COMMON, *extra, '-m', '0', '-o', d_again])
            ok = r2.returncode == 0 and same_bytes(os.path.join(d, 'ckpt_00000200.bin'),
                                                   os.path.join(d_again, 'ckpt_00000200.bin'))
            v.check(ok, f'checkpoint determinism{tag}', 'two runs from the same seed write the same ckpt_00000200.bin'
                    if ok else f'the checkpoints differ ({v.tail(r2, 1)})')


CHARLM_CHECK = r'''
import json, sys
import numpy as np
from pyrnn import CharLM, data
ckpt, train_bin = sys.argv[1], sys.argv[2]
ids, vocab = data.read_tokens(train_bin)
B, T = 8, 64
x = np.asarray(ids[:B * T], np.int32).reshape(B, T)
y = np.asarray(ids[1:B * T + 1], np.int32).reshape(B, T)
def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))
from pyrnn.checkpoint import read_checkpoint
ck = read_checkpoint(ckpt)
out, m = {}, {}
for b in ('c', 'cuda'):   # the checkpoint's weights, fresh AdamW state on both
    m[b] = CharLM(ck['cell'], ck['vocab_size'], ck['embed_size'], ck['hidden_size'], ck['num_layers'], backend=b)
    m[b].load_state_dict(ck['params'])
loss = {b: m[b].forward(x, y) for b in m}
out['loss'] = rel(loss['cuda'], loss['c'])
out['logits'] = rel(m['cuda'].logits, m['c'].logits)
out['h_n'] = rel(m['cuda'].h_n, m['c'].h_n)
if m['c'].c_n is not None:
    out['c_n'] = rel(m['cuda'].c_n, m['c'].c_n)
for b in m:
    m[b].zero_grad(); m[b].backward()
g = {b: np.concatenate([t.ravel() for t in m[b].grad.values()]) for b in m}
out['grads'] = rel(g['cuda'], g['c'])
out['dh0'] = rel(m['cuda'].dh0, m['c'].dh0)
norm = {b: m[b].step(2e-3, weight_decay=0.01, max_grad_norm=1.0) for b in m}
out['norm'] = rel(norm['cuda'], norm['c'])
p = {b: np.concatenate([t.ravel() for t in m[b].state_dict().values()]) for b in m}
out['params after a step'] = rel(p['cuda'], p['c'])
print(json.dumps(out))
'''


def stage_charlm(v):
    ckpt = getattr(v, 'checkpoint', None)
    if not ckpt or not os.path.exists(ckpt):
        return v.check(False, 'charlm', 'no GPU checkpoint (the checkpoint stage failed)')
    r = v.run([v.py, '-c', CHARLM_CHECK, ckpt, os.path.join(v.data, 'train.bin')], timeout=300)
    try:
        res = json.loads(r.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return v.check(False, 'charlm', v.tail(r))
    v.check(all(x <= HARNESS_TOL for x in res.values()), "charlm CharLM(backend='cuda') vs backend='c'",
            ', '.join(f'{k} {x:.1e}' for k, x in res.items()) + f' (relative errors; bound {HARNESS_TOL:g})')


def stage_numerics(v):
    r = v.run([v.py, '-m', 'pytest', '-q', '-p', 'no:cacheprovider', 'tests/test_numerics.py'],
              env={'PYRNN_TRAIN_CPU': os.path.join(ROOT, 'train_gpu')}, timeout=900)
    v.check(r.returncode == 0, 'numerics tests/test_numerics.py on train_gpu', v.tail(r, 1))


def torch_python(v):
    """A Python with torch and CUDA: TORCH_PYTHON, the invoking python3, else a venv of its own."""
    sys.path.insert(0, SCRIPTS)
    import bench_gpu
    py, note = bench_gpu.find_torch_python(os.environ.get('TORCH_PYTHON'))
    if py or os.environ.get('TORCH_PYTHON') or os.environ.get('GPU_VERIFY_OFFLINE') == '1':
        return py, note
    py, note2 = bench_gpu.find_torch_python(sys.executable)
    if py:
        return py, note2
    venv = os.path.join(BUILD, 'venv-torch')
    tpy = os.path.join(venv, 'bin', 'python')
    if not os.path.exists(tpy):
        v.run([sys.executable, '-m', 'venv', venv], timeout=300)
    v.run([tpy, '-m', 'pip', 'install', '-q', '--disable-pip-version-check', 'torch', 'numpy'], timeout=1500)
    return bench_gpu.find_torch_python(tpy)


def stage_bench(v):
    tpy, note = torch_python(v)
    v.record('INFO', 'bench torch', note if tpy else f'no torch with CUDA ({note}); TORCH_PYTHON=python names one')
    out = os.path.join(OUT, 'bench_gpu.json')
    args = [v.py, os.path.join(SCRIPTS, 'bench_gpu.py'), '--out', out] + (['--torch-python', tpy] if tpy else ['--no-torch'])
    r = v.run(args, timeout=1200)
    if r.returncode != 0 or not os.path.exists(out):
        return v.check(False, 'bench', v.tail(r))
    with open(out) as f:
        res = json.load(f)
    for side, s in res.get('sides', {}).items():
        libs = '; '.join(p for paths in s.get('libraries', {}).values() for p in paths)
        v.record('INFO', f'bench {side} loaded', f'{libs} {s.get("versions")}')
    for line in res['targets']['lines']:
        v.record('INFO', 'bench', line)
    v.check(res['targets']['ok'], 'bench targets', '>= 1.0x torch at every shape, >= 1.5x at B=32 (bench_gpu.json)')
    # pyrnn's cuDNN algorithms against each other, fp32
    out2 = os.path.join(OUT, 'bench_algos.json')
    r = v.run([v.py, os.path.join(SCRIPTS, 'bench_gpu.py'), '--out', out2, '--no-torch', '--math', 'fp32', '--batch', '32',
               '128', '--hidden', '256', '1024', '--algos', 'standard', 'persist_static', 'persist_small_h'], timeout=900)
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


STAGE_FNS = {'gpu': stage_gpu, 'deps': stage_deps, 'build': stage_build, 'data': stage_data, 'harness': stage_harness,
             'train': stage_train, 'checkpoint': stage_checkpoint, 'charlm': stage_charlm, 'numerics': stage_numerics,
             'bench': stage_bench}
REQUIRED = {'gpu', 'deps', 'build'}   # always run; a failure stops everything after it
NEEDS = {'train': 'data', 'checkpoint': 'data', 'charlm': 'checkpoint'}


def selected_stages(skip, only):
    """The stages to run, in order: REQUIRED, the ones asked for, and what those need."""
    chosen = {s for s in STAGES if s in REQUIRED or ((not only or s in only) and s not in skip)}
    for s in list(chosen) * 2:   # twice: charlm -> checkpoint -> data
        for t in list(chosen):
            if t in NEEDS:
                chosen.add(NEEDS[t])
    return [s for s in STAGES if s in chosen]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0], epilog=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--skip', nargs='+', default=[], choices=STAGES, metavar='STAGE')
    ap.add_argument('--only', nargs='+', default=None, choices=STAGES, metavar='STAGE',
                    help='these stages and what they need (gpu, deps and build always run)')
    args = ap.parse_args(argv)
    v = Verify()
    if not stage_gpu(v):   # no usable GPU: one line, in a second
        print(f'gpu_verify: {v.lines[-1].split(": ", 1)[1]}; nothing was verified ({os.path.relpath(v.summary, ROOT)})')
        with open(v.summary, 'a') as f:
            f.write('0 passed, 1 failed\n')
        return 1
    print(f'gpu_verify: logs and the summary go to {os.path.relpath(OUT, ROOT)}/', flush=True)
    for stage in selected_stages(args.skip, args.only)[1:]:
        v.stage = stage
        need = NEEDS.get(stage)
        if (need == 'data' and v.data is None) or (need == 'checkpoint' and not getattr(v, 'checkpoint', None)):
            v.check(False, stage, f'not run: the {need} stage failed')
            continue
        print(f'== {stage}', flush=True)
        t = time.time()
        try:
            ok = STAGE_FNS[stage](v)
        except Exception as e:   # noqa: BLE001: a broken stage is a FAIL line, and the others still run
            ok = v.check(False, stage, f'{type(e).__name__}: {e}')
        with open(v.log_path(), 'a') as f:
            f.write(f'# stage {stage}: {time.time() - t:.0f} s\n')
        if stage in REQUIRED and ok is False:
            break
    n_fail = v.failed()
    n_pass = sum(l.startswith('PASS') for l in v.lines)
    total = f'{n_pass} passed, {n_fail} failed'
    with open(v.summary, 'a') as f:
        f.write(f'# {time.time() - v.t0:.0f} s\n{total}\n')
    print(f'gpu_verify: {total} in {time.time() - v.t0:.0f} s; {os.path.relpath(v.summary, ROOT)}')
    return 1 if n_fail else 0


if __name__ == '__main__':
    sys.exit(main())
