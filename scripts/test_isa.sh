#!/usr/bin/env bash
# make test_isa: the compare-outputs harness on every cell on each ISA build DIR/BUILD/test_cpu that
# make built (aarch64 under qemu; an x86-64 level this CPU does not run is built and skipped), then
# the C-vs-oracle suite on the cffi extension built for PY_ARCH into DIR/py (make test_isa_py: no
# BUILDs, that suite alone).
#
#     scripts/test_isa.sh DIR PY_ARCH [BUILD...]     (PYTHON, CC, CELLS and QEMU_AARCH64 from make)
. "$(dirname "$0")/common.sh"
dir=$1 py_arch=$2
shift 2
QEMU_AARCH64=${QEMU_AARCH64:-qemu-aarch64 -L /usr/aarch64-linux-gnu}
QEMU_X86=${QEMU_X86:-qemu-x86_64}
refs=()
for c in $CELLS; do refs+=("ref/ref_$c.bin" "ref/ref_${c}_bf16.bin"); done

# kernels LOG_DIR SET: every harness log in LOG_DIR says it ran the SET kernels
kernels() {
    local bad
    bad=$(grep -L "^kernels: $2 " "$1"/*.log || true)
    [ -z "$bad" ] || { echo "$1: expected the $2 kernels in $bad"; exit 1; }
}

# runs LEVEL: whether this CPU runs code built for an x86-64 level (gcc >= 12 knows them)
runs() {
    mkdir -p "$dir"
    printf 'int main(void) { return !__builtin_cpu_supports("%s"); }\n' "$1" \
        | $CC -x c - -o "$dir/cpu_$1" 2> /dev/null && "$dir/cpu_$1"
}

case " $* " in
    *" aarch64 "*) command -v "${QEMU_AARCH64%% *}" > /dev/null \
        || { echo "${QEMU_AARCH64%% *} not found (apt-get install qemu-user)"; exit 1; } ;;
esac
for build in "$@"; do
    command=$dir/$build/test_cpu
    case $build in
        any)   # every set this CPU runs, then what a Haswell (AVX2) and a Nehalem (SSE4.2) would pick
            sets=$("$command" --kernels | tr -d ,)
            for set in $sets; do
                PYRNN_ISA=$set scripts/harness.sh --label "any $set" "$dir/any/$set" "$command" "${refs[@]}"
                kernels "$dir/any/$set" "$set"
            done
            command -v "$QEMU_X86" > /dev/null || { echo "$QEMU_X86 not found (apt-get install qemu-user)"; exit 1; }
            for cpu in Haswell:avx2 Nehalem:sse2; do
                scripts/harness.sh --label "any, qemu -cpu ${cpu%:*}" "$dir/any/${cpu%:*}" \
                    "$QEMU_X86 -cpu ${cpu%:*} $command" "${refs[@]}"
                kernels "$dir/any/${cpu%:*}" "${cpu#*:}"
            done
            continue ;;
        pairs) runs x86-64-v3 || { echo "pairs: built; this CPU does not run AVX2"; continue; }
            PYRNN_ISA=avx2pairs scripts/harness.sh --label pairs "$dir/pairs" "$command" "${refs[@]}"
            kernels "$dir/pairs" avx2pairs
            continue ;;
        aarch64) command="$QEMU_AARCH64 $command" ;;
        native) ;;
        *) runs "$build" || { echo "$build: built; this CPU does not run it"; continue; } ;;
    esac
    scripts/harness.sh --label "$build" "$dir/$build" "$command" "${refs[@]}"
done

# the C-vs-oracle suite on the extension built for py_arch, imported from its own package folder
runs "$py_arch" || { echo "test_isa_py: this CPU does not run $py_arch: skipped"; exit 0; }
root=$PWD
cd "$dir/py"
export PYRNN_ARCH=$py_arch
"$PYTHON" -c "import os, pyrnn, pyrnn._crnn as m
assert os.path.realpath(m.__file__).startswith(os.getcwd()), m.__file__
print('extension built for $py_arch:', m.__file__, '- pyrnn.isa():', pyrnn.isa())"
rc=0
"$PYTHON" -m pytest -q -p no:cacheprovider "$root/tests/test_c_vs_oracle.py" "$root/tests/test_isa_builds.py" || rc=$?
[ $rc -ne 5 ] || echo "test_isa_py: pytest collected no tests"
exit $rc
