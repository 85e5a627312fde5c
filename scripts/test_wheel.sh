#!/usr/bin/env bash
# make test_wheel: a wheel from `pip wheel .`, installed into a folder of its own, imported by this
# Python natively and under qemu-x86_64 as an AVX2 (Haswell) and an SSE4.2 (Nehalem) CPU: each picks
# its kernels (checked by name) and matches the oracle. The one build runs on every x86-64 CPU.
#
#     scripts/test_wheel.sh DIR     (PYTHON from make; QEMU_X86 defaults to qemu-x86_64)
. "$(dirname "$0")/common.sh"
dir=$1
QEMU_X86=${QEMU_X86:-qemu-x86_64}
rm -rf "$dir"
mkdir -p "$dir"
logged "$dir/wheel.log" "$PYTHON" -m pip wheel -q --no-deps --no-build-isolation . -w "$dir/dist"
logged "$dir/install.log" "$PYTHON" -m pip install -q --no-deps --target "$dir/site" "$dir"/dist/pyrnn-*.whl
python=$("$PYTHON" -c 'import sys; print(sys.executable)')
check='import os, sys, numpy as np, pyrnn
assert pyrnn.__file__.startswith(os.path.abspath(sys.argv[1])), pyrnn.__file__
assert pyrnn.isa() == sys.argv[2] or sys.argv[2] == "any", (pyrnn.isa(), sys.argv[2])
x = np.random.default_rng(0).integers(0, 9, (3, 6))
c, ref = (pyrnn.CharLM("lstm", 9, 4, 8, 2, seed=1, backend=b).forward(x, x) for b in ("c", "numpy"))
assert abs(c - ref) < 1e-5 * ref, (c, ref)
print(f"{sys.argv[3]}: {pyrnn.isa()} kernels of {pyrnn.isa_list()}, loss {c:.6f} = oracle {ref:.6f}")'
# from outside the checkout, so that the wheel's package is the one imported
cd "$dir"
PYTHONPATH=site "$python" -c "$check" site any native
command -v "$QEMU_X86" > /dev/null || { echo "$QEMU_X86 not found (apt-get install qemu-user)"; exit 1; }
for cpu in Haswell:avx2 Nehalem:sse2; do
    PYTHONPATH=site "$QEMU_X86" -cpu "${cpu%:*}" "$python" -c "$check" site "${cpu#*:}" "qemu -cpu ${cpu%:*}" \
        2> >(grep -v "TCG doesn't support" >&2)
done
