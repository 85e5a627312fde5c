# pyrnn: `make train` runs the main job, `make test` installs what the tests need and runs them.
# The Makefile builds; the suites it runs (the harness, sanitizers, valgrind, fuzzing, the ISA matrix)
# are the scripts in scripts/, each called in one line.
PYTHON ?= python3
CC ?= cc
comma := ,
empty :=
space := $(empty) $(empty)
# the cells every suite covers
CELLS = rnn rnn_relu lstm gru

# the CPU to build for. any (the default): one build for every CPU, holding the kernels of every
# instruction set and running the best the CPU has (c/isa.h). Any -march value builds for that CPU
# alone: native (this machine), x86-64-v2 (SSE4.2), x86-64-v3 (AVX2 + FMA), x86-64-v4 (AVX-512):
# `make train_cpu ARCH=x86-64-v3`. PYRNN_ARCH in the environment sets both this default and the cffi
# extension's (pyrnn/_build.py); an ARCH variable in the environment is ignored (it often means
# something else). Every optimised host compile honours it: the C builds and the GPU builds' host side.
ifneq ($(origin ARCH),command line)
ARCH := $(or $(PYRNN_ARCH),any)
endif
export PYRNN_ARCH := $(ARCH)
# $(call host_flags,COMPILER,ARCH[,c++]): -O3, the target, -fopenmp and -fno-math-errno as far as the
# compiler takes them, from the flag probe pyrnn/_build.py uses too (pyrnn/_cflags.py). An ARCH the
# compiler refuses stops make; native falls back to any.
host_flags = $(or $(shell $(PYTHON) pyrnn/_cflags.py --cc '$(1)' --arch '$(2)' --lang $(or $(3),c)),\
	$(error no flags for $(1) with ARCH=$(2): see the line above))
# probed once, on first use
HOST_CFLAGS = $(eval HOST_CFLAGS := $(call host_flags,$(CC),$(ARCH)))$(HOST_CFLAGS)
OMP = $(filter -fopenmp,$(HOST_CFLAGS))
MARCH = $(filter -march=% -DPYRNN_ONE_ISA,$(HOST_CFLAGS))
WARN = -Wall -Wextra -Wno-unused-function
CFLAGS ?= $(HOST_CFLAGS) $(WARN)
LDLIBS = -lm
# the Python side: what the reference files and the extension builds are made from
PY_SRC = $(wildcard pyrnn/*.py pyrnn/*/*.py)

C_SRC = c/train_rnn.c
# the headers train_rnn.c includes, and the compile command: every C build depends on them too, so
# `make train ARCH=x86-64-v3` after a native build rebuilds instead of running the native binary
C_DEPS = $(wildcard c/*.h) build/cflags
build/cflags: FORCE
	@mkdir -p $(@D); echo '$(CC) $(CFLAGS)' | cmp -s - $@ || echo '$(CC) $(CFLAGS)' > $@
.PHONY: FORCE
DATA_DIR ?= data/tinyshakespeare
OUT_DIR ?= out/train

.PHONY: all deps install train train_best bench test test_c refs clean

all: train_cpu test_cpu

train_cpu: $(C_SRC) $(C_DEPS)
	$(CC) $(CFLAGS) $< -o $@ $(LDLIBS)

test_cpu: c/test_rnn.c $(C_SRC) $(C_DEPS)
	$(CC) $(CFLAGS) $< -o $@ $(LDLIBS)

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
	$(PYTHON) -m pyrnn prepare --dataset tinyshakespeare $(if $(TINYSHAKESPEARE),--input $(TINYSHAKESPEARE)) \
		--out-dir $(DATA_DIR)
train: train_cpu $(DATA_DIR)/train.bin
	./train_cpu -i $(DATA_DIR)/train.bin -j $(DATA_DIR)/val.bin -o $(OUT_DIR) $(TRAIN_FLAGS)

# the best model in ten minutes (the recipe search of docs/benchmarks.md): prepares the corpus as train
# does, builds, trains the winner for a wall-clock budget (-x), then prints a sample and its final val loss
TRAIN_BEST_BUDGET ?= 600
TRAIN_BEST_FLAGS ?= -c lstm -L 2 -E 128 -H 512 -b 32 -t 128 -l 2e-3 -w 0.01 -u 100 -q 0.1 -g 1 -p 0.2 -d locked \
	-W 0.2 -D 0.1 -v 250 -s 0 -m 500 -e 0.8
train_best: train_cpu $(DATA_DIR)/train.bin
	./train_cpu -i $(DATA_DIR)/train.bin -j $(DATA_DIR)/val.bin -o out/train_best $(TRAIN_BEST_FLAGS) \
		-x $(TRAIN_BEST_BUDGET)

bench: install
	$(PYTHON) -m pyrnn bench --out bench.json

# reference files from the oracle, one per cell, remade when the Python side changes; the C harness
# checks them (scripts/harness.sh: one line per file, the whole log of the first that fails)
# and one in bf16 (every matmul of bf16-rounded operands, the harness's -M bf16 check)
REFS = $(CELLS:%=ref/ref_%.bin) $(CELLS:%=ref/ref_%_bf16.bin)
refs: $(REFS)
ref/ref_%_bf16.bin: $(PY_SRC)
	@mkdir -p $(@D)
	$(PYTHON) -m pyrnn.reference --cell $* --max-grad-norm 0.1 --precision bf16 -o $@
ref/ref_%.bin: $(PY_SRC)
	@mkdir -p $(@D)
	$(PYTHON) -m pyrnn.reference --cell $* --max-grad-norm 0.1 -o $@
test_c: test_cpu refs
	scripts/harness.sh ref ./test_cpu $(REFS)

test: install train_cpu test_c
	$(PYTHON) -m pytest -q tests

clean:
	rm -rf train_cpu test_cpu lib ref build *.egg-info pyrnn/_crnn*.so pyrnn/_crnn*.c pyrnn/_crnn*.o

# ---- GPU ----
# cuda/: the GPU model (gpu_model.cuh on cudnn_rnn.cuh, kernels.cuh, gpu_check.cuh) built three ways:
# the trainer ./train_gpu (train_rnn.cu), the library behind pyrnn/_cuda.py lib/libpyrnn_cuda.so
# (lib_rnn.cu) and its compare-outputs harness ./test_gpu (test_rnn.cu, on the library's API).
# Without nvcc these targets say so and succeed.
# cuDNN and cuBLAS come from CUDNN_PATH / CUBLAS_PATH, else the CUDA toolkit or the system, else
# the pip wheels (`make cuda_deps`), which ship only versioned sonames, hence -l:libX.so.N + rpath.
CUDA_HOME ?= /usr/local/cuda
ifeq ($(origin NVCC),undefined)
NVCC := $(shell for c in nvcc $(CUDA_HOME)/bin/nvcc /usr/local/cuda/bin/nvcc; do command -v $$c && break; done)
endif
CXX ?= g++
# the wheels' folders (scripts/gpu_env.py root), looked up once, on use
GPU_PIP_CUDNN = $(eval GPU_PIP_CUDNN := $(shell $(PYTHON) scripts/gpu_env.py root cudnn))$(GPU_PIP_CUDNN)
GPU_PIP_CUBLAS = $(eval GPU_PIP_CUBLAS := $(shell $(PYTHON) scripts/gpu_env.py root cublas))$(GPU_PIP_CUBLAS)
# $(call gpu_root,NAME,HEADER,PIP_VAR): the folder with include/ and lib/ or lib64/ of a library:
# NAME_PATH, else the CUDA toolkit, else empty when the system has the header (the compiler's default
# paths), else the wheel
gpu_sys = $(wildcard /usr/include/$(1) /usr/include/x86_64-linux-gnu/$(1))
gpu_toolkit = $(if $(wildcard $(CUDA_HOME)/include/$(1)),$(CUDA_HOME))
gpu_root = $(or $($(1)_PATH),$(call gpu_toolkit,$(2)),$(if $(call gpu_sys,$(2)),,$($(3))))
CUDNN_ROOT = $(eval CUDNN_ROOT := $(call gpu_root,CUDNN,cudnn.h,GPU_PIP_CUDNN))$(CUDNN_ROOT)
CUBLAS_ROOT = $(eval CUBLAS_ROOT := $(call gpu_root,CUBLAS,cublas_v2.h,GPU_PIP_CUBLAS))$(CUBLAS_ROOT)
# a recipe's first line: one line and a failure when a library is missing
gpu_need = test -n "$($(1)_ROOT)$(call gpu_sys,$(2))" \
	|| { echo "error: $(3) not found: make $(4), or set $(1)_PATH"; exit 1; }
need_cudnn = $(call gpu_need,CUDNN,cudnn.h,cuDNN,cuda_deps)
# $(call gpu_dep_flags,ROOT,X): compile and link flags for libX under ROOT; -lX alone when ROOT is empty.
# -lX when an unversioned libX.so exists, else -l:libX.so.N (what the wheels ship)
gpu_libdir = $(patsubst %/,%,$(dir $(firstword $(wildcard $(1)/lib64/lib$(2).so* $(1)/lib/lib$(2).so*))))
gpu_soname = $(notdir $(firstword $(wildcard $(1)/lib$(2).so.[0-9] $(1)/lib$(2).so.[0-9][0-9])))
gpu_libflag = $(if $(wildcard $(1)/lib$(2).so),-l$(2),-l:$(call gpu_soname,$(1),$(2)))
gpu_dir_flags = -I$(1)/include -L$(2) -Xlinker -rpath$(comma)$(2) $(call gpu_libflag,$(2),$(3))
gpu_dep_flags = $(if $(1),$(call gpu_dir_flags,$(1),$(call gpu_libdir,$(1),$(2)),$(2)),-l$(2))
GPU_LIBS = $(call gpu_dep_flags,$(CUDNN_ROOT),cudnn) $(call gpu_dep_flags,$(CUBLAS_ROOT),cublas)
# the host side as for the CPU build: its flags for ARCH from the host compiler, and its warnings; the C
# file's `= { 0 }` initialisers are idiomatic C but draw -Wmissing-field-initializers as C++
GPU_HOST_OPT = $(eval GPU_HOST_OPT := $(call host_flags,$(CXX),$(ARCH),c++))$(GPU_HOST_OPT)
GPU_HOST_FLAGS = $(GPU_HOST_OPT) $(WARN) -Wno-missing-field-initializers
GPU_ARCH ?= -gencode arch=compute_90,code=[sm_90,compute_90]
NVCCFLAGS ?= -O3 -std=c++17 $(GPU_ARCH)
NVCC_CMD = $(NVCC) $(NVCCFLAGS) -Xcompiler $(subst $(space),$(comma),$(strip $(GPU_HOST_FLAGS)))
GPU_LDLIBS = $(GPU_LIBS) $(if $(filter -fopenmp,$(GPU_HOST_FLAGS)),-lgomp) -lm
# every GPU build depends on the headers and on its compile line (build/nvccflags, as build/cflags
# for C): a checkout built elsewhere (other cuDNN paths, other ARCH) is rebuilt, not run
GPU_SRC = $(wildcard cuda/*.cuh) $(C_SRC) $(C_DEPS) build/nvccflags
build/nvccflags: FORCE
	@mkdir -p $(@D); echo '$(NVCC_CMD) $(GPU_LDLIBS)' | cmp -s - $@ || echo '$(NVCC_CMD) $(GPU_LDLIBS)' > $@

.PHONY: lib_gpu test_gpu_run refs_gpu cuda_deps gpu_build_check gpu_info gpu_verify gpu_wheels bench_gpu clean_gpu

ifeq ($(NVCC),)
train_gpu test_gpu lib_gpu:
	@echo "nvcc not found (PATH, CUDA_HOME=$(CUDA_HOME)): skipping $@"
else
train_gpu: cuda/train_rnn.cu $(GPU_SRC)
	@$(need_cudnn)
	$(NVCC_CMD) $< -o $@ $(GPU_LDLIBS)
test_gpu: cuda/test_rnn.cu cuda/lib_rnn.cu c/reference.h $(GPU_SRC)
	@$(need_cudnn)
	$(NVCC_CMD) $< -o $@ $(GPU_LDLIBS)
lib_gpu: lib/libpyrnn_cuda.so
lib/libpyrnn_cuda.so: cuda/lib_rnn.cu $(GPU_SRC)
	@$(need_cudnn)
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

# larger references than `make refs`: several blocks per kernel, E != H, more params than one
# reduction pass
REFS_GPU = $(CELLS:%=ref/ref_big_%.bin)
refs_gpu: $(REFS_GPU)
ref/ref_big_%.bin: $(PY_SRC)
	@mkdir -p $(@D)
	$(PYTHON) -m pyrnn.reference --cell $* --vocab 65 --embed 48 --hidden 96 -B 16 -T 24 --steps 3 \
		--max-grad-norm 0.1 -o $@

# the harness on every reference, when there is a GPU to run it on
test_gpu_run: test_gpu
	@if ! nvidia-smi -L > /dev/null 2>&1; then echo "no GPU (nvidia-smi -L failed): skipping $@"; \
	elif [ ! -x ./test_gpu ]; then echo "./test_gpu was not built: skipping $@"; \
	else $(MAKE) --no-print-directory refs refs_gpu && scripts/harness.sh ref/gpu ./test_gpu $(REFS) $(REFS_GPU); fi

clean_gpu:
	rm -f train_gpu test_gpu lib/libpyrnn_cuda.so

# ---- MPI ----
# ./train_cpu_mpi: the CPU trainer built by mpicc with -DUSE_MPI, data-parallel over MPI ranks:
# `mpiexec -n R ./train_cpu_mpi <train_cpu flags>` (README, "More than one process"). The MPI is
# MPICC when given, else the mpicc on the PATH (Debian: mpich + libmpich-dev, or openmpi-bin +
# libopenmpi-dev), else the mpich wheel in the Python environment (pip install mpich: mpicc, mpiexec,
# mpi.h, libmpi.so; no root needed), installed there when missing; its mpiexec lies beside its mpicc.
# ./train_gpu_mpi: the GPU trainer above with NCCL (cuda/mpi_nccl.cuh) bootstrapped over the same MPI;
# NCCL from NCCL_PATH, else the CUDA toolkit or the system, else the nvidia-nccl-cu13 wheel.
mpi_py_scripts = $(shell $(PYTHON) -c "import sysconfig; print(sysconfig.get_path('scripts'))" 2>/dev/null)
ifeq ($(origin MPICC),undefined)
MPICC = $(eval MPICC := $(or $(shell command -v mpicc 2>/dev/null),$(mpi_py_scripts)/mpicc))$(MPICC)
endif
# the compile and link flags the wrapper adds (MPICH: -show, Open MPI: --showme), for nvcc
mpi_show = $(shell $(MPICC) -show 2>/dev/null || $(MPICC) --showme 2>/dev/null)
mpi_nvcc_flag = $(if $(filter -I% -L% -l% -D%,$(1)),$(1),$(if $(filter -Wl$(comma)%,$(1)),-Xlinker $(1:-Wl$(comma)%=%)))
MPI_NVCC_FLAGS = $(foreach w,$(wordlist 2,999,$(mpi_show)),$(call mpi_nvcc_flag,$(w)))
GPU_PIP_NCCL = $(eval GPU_PIP_NCCL := $(shell $(PYTHON) scripts/gpu_env.py root nccl))$(GPU_PIP_NCCL)
NCCL_ROOT = $(eval NCCL_ROOT := $(call gpu_root,NCCL,nccl.h,GPU_PIP_NCCL))$(NCCL_ROOT)
GPU_MPI_CMD = $(NVCC_CMD) -DUSE_MPI $(MPI_NVCC_FLAGS) $< -o $@ $(call gpu_dep_flags,$(NCCL_ROOT),nccl) $(GPU_LDLIBS)

.PHONY: mpi_deps nccl_deps clean_mpi

mpi_deps:
	@command -v $(MPICC) > /dev/null 2>&1 \
		|| { echo "no mpicc found: installing the mpich wheel into $(PYTHON)'s environment"; \
		$(PYTHON) -m pip install -q --disable-pip-version-check mpich && command -v $(MPICC) > /dev/null; } \
		|| { echo "error: no MPI: install one (apt-get install mpich libmpich-dev) or set MPICC"; exit 1; }

train_cpu_mpi: $(C_SRC) $(C_DEPS) | mpi_deps
	MPICH_CC="$(CC)" OMPI_CC="$(CC)" $(MPICC) -DUSE_MPI $(CFLAGS) $< -o $@ $(LDLIBS)
	@echo "run it as: $$(dirname $$(command -v $(MPICC)))/mpiexec -n RANKS ./$@ <train_cpu flags>"

nccl_deps:
	$(PYTHON) -m pip install -q --disable-pip-version-check nvidia-nccl-cu13

# needs cuda/train_rnn.cu to call nccl_init and nccl_step_mean (see cuda/mpi_nccl.cuh); without nvcc
# it says so and succeeds, as the other GPU targets do
train_gpu_mpi: cuda/train_rnn.cu $(GPU_SRC) | mpi_deps
	@test -n "$(NVCC)" || { echo "nvcc not found (PATH, CUDA_HOME=$(CUDA_HOME)): skipping $@"; exit 0; }; \
	$(need_cudnn); $(call gpu_need,NCCL,nccl.h,NCCL,nccl_deps); \
	echo "$(GPU_MPI_CMD)"; $(GPU_MPI_CMD)

clean_mpi:
	rm -f train_cpu_mpi train_gpu_mpi

# ---- hardening ----
# Sanitizers, valgrind and fuzzing of the file readers (docs/hardening.md). Everything builds under
# build/ and leaves ./train_cpu, ./test_cpu and pyrnn/_crnn*.so alone. The sanitizer builds are for
# ARCH, as everything else; the valgrind and fuzz builds are generic (see there).
#   make test_asan   ASan+UBSan builds of test_cpu, train_cpu and the cffi extension; the harness on
#                    every cell, a train / checkpoint / resume run, the CLI tests on the sanitized
#                    train_cpu and the pytest suite on the sanitized extension (libasan preloaded):
#                    scripts/test_asan.sh
#   make valgrind    memcheck on test_cpu (one cell) and a 20-step train_cpu run with save and resume:
#                    scripts/valgrind.sh
#   make fuzz        each libFuzzer target for FUZZ_SECONDS (needs clang); without clang, a gcc+ASan
#                    driver replays the corpus and random mutations of it instead, and says so:
#                    scripts/fuzz.sh
SAN_FLAGS = -fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer -g -O1
ASAN_DIR = build/asan
# what the suites take from make
SUITE_ENV = PYTHON="$(PYTHON)" CC="$(CC)" CELLS="$(CELLS)"

.PHONY: test_asan asan_build asan_py valgrind fuzz fuzz_build fuzz_replay fuzz_seeds fuzz_merge fuzz_coverage \
	clean_hardening

$(ASAN_DIR)/train_cpu: $(C_SRC) $(C_DEPS)
	@mkdir -p $(@D)
	$(CC) $(SAN_FLAGS) $(MARCH) $(OMP) $(WARN) $< -o $@ $(LDLIBS)
$(ASAN_DIR)/test_cpu: c/test_rnn.c $(C_SRC) $(C_DEPS)
	@mkdir -p $(@D)
	$(CC) $(SAN_FLAGS) $(MARCH) $(OMP) $(WARN) $< -o $@ $(LDLIBS)

# the cffi extension built with the sanitizers into a package folder of its own, whose .py files
# are links to pyrnn/*.py; Python imports it from there when run in that folder
asan_py: $(ASAN_DIR)/py/.built
$(ASAN_DIR)/py/.built: $(C_SRC) $(C_DEPS) $(PY_SRC)
	CC="$(CC)" CFLAGS="$(SAN_FLAGS)" LDFLAGS="-fsanitize=address,undefined" $(PYTHON) pyrnn/_build.py $(ASAN_DIR)/py
	@touch $@

asan_build: $(ASAN_DIR)/train_cpu $(ASAN_DIR)/test_cpu asan_py

test_asan: asan_build
	$(SUITE_ENV) scripts/test_asan.sh $(ASAN_DIR)

# valgrind 3.19 decodes no AVX-512, so this build leaves out -march
VG_DIR = build/valgrind
VALGRIND ?= valgrind
$(VG_DIR)/train_cpu: $(C_SRC) $(C_DEPS)
	@mkdir -p $(@D)
	$(CC) -O2 -g $(OMP) $(WARN) $< -o $@ $(LDLIBS)
$(VG_DIR)/test_cpu: c/test_rnn.c $(C_SRC) $(C_DEPS)
	@mkdir -p $(@D)
	$(CC) -O2 -g $(OMP) $(WARN) $< -o $@ $(LDLIBS)

valgrind: $(VG_DIR)/train_cpu $(VG_DIR)/test_cpu
	$(SUITE_ENV) VALGRIND="$(VALGRIND)" scripts/valgrind.sh $(VG_DIR)

# ---- hardening: fuzzing ----
# fuzz/fuzz_{tokens,checkpoint,reference}.c are libFuzzer targets; fuzz/corpus/<target>/ holds the
# seeds (python3 fuzz/make_seeds.py), fuzz/crashes/<target>/ the reproducers of past findings, which
# every run replays first. New corpus entries go to build/fuzz/corpus/<target>/ (fuzz_merge folds a
# minimized set back into fuzz/corpus). A long run: make fuzz FUZZ_SECONDS=300. The targets hold
# only the file readers, so they build without -march.
FUZZ_SECONDS ?= 20
FUZZ_TARGETS = tokens checkpoint reference
FUZZ_DIR = build/fuzz
ifeq ($(origin CLANG),undefined)
CLANG := $(shell command -v clang 2>/dev/null)
endif
FUZZ_CFLAGS = -g -O1 -fno-omit-frame-pointer -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined \
	$(WARN) -Wno-unknown-pragmas
FUZZ_DEPS = fuzz/fuzz_common.h $(C_SRC) $(C_DEPS)
# the gcc fallback: the same targets under fuzz/replay_main.c, random mutations per seed in the time box
FUZZ_MUTATIONS ?= 100000000
FUZZ_SEED ?= 1
# line coverage of the readers by the corpus (fuzz/corpus plus what fuzzing added in build/fuzz/corpus)
LLVM_PROFDATA ?= llvm-profdata
LLVM_COV ?= llvm-cov
FUZZ_RUN = FUZZ_DIR=$(FUZZ_DIR) scripts/fuzz.sh

$(FUZZ_DIR)/fuzz_%: fuzz/fuzz_%.c $(FUZZ_DEPS)
	@mkdir -p $(@D)
	$(CLANG) $(FUZZ_CFLAGS) $< -o $@ -lm
$(FUZZ_DIR)/replay_%: fuzz/fuzz_%.c fuzz/replay_main.c $(FUZZ_DEPS)
	@mkdir -p $(@D)
	$(CC) $(SAN_FLAGS) $(WARN) -Wno-unknown-pragmas $< fuzz/replay_main.c -o $@ -lm
$(FUZZ_DIR)/cov/cov_%: fuzz/fuzz_%.c $(FUZZ_DEPS)
	@mkdir -p $(@D)
	$(CLANG) -g -O0 -fprofile-instr-generate -fcoverage-mapping -fsanitize=fuzzer -Wno-unknown-pragmas $< -o $@ -lm

fuzz_seeds:
	$(PYTHON) fuzz/make_seeds.py

# corpus and crash reproducers through the gcc+ASan driver (no clang needed); FUZZ_RANDOM=1 adds
# random mutations for FUZZ_SECONDS per target
fuzz_replay: $(FUZZ_TARGETS:%=$(FUZZ_DIR)/replay_%)
	$(FUZZ_RUN) replay $(if $(FUZZ_RANDOM),-mutations=$(FUZZ_MUTATIONS) -max_total_time=$(FUZZ_SECONDS) \
		-seed=$(FUZZ_SEED)) $(FUZZ_TARGETS)

ifeq ($(CLANG),)
fuzz:
	@echo "fuzz: clang not found, so no libFuzzer (apt-get install clang). Falling back to the gcc+ASan driver:"
	@echo "fuzz: the corpus, the crash reproducers and random mutations, $(FUZZ_SECONDS) s per target" \
		"(not coverage-guided)"
	$(MAKE) --no-print-directory fuzz_replay FUZZ_RANDOM=1 FUZZ_SEED=$$(date +%s)
fuzz_build fuzz_merge fuzz_coverage:
	@echo "$@: clang not found (apt-get install clang)"; exit 1
else
fuzz_build: $(FUZZ_TARGETS:%=$(FUZZ_DIR)/fuzz_%)

fuzz: fuzz_build
	$(FUZZ_RUN) run $(FUZZ_SECONDS) $(FUZZ_TARGETS)

fuzz_merge: fuzz_build
	$(FUZZ_RUN) merge $(FUZZ_TARGETS)

fuzz_coverage: $(FUZZ_TARGETS:%=$(FUZZ_DIR)/cov/cov_%)
	LLVM_PROFDATA="$(LLVM_PROFDATA)" LLVM_COV="$(LLVM_COV)" $(FUZZ_RUN) coverage $(FUZZ_TARGETS)
endif

clean_hardening:
	rm -rf build/asan build/valgrind build/fuzz

# ---- ISA builds ----
# The default build holds a kernel set per instruction set and picks one at run time; a one-CPU
# build (ARCH=) holds its own:
#   make test_isa      the compare-outputs harness (fp32 and bf16, every cell) on test_cpu built for any
#                      (the default: each set this CPU runs, forced by PYRNN_ISA, and the detection under
#                      qemu-x86_64 -cpu Haswell and -cpu Nehalem), for the same with the native bf16
#                      layout on emulated arithmetic (pairs), for x86-64-v2 (SSE), x86-64-v3 (AVX2),
#                      x86-64-v4 (AVX-512; run when this CPU has it), native, and aarch64 (NEON;
#                      cross-compiled, run under qemu); then the C-vs-oracle suite on the cffi extension
#                      built for x86-64-v3 into build/isa/py (pyrnn/_crnn*.so is untouched):
#                      scripts/test_isa.sh (make test_isa_py: the last part alone)
#   make check_spills  every kernel set's register tiles keep their accumulators in registers, and its
#                      gate loops are vectorized at its width: the default build's sets, x86-64-v3,
#                      x86-64-v4 and aarch64 (scripts/check_spills.py)
# aarch64 needs AARCH64_APT:
AARCH64_APT = apt-get install gcc-aarch64-linux-gnu libgomp1-arm64-cross qemu-user
ISA_DIR = build/isa
# the x86-64 levels when the compiler knows them (gcc >= 12; with another compiler only native and aarch64)
ISA_X86 = $(if $(shell $(PYTHON) pyrnn/_cflags.py --cc '$(CC)' -- -march=x86-64-v2),x86-64-v2 x86-64-v3 x86-64-v4)
ISA_BUILDS = any pairs $(ISA_X86) native aarch64
ISA_PY_ARCH = x86-64-v3
ISA_PY = $(ISA_DIR)/py/.built-$(ISA_PY_ARCH)
AARCH64_CC ?= aarch64-linux-gnu-gcc
AARCH64_SYSROOT ?= /usr/aarch64-linux-gnu
QEMU_AARCH64 ?= qemu-aarch64 -L $(AARCH64_SYSROOT)
SPILL_TARGETS ?= x86-64 x86-64-v3 x86-64-v4 aarch64
ISA_RUN = $(SUITE_ENV) QEMU_AARCH64="$(QEMU_AARCH64)" scripts/test_isa.sh $(ISA_DIR) $(ISA_PY_ARCH)

.PHONY: test_isa test_isa_py test_wheel check_spills aarch64_deps

# each build for its own -march (native: this machine, when the compiler takes it; any: every CPU;
# pairs: any, with a stand-in kernel set that checks the native bf16 path without VDPBF16PS)
$(ISA_DIR)/%/test_cpu: c/test_rnn.c $(C_SRC) $(C_DEPS)
	@mkdir -p $(@D)
	$(CC) $(call host_flags,$(CC),$*) $(WARN) $< -o $@ $(LDLIBS)
$(ISA_DIR)/pairs/test_cpu: c/test_rnn.c $(C_SRC) $(C_DEPS)
	@mkdir -p $(@D)
	$(CC) $(call host_flags,$(CC),any) -DPYRNN_TEST_PAIRS $(WARN) $< -o $@ $(LDLIBS)
$(ISA_DIR)/aarch64/test_cpu: c/test_rnn.c $(C_SRC) $(C_DEPS) | aarch64_deps
	@mkdir -p $(@D)
	$(AARCH64_CC) $(call host_flags,$(AARCH64_CC),armv8-a) $(WARN) $< -o $@ $(LDLIBS)
aarch64_deps:
	@command -v $(AARCH64_CC) > /dev/null && test -e $(AARCH64_SYSROOT)/lib/libgomp.so.1 \
		|| { echo "$(AARCH64_CC) or its libgomp not found ($(AARCH64_APT))"; exit 1; }

# the cffi extension for ISA_PY_ARCH, in a package folder of its own
$(ISA_PY): $(C_SRC) $(C_DEPS) $(PY_SRC)
	@mkdir -p $(@D); rm -f $(ISA_DIR)/py/.built-*
	PYRNN_ARCH=$(ISA_PY_ARCH) $(PYTHON) pyrnn/_build.py $(ISA_DIR)/py > /dev/null
	@touch $@

# the builds are named in the recipe, so that only this target probes the compiler for them
test_isa: refs
	@$(MAKE) --no-print-directory $(ISA_BUILDS:%=$(ISA_DIR)/%/test_cpu) $(ISA_PY)
	$(ISA_RUN) $(ISA_BUILDS)

test_isa_py: $(ISA_PY)
	$(ISA_RUN)

# the wheel from `pip wheel .` on this CPU and, under qemu, on an AVX2 and an SSE4.2 one (scripts/test_wheel.sh)
test_wheel:
	$(SUITE_ENV) scripts/test_wheel.sh build/wheel

check_spills:
	$(PYTHON) scripts/check_spills.py --cc "$(CC)" --aarch64-cc $(AARCH64_CC) --out-dir $(ISA_DIR)/asm $(SPILL_TARGETS)
