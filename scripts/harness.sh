#!/usr/bin/env bash
# The compare-outputs harness on reference files, for make test_c, test_isa, test_asan and test_gpu_run:
#
#     scripts/harness.sh [--label TEXT] LOG_DIR 'COMMAND' REF...
#
# runs COMMAND REF for each REF (COMMAND is split into words: a harness binary, or qemu and one),
# keeps the output in LOG_DIR/<ref name>.log and prints its last line, the verdict, after the ref's
# path (and TEXT); the first failure prints its whole log and stops with a non-zero status.
set -euo pipefail
label=
if [ "${1:-}" = --label ]; then label="$2 "; shift 2; fi
log_dir=$1 command=$2
shift 2
mkdir -p "$log_dir"
for ref in "$@"; do
    log=$log_dir/$(basename "$ref" .bin).log
    # shellcheck disable=SC2086  # COMMAND is words on purpose
    $command "$ref" > "$log" 2>&1 || { cat "$log"; echo "$label$ref: FAILED"; exit 1; }
    echo "$label$ref: $(tail -1 "$log")"
done
