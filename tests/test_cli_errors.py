"""Bad input to ./train_cpu: every case gets one line `error: ...` on stderr naming what is wrong,
a non-zero exit status (never a signal), no traceback, and leaves the output folder of an earlier
good run (its checkpoints, `latest` and log.jsonl) byte for byte as it was.

Runs in a scratch folder with relative paths, so the messages are the ones a user sees;
`python tests/test_cli_errors.py` prints them as the "Input validation" table of docs/hardening.md.
"""
import os
import shutil
import sys
import tempfile

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from helpers import run, snapshot, synthetic_text, write_split  # noqa: E402

MODEL = ['-c', 'lstm', '-L', '1', '-E', '8', '-H', '16', '-b', '4', '-t', '16', '-n', '3', '-k', '1',
         '-v', '0', '-s', '0', '-m', '0', '-P', '1']
DATA = ['-i', 'data/train.bin', '-j', 'data/val.bin']
GOOD = DATA + ['-o', 'run'] + MODEL       # the run whose folder must survive every bad one
CKPT = 'run/ckpt_00000003.bin'


def with_flag(args, flag, value):
    """args with flag's value replaced (or appended)."""
    out = list(args)
    if flag in out:
        out[out.index(flag) + 1] = value
    else:
        out += [flag, value]
    return out


def edited(src, dst, fn):
    raw = bytearray(open(src, 'rb').read())
    raw = fn(raw)
    with open(dst, 'wb') as f:
        f.write(bytes(raw))


def set_i32(offset, value):
    def fn(raw):
        raw[offset:offset + 4] = np.int32(value).tobytes()
        return raw
    return fn


def flip(offset):
    def fn(raw):
        raw[offset] ^= 0x10
        return raw
    return fn


def cut(n):
    return lambda raw: raw[:n]


def build_workspace(ws):
    """data/ (22 symbols), other/ (3 symbols), run/ (a good 3-step run with checkpoints), bad/."""
    write_split(os.path.join(ws, 'data'), synthetic_text(3000))
    write_split(os.path.join(ws, 'other'), synthetic_text(3000, alphabet=b'xyz'))
    r = run(GOOD, cwd=ws)
    assert r.returncode == 0, r.stdout + r.stderr
    bad = os.path.join(ws, 'bad')
    os.makedirs(bad)
    os.makedirs(os.path.join(ws, 'empty_out'))
    tokens, ckpt = os.path.join(ws, 'data', 'train.bin'), os.path.join(ws, CKPT)
    n_tokens = os.path.getsize(tokens) - 1024
    open(os.path.join(bad, 'empty.bin'), 'wb').close()
    edited(tokens, os.path.join(bad, 'short_header.bin'), cut(500))
    edited(tokens, os.path.join(bad, 'short_tokens.bin'), cut(1024 + n_tokens // 2))
    edited(tokens, os.path.join(bad, 'flipped_count.bin'), flip(17))
    edited(tokens, os.path.join(bad, 'token_ge_v.bin'), lambda raw: raw[:1124] + bytes([200]) + raw[1125:])
    edited(tokens, os.path.join(bad, 'magic.bin'), set_i32(0, 12345))
    edited(tokens, os.path.join(bad, 'version.bin'), set_i32(4, 2))
    edited(ckpt, os.path.join(bad, 'ckpt_short.bin'), cut(os.path.getsize(ckpt) // 2))
    edited(ckpt, os.path.join(bad, 'ckpt_tiny.bin'), cut(100))
    edited(ckpt, os.path.join(bad, 'ckpt_flipped.bin'), flip(600))
    edited(ckpt, os.path.join(bad, 'ckpt_magic.bin'), set_i32(0, 12345))
    edited(ckpt, os.path.join(bad, 'ckpt_version.bin'), set_i32(4, 2))
    os.makedirs(os.path.join(ws, 'latest_missing'))
    with open(os.path.join(ws, 'latest_missing', 'latest'), 'w') as f:
        f.write('ckpt_99999999.bin\n')
    os.makedirs(os.path.join(ws, 'latest_empty'))
    open(os.path.join(ws, 'latest_empty', 'latest'), 'w').close()
    return n_tokens


def cases(n_tokens):
    """(id, what the user did, arguments, a part of the expected message)."""
    on_bad = lambda name: with_flag(GOOD, '-i', f'bad/{name}')  # noqa: E731
    resume = lambda path, *extra: GOOD + ['-r', path] + list(extra)  # noqa: E731
    return [
        # data files
        ('data-missing', 'data file missing', on_bad('missing.bin'),
         'bad/missing.bin: cannot open: No such file or directory'),
        ('data-empty', 'data file empty', on_bad('empty.bin'), 'bad/empty.bin: truncated: header needs 1024 bytes, 0 left'),
        ('data-short-header', 'data file truncated inside the header', on_bad('short_header.bin'),
         'bad/short_header.bin: truncated: header needs 1024 bytes, 500 left'),
        ('data-short', 'data file truncated inside the tokens', on_bad('short_tokens.bin'),
         f'bad/short_tokens.bin: header says {n_tokens} tokens but the file holds {n_tokens // 2} (truncated or corrupted)'),
        ('data-flipped', 'data file with a flipped byte (token count)', on_bad('flipped_count.bin'),
         'bad/flipped_count.bin: header says'),
        ('data-token-ge-v', 'token id >= V in a token file', on_bad('token_ge_v.bin'),
         'bad/token_ge_v.bin: token 200 at position 100 is outside the vocabulary [0, 22)'),
        ('data-magic', 'data file with a wrong magic', on_bad('magic.bin'), 'bad/magic.bin: not a pyrnn token file (bad magic'),
        ('data-version', 'data file with a wrong version', on_bad('version.bin'),
         'bad/version.bin: token file version 2, this build reads version 1'),
        ('data-dir', 'a folder given as the data file', on_bad('.'), 'bad/.: not a regular file'),
        ('val-vocab', 'val split with another vocabulary', with_flag(GOOD, '-j', 'other/val.bin'),
         'data/train.bin and other/val.bin have different vocabularies'),
        ('data-too-small', 'batch larger than the data', with_flag(with_flag(GOOD, '-b', '64'), '-t', '64'),
         f'train split has {n_tokens} tokens, too few for one batch of B=64 x T=64 (needs 4097)'),
        # checkpoints
        ('ckpt-missing', 'checkpoint missing', resume('bad/missing_ckpt.bin'),
         'bad/missing_ckpt.bin: cannot open: No such file or directory'),
        ('latest-none', '-r latest with no checkpoint in -o', with_flag(GOOD, '-o', 'empty_out') + ['-r', 'latest'],
         'empty_out/latest: no checkpoint to resume from: No such file or directory'),
        ('latest-dangling', '-r latest naming a file that is gone', with_flag(GOOD, '-o', 'latest_missing') + ['-r', 'latest'],
         'latest_missing/ckpt_99999999.bin: cannot open: No such file or directory'),
        ('latest-empty', '-r latest with an empty latest file', with_flag(GOOD, '-o', 'latest_empty') + ['-r', 'latest'],
         'latest_empty/latest: does not name a checkpoint'),
        ('ckpt-short', 'checkpoint truncated', resume('bad/ckpt_short.bin'),
         'bad/ckpt_short.bin: checksum mismatch (corrupted or truncated checkpoint)'),
        ('ckpt-tiny', 'checkpoint truncated inside the header', resume('bad/ckpt_tiny.bin'),
         'bad/ckpt_tiny.bin: truncated: header needs 256 bytes, 100 left'),
        ('ckpt-flipped', 'checkpoint with a flipped byte', resume('bad/ckpt_flipped.bin'),
         'bad/ckpt_flipped.bin: checksum mismatch (corrupted or truncated checkpoint)'),
        ('ckpt-magic', 'checkpoint with a wrong magic', resume('bad/ckpt_magic.bin'),
         'bad/ckpt_magic.bin: not a pyrnn checkpoint (bad magic)'),
        ('ckpt-version', 'checkpoint with a wrong version', resume('bad/ckpt_version.bin'),
         'bad/ckpt_version.bin: checkpoint version 2, this build reads version 1'),
        ('ckpt-vocab', '-r with a checkpoint trained on another vocabulary',
         ['-i', 'other/train.bin', '-j', 'other/val.bin', '-o', 'run'] + MODEL + ['-r', CKPT],
         f'{CKPT} was trained on a vocabulary of 22 symbols that differs from other/train.bin (3)'),
        ('ckpt-hidden', '-r with an explicit -H that differs', with_flag(resume(CKPT), '-H', '32'),
         f'{CKPT} holds a lstm model with L=1 E=8 H=16, which does not match the flags given'),
        ('ckpt-cell', '-r with an explicit -c that differs', with_flag(resume(CKPT), '-c', 'gru'),
         f'{CKPT} holds a lstm model with L=1 E=8 H=16, which does not match the flags given'),
        ('ckpt-layout', '-r with an explicit -b that differs', with_flag(resume(CKPT), '-b', '2'),
         f'{CKPT} was trained with -b 4 -t 16; resuming needs the same stream layout'),
        # flags
        ('b-zero', '-b 0', with_flag(GOOD, '-b', '0'), '-b batch size must be positive, got 0'),
        ('t-negative', '-t -1', with_flag(GOOD, '-t', '-1'), '-t sequence length must be positive, got -1'),
        ('h-zero', '-H 0', with_flag(GOOD, '-H', '0'), '-H hidden size must be positive, got 0'),
        ('l-zero', '-L 0', with_flag(GOOD, '-L', '0'), '-L layers must be positive, got 0'),
        ('e-negative', '-E -3', with_flag(GOOD, '-E', '-3'), '-E embedding size must be positive, got -3'),
        ('h-huge', '-H 100000', with_flag(GOOD, '-H', '100000'), '-L, -E or -H is too large'),
        ('cell-unknown', '-c foo', with_flag(GOOD, '-c', 'foo'), "-c: unknown cell 'foo' (expected rnn, rnn_relu, lstm or gru)"),
        ('lr-zero', '-l 0', with_flag(GOOD, '-l', '0'), '-l learning rate must be positive, got 0'),
        ('lr-nan', '-l nan', with_flag(GOOD, '-l', 'nan'), "flag -l needs a number, got 'nan'"),
        ('n-text', '-n abc', with_flag(GOOD, '-n', 'abc'), "flag -n needs an integer, got 'abc'"),
        ('n-overflow', '-n 99999999999', with_flag(GOOD, '-n', '99999999999'), "flag -n needs an integer, got '99999999999'"),
        ('nonfinite-unknown', '-N maybe', with_flag(GOOD, '-N', 'maybe'), "-N must be stop or skip, got 'maybe'"),
        ('flag-unknown', 'an unknown flag', GOOD + ['-Z', '1'], 'unknown flag -Z (-h lists them)'),
        ('flag-long', 'a long option', GOOD + ['--steps', '1'], "unexpected argument '--steps'"),
        ('flag-no-value', 'a flag without its value', GOOD + ['-n'], 'flag -n needs a value'),
        ('positional', 'a stray argument', GOOD + ['data/train.bin'], "unexpected argument 'data/train.bin'"),
        # output folder
        ('out-proc', 'an output folder that cannot be made (-o /proc/foo)', with_flag(GOOD, '-o', '/proc/pyrnn-test'),
         '-o /proc/pyrnn-test: cannot create /proc/pyrnn-test: No such file or directory'),
        ('out-under-file', 'an output folder under a file', with_flag(GOOD, '-o', 'data/train.bin/out'),
         '-o data/train.bin/out: cannot create data/train.bin/out: Not a directory'),
        ('out-is-file', 'an output "folder" that is a file', with_flag(GOOD, '-o', 'data/train.bin'),
         '-o data/train.bin: not a directory'),
    ]


@pytest.fixture(scope='module')
def workspace(tmp_path_factory):
    ws = str(tmp_path_factory.mktemp('cli'))
    n_tokens = build_workspace(ws)
    return ws, n_tokens


def check_case(ws, args, expect):
    before = snapshot(ws)
    r = run(args, cwd=ws, timeout=60)
    out = r.stdout + r.stderr
    assert r.returncode > 0, f'exit status {r.returncode} (negative: killed by a signal)\n{out}'
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith('error: '), f'want one error line on stderr, got:\n{r.stderr}'
    assert expect in lines[0], f'{expect!r} not in {lines[0]!r}'
    assert 'Traceback' not in out and 'AddressSanitizer' not in out and 'runtime error' not in out, out
    after = snapshot(ws)
    assert after == before, f'files changed: {sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))}'
    return lines[0]


def _ids():
    return [c[0] for c in cases(0)]


@pytest.mark.parametrize('case', _ids())
def test_bad_input(workspace, case):
    ws, n_tokens = workspace
    _, _, args, expect = next(c for c in cases(n_tokens) if c[0] == case)
    check_case(ws, args, expect)


def test_good_run_still_resumes(workspace):
    """After all that, the folder still resumes: the checks above left it usable."""
    ws, _ = workspace
    r = run(with_flag(GOOD, '-n', '4') + ['-r', 'latest'], cwd=ws)
    assert r.returncode == 0, r.stdout + r.stderr
    assert 'resuming from run/ckpt_00000003.bin at step 3' in r.stdout


def test_help_lists_flags():
    r = run(['-h'])
    assert r.returncode == 0 and r.stderr == ''
    for flag in ('-i', '-o', '-r', '-N', '-P'):
        assert f'  {flag}  ' in r.stdout


def pairs(args):
    """args as (flag, value) pairs, a flag without a value or a stray argument standing alone."""
    out, i = [], 0
    while i < len(args):
        if args[i].startswith('-') and i + 1 < len(args):
            out.append((args[i], args[i + 1]))
            i += 2
        else:
            out.append((args[i],))
            i += 1
    return out


def delta(args):
    """The part of args that differs from GOOD, for the table."""
    good = dict(p for p in pairs(GOOD) if len(p) == 2)
    shown = [p for p in pairs(args) if len(p) == 1 or good.get(p[0]) != p[1]]
    return ' '.join(' '.join(repr(x) if x == '' else x for x in p) for p in shown)


def code(text):
    """text as a markdown code span (doubled backticks when it holds one)."""
    return f'`` {text} ``' if '`' in text else f'`{text}`'


def main():
    """Prints the markdown table of docs/hardening.md ("Input validation")."""
    ws = tempfile.mkdtemp(prefix='pyrnn-cli-')
    try:
        n_tokens = build_workspace(ws)
        print('| bad input | flags that differ from the good run | what the user sees (stderr) | exit |')
        print('| --- | --- | --- | --- |')
        for _, what, args, expect in cases(n_tokens):
            before = snapshot(ws)
            r = run(args, cwd=ws)
            assert snapshot(ws) == before and expect in r.stderr, (what, r.stderr)
            print(f'| {what} | {code(delta(args))} | {code(r.stderr.strip())} | {r.returncode} |')
    finally:
        shutil.rmtree(ws)


if __name__ == '__main__':
    main()
