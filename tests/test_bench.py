"""python -m pyrnn bench end to end on the smallest case: the table and JSON it writes hold
consistent figures (tokens/s from the median step, GFLOP/s from the FLOP count, paired ratios)."""
import json
import subprocess
import sys
from statistics import median

from pyrnn.bench import CONFIGS, step_flops


def test_bench_writes_consistent_results(tmp_path):
    out = tmp_path / 'bench.json'
    r = subprocess.run([sys.executable, '-m', 'pyrnn', 'bench', '--threads', '1', '--configs', 'small',
                        '--cells', 'rnn', '--rounds', '3', '--repeats', '2', '--warmup', '1', '--out', str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert 'small   rnn   c' in r.stdout
    d = json.loads(out.read_text())
    assert d['threads'] == 1 and d['rounds'] == 3 and d['gemm_gflops']['numpy'] > 0
    rows = {x['impl']: x for x in d['results']}
    assert {'c', 'numpy'} <= set(rows)
    E, H, L, B, T, _ = CONFIGS['small']
    for impl, x in rows.items():
        assert (x['config'], x['cell']) == ('small', 'rnn')
        assert x['step_s'] > 0 and abs(x['tok_s'] - B * T / x['step_s']) < 1e-6 * x['tok_s']
        assert abs(x['gflops'] - step_flops('rnn', E, H, L, B, T) / x['step_s'] / 1e9) < 1e-6 * x['gflops']
        assert x['peak_rss_mb'] > x['train_rss_mb'] > 0
        assert len(x['tok_s_rounds']) == (1 if impl == 'numpy' else 3)
    if 'torch' in rows:   # each round's ratio pairs c's turn with torch's turn of the same round
        assert rows['torch']['x_torch'] == 1.0
        c, t = rows['c']['tok_s_rounds'], rows['torch']['tok_s_rounds']
        paired = sorted(a / b for a, b in zip(c, t))
        assert all(abs(x - y) < 0.01 * y for x, y in zip(rows['c']['x_torch_rounds'], paired))
        assert abs(rows['c']['x_torch'] - median(paired)) < 0.01 * median(paired)
