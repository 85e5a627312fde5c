"""No-spill check of the GEMM micro-kernel: compiles c/train_rnn.c to assembly for each target and
fails if the kernel's inner loop touches the stack (its accumulators did not fit in registers), or
if a gate loop (each `#pragma omp simd` loop of the cells) is not vectorized at the target's full
vector width (gcc's -fopt-info report; on AVX2 a branch in sigmoid once kept them all scalar).

    python scripts/check_spills.py [x86-64-v3 x86-64-v4 aarch64] [--cc cc] [--aarch64-cc aarch64-linux-gnu-gcc]

The kernel functions are noinline (gcc may add .constprop.N / .isra.N suffixes). A loop is a label
that a later branch of the same function jumps back to; an innermost loop holds no other loop. The
kernel's loops are the innermost ones with a fused multiply-add: the edge-tile stores around them
may use the stack by design. Stack references are (%rsp), (%rbp) when it is the frame pointer,
push and pop on x86; [sp and [x29 (when it is the frame pointer) on aarch64.
"""
import argparse
import os
import re
import shlex
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KERNELS = ('matmul_tile_rowmajor', 'matmul_tile_transposed')
# target: (family, compiler option of this script, -march)
TARGETS = {
    'x86-64-v3': ('x86', 'cc', 'x86-64-v3'),
    'x86-64-v4': ('x86', 'cc', 'x86-64-v4'),
    'aarch64': ('arm', 'aarch64_cc', 'armv8-a'),
}
VEC_BYTES = {'x86-64-v3': 32, 'x86-64-v4': 64, 'aarch64': 16}   # the widest float vector of each target
FMA = {'x86': re.compile(r'^v?f(n)?m(add|sub)'), 'arm': re.compile(r'^(fmla|fmls|fmadd|fmsub)(\.|$)')}
BRANCH = {'x86': re.compile(r'^j[a-z]+$'), 'arm': re.compile(r'^(b|b\.?[a-z]{2}|cbn?z|tbn?z)$')}
STACK = {'x86': re.compile(r'\(%rsp[,)]'), 'arm': re.compile(r'\[sp[\],]')}
FRAME = {'x86': re.compile(r'\(%rbp[,)]'), 'arm': re.compile(r'\[x29[\],]')}
FRAME_SETUP = {'x86': re.compile(r'^movq?\s+%rsp,\s*%rbp$'), 'arm': re.compile(r'^(mov|add)\s+x29,\s*sp\b')}
LABEL = re.compile(r'^([.\w$]+):')


def functions(asm, names):
    """{symbol: [line, ...]} for each symbol named `name` or `name.<suffix>`, up to its .size."""
    start = re.compile(r'^((%s)(\.[\w.]+)?):' % '|'.join(map(re.escape, names)))
    out, cur = {}, None
    for line in asm.splitlines():
        m = start.match(line)
        if m:
            cur = out.setdefault(m.group(1), [])
            continue
        if cur is not None:
            if re.match(r'^\s*\.size\s', line) or re.match(r'^\s*\.cfi_endproc', line):
                cur = None
            else:
                cur.append(line)
    return out


def parse(lines):
    """(instructions as (mnemonic, operands), {label: index of the next instruction})"""
    insns, labels = [], {}
    for line in lines:
        line = line.split('#')[0].split('//')[0].strip()
        m = LABEL.match(line)
        if m:
            labels[m.group(1)] = len(insns)
            line = line[m.end():].strip()
        if not line or line.startswith('.'):
            continue
        parts = line.split(None, 1)
        insns.append((parts[0], parts[1] if len(parts) > 1 else ''))
    return insns, labels


def inner_loops(insns, labels, family):
    """[(first, last)] index ranges of the innermost loops: a branch at `last` back to `first`."""
    loops = set()
    for j, (op, args) in enumerate(insns):
        if BRANCH[family].match(op):
            target = args.split(',')[-1].strip()
            if target in labels and labels[target] <= j:
                loops.add((labels[target], j))
    return sorted(a for a in loops if not any(b != a and a[0] <= b[0] and b[1] <= a[1] for b in loops))


def analyse(asm, family, names=KERNELS):
    """[(symbol, loop label, instructions in the loop, stack references in it)] for every innermost
    loop with an FMA in each kernel function; a function without one gives (symbol, None, 0, 0)."""
    rows = []
    for sym, lines in functions(asm, names).items():
        insns, labels = parse(lines)
        has_frame = any(FRAME_SETUP[family].match(f'{op} {args}') for op, args in insns)
        def is_stack(op, args):
            return bool(STACK[family].search(args) or (has_frame and FRAME[family].search(args))
                        or (family == 'x86' and op.startswith(('push', 'pop'))))
        found = False
        for first, last in inner_loops(insns, labels, family):
            body = insns[first:last + 1]
            if not any(FMA[family].match(op) for op, _ in body):
                continue
            found = True
            name = next(l for l, i in labels.items() if i == first)
            rows.append((sym, name, len(body), sum(is_stack(op, args) for op, args in body)))
        if not found:
            rows.append((sym, None, 0, 0))
    return rows


def compile_asm(target, out_dir, compilers, source):
    """(family, assembly, gcc's vectorization report)"""
    family, cc_opt, march = TARGETS[target]
    path = os.path.join(out_dir, f'train_rnn.{target}.s')
    report = os.path.join(out_dir, f'train_rnn.{target}.vec.txt')
    cmd = shlex.split(compilers[cc_opt]) + ['-S', '-O3', f'-march={march}', '-fopenmp', '-fno-math-errno',
                                            f'-fopt-info-vec-optimized={report}', '-DPYRNN_LIBRARY', source, '-o', path]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f'{" ".join(cmd)} failed:\n{r.stderr.strip()}')
    with open(path) as f, open(report) as g:
        return family, f.read(), g.read()


def simd_loops(source):
    """Line numbers of the loops marked `#pragma omp simd` in the source: the gate loops."""
    with open(source) as f:
        lines = f.read().splitlines()
    return [j + 1 for i, line in enumerate(lines) if line.strip() == '#pragma omp simd'
            for j in range(i + 1, min(i + 3, len(lines))) if re.match(r'\s*for \(', lines[j])]


def vector_widths(report, source):
    """{line: widest vector in bytes} of the loops of `source` that gcc reports vectorized."""
    name, out = re.escape(os.path.basename(source)), {}
    for m in re.finditer(r'%s:(\d+):\d+: optimized: loop vectorized using (\d+) byte vectors' % name, report):
        out[int(m.group(1))] = max(out.get(int(m.group(1)), 0), int(m.group(2)))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('targets', nargs='*', help=f'of {", ".join(TARGETS)} (default: all)')
    p.add_argument('--cc', default=os.environ.get('CC') or 'cc')
    p.add_argument('--aarch64-cc', default='aarch64-linux-gnu-gcc')
    p.add_argument('--source', default=os.path.join(ROOT, 'c', 'train_rnn.c'))
    p.add_argument('--out-dir', help='keep the assembly here (default: a temporary folder)')
    args = p.parse_args(argv)
    args.targets = args.targets or list(TARGETS)
    for t in args.targets:
        if t not in TARGETS:
            p.error(f'unknown target {t!r} (expected {", ".join(TARGETS)})')
    compilers = {'cc': args.cc, 'aarch64_cc': args.aarch64_cc}
    failed = []
    with tempfile.TemporaryDirectory() as tmp:
        out_dir = args.out_dir or tmp
        os.makedirs(out_dir, exist_ok=True)
        for target in args.targets:
            try:
                family, asm, report = compile_asm(target, out_dir, compilers, args.source)
            except (OSError, RuntimeError) as e:
                print(f'{target}: cannot compile: {e}')
                failed.append(target)
                continue
            rows = analyse(asm, family)
            missing = [n for n in KERNELS if not any(s.split('.')[0] == n for s, *_ in rows)]
            for n in missing:
                print(f'{target:10} {n}: not found in the assembly (is it still noinline?)')
            for sym in dict.fromkeys(s for s, *_ in rows):
                loops = [(loop, n, stack) for s, loop, n, stack in rows if s == sym and loop is not None]
                if not loops:
                    print(f'{target:10} {sym}: no innermost loop with an FMA found')
                    continue
                spilling = ', '.join(f'{loop} ({stack} of {n})' for loop, n, stack in loops if stack)
                print(f'{target:10} {sym}: {len(loops)} inner FMA loops, {sum(n for _, n, _ in loops)} instructions, '
                      f'{sum(stack for *_, stack in loops)} stack references' + (f'; SPILLS in {spilling}' if spilling else ''))
            widths, loops = vector_widths(report, args.source), simd_loops(args.source)
            # gcc names a loop by its `for` line or by the first line of its body
            width = {n: max(widths.get(n, 0), widths.get(n + 1, 0)) for n in loops}
            narrow = [f'line {n} ({width[n] or "scalar"})' for n in loops if width[n] < VEC_BYTES[target]]
            print(f'{target:10} gate loops: {len(loops) - len(narrow)} of {len(loops)} vectorized at {VEC_BYTES[target]} bytes'
                  + (f'; NOT: {", ".join(narrow)}' if narrow else ''))
            if missing or narrow or not loops or any(loop is None or stack for _, loop, _, stack in rows):
                failed.append(target)
    if failed:
        print(f'check_spills: FAILED for {", ".join(failed)}')
        return 1
    print(f'check_spills: no stack references in the GEMM inner loops, gate loops vectorized ({", ".join(args.targets)})')
    return 0


if __name__ == '__main__':
    sys.exit(main())
