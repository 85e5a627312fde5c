# Sourced by the suites in scripts/ (run by make from the repository root, which they move to):
# strict mode, the sanitizer settings, a step whose log is shown only when it fails, the synthetic
# data of the training runs, and the check that a run resumed. PYTHON, CC and CELLS come from make.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python3}
CC=${CC:-cc}
# any finding fails the run
SAN_ENV=(ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1)

# logged LOG COMMAND...: COMMAND with its output in LOG, printed when it fails
logged() {
    local log=$1
    shift
    "$@" > "$log" 2>&1 || { cat "$log"; return 1; }
}

# synthetic_data DIR: 6000 random bytes over 17 symbols, as DIR/train.bin and DIR/val.bin
synthetic_data() {
    "$PYTHON" -c "import sys, numpy as np; from pyrnn import data
symbols = np.frombuffer(b'abcdefghij klmno\n', np.uint8)
data.prepare(np.random.default_rng(0).choice(symbols, 6000).tobytes(), sys.argv[1])" "$1" > /dev/null
}

# resumed LOG OUT FROM TO: the run of LOG resumed from OUT's checkpoint of step FROM and saved step TO
resumed() {
    local from to
    from=$(printf '%s/ckpt_%08d.bin' "$2" "$3")
    to=$(printf '%s/ckpt_%08d.bin' "$2" "$4")
    grep -q "resuming from $from at step $3" "$1" && test -f "$to" \
        || { echo "resume did not happen as expected"; cat "$1"; return 1; }
}
