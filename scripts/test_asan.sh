#!/usr/bin/env bash
# make test_asan (docs/hardening.md): the ASan+UBSan builds in DIR, made by make (train_cpu, test_cpu,
# and the cffi extension in DIR/py), on the compare-outputs harness for every cell, a train /
# checkpoint / resume run, the CLI tests and the pytest suite.
#
#     scripts/test_asan.sh DIR        (PYTHON, CC and CELLS from make)
. "$(dirname "$0")/common.sh"
dir=$1
# the tests that run ./train_cpu (PYRNN_TRAIN_CPU picks another binary)
cli_tests=(tests/test_cli_errors.py tests/test_numerics.py)

echo "== test_asan: compare-outputs harness on every cell"
mkdir -p "$dir/ref"
refs=()
for c in $CELLS; do
    "$PYTHON" -m pyrnn.reference --cell "$c" -o "$dir/ref/ref_${c}_default.bin" > /dev/null
    "$PYTHON" -m pyrnn.reference --cell "$c" --max-grad-norm 0.1 --layers 3 --no-h0 \
        -o "$dir/ref/ref_${c}_clipped.bin" > /dev/null
    refs+=("$dir/ref/ref_${c}_default.bin" "$dir/ref/ref_${c}_clipped.bin")
done
env "${SAN_ENV[@]}" scripts/harness.sh "$dir/ref" "$dir/test_cpu" "${refs[@]}"

echo "== test_asan: train, checkpoint, resume (lstm, gru; dropout, eval, top-k sampling)"
d=$dir/train
rm -rf "$d"
mkdir -p "$d"
synthetic_data "$d/data"
for c in lstm gru; do
    flags=(-i "$d/data/train.bin" -j "$d/data/val.bin" -o "$d/$c" -v 3 -s 6 -m 20 -K 5 -k 3 -P 2)
    logged "$d/$c.log" env "${SAN_ENV[@]}" "$dir/train_cpu" "${flags[@]}" -c "$c" -L 2 -E 8 -H 16 -b 4 -t 16 \
        -p 0.1 -n 6
    logged "$d/$c.resume.log" env "${SAN_ENV[@]}" "$dir/train_cpu" "${flags[@]}" -r latest -n 10
    resumed "$d/$c.resume.log" "$d/$c" 6 10
    echo "$c: trained 6 steps, resumed to 10: $(grep 'final val loss' "$d/$c.resume.log")"
done

echo "== test_asan: CLI tests on the sanitized train_cpu"
env "${SAN_ENV[@]}" PYRNN_TRAIN_CPU="$(realpath "$dir/train_cpu")" \
    "$PYTHON" -m pytest -q -p no:cacheprovider "${cli_tests[@]}"

echo "== test_asan: pytest suite on the sanitized extension (libasan preloaded)"
# the interpreter is not built with ASan: libasan comes first, then libstdc++ (else ASan finds no
# __cxa_throw to wrap and aborts at torch's first C++ exception), and leak checking is off (CPython
# never frees everything at exit)
root=$PWD
ignored=()
for t in "${cli_tests[@]}" tests/test_kill_resume.py; do ignored+=("--ignore=$root/$t"); done
cd "$dir/py"
export LD_PRELOAD="$($CC -print-file-name=libasan.so) $($CC -print-file-name=libstdc++.so)" \
    ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 \
    UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1
"$PYTHON" -c "import os, pyrnn._crnn as m
assert os.path.realpath(m.__file__).startswith(os.getcwd()), m.__file__
print('sanitized extension:', m.__file__)"
# the programs the tests start inherit the preload, and nvcc crashes under libasan: the tests of the GPU
# tools and of the built GPU library, which never load the extension, run in `make test` only
"$PYTHON" -m pytest -q -p no:cacheprovider "$root/tests" "${ignored[@]}" --ignore="$root/tests/test_gpu_tools.py" \
    -k 'not test_the_built_library_exports_the_call_table'
