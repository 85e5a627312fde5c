"""python -m pyrnn bench end to end on the smallest case: the table and JSON it writes hold
consistent figures (tokens/s from the median step, GFLOP/s from the FLOP count, paired ratios) and
name the CPU and the instruction set each side ran; --isa avx2 holds both sides to AVX2, --builds
times builds against each other, --precision bf16 runs both sides in bf16."""
import json
import os
import subprocess
import sys
from statistics import median

import pytest

import pyrnn
from pyrnn.bench import CONFIGS, HELD_ISA, LAYER_CONFIGS, _cpu, layer_step_flops, make_layer_step, step_flops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def bench(tmp_path, *args):
    out = tmp_path / 'bench.json'
    r = subprocess.run([sys.executable, '-m', 'pyrnn', 'bench', '--configs', 'small', '--cells', 'rnn',
                        '--warmup', '1', '--out', str(out), *args], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout, json.loads(out.read_text())


def test_bench_writes_consistent_results(tmp_path):
    stdout, d = bench(tmp_path, '--threads', '1', '--rounds', '3', '--repeats', '2')
    assert 'small    rnn   c' in stdout
    assert d['threads'] == 1 and d['rounds'] == 3 and d['gemm_gflops']['numpy'] > 0
    # the CPU model, and the kernels of the extension this process imports too
    assert d['cpu'] == _cpu()[0] and f"\n{d['cpu']}, {os.cpu_count()} cores, 1 threads\n" in '\n' + stdout
    isa = d['isa']
    assert isa['held_to'] == 'native' and isa['env'] == {} and isa['c'] == pyrnn.isa()
    assert f"instruction sets: C {pyrnn.isa()} (" in stdout
    assert os.path.samefile(isa['c_extension'], pyrnn._crnn.__file__)
    if 'torch' in d['gemm_gflops']:
        assert isa['torch'] in stdout and isa['torch'].isupper()
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


@pytest.mark.skipif(not {'avx2', 'fma'} <= _cpu()[1], reason='needs an x86 CPU with AVX2 and FMA')
def test_bench_isa_avx2_holds_both_sides(tmp_path):
    if 'avx2' not in pyrnn.isa_list():
        pytest.skip('this build holds no avx2 kernels (built for one other CPU)')
    stdout, d = bench(tmp_path, '--threads', '1', '--rounds', '1', '--repeats', '1', '--isa', 'avx2', '--no-numpy')
    isa = d['isa']
    assert isa['held_to'] == 'avx2' and isa['env'] == HELD_ISA['avx2']['env'] and isa['c'] == 'avx2'
    assert os.path.samefile(isa['c_extension'], pyrnn._crnn.__file__)   # the installed build, held by PYRNN_ISA
    assert 'held to avx2: ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2' in stdout
    if isa['blas'] is not None:
        assert isa['blas'] == 'Haswell'
    if 'torch' in d['gemm_gflops']:
        assert isa['torch'] == 'AVX2'
    assert {x['impl'] for x in d['results']} >= {'c'} and d['results'][0]['isa']['c'] == 'avx2'


def test_bench_builds_time_builds_against_the_first(tmp_path):
    sets = pyrnn.isa_list(cpu_only=True)
    if len(sets) < 2:
        pytest.skip('one kernel set: nothing to hold the builds apart')
    stdout, d = bench(tmp_path, '--threads', '1', '--rounds', '2', '--repeats', '1', '--builds', f'any:{sets[0]}',
                      'any')
    rows = {x['impl']: x for x in d['results']}
    assert rows[f'any:{sets[0]}']['x_first'] == 1.0 and rows['any']['x_first'] > 0
    assert rows[f'any:{sets[0]}']['isa']['c'] == sets[0] and rows['any']['isa']['c'] == sets[-1]
    assert d['builds'] == [f'any:{sets[0]}', 'any'] and 'x any' in stdout


def test_bench_bf16_runs_both_sides_in_bf16(tmp_path):
    stdout, d = bench(tmp_path, '--threads', '1', '--rounds', '1', '--repeats', '1', '--no-numpy', '--precision',
                      'bf16')
    assert d['isa']['precision'] == 'bf16' and "torch.autocast('cpu', dtype=torch.bfloat16)" in stdout
    c = next(x for x in d['results'] if x['impl'] == 'c')
    assert c['tok_s'] > 0


def test_layer_mode_counts_both_directions_and_runs():
    # a bidirectional layer l > 0 reads both directions' outputs: 2H inputs per direction
    I, H, L, B, T, D = LAYER_CONFIGS['layer_bi']
    assert layer_step_flops('lstm', I, H, L, B, T, 2) == 3 * 2 * 2 * B * T * 4 * H * ((I + H) + (2 * H + H))
    assert layer_step_flops('lstm', I, H, L, B, T, 1) == 3 * 2 * B * T * 4 * H * ((I + H) + (H + H))
    for config in LAYER_CONFIGS:   # the C side's step runs through the layer API
        make_layer_step('c', config, 'lstm', 1)()


def test_torch_module_mode_times_torch_against_pyrnn_torch(tmp_path):
    pytest.importorskip('torch', reason='--torch-module times torch training steps')
    stdout, d = bench(tmp_path, '--torch-module', '--threads', '1', '--rounds', '2', '--repeats', '1')
    rows = {x['impl']: x for x in d['results']}
    assert set(rows) == {'pyrnn', 'torch'} and all((x['config'], x['cell']) == ('small', 'rnn') for x in rows.values())
    assert rows['torch']['x_torch'] == 1.0 and rows['pyrnn']['x_torch'] > 0
    # each side names what it ran on: torch's kernels on both, pyrnn's C kernels on the pyrnn side only
    assert rows['pyrnn']['isa'] == {'torch': d['isa']['torch'], 'c': pyrnn.isa()}
    assert rows['torch']['isa'] == {'torch': d['isa']['torch']}
    assert "small    rnn   pyrnn" in stdout and f"torch {d['isa']['torch']} c {pyrnn.isa()}" in stdout
