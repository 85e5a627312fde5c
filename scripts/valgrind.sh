#!/usr/bin/env bash
# make valgrind (docs/hardening.md): memcheck on DIR/test_cpu (an LSTM reference) and on DIR/train_cpu:
# 10 steps with checkpoints, a resume to step 20, and a resume from an empty `latest`.
#
#     scripts/valgrind.sh DIR         (PYTHON and VALGRIND from make)
. "$(dirname "$0")/common.sh"
dir=$1
VALGRIND=${VALGRIND:-valgrind}
command -v "$VALGRIND" > /dev/null || { echo "valgrind not found (apt-get install valgrind)"; exit 1; }
vg=("$VALGRIND" -q --error-exitcode=1 --leak-check=full)

d=$dir/run
rm -rf "$d"
mkdir -p "$d"
"$PYTHON" -m pyrnn.reference --cell lstm --layers 2 --vocab 5 --embed 3 --hidden 4 -B 2 -T 3 --steps 2 \
    -o "$d/ref.bin" > /dev/null
logged "$d/ref.log" env OMP_NUM_THREADS=1 "${vg[@]}" "$dir/test_cpu" "$d/ref.bin"
echo "valgrind test_cpu (lstm): $(tail -1 "$d/ref.log")"

synthetic_data "$d/data"
flags=(-i "$d/data/train.bin" -j "$d/data/val.bin" -o "$d/out" -v 10 -s 20 -m 10 -k 5 -P 1)
logged "$d/train.log" "${vg[@]}" "$dir/train_cpu" "${flags[@]}" -c lstm -L 1 -E 4 -H 8 -b 2 -t 8 -n 10
logged "$d/resume.log" "${vg[@]}" "$dir/train_cpu" "${flags[@]}" -r latest -n 20
resumed "$d/resume.log" "$d/out" 10 20
echo "valgrind train_cpu: 10 steps, checkpoint, resume to 20: clean"

# an empty `latest` is bad input: exit status 1 and its message, and no memory error (status 99)
: > "$d/out/latest"
rc=0
"$VALGRIND" -q --error-exitcode=99 --leak-check=full "$dir/train_cpu" "${flags[@]}" -r latest -n 30 \
    > "$d/empty.log" 2>&1 || rc=$?
[ "$rc" -eq 1 ] && grep -q "does not name a checkpoint" "$d/empty.log" || { cat "$d/empty.log"; exit 1; }
echo "valgrind train_cpu, resume from an empty latest: rejected, clean"
