"""SIGKILL ./train_cpu at 20 random moments (seeded) while it checkpoints every step, and resume
each time with `-r latest`. Every resume must start from the last complete checkpoint: `latest`
always names a finished ckpt_*.bin (never a .tmp) whose CRC checks, the resumed step never goes
back, and the final ckpt_00000060.bin is byte for byte the one an uninterrupted run writes (the
trainer is bit-deterministic for a fixed thread count). A kill before the first checkpoint leaves
nothing to resume, and the run restarts from scratch."""
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from helpers import synthetic_text, train_cpu, write_split  # noqa: E402

from pyrnn.checkpoint import read_checkpoint  # noqa: E402

STEPS = 60
MODEL = ['-c', 'lstm', '-L', '1', '-E', '8', '-H', '16', '-b', '4', '-t', '16', '-n', str(STEPS), '-k', '1',
         '-v', '0', '-s', '0', '-m', '0', '-P', '1']
N_KILLS = 20
CKPT_NAME = re.compile(r'ckpt_(\d{8})\.bin')


LINE_BUFFERED = shutil.which('stdbuf') is not None


def command(data, out, resume):
    # stdout line-buffered (it is a pipe here), so progress can be watched and a killed run still
    # shows what it printed
    return (['stdbuf', '-oL'] if LINE_BUFFERED else []) + [train_cpu(), '-i', str(data / 'train.bin'), '-j', '', '-o', str(out)] + MODEL + \
        (['-r', 'latest'] if resume else [])


def environment():
    # stdbuf works by LD_PRELOAD, which a sanitized build (PYRNN_TRAIN_CPU) must be told to accept
    env = dict(os.environ)
    env['ASAN_OPTIONS'] = ':'.join(filter(None, [env.get('ASAN_OPTIONS'), 'verify_asan_link_order=0']))
    return env


def latest_checkpoint(out):
    """(name, step) of what `latest` names, checked to be a complete checkpoint; None if no latest."""
    path = out / 'latest'
    if not path.exists():
        return None
    name = path.read_text()
    assert name.endswith('\n') and CKPT_NAME.fullmatch(name[:-1]), f'latest holds {name!r}'
    name = name[:-1]
    k = read_checkpoint(str(out / name))   # raises on a partial or corrupted file (size, CRC-32)
    assert k['step'] == int(CKPT_NAME.fullmatch(name).group(1))
    return name, k['step']


def test_sigkill_at_random_moments_then_resume(tmp_path):
    data = tmp_path / 'data'
    write_split(data, synthetic_text(20000), val_frac=0.0)
    ref, out = tmp_path / 'reference', tmp_path / 'killed'

    t0 = time.monotonic()
    r = subprocess.run(command(data, ref, False), capture_output=True, text=True, timeout=120, env=environment())
    assert r.returncode == 0, r.stderr
    per_step = (time.monotonic() - t0) / STEPS
    expected = (ref / f'ckpt_{STEPS:08d}.bin').read_bytes()

    rng = random.Random(20261101)
    resumed_steps, restarts, killed, tmp_left = [], 0, 0, 0
    last_step = 0
    for i in range(N_KILLS + 1):
        before = latest_checkpoint(out)
        if before is not None:
            assert before[1] >= last_step, f'latest went back from step {last_step} to {before[1]}'
            last_step = before[1]
        proc = subprocess.Popen(command(data, out, before is not None), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=environment())
        # a reader thread collects stdout and notes when checkpoint `target` is saved, and how fast
        # steps go right now (the disk's fsync time varies a lot), so the kills spread over the run
        start = before[1] if before else 0
        target = start + (1 if i % 2 == 0 else rng.randint(1, 3))
        lines, saved_at, hit = [], [], threading.Event()

        def reader(proc=proc, lines=lines, saved_at=saved_at, hit=hit, target=target):
            for line in proc.stdout:
                lines.append(line)
                if line.startswith('saved '):
                    saved_at.append(time.monotonic())
                    if line.rstrip().endswith(f'ckpt_{target:08d}.bin'):
                        hit.set()
            hit.set()

        thread = threading.Thread(target=reader, daemon=True)
        thread.start()
        if i < N_KILLS:
            if i % 2 == 0:
                # start-up and the first checkpoint writes: a short random delay, at most until the
                # first new checkpoint is out
                hit.wait(timeout=rng.uniform(0, 1.5 * per_step))
            else:
                # a few steps in: once checkpoint start + k is out, a random part of a step later
                hit.wait(timeout=60 if LINE_BUFFERED else rng.uniform(0, 5 * per_step))
                time.sleep(rng.uniform(0, 1.2 * per_step))
            proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=120)
        thread.join(timeout=60)
        stdout, stderr = ''.join(lines), proc.stderr.read()
        proc.stderr.close()
        if len(saved_at) >= 3:
            per_step = float(np.median(np.diff(saved_at)))
        if i < N_KILLS and proc.returncode == -signal.SIGKILL:
            killed += 1
        else:
            assert proc.returncode == 0, f'run {i} exited {proc.returncode}:\n{stdout}{stderr}'
        m = re.search(r'^resuming from (\S+) at step (\d+)$', stdout, re.M)
        if before is None:
            restarts += 1
            assert m is None
        elif m is not None:   # (a kill can land before the line is printed)
            assert m.group(1) == str(out / before[0]) and int(m.group(2)) == before[1], (m.group(0), before)
            resumed_steps.append(before[1])
        assert not stderr.strip() or proc.returncode == -signal.SIGKILL, stderr
        tmp_left += sum(f.endswith('.tmp') for f in os.listdir(out)) if out.exists() else 0

    assert latest_checkpoint(out) == (f'ckpt_{STEPS:08d}.bin', STEPS)
    assert (out / f'ckpt_{STEPS:08d}.bin').read_bytes() == expected, 'resumed run differs from the uninterrupted one'
    assert resumed_steps == sorted(resumed_steps)
    assert killed >= N_KILLS // 2, f'only {killed} of {N_KILLS} kills landed while the trainer ran'
    print(f'\n{killed} kills landed ({tmp_left} left a .tmp behind), {restarts} runs started from scratch, '
          f'resumed at steps {resumed_steps}; {per_step * 1e3:.1f} ms per step')
