# pyrnn: `make train` runs the main job, `make test` installs what the tests need and runs them.
PYTHON ?= python3
CC ?= cc
# -O3 and OpenMP when the compiler takes them, plain -O2 otherwise; we never read errno, and without
# -fno-math-errno a sqrtf call keeps the AdamW loop scalar
try_flag = $(shell echo 'int main(void){return 0;}' | $(CC) $(1) -x c - -o /dev/null 2>/dev/null && echo $(1))
# the CPU to build for: -march=$(ARCH). native (this machine) by default; x86-64-v2 (SSE4.2),
# x86-64-v3 (AVX2 + FMA), x86-64-v4 (AVX-512) or any other -march value builds for another one:
# `make train_cpu ARCH=x86-64-v3`. PYRNN_ARCH in the environment sets both this default and the cffi
# extension's (pyrnn/_build.py); an ARCH variable in the environment is ignored (it often means
# something else). An ARCH the compiler rejects is an error; native falls back to no -march.
ifneq ($(origin ARCH),command line)
ARCH := $(or $(PYRNN_ARCH),native)
endif
export PYRNN_ARCH := $(ARCH)
MARCH := $(if $(filter native,$(ARCH)),$(call try_flag,-march=native),-march=$(ARCH))
OPT := $(or $(call try_flag,-O3),-O2) $(call try_flag,-fno-math-errno)
OMP := $(call try_flag,-fopenmp)
WARN = -Wall -Wextra -Wno-unused-function
CFLAGS ?= $(OPT) $(MARCH) $(OMP) $(WARN)
LDLIBS = -lm

C_SRC = c/train_rnn.c
# the headers train_rnn.c includes, and the compile command: every C build depends on them too, so
# `make train ARCH=x86-64-v3` after a native build rebuilds instead of running the native binary
C_DEPS = $(wildcard c/*.h) build/cflags
build/cflags: FORCE
	@mkdir -p $(@D); echo '$(CC) $(CFLAGS)' | cmp -s - $@ || echo '$(CC) $(CFLAGS)' > $@
.PHONY: FORCE
DATA_DIR ?= data/tinyshakespeare
OUT_DIR ?= out/train

.PHONY: all lib deps install train bench test test_c refs clean

all: train_cpu test_cpu lib

train_cpu: $(C_SRC) $(C_DEPS)
	$(CC) $(CFLAGS) $< -o $@ $(LDLIBS)

test_cpu: c/test_rnn.c $(C_SRC) $(C_DEPS)
	$(CC) $(CFLAGS) $< -o $@ $(LDLIBS)

# the shared library behind the bindings (pip builds the same file into pyrnn/_crnn*.so)
lib: lib/libpyrnn.so
lib/libpyrnn.so: $(C_SRC) $(C_DEPS)
	@mkdir -p lib
	$(CC) $(CFLAGS) -DPYRNN_LIBRARY -shared -fPIC $< -o $@ $(LDLIBS)

# everything the package and its tests need, then the package itself (builds the cffi extension for
# ARCH). A fresh venv's setuptools (65.5 in Python 3.11's) has no bdist_wheel of its own (it came in
# 70.1), and pip's editable install needs it: wheel provides it
deps:
	$(PYTHON) -m pip install -q --disable-pip-version-check numpy cffi pytest "setuptools>=64" wheel
install: deps
	$(PYTHON) -m pip install -q --disable-pip-version-check --no-build-isolation -e .

# the main job: tiny-shakespeare (downloaded and hash-checked, or TINYSHAKESPEARE=/path/to/input.txt),
# a 2-layer LSTM for about 3 minutes on 2 cores, then the val loss and a sample
TINYSHAKESPEARE ?= $(PYRNN_TINYSHAKESPEARE)
TRAIN_STEPS ?= 2500
TRAIN_FLAGS ?= -c lstm -L 2 -E 128 -H 256 -b 32 -t 64 -l 2e-3 -n $(TRAIN_STEPS) -v 500 -s 0 -m 500 -e 0.8
$(DATA_DIR)/train.bin:
	$(PYTHON) -m pip install -q --disable-pip-version-check numpy
	$(PYTHON) -m pyrnn prepare --dataset tinyshakespeare $(if $(TINYSHAKESPEARE),--input $(TINYSHAKESPEARE)) --out-dir $(DATA_DIR)
train: train_cpu $(DATA_DIR)/train.bin
	./train_cpu -i $(DATA_DIR)/train.bin -j $(DATA_DIR)/val.bin -o $(OUT_DIR) $(TRAIN_FLAGS)

bench: install
	$(PYTHON) -m pyrnn bench --out bench.json

# reference files from the oracle, checked by the C harness
refs:
	@mkdir -p ref
	for c in rnn rnn_relu lstm gru; do $(PYTHON) -m pyrnn.reference --cell $$c --max-grad-norm 0.1 -o ref/ref_$$c.bin || exit 1; done
test_c: test_cpu refs
	for c in rnn rnn_relu lstm gru; do ./test_cpu ref/ref_$$c.bin > ref/test_$$c.log || { cat ref/test_$$c.log; exit 1; }; tail -1 ref/test_$$c.log; done

test: install train_cpu test_c
	$(PYTHON) -m pytest -q tests

clean:
	rm -rf train_cpu test_cpu lib ref build *.egg-info pyrnn/_crnn*.so pyrnn/_crnn*.c pyrnn/_crnn*.o

# ---- MPI ----
# ./train_cpu_mpi: the CPU trainer built by mpicc with -DUSE_MPI, data-parallel over MPI ranks:
# `mpiexec -n R ./train_cpu_mpi <train_cpu flags>` (README, "More than one process"). The MPI is
# MPICC when given, else the mpicc on the PATH (Debian: mpich + libmpich-dev, or openmpi-bin +
# libopenmpi-dev), else the mpich wheel in the Python environment (pip install mpich: mpicc, mpiexec,
# mpi.h, libmpi.so; no root needed), installed there when missing; its mpiexec lies beside its mpicc.
# ./train_gpu_mpi: the GPU trainer with NCCL (cuda/mpi_nccl.cuh) bootstrapped over the same MPI;
# NCCL from NCCL_PATH, else the CUDA toolkit or the system, else the nvidia-nccl-cu13 wheel.
mpi_comma := ,
mpi_py_scripts = $(shell $(PYTHON) -c "import sysconfig; print(sysconfig.get_path('scripts'))" 2>/dev/null)
ifeq ($(origin MPICC),undefined)
MPICC = $(eval MPICC := $(or $(shell command -v mpicc 2>/dev/null),$(mpi_py_scripts)/mpicc))$(MPICC)
endif
# the compile and link flags the wrapper adds (MPICH: -show, Open MPI: --showme), for nvcc
mpi_show = $(shell $(MPICC) -show 2>/dev/null || $(MPICC) --showme 2>/dev/null)
MPI_NVCC_FLAGS = $(foreach w,$(wordlist 2,999,$(mpi_show)),$(if $(filter -I% -L% -l% -D%,$(w)),$(w),$(if $(filter -Wl$(mpi_comma)%,$(w)),-Xlinker $(patsubst -Wl$(mpi_comma)%,%,$(w)))))
mpi_py_nccl = import nvidia.nccl as m; print(list(m.__path__)[0])
mpi_sys_nccl = $(wildcard /usr/include/nccl.h /usr/include/x86_64-linux-gnu/nccl.h)
NCCL_ROOT = $(eval NCCL_ROOT := $(or $(NCCL_PATH),$(if $(wildcard $(CUDA_HOME)/include/nccl.h),$(CUDA_HOME)),$(if $(mpi_sys_nccl),,$(shell $(PYTHON) -c "$(mpi_py_nccl)" 2>/dev/null))))$(NCCL_ROOT)

.PHONY: mpi_deps nccl_deps clean_mpi

mpi_deps:
	@command -v $(MPICC) > /dev/null 2>&1 || { echo "no mpicc found: installing the mpich wheel into $(PYTHON)'s environment"; \
		$(PYTHON) -m pip install -q --disable-pip-version-check mpich && command -v $(MPICC) > /dev/null; } \
		|| { echo "error: no MPI: install one (apt-get install mpich libmpich-dev) or set MPICC"; exit 1; }

train_cpu_mpi: $(C_SRC) $(C_DEPS) | mpi_deps
	MPICH_CC="$(CC)" OMPI_CC="$(CC)" $(MPICC) -DUSE_MPI $(CFLAGS) $< -o $@ $(LDLIBS)
	@echo "run it as: $$(dirname $$(command -v $(MPICC)))/mpiexec -n RANKS ./$@ <train_cpu flags>"

nccl_deps:
	$(PYTHON) -m pip install -q --disable-pip-version-check nvidia-nccl-cu13

# needs cuda/train_rnn.cu to call nccl_init and nccl_step_mean (see cuda/mpi_nccl.cuh); without nvcc
# it says so and succeeds, as the other GPU targets do
train_gpu_mpi: cuda/train_rnn.cu $(wildcard cuda/*.cuh) $(C_SRC) $(C_DEPS) | mpi_deps
	@test -n "$(NVCC)" || { echo "nvcc not found (PATH, CUDA_HOME=$(CUDA_HOME)): skipping $@"; exit 0; }; \
	test -n "$(CUDNN_ROOT)$(gpu_sys_cudnn)" || { echo "error: cuDNN not found: make cuda_deps, or set CUDNN_PATH"; exit 1; }; \
	test -n "$(NCCL_ROOT)$(mpi_sys_nccl)" || { echo "error: NCCL not found: make nccl_deps, or set NCCL_PATH"; exit 1; }; \
	echo "$(NVCC_CMD) -DUSE_MPI $(MPI_NVCC_FLAGS) $< -o $@ $(call gpu_dep_flags,$(NCCL_ROOT),nccl) $(GPU_LDLIBS)"; \
	$(NVCC_CMD) -DUSE_MPI $(MPI_NVCC_FLAGS) $< -o $@ $(call gpu_dep_flags,$(NCCL_ROOT),nccl) $(GPU_LDLIBS)

clean_mpi:
	rm -f train_cpu_mpi train_gpu_mpi

# ---- GPU ----
# cuda/: the GPU model (gpu_model.cuh on cudnn_rnn.cuh, kernels.cuh, gpu_check.cuh) built three ways:
# the trainer ./train_gpu (train_rnn.cu), the library behind pyrnn/_cuda.py lib/libpyrnn_cuda.so
# (lib_rnn.cu) and its compare-outputs harness ./test_gpu (test_rnn.cu, on the library's API).
# Without nvcc these targets say so and succeed.
# cuDNN and cuBLAS come from CUDNN_PATH / CUBLAS_PATH, else the CUDA toolkit or the system, else
# the pip wheels (`make cuda_deps`), which ship only versioned sonames, hence -l:libX.so.N + rpath.
CUDA_HOME ?= /usr/local/cuda
ifeq ($(origin NVCC),undefined)
NVCC := $(shell command -v nvcc 2>/dev/null || { test -x $(CUDA_HOME)/bin/nvcc && echo $(CUDA_HOME)/bin/nvcc; } || { test -x /usr/local/cuda/bin/nvcc && echo /usr/local/cuda/bin/nvcc; })
endif
CXX ?= g++
gpu_comma := ,
# the pip wheels' folders; nvidia is a namespace package, so ask for __path__ (evaluated once, on use)
gpu_py_cudnn = import nvidia.cudnn as m; print(list(m.__path__)[0])
gpu_py_cublas = import importlib.util as u, os; print(next((p for n in ('nvidia.cu13', 'nvidia.cublas') if u.find_spec(n) for p in u.find_spec(n).submodule_search_locations if os.path.exists(os.path.join(p, 'include', 'cublas_v2.h'))), ''))
GPU_PIP_CUDNN = $(eval GPU_PIP_CUDNN := $(shell $(PYTHON) -c "$(gpu_py_cudnn)" 2>/dev/null))$(GPU_PIP_CUDNN)
GPU_PIP_CUBLAS = $(eval GPU_PIP_CUBLAS := $(shell $(PYTHON) -c "$(gpu_py_cublas)" 2>/dev/null))$(GPU_PIP_CUBLAS)
# root folders (include/ and lib/ or lib64/ below); empty = the compiler's default paths
gpu_sys_cudnn = $(wildcard /usr/include/cudnn.h /usr/include/x86_64-linux-gnu/cudnn.h)
CUDNN_ROOT = $(eval CUDNN_ROOT := $(or $(CUDNN_PATH),$(if $(wildcard $(CUDA_HOME)/include/cudnn.h),$(CUDA_HOME)),$(if $(gpu_sys_cudnn),,$(GPU_PIP_CUDNN))))$(CUDNN_ROOT)
CUBLAS_ROOT = $(eval CUBLAS_ROOT := $(or $(CUBLAS_PATH),$(if $(wildcard $(CUDA_HOME)/include/cublas_v2.h),$(CUDA_HOME)),$(if $(wildcard /usr/include/cublas_v2.h),,$(GPU_PIP_CUBLAS))))$(CUBLAS_ROOT)
gpu_libdir = $(firstword $(wildcard $(1)/lib64/lib$(2).so* $(1)/lib/lib$(2).so*))
# -lX when an unversioned libX.so exists, else -l:libX.so.N (what the wheels ship)
gpu_libflag = $(if $(wildcard $(dir $(call gpu_libdir,$(1),$(2)))lib$(2).so),-l$(2),-l:$(notdir $(firstword $(wildcard $(dir $(call gpu_libdir,$(1),$(2)))lib$(2).so.[0-9] $(dir $(call gpu_libdir,$(1),$(2)))lib$(2).so.[0-9][0-9]))))
gpu_dep_flags = $(if $(1),-I$(1)/include -L$(dir $(call gpu_libdir,$(1),$(2))) -Xlinker -rpath$(gpu_comma)$(patsubst %/,%,$(dir $(call gpu_libdir,$(1),$(2)))) $(call gpu_libflag,$(1),$(2)),-l$(2))
GPU_LIBS = $(call gpu_dep_flags,$(CUDNN_ROOT),cudnn) $(call gpu_dep_flags,$(CUBLAS_ROOT),cublas)
# host side as for the CPU build: OpenMP when the host compiler takes it; the C file's `= { 0 }`
# initialisers are idiomatic C but draw -Wmissing-field-initializers as C++
gpu_cxx_flag = $(shell echo 'int main(){return 0;}' | $(CXX) $(1) -x c++ - -o /dev/null 2>/dev/null && echo $(gpu_comma)$(1))
# host code for the CPU that ARCH names (MARCH, as every C build)
GPU_HOST_FLAGS = $(eval GPU_HOST_FLAGS := -Wall,-Wextra,-Wno-unused-function,-Wno-missing-field-initializers$(if $(MARCH),$(gpu_comma)$(MARCH))$(call gpu_cxx_flag,-fopenmp))$(GPU_HOST_FLAGS)
GPU_ARCH ?= -gencode arch=compute_90,code=[sm_90,compute_90]
NVCCFLAGS ?= -O3 -std=c++17 $(GPU_ARCH)
NVCC_CMD = $(NVCC) $(NVCCFLAGS) -Xcompiler $(GPU_HOST_FLAGS)
GPU_LDLIBS = $(GPU_LIBS) $(if $(findstring fopenmp,$(GPU_HOST_FLAGS)),-lgomp) -lm
# every GPU build depends on the headers and on its compile line (build/nvccflags, as build/cflags
# for C): a checkout built elsewhere (other cuDNN paths, other ARCH) is rebuilt, not run
GPU_SRC = $(wildcard cuda/*.cuh) $(C_SRC) $(C_DEPS) build/nvccflags
build/nvccflags: FORCE
	@mkdir -p $(@D); echo '$(NVCC_CMD) $(GPU_LDLIBS)' | cmp -s - $@ || echo '$(NVCC_CMD) $(GPU_LDLIBS)' > $@
GPU_REF_CELLS = rnn rnn_relu lstm gru

.PHONY: lib_gpu test_gpu_run refs_gpu cuda_deps gpu_build_check gpu_info gpu_verify gpu_wheels bench_gpu clean_gpu

ifeq ($(NVCC),)
train_gpu test_gpu lib_gpu:
	@echo "nvcc not found (PATH, CUDA_HOME=$(CUDA_HOME)): skipping $@"
else
train_gpu: cuda/train_rnn.cu $(GPU_SRC)
	@test -n "$(CUDNN_ROOT)$(gpu_sys_cudnn)" || { echo "error: cuDNN not found: make cuda_deps, or set CUDNN_PATH"; exit 1; }
	$(NVCC_CMD) $< -o $@ $(GPU_LDLIBS)
test_gpu: cuda/test_rnn.cu cuda/lib_rnn.cu c/reference.h $(GPU_SRC)
	@test -n "$(CUDNN_ROOT)$(gpu_sys_cudnn)" || { echo "error: cuDNN not found: make cuda_deps, or set CUDNN_PATH"; exit 1; }
	$(NVCC_CMD) $< -o $@ $(GPU_LDLIBS)
lib_gpu: lib/libpyrnn_cuda.so
lib/libpyrnn_cuda.so: cuda/lib_rnn.cu $(GPU_SRC)
	@test -n "$(CUDNN_ROOT)$(gpu_sys_cudnn)" || { echo "error: cuDNN not found: make cuda_deps, or set CUDNN_PATH"; exit 1; }
	@mkdir -p lib
	$(NVCC_CMD) -Xcompiler -fPIC -shared $< -o $@ $(GPU_LDLIBS)
endif

# builds all three when nvcc is here; succeeds (and says so) when it is not
# CI: compile and link every GPU target whenever nvcc is present, GPU or not
gpu_build_check:
ifeq ($(NVCC),)
	@echo "nvcc not found: skipping GPU targets"
else
	$(MAKE) cuda_deps
	$(MAKE) train_gpu test_gpu lib_gpu
endif

gpu_info:
	@echo "NVCC=$(NVCC)"; echo "CUDNN_ROOT=$(CUDNN_ROOT)"; echo "CUBLAS_ROOT=$(CUBLAS_ROOT)"
	@echo "GPU_LDLIBS=$(GPU_LDLIBS)"; echo "NVCC_CMD=$(NVCC_CMD)"

# the pinned cuDNN and cuBLAS wheels for nvcc's CUDA major version (12 or 13; scripts/gpu_env.py)
cuda_deps:
	$(PYTHON) scripts/gpu_env.py deps $(if $(NVCC),--nvcc $(NVCC))

# everything the GPU side promises, on a GPU machine, built there (docs/gpu.md): the builds, the
# harness, train_gpu against train_cpu, checkpoints, the bindings, the numerical-fault tests and the
# benchmark; out/gpu_verify/summary.txt. Without a GPU it says so in one line and stops.
# GPU_VERIFY_ARGS="--skip bench" (or --only STAGE..., --python PY, --deadline S) for part of it.
gpu_verify:
	@$(PYTHON) scripts/gpu_verify.py $(GPU_VERIFY_ARGS)

# what a GPU machine without network lacks for gpu_verify, as wheels for its Python (cp312 manylinux
# by default): cffi and pycparser, which the C extension's build needs. Into .whl/ (ignored), where
# gpu_verify installs from; carry that folder to the machine (docs/gpu.md)
GPU_WHEELS_DIR ?= .whl
GPU_WHEELS_PYTHON ?= 3.12
GPU_WHEELS ?= cffi==2.0.0 pycparser==3.0
gpu_wheels:
	$(PYTHON) -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
		--python-version $(GPU_WHEELS_PYTHON) --implementation cp --platform manylinux_2_28_x86_64 \
		--platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d $(GPU_WHEELS_DIR) $(GPU_WHEELS)
	@ls $(GPU_WHEELS_DIR)

# train_gpu's step against PyTorch's (torch from TORCH_PYTHON, or any python3 that has it)
bench_gpu: lib_gpu
	$(PYTHON) scripts/bench_gpu.py --out out/bench_gpu.json

# larger references than `make refs`: several blocks per kernel, E != H, more params than one reduction pass
refs_gpu:
	@mkdir -p ref
	for c in $(GPU_REF_CELLS); do $(PYTHON) -m pyrnn.reference --cell $$c --vocab 65 --embed 48 --hidden 96 -B 16 -T 24 --steps 3 --max-grad-norm 0.1 -o ref/ref_big_$$c.bin || exit 1; done

# the harness on every reference, when there is a GPU to run it on
test_gpu_run: test_gpu
	@if ! nvidia-smi -L >/dev/null 2>&1; then echo "no GPU (nvidia-smi -L failed): skipping test_gpu_run"; exit 0; fi; \
	if [ ! -x ./test_gpu ]; then echo "./test_gpu was not built: skipping test_gpu_run"; exit 0; fi; \
	$(MAKE) refs refs_gpu || exit 1; \
	for r in $(foreach c,$(GPU_REF_CELLS),ref/ref_$(c).bin ref/ref_big_$(c).bin); do \
		log=ref/test_gpu_$$(basename $$r .bin).log; \
		./test_gpu $$r > $$log 2>&1 || { cat $$log; exit 1; }; echo "$$r: $$(tail -1 $$log)"; done

clean_gpu:
	rm -f train_gpu test_gpu lib/libpyrnn_cuda.so

# ---- hardening ----
# Sanitizers, valgrind and fuzzing of the file readers (docs/hardening.md). Everything builds under
# build/ and leaves ./train_cpu, ./test_cpu and pyrnn/_crnn*.so alone.
#   make test_asan   ASan+UBSan builds of test_cpu, train_cpu and the cffi extension; the harness on
#                    every cell, a train / checkpoint / resume run, the CLI tests on the sanitized
#                    train_cpu and the pytest suite on the sanitized extension (libasan preloaded)
#   make valgrind    memcheck on test_cpu (one cell) and a 20-step train_cpu run with save and resume
#   make fuzz        each libFuzzer target for FUZZ_SECONDS (needs clang); without clang, a gcc+ASan
#                    driver replays the corpus and random mutations of it instead, and says so
SAN_FLAGS = -fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer -g -O1
SAN_WARN = $(WARN)
SAN_ENV = ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1
# CPython never frees everything at exit, so leak checking is off only for the interpreter run
SAN_PY_ENV = LD_PRELOAD=$$($(CC) -print-file-name=libasan.so) ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 \
	UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1
ASAN_DIR = build/asan
HARD_CELLS = rnn rnn_relu lstm gru
# the tests that run ./train_cpu (PYRNN_TRAIN_CPU picks another binary)
CLI_TESTS = tests/test_cli_errors.py tests/test_numerics.py
# 6000 random bytes over 17 symbols, as train.bin / val.bin in the folder given
HARD_DATA_PY = import sys, numpy as np; from pyrnn import data; \
	data.prepare(np.random.default_rng(0).choice(np.frombuffer(b'abcdefghij klmno\n', np.uint8), 6000).tobytes(), sys.argv[1])

.PHONY: test_asan asan_build asan_py valgrind fuzz fuzz_build fuzz_replay fuzz_seeds fuzz_merge fuzz_coverage clean_hardening

$(ASAN_DIR)/train_cpu: $(C_SRC) $(C_DEPS)
	@mkdir -p $(@D)
	$(CC) $(SAN_FLAGS) $(OMP) $(SAN_WARN) $< -o $@ $(LDLIBS)
$(ASAN_DIR)/test_cpu: c/test_rnn.c $(C_SRC) $(C_DEPS)
	@mkdir -p $(@D)
	$(CC) $(SAN_FLAGS) $(OMP) $(SAN_WARN) $< -o $@ $(LDLIBS)

# the cffi extension built with the sanitizers into a package folder of its own, whose .py files
# are links to pyrnn/*.py; Python imports it from there when run in that folder
asan_py: $(ASAN_DIR)/py/.built
$(ASAN_DIR)/py/.built: $(C_SRC) $(C_DEPS) pyrnn/_build.py
	CC="$(CC)" CFLAGS="$(SAN_FLAGS)" LDFLAGS="-fsanitize=address,undefined" $(PYTHON) pyrnn/_build.py $(ASAN_DIR)/py
	@touch $@

asan_build: $(ASAN_DIR)/train_cpu $(ASAN_DIR)/test_cpu asan_py

test_asan: asan_build
	@echo "== test_asan: compare-outputs harness on every cell"
	@mkdir -p $(ASAN_DIR)/ref
	@for c in $(HARD_CELLS); do \
		for v in "default:" "clipped:--max-grad-norm 0.1 --layers 3 --no-h0"; do \
			ref=$(ASAN_DIR)/ref/ref_$${c}_$${v%%:*}.bin; \
			$(PYTHON) -m pyrnn.reference --cell $$c $${v#*:} -o $$ref > /dev/null || exit 1; \
			$(SAN_ENV) $(ASAN_DIR)/test_cpu $$ref > $$ref.log 2>&1 || { cat $$ref.log; exit 1; }; \
			echo "$$ref: $$(tail -1 $$ref.log)"; \
		done; done
	@echo "== test_asan: train, checkpoint, resume (lstm, gru; dropout, eval, top-k sampling)"
	@d=$(ASAN_DIR)/train; rm -rf $$d; mkdir -p $$d; $(PYTHON) -c "$(HARD_DATA_PY)" $$d/data || exit 1; \
	for c in lstm gru; do \
		flags="-i $$d/data/train.bin -j $$d/data/val.bin -o $$d/$$c -v 3 -s 6 -m 20 -K 5 -k 3 -P 2"; \
		$(SAN_ENV) $(ASAN_DIR)/train_cpu $$flags -c $$c -L 2 -E 8 -H 16 -b 4 -t 16 -p 0.1 -n 6 > $$d/$$c.log 2>&1 \
			|| { cat $$d/$$c.log; exit 1; }; \
		$(SAN_ENV) $(ASAN_DIR)/train_cpu $$flags -r latest -n 10 > $$d/$$c.resume.log 2>&1 \
			|| { cat $$d/$$c.resume.log; exit 1; }; \
		grep -q "resuming from $$d/$$c/ckpt_00000006.bin at step 6" $$d/$$c.resume.log && test -f $$d/$$c/ckpt_00000010.bin \
			|| { echo "resume did not happen as expected"; cat $$d/$$c.resume.log; exit 1; }; \
		echo "$$c: trained 6 steps, resumed to 10: $$(grep 'final val loss' $$d/$$c.resume.log)"; \
	done
	@echo "== test_asan: CLI tests on the sanitized train_cpu"
	$(SAN_ENV) PYRNN_TRAIN_CPU=$(CURDIR)/$(ASAN_DIR)/train_cpu $(PYTHON) -m pytest -q -p no:cacheprovider $(CLI_TESTS)
	@echo "== test_asan: pytest suite on the sanitized extension (libasan preloaded)"
	cd $(ASAN_DIR)/py && $(SAN_PY_ENV) $(PYTHON) -c \
		"import os, pyrnn._crnn as m; assert os.path.realpath(m.__file__).startswith(os.getcwd()), m.__file__; print('sanitized extension:', m.__file__)"
	cd $(ASAN_DIR)/py && $(SAN_PY_ENV) $(PYTHON) -m pytest -q -p no:cacheprovider $(CURDIR)/tests \
		$(foreach t,$(CLI_TESTS) tests/test_kill_resume.py,--ignore=$(CURDIR)/$(t))

# valgrind 3.19 decodes no AVX-512, so this build leaves out -march=native
VG_DIR = build/valgrind
VALGRIND ?= valgrind
VG = $(VALGRIND) -q --error-exitcode=1 --leak-check=full
$(VG_DIR)/train_cpu: $(C_SRC) $(C_DEPS)
	@mkdir -p $(@D)
	$(CC) -O2 -g $(OMP) $(SAN_WARN) $< -o $@ $(LDLIBS)
$(VG_DIR)/test_cpu: c/test_rnn.c $(C_SRC) $(C_DEPS)
	@mkdir -p $(@D)
	$(CC) -O2 -g $(OMP) $(SAN_WARN) $< -o $@ $(LDLIBS)

valgrind: $(VG_DIR)/train_cpu $(VG_DIR)/test_cpu
	@command -v $(VALGRIND) > /dev/null || { echo "valgrind not found (apt-get install valgrind)"; exit 1; }
	@d=$(VG_DIR)/run; rm -rf $$d; mkdir -p $$d; \
	$(PYTHON) -m pyrnn.reference --cell lstm --layers 2 --vocab 5 --embed 3 --hidden 4 -B 2 -T 3 --steps 2 -o $$d/ref.bin > /dev/null || exit 1; \
	OMP_NUM_THREADS=1 $(VG) $(VG_DIR)/test_cpu $$d/ref.bin > $$d/ref.log 2>&1 || { cat $$d/ref.log; exit 1; }; \
	echo "valgrind test_cpu (lstm): $$(tail -1 $$d/ref.log)"; \
	$(PYTHON) -c "$(HARD_DATA_PY)" $$d/data || exit 1; \
	flags="-i $$d/data/train.bin -j $$d/data/val.bin -o $$d/out -v 10 -s 20 -m 10 -k 5 -P 1"; \
	$(VG) $(VG_DIR)/train_cpu $$flags -c lstm -L 1 -E 4 -H 8 -b 2 -t 8 -n 10 > $$d/train.log 2>&1 || { cat $$d/train.log; exit 1; }; \
	$(VG) $(VG_DIR)/train_cpu $$flags -r latest -n 20 > $$d/resume.log 2>&1 || { cat $$d/resume.log; exit 1; }; \
	grep -q "resuming from $$d/out/ckpt_00000010.bin at step 10" $$d/resume.log && test -f $$d/out/ckpt_00000020.bin \
		|| { echo "resume did not happen as expected"; cat $$d/resume.log; exit 1; }; \
	echo "valgrind train_cpu: 10 steps, checkpoint, resume to 20: clean"; \
	: > $$d/out/latest; \
	$(VALGRIND) -q --error-exitcode=99 --leak-check=full $(VG_DIR)/train_cpu $$flags -r latest -n 30 > $$d/empty.log 2>&1; \
	test $$? -eq 1 && grep -q "does not name a checkpoint" $$d/empty.log || { cat $$d/empty.log; exit 1; }; \
	echo "valgrind train_cpu, resume from an empty latest: rejected, clean"

# ---- hardening: fuzzing ----
# fuzz/fuzz_{tokens,checkpoint,reference}.c are libFuzzer targets; fuzz/corpus/<target>/ holds the
# seeds (python3 fuzz/make_seeds.py), fuzz/crashes/<target>/ the reproducers of past findings, which
# every run replays first. New corpus entries go to build/fuzz/corpus/<target>/ (fuzz_merge folds a
# minimized set back into fuzz/corpus). A long run: make fuzz FUZZ_SECONDS=300
FUZZ_SECONDS ?= 20
FUZZ_TARGETS = tokens checkpoint reference
FUZZ_DIR = build/fuzz
ifeq ($(origin CLANG),undefined)
CLANG := $(shell command -v clang 2>/dev/null)
endif
FUZZ_CFLAGS = -g -O1 -fno-omit-frame-pointer -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined \
	$(SAN_WARN) -Wno-unknown-pragmas
FUZZ_OPTS = -max_len=8192 -timeout=10 -rss_limit_mb=2048 -print_final_stats=1
FUZZ_DEPS = fuzz/fuzz_common.h $(C_SRC) $(C_DEPS)
# the gcc fallback: the same targets under fuzz/replay_main.c, random mutations per seed in the time box
FUZZ_MUTATIONS ?= 100000000
FUZZ_SEED ?= 1

$(FUZZ_DIR)/fuzz_%: fuzz/fuzz_%.c $(FUZZ_DEPS)
	@mkdir -p $(@D)
	$(CLANG) $(FUZZ_CFLAGS) $< -o $@ -lm
$(FUZZ_DIR)/replay_%: fuzz/fuzz_%.c fuzz/replay_main.c $(FUZZ_DEPS)
	@mkdir -p $(@D)
	$(CC) $(SAN_FLAGS) $(SAN_WARN) -Wno-unknown-pragmas $< fuzz/replay_main.c -o $@ -lm

fuzz_seeds:
	$(PYTHON) fuzz/make_seeds.py

# corpus and crash reproducers through the gcc+ASan driver (no clang needed); FUZZ_RANDOM=1 adds
# random mutations for FUZZ_SECONDS per target
fuzz_replay: $(foreach t,$(FUZZ_TARGETS),$(FUZZ_DIR)/replay_$(t))
	@for t in $(FUZZ_TARGETS); do mkdir -p fuzz/crashes/$$t; \
		$(SAN_ENV) $(FUZZ_DIR)/replay_$$t -crash_dir=fuzz/crashes/$$t \
			$(if $(FUZZ_RANDOM),-mutations=$(FUZZ_MUTATIONS) -max_total_time=$(FUZZ_SECONDS) -seed=$(FUZZ_SEED)) \
			fuzz/corpus/$$t fuzz/crashes/$$t || exit 1; done

ifeq ($(CLANG),)
fuzz:
	@echo "fuzz: clang not found, so no libFuzzer (apt-get install clang). Falling back to the gcc+ASan driver:"
	@echo "fuzz: the corpus, the crash reproducers and random mutations, $(FUZZ_SECONDS) s per target (not coverage-guided)"
	$(MAKE) --no-print-directory fuzz_replay FUZZ_RANDOM=1 FUZZ_SEED=$$(date +%s)
fuzz_build fuzz_merge:
	@echo "$@: clang not found (apt-get install clang)"; exit 1
else
fuzz_build: $(foreach t,$(FUZZ_TARGETS),$(FUZZ_DIR)/fuzz_$(t))

fuzz: fuzz_build
	@for t in $(FUZZ_TARGETS); do \
		mkdir -p $(FUZZ_DIR)/corpus/$$t fuzz/crashes/$$t; log=$(FUZZ_DIR)/fuzz_$$t.log; \
		crashes=$$(find fuzz/crashes/$$t -type f ! -name '.*' | sort); \
		if [ -n "$$crashes" ]; then $(SAN_ENV) $(FUZZ_DIR)/fuzz_$$t $$crashes > $$log.replay 2>&1 \
			|| { cat $$log.replay; echo "fuzz $$t: a reproducer in fuzz/crashes/$$t fails again"; exit 1; }; fi; \
		$(SAN_ENV) $(FUZZ_DIR)/fuzz_$$t $(FUZZ_OPTS) -max_total_time=$(FUZZ_SECONDS) \
			-artifact_prefix=fuzz/crashes/$$t/ $(FUZZ_DIR)/corpus/$$t fuzz/corpus/$$t > $$log 2>&1 \
			|| { tail -60 $$log; echo "fuzz $$t: FAILED, reproducer in fuzz/crashes/$$t/"; exit 1; }; \
		echo "fuzz $$t: $$(echo $$crashes | wc -w) reproducers replayed; $$(grep -E '^#[0-9]+[[:space:]]+DONE' $$log | tr '\t' ' ' | sed 's/ *rss:.*//')"; \
		echo "fuzz $$t: $$(grep -E 'stat::number_of_executed_units' $$log) in $(FUZZ_SECONDS) s"; \
	done

fuzz_merge: fuzz_build
	for t in $(FUZZ_TARGETS); do $(FUZZ_DIR)/fuzz_$$t -merge=1 -max_len=8192 fuzz/corpus/$$t $(FUZZ_DIR)/corpus/$$t || exit 1; done
endif

clean_hardening:
	rm -rf build/asan build/valgrind build/fuzz

# line coverage of the readers by the corpus (fuzz/corpus plus what fuzzing added in build/fuzz/corpus)
LLVM_PROFDATA ?= llvm-profdata
LLVM_COV ?= llvm-cov
FUZZ_COV_FUNCS = blob_load|blob_take|blob_done|checked_count|config_from_header|tokens_parse|loader_init|loader_next|checkpoint_parse|resolve_latest|reference_parse
fuzz_coverage:
	@test -n "$(CLANG)" || { echo "fuzz_coverage: clang not found"; exit 1; }
	@mkdir -p $(FUZZ_DIR)/cov
	@for t in $(FUZZ_TARGETS); do \
		$(CLANG) -g -O0 -fprofile-instr-generate -fcoverage-mapping -fsanitize=fuzzer -Wno-unknown-pragmas fuzz/fuzz_$$t.c \
			-o $(FUZZ_DIR)/cov/cov_$$t -lm || exit 1; \
		mkdir -p $(FUZZ_DIR)/corpus/$$t; \
		LLVM_PROFILE_FILE=$(FUZZ_DIR)/cov/$$t.profraw $(FUZZ_DIR)/cov/cov_$$t -runs=0 $(FUZZ_DIR)/corpus/$$t fuzz/corpus/$$t \
			fuzz/crashes/$$t > $(FUZZ_DIR)/cov/$$t.log 2>&1 || { cat $(FUZZ_DIR)/cov/$$t.log; exit 1; }; \
		$(LLVM_PROFDATA) merge -sparse $(FUZZ_DIR)/cov/$$t.profraw -o $(FUZZ_DIR)/cov/$$t.profdata || exit 1; \
		echo "== $$t: $$(find $(FUZZ_DIR)/corpus/$$t fuzz/corpus/$$t fuzz/crashes/$$t -type f ! -name '.*' | wc -l) inputs"; \
		$(LLVM_COV) report -show-functions $(FUZZ_DIR)/cov/cov_$$t -instr-profile=$(FUZZ_DIR)/cov/$$t.profdata \
			$(C_SRC) $(wildcard c/*.h) | sed -E 's/^[a-z_]+\.[ch]://' | grep -E "^($(FUZZ_COV_FUNCS)) " \
			| awk '$$5 > $$6 { printf "  %-18s lines %3d/%-3d (%s)  branches %3d/%-3d (%s)\n", $$1, $$5 - $$6, $$5, $$7, $$8 - $$9, $$8, $$10 }'; \
	done

# ---- ISA builds ----
# The GEMM kernel is sized per instruction set at compile time, so each ISA is a build of its own:
#   make test_isa      test_cpu for x86-64-v2 (SSE), x86-64-v3 (AVX2), x86-64-v4 (AVX-512; run when this
#                      CPU has it), native, and aarch64 (NEON; cross-compiled, run under qemu), the
#                      compare-outputs harness on every cell on each; then the C-vs-oracle suite on the
#                      cffi extension built for x86-64-v3 into build/isa/py (pyrnn/_crnn*.so is untouched)
#   make check_spills  the GEMM inner loops compiled for x86-64-v3, x86-64-v4 and aarch64 keep their
#                      accumulators in registers (scripts/check_spills.py)
# aarch64 needs `apt-get install gcc-aarch64-linux-gnu libgomp1-arm64-cross qemu-user`.
ISA_DIR = build/isa
ISA_CELLS = rnn rnn_relu lstm gru
ISA_X86 = $(if $(call try_flag,-march=x86-64-v2),x86-64-v2 x86-64-v3 x86-64-v4)
ISA_BUILDS = $(ISA_X86) native aarch64
ISA_PY_ARCH = x86-64-v3
ISA_PY_TESTS = tests/test_c_vs_oracle.py tests/test_isa_builds.py
AARCH64_CC ?= aarch64-linux-gnu-gcc
AARCH64_SYSROOT ?= /usr/aarch64-linux-gnu
QEMU_AARCH64 ?= qemu-aarch64 -L $(AARCH64_SYSROOT)
SPILL_TARGETS ?= x86-64-v3 x86-64-v4 aarch64
# the x86-64 levels this CPU runs, one a line (gcc >= 12 knows them; with another compiler only native
# and aarch64 run)
cpu_levels = printf '%s\n' 'int puts(const char*);' 'int main(void) {' \
	$(foreach l,$(ISA_X86),'if (__builtin_cpu_supports("$(l)")) puts("$(l)");') 'return 0; }' \
	| $(CC) -x c - -o $(ISA_DIR)/cpu_levels 2>/dev/null && $(ISA_DIR)/cpu_levels

.PHONY: test_isa test_isa_py check_spills

$(ISA_DIR)/%/test_cpu: c/test_rnn.c $(C_SRC) $(C_DEPS)
	@mkdir -p $(@D)
	$(CC) $(OPT) -march=$* $(OMP) $(WARN) $< -o $@ $(LDLIBS)
$(ISA_DIR)/native/test_cpu: c/test_rnn.c $(C_SRC) $(C_DEPS)
	@mkdir -p $(@D)
	$(CC) $(OPT) $(call try_flag,-march=native) $(OMP) $(WARN) $< -o $@ $(LDLIBS)
$(ISA_DIR)/aarch64/test_cpu: c/test_rnn.c $(C_SRC) $(C_DEPS)
	@command -v $(AARCH64_CC) > /dev/null || { echo "$(AARCH64_CC) not found (apt-get install gcc-aarch64-linux-gnu libgomp1-arm64-cross qemu-user)"; exit 1; }
	@mkdir -p $(@D)
	$(AARCH64_CC) -O3 -march=armv8-a -fno-math-errno -fopenmp $(WARN) $< -o $@ $(LDLIBS)

test_isa: refs $(foreach a,$(ISA_BUILDS),$(ISA_DIR)/$(a)/test_cpu)
	@command -v $(firstword $(QEMU_AARCH64)) > /dev/null || { echo "$(firstword $(QEMU_AARCH64)) not found (apt-get install qemu-user)"; exit 1; }
	@levels=" $$($(cpu_levels) | tr '\n' ' ') "; \
	for a in $(ISA_BUILDS); do \
		run=; case $$a in aarch64) run="$(QEMU_AARCH64)";; native) ;; \
			*) case "$$levels" in *" $$a "*) ;; *) echo "$$a: built; this CPU does not run it"; continue;; esac;; esac; \
		for c in $(ISA_CELLS); do log=$(ISA_DIR)/$$a/test_$$c.log; \
			$$run $(ISA_DIR)/$$a/test_cpu ref/ref_$$c.bin > $$log 2>&1 || { cat $$log; echo "$$a $$c: FAILED"; exit 1; }; \
			echo "$$a $$c: $$(tail -1 $$log)"; done; done
	@$(MAKE) --no-print-directory test_isa_py

# the C-vs-oracle suite on the extension built for ISA_PY_ARCH, imported from its own package folder
test_isa_py:
	@mkdir -p $(ISA_DIR)
	@case " $$($(cpu_levels) | tr '\n' ' ') " in *" $(ISA_PY_ARCH) "*) ;; \
		*) echo "test_isa_py: this CPU does not run $(ISA_PY_ARCH): skipped"; exit 0;; esac; \
	set -e; PYRNN_ARCH=$(ISA_PY_ARCH) $(PYTHON) pyrnn/_build.py $(ISA_DIR)/py > /dev/null; \
	cd $(ISA_DIR)/py; \
	PYRNN_ARCH=$(ISA_PY_ARCH) $(PYTHON) -c "import os, pyrnn, pyrnn._crnn as m; \
		assert os.path.realpath(m.__file__).startswith(os.getcwd()), m.__file__; \
		print('extension built for $(ISA_PY_ARCH):', m.__file__, '- pyrnn.isa():', pyrnn.isa())"; \
	PYRNN_ARCH=$(ISA_PY_ARCH) $(PYTHON) -m pytest -q -p no:cacheprovider $(addprefix $(CURDIR)/,$(ISA_PY_TESTS)) \
		|| { rc=$$?; [ $$rc -ne 5 ] || echo "test_isa_py: pytest collected no tests"; exit $$rc; }

check_spills:
	$(PYTHON) scripts/check_spills.py --cc "$(CC)" --aarch64-cc $(AARCH64_CC) --out-dir $(ISA_DIR)/asm $(SPILL_TARGETS)
