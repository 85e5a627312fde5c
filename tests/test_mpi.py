"""Data-parallel training over MPI: `mpiexec -n R ./train_cpu_mpi` with the global batch B split
into R ranks of B/R streams trains the same model as one process with batch B, up to float
summation order; a failure on one rank stops every rank with one message; checkpoints move between
any rank counts that divide B, and to plain ./train_cpu.

The bounds: every rank starts from the same parameters, so step 1's loss differs from one process's
only in how the rows' losses are summed (a mean per rank, then the mean of the ranks: a float
rounding, ~1e-7 relative); we hold 1e-5. Later steps also see the gradients summed in another order
(each rank's GEMMs over its own rows, then the all-reduce), an error of ~1e-7 per element that AdamW
carries from step to step; over 30 steps it stays near the log's 6 printed digits (~3e-7 measured),
and we hold the issue's 1e-4. The masks of dropout (on here) depend on the global stream, not the
rank, so they match too. One rank is bit-identical to ./train_cpu.

Needs an MPI (mpicc and mpiexec: `apt-get install mpich libmpich-dev`, or `pip install mpich`, or
`make train_cpu_mpi`, which installs the wheel when no MPI is found); skipped, saying so, without
one. PYRNN_REQUIRE_MPI=1 (CI) turns that skip into a failure. PYRNN_TRAIN_CPU_MPI=/path runs
another build. The machine may have fewer cores than ranks: every rank runs one thread (-P 1).
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
import uuid

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from helpers import ROOT, train_cpu, write_split  # noqa: E402

from pyrnn.checkpoint import read_checkpoint  # noqa: E402

STEPS = 30
# B = 8 splits into 1, 2 and 4 ranks; lr 1e-2 so that the 30 steps move the model a long way
MODEL = ['-c', 'lstm', '-L', '2', '-E', '16', '-H', '32', '-b', '8', '-t', '16', '-l', '1e-2', '-p', '0.1',
         '-v', '10', '-s', '0', '-m', '0', '-k', '10', '-P', '1']
SMALL = ['-c', 'lstm', '-L', '1', '-E', '8', '-H', '16', '-b', '4', '-t', '16', '-v', '0', '-s', '0', '-m', '0',
         '-P', '1']


def find_mpi_tool(name):
    """name (mpicc, mpiexec) on the PATH, else in this Python's scripts folder (where the mpich wheel
    puts it), the order the Makefile looks in; None if neither has it."""
    found = shutil.which(name)
    if found:
        return found
    local = os.path.join(sysconfig.get_path('scripts'), name)
    return local if os.access(local, os.X_OK) else None


MPIEXEC = find_mpi_tool('mpiexec')
NO_MPI = None if MPIEXEC and (find_mpi_tool('mpicc') or os.environ.get('PYRNN_TRAIN_CPU_MPI')) else (
    'no MPI found (mpicc and mpiexec, on the PATH or beside this Python): apt-get install mpich libmpich-dev, '
    'or pip install mpich')
if NO_MPI and os.environ.get('PYRNN_REQUIRE_MPI') == '1':
    raise RuntimeError(f'PYRNN_REQUIRE_MPI=1 but {NO_MPI}')
pytestmark = pytest.mark.skipif(NO_MPI is not None, reason=NO_MPI or '')


def open_mpi():
    r = subprocess.run([MPIEXEC, '--version'], capture_output=True, text=True)
    return 'Open MPI' in r.stdout + r.stderr or 'OpenRTE' in r.stdout + r.stderr


_binary = []


def train_cpu_mpi():
    if not _binary:
        path = os.environ.get('PYRNN_TRAIN_CPU_MPI')
        if not path:
            r = subprocess.run(['make', '-s', 'train_cpu_mpi', f'PYTHON={sys.executable}'], cwd=ROOT,
                               capture_output=True, text=True)
            assert r.returncode == 0, f'make train_cpu_mpi failed:\n{r.stdout}{r.stderr}'
            path = os.path.join(ROOT, 'train_cpu_mpi')
        _binary.append(os.path.abspath(path))
    return _binary[0]


def launch(blocks, env=None):
    """The mpiexec command and environment for MPMD blocks [(ranks, argv), ...] of train_cpu_mpi
    (argv may start with `env NAME=VALUE` to set something on those ranks only)."""
    full_env = dict(os.environ, **(env or {}))
    cmd = [MPIEXEC]
    if open_mpi():   # it refuses more ranks than cores, and root, unless told
        cmd.append('--oversubscribe')
        full_env.update(OMPI_ALLOW_RUN_AS_ROOT='1', OMPI_ALLOW_RUN_AS_ROOT_CONFIRM='1')
    for i, (n, argv) in enumerate(blocks):
        cmd += ([':'] if i else []) + ['-n', str(n)]
        prefix = argv[:2] if argv[:1] == ['env'] else []
        cmd += prefix + [train_cpu_mpi()] + [str(a) for a in argv[len(prefix):]]
    return cmd, full_env


def mpirun(blocks, timeout=120):
    cmd, env = launch(blocks)
    return subprocess.run(cmd, env=env, capture_output=True, text=True, errors='replace', timeout=timeout)


def ranks(n, args):
    return mpirun([(n, args)])


def errors(stderr):
    return [line for line in stderr.splitlines() if line.startswith('error:')]


def log(folder):
    """{(step, 'train' | 'val'): loss} of log.jsonl, and the grad norms."""
    losses, norms = {}, {}
    for line in open(os.path.join(folder, 'log.jsonl')):
        r = json.loads(line)
        if 'train_loss' in r:
            losses[r['step'], 'train'] = r['train_loss']
            norms[r['step']] = r['grad_norm']
        else:
            losses[r['step'], 'val'] = r['val_loss']
    return losses, norms


def text(n, seed=0):
    """Words of a small vocabulary: structure that an LSTM learns within a few dozen steps."""
    words = b'the cat sat on a mat and the dog ran far to see her old red hat in the rain\n'.split(b' ')
    rng = np.random.default_rng(seed)
    return b' '.join(words[i] for i in rng.integers(0, len(words), n // 4))[:n]


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
    """The same 30 steps on one process (./train_cpu), and on 1, 2 and 4 ranks."""
    d = tmp_path_factory.mktemp('mpi')
    write_split(d / 'data', text(40000))
    common = ['-i', d / 'data' / 'train.bin', '-j', d / 'data' / 'val.bin', '-n', STEPS] + MODEL
    out = {'d': d, 'common': common}
    r = subprocess.run([train_cpu()] + [str(a) for a in common + ['-o', d / 'plain']], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    out['plain'] = d / 'plain'
    for n in (1, 2, 4):
        r = ranks(n, common + ['-o', d / f'r{n}'])
        assert r.returncode == 0, r.stdout + r.stderr
        assert r.stdout.count('pyrnn cpu |') == 1, 'rank 0 alone prints'
        out[n] = d / f'r{n}'
    return out


def test_one_rank_is_the_plain_trainer_bit_for_bit(runs):
    assert log(runs[1]) == log(runs['plain'])
    a, b = read_checkpoint(str(runs[1] / 'ckpt_00000030.bin')), read_checkpoint(str(runs['plain'] / 'ckpt_00000030.bin'))
    assert all(np.array_equal(a['params'][k], b['params'][k]) for k in a['params'])
    assert np.array_equal(a['h'], b['h']) and np.array_equal(a['c'], b['c'])


@pytest.mark.parametrize('n', [2, 4])
def test_ranks_log_the_same_losses_as_one_process(runs, n):
    ref, _ = log(runs[1])
    got, _ = log(runs[n])
    assert got.keys() == ref.keys() and len([k for k in ref if k[1] == 'val']) == 3
    rel = {k: abs(got[k] - ref[k]) / ref[k] for k in ref}
    print(f'{n} ranks vs 1: max relative loss difference {max(rel.values()):.2e} '
          f'(step 1: {rel[1, "train"]:.2e}, val: {max(v for k, v in rel.items() if k[1] == "val"):.2e})')
    assert rel[1, 'train'] <= 1e-5
    assert max(rel.values()) <= 1e-4
    assert ref[STEPS, 'train'] < ref[1, 'train'] - 0.5, 'the model must have learned something'


@pytest.mark.parametrize('n', [2, 4])
def test_checkpoint_holds_every_rank_state_in_global_stream_order(runs, n):
    a = read_checkpoint(str(runs[1] / 'ckpt_00000030.bin'))
    b = read_checkpoint(str(runs[n] / 'ckpt_00000030.bin'))
    assert (b['B'], b['T'], b['step'], b['adam_t'], b['data_pos'], b['rng']) == \
        (a['B'], a['T'], a['step'], a['adam_t'], a['data_pos'], a['rng'])
    # the streams' states differ from each other by far more than the bound: a stream out of place fails
    assert np.abs(a['h'][:, 0] - a['h'][:, 1]).max() > 1e-2
    for k in a['params']:
        np.testing.assert_allclose(b['params'][k], a['params'][k], rtol=0, atol=1e-4, err_msg=k)
    np.testing.assert_allclose(b['h'], a['h'], rtol=0, atol=1e-4)
    np.testing.assert_allclose(b['c'], a['c'], rtol=0, atol=1e-4)


def test_two_rank_checkpoint_resumes_under_one_and_four(runs):
    ref, _ = log(runs[2])
    for how in ('plain', 4):
        out = runs['d'] / f'resume_{how}'
        out.mkdir()
        shutil.copy(runs[2] / 'ckpt_00000020.bin', out)
        (out / 'latest').write_text('ckpt_00000020.bin\n')
        args = runs['common'] + ['-o', out, '-r', 'latest']
        if how == 'plain':
            r = subprocess.run([train_cpu()] + [str(a) for a in args], capture_output=True, text=True)
        else:
            r = ranks(how, args)
        assert r.returncode == 0, r.stdout + r.stderr
        assert 'resuming from' in r.stdout and 'at step 20' in r.stdout
        got, _ = log(out)
        assert sorted(got) == sorted(k for k in ref if k[0] > 20)
        worst = max(abs(got[k] - ref[k]) / ref[k] for k in got)
        print(f'2-rank checkpoint resumed under {how}: max relative loss difference {worst:.2e}')
        assert worst <= 1e-4


def test_batch_must_divide_by_ranks(runs):
    r = ranks(4, runs['common'] + ['-b', '6', '-o', runs['d'] / 'bad_b'])   # the last -b counts
    assert r.returncode != 0
    lines = errors(r.stderr)
    assert len(lines) == 1 and '-b 6' in lines[0] and '4 ranks' in lines[0], r.stderr


@pytest.fixture
def small(tmp_path):
    write_split(tmp_path / 'data', text(20000))
    return tmp_path, ['-i', tmp_path / 'data' / 'train.bin', '-j', ''] + SMALL


def test_bad_file_on_one_rank_stops_every_rank_with_one_message(small):
    d, args = small
    good = args + ['-n', '5', '-o', d / 'out']
    bad = [str(a).replace('train.bin', 'missing.bin') for a in good]
    t0 = time.monotonic()
    r = mpirun([(1, good), (1, bad)], timeout=60)
    assert r.returncode != 0 and time.monotonic() - t0 < 30
    lines = errors(r.stderr)
    assert len(lines) == 1 and 'rank 1' in lines[0] and 'missing.bin' in lines[0], r.stderr
    assert not (d / 'out' / 'latest').exists()


def test_nan_on_one_rank_stops_every_rank(small):
    d, args = small
    run_args = args + ['-n', '8', '-k', '1', '-o', d / 'out']
    r = mpirun([(1, run_args), (1, ['env', 'PYRNN_FAULT_NAN_GRAD_STEP=4'] + run_args)], timeout=60)
    assert r.returncode != 0
    lines = errors(r.stderr)
    assert len(lines) == 1 and 'step 4' in lines[0] and 'NaN' in lines[0], r.stderr
    assert (d / 'out' / 'latest').read_text() == 'ckpt_00000003.bin\n'
    read_checkpoint(str(d / 'out' / 'ckpt_00000003.bin'))   # complete: size and CRC check


def test_nan_on_one_rank_skipped_by_every_rank(small):
    d, args = small
    run_args = args + ['-n', '8', '-N', 'skip', '-o', d / 'out']
    r = mpirun([(1, run_args), (1, ['env', 'PYRNN_FAULT_NAN_GRAD_STEP=4'] + run_args)], timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count('non-finite gradient, update skipped') == 1
    losses, _ = log(d / 'out')
    assert (4, 'train') not in losses and (8, 'train') in losses


def test_full_disk_on_rank_0_stops_every_rank(small):
    d, args = small
    out = d / 'out'
    out.mkdir()
    os.symlink('/dev/full', out / 'ckpt_00000003.bin.tmp')   # the third checkpoint meets a full disk
    r = ranks(2, args + ['-n', '6', '-k', '1', '-o', out])
    assert r.returncode != 0
    lines = errors(r.stderr)
    assert len(lines) == 1 and 'No space left on device' in lines[0], r.stderr
    assert (out / 'latest').read_text() == 'ckpt_00000002.bin\n'
    read_checkpoint(str(out / 'ckpt_00000002.bin'))
    assert not (out / 'ckpt_00000003.bin').exists()


def rank_pids(tag):
    """{rank: pid} of the train_cpu_mpi processes started with PYRNN_TEST_TAG=tag."""
    found = {}
    for pid in filter(str.isdigit, os.listdir('/proc')):
        try:
            exe = os.path.basename(os.readlink(f'/proc/{pid}/exe'))
            env = dict(kv.split(b'=', 1) for kv in open(f'/proc/{pid}/environ', 'rb').read().split(b'\0') if b'=' in kv)
        except OSError:
            continue
        rank = env.get(b'PMI_RANK', env.get(b'OMPI_COMM_WORLD_RANK'))
        if exe.startswith('train_cpu_mpi') and env.get(b'PYRNN_TEST_TAG') == tag.encode() and rank is not None:
            found[int(rank)] = int(pid)
    return found


def alive(pid):
    try:
        return open(f'/proc/{pid}/stat').read().rsplit(')', 1)[1].split()[0] != 'Z'   # state Z: exited
    except OSError:
        return False


@pytest.mark.parametrize('victim', [1, 0])
def test_killing_one_rank_stops_the_others_and_leaves_a_complete_checkpoint(small, victim):
    d, args = small
    out = d / 'out'
    tag = uuid.uuid4().hex
    cmd, env = launch([(2, args + ['-n', '1000000', '-k', '1', '-o', out])])
    env['PYRNN_TEST_TAG'] = tag
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not ((out / 'latest').exists() and (out / 'latest').read_text() >= 'ckpt_00000003.bin\n'):
            assert proc.poll() is None and time.monotonic() < deadline, 'the run did not get to its third checkpoint'
            time.sleep(0.05)
        pids = rank_pids(tag)
        assert sorted(pids) == [0, 1], pids
        os.kill(pids[victim], signal.SIGKILL)
        t0 = time.monotonic()
        rc = proc.wait(timeout=20)
        print(f'rank {victim} killed: mpiexec exited {rc} after {time.monotonic() - t0:.2f} s')
        assert rc != 0 and time.monotonic() - t0 < 10
        assert not any(alive(pid) for pid in pids.values()), 'a rank outlived mpiexec'
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    name = (out / 'latest').read_text().strip()
    k = read_checkpoint(str(out / name))   # complete: size and CRC check
    assert name == f'ckpt_{k["step"]:08d}.bin'
    r = ranks(2, args + ['-n', k['step'] + 2, '-k', '1', '-o', out, '-r', 'latest'])
    assert r.returncode == 0 and f'at step {k["step"]}' in r.stdout, r.stderr


def test_scaling_script_smoke(tmp_path):
    """scripts/bench_mpi.py on a tiny model (its numbers mean nothing): the figures hang together."""
    out = tmp_path / 'bench.json'
    r = subprocess.run([sys.executable, os.path.join(ROOT, 'scripts', 'bench_mpi.py'), '--smoke', '--out', str(out)],
                       capture_output=True, text=True, timeout=300, env=dict(os.environ, PYRNN_TRAIN_CPU_MPI=train_cpu_mpi()))
    assert r.returncode == 0, r.stdout + r.stderr
    res = json.loads(out.read_text())
    B, T = res['model']['B'], res['model']['T']
    by = {(x['ranks'], x['threads']): x for x in res['layouts']}
    assert set(by) == {(1, 2), (2, 1)}
    for x in by.values():
        assert 0 < x['step_ms'] and abs(x['tok_s'] - B * T / (x['step_ms'] / 1e3)) < 1e-6 * x['tok_s']
        assert 0 <= x['allreduce_ms'] <= x['step_ms'] and abs(x['allreduce_share'] - x['allreduce_ms'] / x['step_ms']) < 1e-12
    assert by[1, 2]['allreduce_ms'] == 0 and by[2, 1]['allreduce_ms'] > 0
    m = res['paper_model']
    for row in m['rows']:
        R = row['machines']
        assert abs(row['step_s'] - (m['step_s_1_machine'] / R + row['allreduce_s'])) < 1e-12
        assert abs(row['speedup'] - m['step_s_1_machine'] / row['step_s']) < 1e-9 and row['efficiency'] <= 1 + 1e-12
        assert (row['allreduce_s'] == 0) == (R == 1)


def test_ranks_train_what_one_process_trains_with_every_regulariser(tmp_path):
    """Locked dropout (one mask per global stream), weight drop and embedding dropout (one mask per
    batch): 2 ranks draw the masks of one process, so the losses agree as closely as without them."""
    write_split(tmp_path / 'data', text(20000))
    common = ['-i', tmp_path / 'data' / 'train.bin', '-j', tmp_path / 'data' / 'val.bin', '-n', '12'] + MODEL + [
        '-d', 'locked', '-W', '0.2', '-D', '0.1']
    logs = []
    for n in (1, 2):
        r = ranks(n, common + ['-o', tmp_path / f'r{n}'])
        assert r.returncode == 0, r.stdout + r.stderr
        logs.append(log(tmp_path / f'r{n}')[0])
    assert logs[0].keys() == logs[1].keys()
    assert max(abs(logs[1][k] - logs[0][k]) / logs[0][k] for k in logs[0]) <= 1e-4
    plain = subprocess.run([train_cpu()] + [str(a) for a in common[:-6] + ['-o', tmp_path / 'plain']],
                           capture_output=True, text=True)
    assert plain.returncode == 0 and log(tmp_path / 'plain')[0] != logs[0], 'the regularisers must act'
