"""The recipe search of docs/benchmarks.md: each recipe is train_cpu on tiny-shakespeare under a
wall-clock budget (-x), and what it gave is its val loss against time and steps.

    python scripts/recipes.py --budget 600 --seeds 1337 --out docs/recipes.json [NAME...]
    python scripts/recipes.py --table docs/recipes.json     # the markdown table of a finished search

Runs one recipe at a time on the whole machine (never beside another job: the budget is wall time).
Each run's log.jsonl holds its val losses with the wall time since it started (elapsed_s), so the
table gives the val loss each run had reached at 2, 5 and 10 minutes, and a plot (with matplotlib)
draws val loss against time.
"""
import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, 'data', 'tinyshakespeare')
# every recipe: cosine to 10% of the lr after 100 warmup steps, clip 1, eval every 100 steps
COMMON = ['-u', '100', '-q', '0.1', '-g', '1', '-v', '100', '-s', '0', '-m', '0']
LSTM512 = ['-c', 'lstm', '-L', '2', '-E', '128', '-H', '512', '-b', '32', '-t', '128', '-l', '2e-3', '-w', '0.01']
RECIPES = {   # name: (what it tries, flags)
    'base': ('the earlier 10-minute recipe: 2x512 LSTM, dropout 0.2 per step', LSTM512 + ['-p', '0.2']),
    'locked': ('dropout 0.2 with locked masks', LSTM512 + ['-p', '0.2', '-d', 'locked']),
    'awd': ('locked dropout 0.2, weight drop 0.2, embedding dropout 0.1',
            LSTM512 + ['-p', '0.2', '-d', 'locked', '-W', '0.2', '-D', '0.1']),
    'light': ('locked dropout 0.1, weight drop 0.1', LSTM512 + ['-p', '0.1', '-d', 'locked', '-W', '0.1']),
    'none': ('no regulariser', LSTM512),
    'lr3': ('lr 3e-3, locked dropout 0.1, weight drop 0.1',
            LSTM512[:-4] + ['-l', '3e-3', '-w', '0.01', '-p', '0.1', '-d', 'locked', '-W', '0.1']),
    'h384': ('2x384 LSTM (more steps in the budget), locked dropout 0.1',
             ['-c', 'lstm', '-L', '2', '-E', '128', '-H', '384', '-b', '32', '-t', '128', '-l', '2e-3', '-w', '0.01',
              '-p', '0.1', '-d', 'locked']),
    'gru512': ('2x512 GRU, locked dropout 0.1',
               ['-c', 'gru', '-L', '2', '-E', '128', '-H', '512', '-b', '32', '-t', '128', '-l', '2e-3', '-w', '0.01',
                '-p', '0.1', '-d', 'locked']),
    't64': ('2x512 LSTM on B=64 x T=64, locked dropout 0.1',
            ['-c', 'lstm', '-L', '2', '-E', '128', '-H', '512', '-b', '64', '-t', '64', '-l', '2e-3', '-w', '0.01',
             '-p', '0.1', '-d', 'locked']),
}
MARKS = (120, 300, 600)


def run(name, flags, budget, seed, out_root, train_cpu, extra):
    out = os.path.join(out_root, f'{name}-{seed}')
    cmd = [train_cpu, '-i', os.path.join(DATA, 'train.bin'), '-j', os.path.join(DATA, 'val.bin'), '-o', out,
           *COMMON, *flags, '-x', str(budget), '-S', str(seed), *extra]
    t0 = time.monotonic()
    r = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.monotonic() - t0
    if r.returncode != 0:
        sys.exit(f'{name}: {r.stderr.strip()}')
    val, planned, steps = [], None, 0
    with open(os.path.join(out, 'log.jsonl')) as f:
        for rec in map(json.loads, f):
            if 'val_loss' in rec:
                val.append((rec['step'], rec['elapsed_s'], rec['val_loss']))
            planned = rec.get('planned_steps', planned)
            steps = max(steps, rec['step'])
    banner = r.stdout.splitlines()[0]
    return dict(name=name, seed=seed, flags=' '.join(COMMON + flags + ['-x', str(budget)]), wall_s=round(wall, 1),
                steps=steps, planned_steps=planned, final_val=val[-1][2], val=val, banner=banner)


def at(run_, seconds):
    """The last val loss logged by `seconds` into the run (None before the first)."""
    done = [v for _, t, v in run_['val'] if t <= seconds]
    return done[-1] if done else None


def table(runs):
    lines = ['| recipe | seed | what it tries | steps | wall | val at 2 / 5 / 10 min | final val |',
             '| --- | --- | --- | --- | --- | --- | --- |']
    for r in runs:
        marks = ' / '.join('-' if at(r, m) is None else f'{at(r, m):.3f}' for m in MARKS)
        lines.append(f"| {r['name']} | {r['seed']} | {RECIPES.get(r['name'], ('',))[0]} | {r['steps']} | "
                     f"{r['wall_s']:.0f} s | {marks} | **{r['final_val']:.4f}** |")
    return '\n'.join(lines)


def plot(runs, path):
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except ImportError:
        print('no matplotlib: no plot')
        return
    fig, ax = plt.subplots(figsize=(8, 5))
    for r in runs:
        ax.plot([t / 60 for _, t, _ in r['val']], [v for *_, v in r['val']], label=f"{r['name']} (seed {r['seed']})")
    ax.set(xlabel='wall time (min)', ylabel='val loss', ylim=(1.35, 2.0), title='tiny-shakespeare, 2 threads')
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=110, bbox_inches='tight')
    print(f'wrote {path}')


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('names', nargs='*', help=f'of {", ".join(RECIPES)} (default: all)')
    p.add_argument('--budget', type=int, default=600)
    p.add_argument('--seeds', nargs='+', type=int, default=[1337])
    p.add_argument('--out', default='recipes.json', help='appends to this JSON list')
    p.add_argument('--out-dir', default='out/recipes')
    p.add_argument('--train-cpu', default=os.path.join(ROOT, 'train_cpu'))
    p.add_argument('--extra', default='', help='flags added to every run (e.g. "-M bf16")')
    p.add_argument('--table', help='print the table of this JSON and stop')
    p.add_argument('--plot', help='with --table: draw val loss against time into this PNG')
    a = p.parse_args(argv)
    if a.table:
        with open(a.table) as f:
            runs = json.load(f)
        print(table(runs))
        if a.plot:
            plot(runs, a.plot)
        return
    runs = json.load(open(a.out)) if os.path.exists(a.out) else []
    for name in a.names or list(RECIPES):
        for seed in a.seeds:
            r = run(name, RECIPES[name][1], a.budget, seed, a.out_dir, a.train_cpu, a.extra.split())
            print(f"{name} seed {seed}: val {r['final_val']:.4f} after {r['steps']} steps in {r['wall_s']:.0f} s",
                  flush=True)
            runs.append(r)
            with open(a.out, 'w') as f:
                json.dump(runs, f, indent=1)
    print(table(runs))


if __name__ == '__main__':
    main()
