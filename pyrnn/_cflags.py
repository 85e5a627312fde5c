"""The host compiler flags of every optimised build, decided in one place: the Makefile's C builds,
the host side of its GPU builds (through nvcc -Xcompiler) and the cffi extension (pyrnn/_build.py)
all ask here whether a compiler takes a flag. Standard library only, and run as a script by make,
so `make train_cpu` needs nothing beyond Python 3, a C compiler and make.

    python3 pyrnn/_cflags.py [--cc CC] [--lang c|c++] [--arch ARCH]   the build flags for ARCH
    python3 pyrnn/_cflags.py [--cc CC] [--lang c|c++] -- FLAG...      those of the FLAGs CC takes

The build flags: -O3 (else -O2), the target, and -fopenmp, -fno-math-errno and -falign-loops=64 when
the compiler takes them (without OpenMP the C code runs serially; we never read errno, and a sqrtf
that may set it keeps the AdamW loop scalar; see build_flags for the alignment). ARCH any (the
default) is one build for every CPU of the architecture: no -march, and c/isa.h compiles the kernels
of every instruction set and picks one at run time. Any other ARCH is a build for that CPU alone,
-march=ARCH -DPYRNN_ONE_ISA (native: this machine; left out, so the build is `any`, when the compiler
does not take it); an ARCH the compiler does not take is an error.
"""
import argparse
import os
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tempfile


def compiler():
    """The C compiler setuptools will use, as a list of words: $CC, else Python's own, else cc."""
    for cand in (os.environ.get('CC'), sysconfig.get_config_var('CC'), 'cc'):
        if cand and shutil.which(shlex.split(cand)[0]):
            return shlex.split(cand)
    return ['cc']


def accepts(cc, flags, lang='c'):
    """Whether cc (a list of words) compiles and links an empty program with flags."""
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, 'probe.c')
        with open(src, 'w') as f:
            f.write('int main(void) { return 0; }\n')
        try:
            r = subprocess.run(cc + flags + ['-x', lang, src, '-o', os.path.join(d, 'probe')],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60)
        except (OSError, subprocess.SubprocessError):
            return False
        return r.returncode == 0


def accepted(cc, flags, lang='c'):
    """The flags cc takes, each on its own (all together first: one compile when it takes them all)."""
    if accepts(cc, flags, lang):
        return list(flags)
    return [f for f in flags if accepts(cc, [f], lang)]


def build_flags(cc, arch='any', lang='c'):
    """The optimisation, target and OpenMP flags of a build for arch; ValueError if cc refuses arch."""
    march = '-march=' + arch
    # loops aligned to 64 bytes: the GEMM tile's inner loop otherwise lands wherever the code before it
    # ends, and the default build (whose kernel sets sit side by side) ran 5% behind a one-CPU build with
    # the very same instructions (callgrind: equal counts) until both aligned theirs
    wanted = ['-O3'] + ([] if arch == 'any' else [march]) + ['-fopenmp', '-fno-math-errno', '-falign-loops=64']
    got = accepted(cc, wanted, lang)
    if arch not in ('any', 'native') and march not in got:
        raise ValueError(f'{" ".join(cc)} does not take {march}')
    one_isa = ['-DPYRNN_ONE_ISA'] if march in got else []
    return (['-O2'] if '-O3' not in got else []) + got + one_isa


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--cc', help='the compiler command (default: $CC, else Python\'s, else cc)')
    p.add_argument('--lang', default='c', choices=('c', 'c++'))
    p.add_argument('--arch', default='any', help='any (every CPU, kernels picked at run time) or a -march value')
    p.add_argument('probe', nargs='*', metavar='FLAG', help='after --: print those of these flags the compiler takes')
    args = p.parse_args(argv)
    cc = shlex.split(args.cc) if args.cc else compiler()
    if not cc or not shutil.which(cc[0]):
        print(f'error: compiler {args.cc or cc} not found', file=sys.stderr)
        return 1
    if args.probe:
        print(' '.join(accepted(cc, args.probe, args.lang)))
        return 0
    try:
        print(' '.join(build_flags(cc, args.arch, args.lang)))
    except ValueError as e:
        print(f'error: ARCH={args.arch}: {e}', file=sys.stderr)
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
