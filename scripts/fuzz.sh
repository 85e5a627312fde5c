#!/usr/bin/env bash
# The runs of the fuzz targets (docs/hardening.md) on the binaries make builds in FUZZ_DIR:
#
#     scripts/fuzz.sh run SECONDS TARGET...    libFuzzer: replay fuzz/crashes/TARGET, then fuzz SECONDS
#     scripts/fuzz.sh replay [OPTION...] TARGET...
#                                              the gcc+ASan driver (fuzz/replay_main.c) on the corpus and
#                                              the reproducers; OPTIONs (-mutations=N -max_total_time=S
#                                              -seed=N) go to the driver
#     scripts/fuzz.sh merge TARGET...          fold a minimized build/fuzz/corpus into fuzz/corpus
#     scripts/fuzz.sh coverage TARGET...       line and branch coverage of the readers by the corpus
#
# New corpus entries collect in FUZZ_DIR/corpus/TARGET; a failing input goes to fuzz/crashes/TARGET.
. "$(dirname "$0")/common.sh"
FUZZ_DIR=${FUZZ_DIR:-build/fuzz}
OPTS=(-max_len=8192 -timeout=10 -rss_limit_mb=2048 -print_final_stats=1)
# the reader functions whose coverage `coverage` reports
READERS='blob_load|blob_take|blob_done|checked_count|config_from_header|tokens_parse|loader_init|loader_next'
READERS+='|checkpoint_parse|resolve_latest|reference_parse'

# the reproducers of past findings of a target, one a line
crashes() { find "fuzz/crashes/$1" -type f ! -name '.*' | sort; }

run() {
    local seconds=$1 t log found
    shift
    for t in "$@"; do
        mkdir -p "$FUZZ_DIR/corpus/$t" "fuzz/crashes/$t"
        log=$FUZZ_DIR/fuzz_$t.log
        mapfile -t found < <(crashes "$t")
        if [ ${#found[@]} -gt 0 ]; then
            env "${SAN_ENV[@]}" "$FUZZ_DIR/fuzz_$t" "${found[@]}" > "$log.replay" 2>&1 \
                || { cat "$log.replay"; echo "fuzz $t: a reproducer in fuzz/crashes/$t fails again"; exit 1; }
        fi
        env "${SAN_ENV[@]}" "$FUZZ_DIR/fuzz_$t" "${OPTS[@]}" -max_total_time="$seconds" \
            -artifact_prefix="fuzz/crashes/$t/" "$FUZZ_DIR/corpus/$t" "fuzz/corpus/$t" > "$log" 2>&1 \
            || { tail -60 "$log"; echo "fuzz $t: FAILED, reproducer in fuzz/crashes/$t/"; exit 1; }
        echo "fuzz $t: ${#found[@]} reproducers replayed;" \
            "$(grep -E '^#[0-9]+[[:space:]]+DONE' "$log" | tr '\t' ' ' | sed 's/ *rss:.*//')"
        echo "fuzz $t: $(grep -E 'stat::number_of_executed_units' "$log") in $seconds s"
    done
}

replay() {
    local options=() t
    while [ $# -gt 0 ] && [ "${1#-}" != "$1" ]; do options+=("$1"); shift; done
    for t in "$@"; do
        mkdir -p "fuzz/crashes/$t"
        env "${SAN_ENV[@]}" "$FUZZ_DIR/replay_$t" -crash_dir="fuzz/crashes/$t" "${options[@]}" \
            "fuzz/corpus/$t" "fuzz/crashes/$t"
    done
}

merge() {
    local t
    for t in "$@"; do
        "$FUZZ_DIR/fuzz_$t" -merge=1 -max_len=8192 "fuzz/corpus/$t" "$FUZZ_DIR/corpus/$t"
    done
}

coverage() {
    local t n cov=$FUZZ_DIR/cov
    for t in "$@"; do
        mkdir -p "$FUZZ_DIR/corpus/$t"
        logged "$cov/$t.log" env LLVM_PROFILE_FILE="$cov/$t.profraw" "$cov/cov_$t" -runs=0 \
            "$FUZZ_DIR/corpus/$t" "fuzz/corpus/$t" "fuzz/crashes/$t"
        "${LLVM_PROFDATA:-llvm-profdata}" merge -sparse "$cov/$t.profraw" -o "$cov/$t.profdata"
        n=$(find "$FUZZ_DIR/corpus/$t" "fuzz/corpus/$t" "fuzz/crashes/$t" -type f ! -name '.*' | wc -l)
        echo "== $t: $n inputs"
        "${LLVM_COV:-llvm-cov}" report -show-functions "$cov/cov_$t" -instr-profile="$cov/$t.profdata" c/*.c c/*.h \
            | sed -E 's/^[a-z_]+\.[ch]://' | grep -E "^($READERS) " \
            | awk '$5 > $6 { printf "  %-18s lines %3d/%-3d (%s)  branches %3d/%-3d (%s)\n", $1, $5 - $6, $5, $7,
                             $8 - $9, $8, $10 }'
    done
}

mode=$1
shift
case $mode in
    run|replay|merge|coverage) "$mode" "$@" ;;
    *) echo "usage: scripts/fuzz.sh run SECONDS TARGET... | replay [OPTION...] TARGET... | merge TARGET..." \
            "| coverage TARGET..." >&2; exit 2 ;;
esac
