"""The fuzz targets (fuzz/fuzz_*.c) under the gcc+ASan+UBSan driver fuzz/replay_main.c: every seed in
fuzz/corpus/<target>/, every reproducer in fuzz/crashes/<target>/ and a few hundred seeded random
mutations of them must load or be rejected with a message: no crash, no hang, no read past the
end. (`make fuzz` is the coverage-guided run; this is its regression replay, with no clang needed.)"""
import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGETS = ['tokens', 'checkpoint', 'reference']
SAN_ENV = dict(ASAN_OPTIONS='detect_leaks=1:abort_on_error=1', UBSAN_OPTIONS='halt_on_error=1:print_stacktrace=1')


@pytest.fixture(scope='module')
def drivers():
    if not shutil.which('make') or not shutil.which(os.environ.get('CC', 'cc')):
        pytest.skip('make or a C compiler is missing')
    binaries = [f'build/fuzz/replay_{t}' for t in TARGETS]
    env = {k: v for k, v in os.environ.items() if k != 'LD_PRELOAD'}
    r = subprocess.run(['make', '-s'] + binaries, cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
    if r.returncode != 0 and 'sanitize' in r.stderr and 'cannot find' in r.stderr:
        pytest.skip(f'the compiler has no ASan runtime:\n{r.stderr}')
    assert r.returncode == 0, r.stdout + r.stderr
    return {t: os.path.join(ROOT, b) for t, b in zip(TARGETS, binaries)}


@pytest.mark.parametrize('target', TARGETS)
def test_corpus_crashes_and_mutations(drivers, target, tmp_path):
    corpus = os.path.join(ROOT, 'fuzz', 'corpus', target)
    crashes = os.path.join(ROOT, 'fuzz', 'crashes', target)
    assert len(os.listdir(corpus)) >= 5, 'seed corpus missing: python3 fuzz/make_seeds.py'
    env = {k: v for k, v in os.environ.items() if k != 'LD_PRELOAD'}
    env.update(SAN_ENV)
    args = [drivers[target], '-mutations=300', '-seed=7', f'-crash_dir={tmp_path}', corpus]
    if os.path.isdir(crashes):
        args.append(crashes)
    r = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, f'{r.stdout}{r.stderr[-4000:]}\nfailing input saved in {tmp_path}'
    n_crashes = len([f for f in os.listdir(crashes) if not f.startswith('.')]) if os.path.isdir(crashes) else 0
    n_files = len(os.listdir(corpus)) + n_crashes
    assert f'replay {target}: {n_files} files ok' in r.stdout, r.stdout
    assert 'random mutations ok' in r.stdout
