"""No-spill check of every kernel set: compiles c/train_rnn.c to assembly for each target and fails if
a GEMM register tile's inner loop touches the stack (its accumulators did not fit in registers), or
if a cell's gate loop is not vectorized at its kernel set's full vector width (on AVX2 a branch in
sigmoid once kept them all scalar).

    python scripts/check_spills.py [x86-64 x86-64-v3 x86-64-v4 aarch64] [--cc cc] [--aarch64-cc aarch64-linux-gnu-gcc]

x86-64 is the default build, which holds every x86 kernel set (c/isa.h: sse2, avx2, avx512, avx512bf16);
x86-64-v3, x86-64-v4 and aarch64 are one-CPU builds, whose set is named `one`. Each set's functions
carry its name as a suffix (c/kernels.h): the tiles tile_rowmajor, tile_transposed (which the emulated
bf16 GEMM runs too) and, with native bf16, tile_bf16_rows are noinline, and so are the cell wrappers
(rnn_forward, ..., gru_backward), into which cells.h's loops are inlined (gcc may add .constprop.N /
.isra.N suffixes). A loop is a label that a later branch of the same function jumps back to; an
innermost loop holds no other loop. A tile's loops are the innermost ones with a multiply-add (FMA, or
multiply on SSE2, or VDPBF16PS): the edge-tile stores around them may use the stack by design. Stack
references are (%rsp), (%rbp) when it is the frame pointer, push and pop on x86; [sp and [x29 (when it
is the frame pointer) on aarch64. A gate loop is vectorized at full width when an innermost loop of the
cell's function works on registers of that width (xmm 16, ymm 32, zmm 64 bytes; NEON's 16-byte v
registers).
"""
import argparse
import os
import re
import shlex
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# and tile_bf16_rows in a set with native bf16 (avx512bf16)
TILES = ('tile_rowmajor', 'tile_transposed', 'tile_copied')
CELLS = {'rnn_forward': 2, 'rnn_backward': 1, 'lstm_forward': 1, 'lstm_backward': 1, 'gru_forward': 1,
         'gru_backward': 1}   # each cell wrapper's `#pragma omp simd` loops (cells.h)
# target: (family, compiler option of this script, flags, {kernel set: vector bytes})
TARGETS = {
    'x86-64': ('x86', 'cc', [], {'sse2': 16, 'avx2': 32, 'avx512': 64, 'avx512bf16': 64}),
    'x86-64-v3': ('x86', 'cc', ['-march=x86-64-v3', '-DPYRNN_ONE_ISA'], {'one': 32}),
    'x86-64-v4': ('x86', 'cc', ['-march=x86-64-v4', '-DPYRNN_ONE_ISA'], {'one': 64}),
    'aarch64': ('arm', 'aarch64_cc', ['-march=armv8-a'], {'one': 16}),
}
MAC = {'x86': re.compile(r'^(v?f(n)?m(add|sub)|v?mulps|vdpbf16ps)'),
       'arm': re.compile(r'^(fmla|fmls|fmadd|fmsub|fmul)(\.|$)')}
BRANCH = {'x86': re.compile(r'^j[a-z]+$'), 'arm': re.compile(r'^(b|b\.?[a-z]{2}|cbn?z|tbn?z)$')}
STACK = {'x86': re.compile(r'\(%rsp[,)]'), 'arm': re.compile(r'\[sp[\],]')}
FRAME = {'x86': re.compile(r'\(%rbp[,)]'), 'arm': re.compile(r'\[x29[\],]')}
FRAME_SETUP = {'x86': re.compile(r'^movq?\s+%rsp,\s*%rbp$'), 'arm': re.compile(r'^(mov|add)\s+x29,\s*sp\b')}
REGISTER_BYTES = {'x86': [(re.compile(r'%zmm'), 64), (re.compile(r'%ymm'), 32), (re.compile(r'%xmm'), 16)],
                  'arm': [(re.compile(r'\bv\d+\.(4s|16b|8h|2d)'), 16), (re.compile(r'\bq\d+\b'), 16)]}
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


def loop_bodies(asm, family, names):
    """{symbol: ([(first index, innermost loop body as (mnemonic, operands) pairs)], its stack test, its
    labels)} for every function named in names"""
    out = {}
    for sym, lines in functions(asm, names).items():
        insns, labels = parse(lines)
        has_frame = any(FRAME_SETUP[family].match(f'{op} {args}') for op, args in insns)
        def is_stack(op, args, has_frame=has_frame):
            return bool(STACK[family].search(args) or (has_frame and FRAME[family].search(args))
                        or (family == 'x86' and op.startswith(('push', 'pop'))))
        out[sym] = ([(a, insns[a:b + 1]) for a, b in inner_loops(insns, labels, family)], is_stack, labels)
    return out


def width(body, family):
    """the widest vector register an instruction of the loop names, in bytes (0: none)"""
    return max((n for _, args in body for reg, n in REGISTER_BYTES[family] if reg.search(args)), default=0)


def analyse(asm, family, names):
    """[(symbol, loop label, instructions in the loop, stack references in it)] for every innermost loop
    with a multiply-add in each function named; a function without one gives (symbol, None, 0, 0)."""
    rows = []
    for sym, (bodies, is_stack, labels) in loop_bodies(asm, family, names).items():
        macs = [(first, b) for first, b in bodies if any(MAC[family].match(op) for op, _ in b)]
        for first, body in macs:
            label = next(l for l, i in labels.items() if i == first)
            rows.append((sym, label, len(body), sum(is_stack(op, args) for op, args in body)))
        if not macs:
            rows.append((sym, None, 0, 0))
    return rows


def narrow_cells(asm, family, isa, vec_bytes):
    """The cells of set isa with fewer innermost loops at the full vector width than simd loops"""
    cells = loop_bodies(asm, family, [f'{c}_{isa}' for c in CELLS])
    narrow = []
    for c, n in CELLS.items():
        bodies = [b for s, (bs, _, _) in cells.items() if s.split('.')[0] == f'{c}_{isa}' for _, b in bs]
        if sum(width(b, family) >= vec_bytes for b in bodies) < n:
            narrow.append(c)
    return narrow


def check_set(asm, family, isa, vec_bytes):
    """The lines to print for kernel set isa, and whether it passed"""
    lines, ok = [], True
    names = [f'{t}_{isa}' for t in TILES + (('tile_bf16_rows',) if isa.endswith('bf16') else ())]
    rows = analyse(asm, family, names)
    for n in names:
        if not any(sym.split('.')[0] == n for sym, *_ in rows):
            lines.append(f'{isa:10} {n}: not found in the assembly (is it still noinline?)')
            ok = False
    for sym in dict.fromkeys(sym for sym, *_ in rows):
        loops = [(n, stack) for s, label, n, stack in rows if s == sym and label is not None]
        stack = sum(st for _, st in loops)
        lines.append(f'{isa:10} {sym}: {len(loops)} inner multiply-add loops, {sum(n for n, _ in loops)} '
                     f'instructions, {stack} stack references' + ('; SPILLS' if stack else ''))
        ok = ok and bool(loops) and not stack
    narrow = narrow_cells(asm, family, isa, vec_bytes)
    lines.append(f'{isa:10} gate loops: {len(CELLS) - len(narrow)} of {len(CELLS)} cells vectorized at '
                 f'{vec_bytes} bytes' + (f'; NOT: {", ".join(narrow)}' if narrow else ''))
    return lines, ok and not narrow


def compile_asm(target, out_dir, compilers, source):
    """(family, assembly)"""
    family, cc_opt, flags, _ = TARGETS[target]
    path = os.path.join(out_dir, f'train_rnn.{target}.s')
    cmd = shlex.split(compilers[cc_opt]) + ['-S', '-O3', *flags, '-fopenmp', '-fno-math-errno', '-DPYRNN_LIBRARY',
                                            source, '-o', path]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f'{" ".join(cmd)} failed:\n{r.stderr.strip()}')
    with open(path) as f:
        return family, f.read()


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
                family, asm = compile_asm(target, out_dir, compilers, args.source)
            except (OSError, RuntimeError) as e:
                print(f'{target}: cannot compile: {e}')
                failed.append(target)
                continue
            for isa, vec_bytes in TARGETS[target][3].items():
                lines, ok = check_set(asm, family, isa, vec_bytes)
                print('\n'.join(f'{target:10} {line}' for line in lines))
                if not ok:
                    failed.append(f'{target} {isa}')
    if failed:
        print(f'check_spills: FAILED for {", ".join(failed)}')
        return 1
    print(f'check_spills: no stack references in the tiles\' inner loops, gate loops vectorized, every kernel set '
          f'of {", ".join(args.targets)}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
