"""Builds for a chosen CPU: the C backend reports the kernels its compiler flags select, ARCH and
PYRNN_ARCH reach the compiler through the one flag probe (pyrnn/_cflags.py) of the C, GPU-host and
extension builds, and the no-spill check (scripts/check_spills.py) tells a kernel loop that keeps its
accumulators in registers from one that spills."""
import importlib.util
import os
import shutil
import subprocess
import sys

import pytest

import pyrnn
from pyrnn._cflags import accepts, compiler

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ISAS = ('avx512bf16', 'avx512', 'avx2', 'neon', 'sse2', 'portable')


def expected_isa(macros):
    """The kernel set a one-CPU build holds under these predefined macros."""
    if '__AVX512F__' in macros:
        return 'avx512bf16' if '__AVX512BF16__' in macros else 'avx512'
    if '__AVX2__' in macros and '__FMA__' in macros:
        return 'avx2'
    if '__ARM_NEON' in macros:
        return 'neon'
    return 'sse2' if '__SSE2__' in macros else 'portable'


def test_isa_matches_the_build_flags():
    # a build for one CPU (make test_isa runs this on one built with PYRNN_ARCH=x86-64-v3) holds the set its
    # flags select; the default build holds every x86-64 set and takes the widest this CPU runs
    from pyrnn import _crnn
    flags = _crnn.ffi.string(_crnn.lib.pyrnn_build_flags()).decode().split()
    r = subprocess.run(compiler() + flags + ['-dM', '-E', '-x', 'c', os.devnull], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    macros = {line.split()[1] for line in r.stdout.splitlines() if line.startswith('#define ')}
    assert pyrnn.isa() in ISAS
    if '-DPYRNN_ONE_ISA' in flags or '__x86_64__' not in macros:
        assert pyrnn.isa_list() == [expected_isa(macros)], flags
        assert pyrnn.isa() == expected_isa(macros), (flags, pyrnn.isa())
    else:
        assert pyrnn.isa_list() == ['sse2', 'avx2', 'avx512', 'avx512bf16'], flags
        assert pyrnn.isa() == pyrnn.isa_list(cpu_only=True)[-1]


def test_expected_isa_table():
    assert expected_isa({'__AVX512F__', '__AVX2__', '__FMA__', '__SSE2__'}) == 'avx512'
    assert expected_isa({'__AVX2__', '__SSE2__'}) == 'sse2'   # AVX2 without FMA gets no 6x16 FMA tile
    assert expected_isa({'__AVX2__', '__FMA__', '__SSE2__'}) == 'avx2'
    assert expected_isa({'__ARM_NEON', '__aarch64__'}) == 'neon'
    assert expected_isa(set()) == 'portable'


def build_flags(env_arch):
    env = dict(os.environ)
    env.pop('PYRNN_ARCH', None)
    if env_arch:
        env['PYRNN_ARCH'] = env_arch
    return subprocess.run([sys.executable, '-c', 'import _build; print(" ".join(_build._compile_args))'],
                          cwd=os.path.join(ROOT, 'pyrnn'), env=env, capture_output=True, text=True)


def test_pyrnn_arch_reaches_the_extension_build():
    if accepts(compiler(), ['-march=x86-64-v3']):
        r = build_flags('x86-64-v3')
        assert r.returncode == 0, r.stderr
        assert '-march=x86-64-v3' in r.stdout.split() and '-march=native' not in r.stdout.split()
    r = build_flags('no-such-cpu')
    assert r.returncode != 0 and 'PYRNN_ARCH=no-such-cpu' in r.stderr and '-march=no-such-cpu' in r.stderr


def make_flags(*args, env=None):
    """The compile line `make train_cpu` would run."""
    e = dict(os.environ, **(env or {}))
    e.pop('CFLAGS', None)
    for k in ('ARCH', 'PYRNN_ARCH'):
        if k not in (env or {}):
            e.pop(k, None)
    r = subprocess.run(['make', '-n', '-B', '-s', 'train_cpu', *args], cwd=ROOT, env=e, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return r.stdout.split()


@pytest.mark.skipif(not shutil.which('make'), reason='make is not available')
def test_make_arch_picks_the_target():
    assert '-march=x86-64-v3' in make_flags('ARCH=x86-64-v3')
    assert '-march=x86-64-v4' in make_flags(env={'PYRNN_ARCH': 'x86-64-v4'})
    default = make_flags(env={'ARCH': 'x86-64-v2'})   # ARCH in the environment is not ours
    assert '-march=x86-64-v2' not in default
    assert not any(f.startswith('-march=') and f != '-march=native' for f in default)


@pytest.mark.skipif(not shutil.which('make'), reason='make is not available')
def test_make_rebuilds_when_arch_changes(tmp_path):
    # the compile line is a prerequisite: after a native build, ARCH=x86-64-v2 rebuilds, and back
    from pyrnn import data
    if not accepts(compiler(), ['-march=x86-64-v2']):
        pytest.skip('the compiler does not target x86-64-v2')
    data.prepare(b'to be or not to be, that is the question\n' * 200, str(tmp_path / 'data'))
    env = {k: v for k, v in os.environ.items() if k not in ('ARCH', 'PYRNN_ARCH', 'CFLAGS')}

    def kernels(*make_args):   # what the trainer's banner says it was built with
        subprocess.run(['make', '-s', 'train_cpu', *make_args], cwd=ROOT, env=env, check=True, capture_output=True)
        r = subprocess.run([os.path.join(ROOT, 'train_cpu'), '-i', str(tmp_path / 'data' / 'train.bin'), '-j', '',
                            '-o', str(tmp_path / 'out'), '-n', '0', '-s', '0', '-m', '0', '-v', '0', '-P', '1'],
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        return r.stdout.splitlines()[0].rsplit('|', 1)[1].split()[0]

    native = kernels()
    try:
        assert kernels('ARCH=x86-64-v2') == 'sse2' != native
    finally:
        assert kernels() == native


def cflags(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, 'pyrnn', '_cflags.py'), *args],
                          capture_output=True, text=True)


def test_flag_probe_keeps_what_the_compiler_takes():
    # what `make` runs: the build flags for an ARCH, or the flags of a list the compiler takes
    r = cflags('--', '-fno-math-errno', '-fno-such-flag-anywhere')
    assert r.returncode == 0 and r.stdout.split() == ['-fno-math-errno'], r
    r = cflags('--arch', 'no-such-cpu')
    assert r.returncode == 1 and r.stderr.strip() == f'error: ARCH=no-such-cpu: {" ".join(compiler())} ' \
        'does not take -march=no-such-cpu', r
    if accepts(compiler(), ['-march=x86-64-v3']):
        assert '-march=x86-64-v3' in cflags('--arch', 'x86-64-v3').stdout.split()


@pytest.mark.skipif(not shutil.which('make'), reason='make is not available')
def test_make_gpu_host_side_follows_arch():
    # the host side of the GPU builds takes its flags from the same probe as the C builds; a stand-in
    # nvcc, so that the rule exists without a CUDA toolkit
    if not accepts(['g++'], ['-march=x86-64-v3'], 'c++'):
        pytest.skip('no g++ that targets x86-64-v3')
    e = {k: v for k, v in os.environ.items() if k not in ('ARCH', 'PYRNN_ARCH', 'CFLAGS', 'NVCCFLAGS')}
    r = subprocess.run(['make', '-n', '-B', '-s', 'train_gpu', 'NVCC=/bin/true', 'CXX=g++', 'CUDNN_PATH=/none',
                        'ARCH=x86-64-v3'], cwd=ROOT, env=e, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    line = next(w for w in r.stdout.split() if w.startswith('-O3,'))   # -Xcompiler's argument
    assert '-march=x86-64-v3' in line.split(',') and '-march=native' not in line, line


# ---------------------------------------------------------------------------- the no-spill check

def spills_module():
    spec = importlib.util.spec_from_file_location('check_spills', os.path.join(ROOT, 'scripts', 'check_spills.py'))
    m = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(m)
    return m


X86 = """\
\t.text
tile_rowmajor_avx2.constprop.0:
\t.cfi_startproc
\tpushq\t%rbp
\tmovq\t%rsp, %rbp
\tsubq\t$64, %rsp
.L3:
\tvmovups\t(%r8), %ymm1
\tvbroadcastss\t(%r9,%rax), %ymm2
\tvfmadd231ps\t%ymm2, %ymm1, %ymm3
{inner}
\taddq\t$4, %rax
\tcmpq\t%rax, %rdx
\tjne\t.L3
.L5:
\tvmovss\t-32(%rbp,%rcx,4), %xmm0
\tvaddss\t(%rdi,%rcx,4), %xmm0, %xmm0
\tjne\t.L5
\tleave
\tret
\t.cfi_endproc
\t.size\ttile_rowmajor_avx2.constprop.0, .-tile_rowmajor_avx2.constprop.0
tile_transposed_avx2:
.L9:
\tvfmadd231ps\t%ymm2, %ymm1, %ymm4
\tjb\t.L9
\tret
\t.size\ttile_transposed_avx2, .-tile_transposed_avx2
"""

ARM = """\
tile_rowmajor_avx2:
\tstp\tx29, x30, [sp, -64]!
\tmov\tx29, sp
.L19:
\tldr\tq1, [x4]
\tfmla\tv0.4s, v1.4s, v2.s[0]
{inner}
\tcmp\tx3, x5
\tbne\t.L19
\tret
\t.size\ttile_rowmajor_avx2, .-tile_rowmajor_avx2
tile_transposed_avx2:
.L30:
\tldr\tq2, [x1], 16
\tsubs\tw2, w2, #1
\tfmla\tv3.4s, v2.4s, v4.s[1]
\tb.ne\t.L30
\tret
\t.size\ttile_transposed_avx2, .-tile_transposed_avx2
"""


NAMES = ['tile_rowmajor_avx2', 'tile_transposed_avx2']


def test_spill_check_finds_stack_references_in_the_fma_loop():
    cs = spills_module()
    clean = cs.analyse(X86.format(inner='\tvfmadd231ps\t%ymm2, %ymm0, %ymm5'), 'x86', NAMES)
    # the scalar edge loop .L5 reads the stack by design and has no FMA: not a kernel loop
    assert clean == [('tile_rowmajor_avx2.constprop.0', '.L3', 7, 0), ('tile_transposed_avx2', '.L9', 2, 0)]
    spilled = cs.analyse(X86.format(inner='\tvmovaps\t%ymm6, 96(%rsp)\n\tvmovaps\t-64(%rbp), %ymm6'), 'x86', NAMES)
    assert spilled[0] == ('tile_rowmajor_avx2.constprop.0', '.L3', 8, 2)
    pushed = cs.analyse(X86.format(inner='\tpushq\t%rbx\n\tpopq\t%rbx'), 'x86', NAMES)
    assert pushed[0][3] == 2


def test_spill_check_counts_rbp_only_as_a_frame_pointer():
    cs = spills_module()
    # without `movq %rsp, %rbp`, rbp is one more general register
    asm = X86.replace('\tmovq\t%rsp, %rbp\n', '').format(inner='\tvmovups\t32(%rbp), %ymm6')
    assert cs.analyse(asm, 'x86', NAMES)[0][3] == 0
    assert cs.analyse(X86.format(inner='\tvmovups\t32(%rbp), %ymm6'), 'x86', NAMES)[0][3] == 1


def test_spill_check_aarch64():
    cs = spills_module()
    assert cs.analyse(ARM.format(inner='\tfmla\tv5.4s, v1.4s, v2.s[1]'), 'arm', NAMES) == [
        ('tile_rowmajor_avx2', '.L19', 5, 0), ('tile_transposed_avx2', '.L30', 4, 0)]
    spilled = cs.analyse(ARM.format(inner='\tstr\tq8, [sp, 160]\n\tldr\tq8, [x29, 32]'), 'arm', NAMES)
    assert spilled[0] == ('tile_rowmajor_avx2', '.L19', 6, 2)


def test_spill_check_innermost_loop_only_and_missing_kernel():
    cs = spills_module()
    nested = """\
tile_rowmajor_avx2:
.L1:
\tmovq\t%rax, 8(%rsp)
.L2:
\tvfmadd231ps\t%zmm2, %zmm1, %zmm3
\tjne\t.L2
\tvfmadd231ps\t%zmm2, %zmm1, %zmm3
\tjne\t.L1
\tret
\t.size\ttile_rowmajor_avx2, .-tile_rowmajor_avx2
"""
    assert cs.analyse(nested, 'x86', NAMES) == [('tile_rowmajor_avx2', '.L2', 2, 0)]
    no_loop = 'tile_rowmajor_avx2:\n\tvfmadd231ps\t%zmm2, %zmm1, %zmm3\n\tret\n\t.size\ttile_rowmajor_avx2, .-x\n'
    assert cs.analyse(no_loop, 'x86', NAMES) == [('tile_rowmajor_avx2', None, 0, 0)]
    assert cs.analyse('other:\n\tret\n', 'x86', NAMES) == []


def test_spill_check_sees_a_gate_loop_below_full_width():
    cs = spills_module()
    cell = """\
lstm_forward_avx512:
.L4:
\tvaddps\t%{reg}1, %{reg}2, %{reg}3
\tjne\t.L4
\tret
\t.size\tlstm_forward_avx512, .-lstm_forward_avx512
"""
    assert 'lstm_forward' not in cs.narrow_cells(cell.format(reg='zmm'), 'x86', 'avx512', 64)
    assert 'lstm_forward' in cs.narrow_cells(cell.format(reg='ymm'), 'x86', 'avx512', 64)
