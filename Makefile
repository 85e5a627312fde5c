# pyrnn: `make train` runs the main job, `make test` installs what the tests need and runs them.
PYTHON ?= python3
CC ?= cc
# -O3 -march=native and OpenMP when the compiler takes them, plain -O2 otherwise
try_flag = $(shell echo 'int main(void){return 0;}' | $(CC) $(1) -x c - -o /dev/null 2>/dev/null && echo $(1))
OPT := $(or $(call try_flag,-O3 -march=native),$(call try_flag,-O3),-O2)
OMP := $(call try_flag,-fopenmp)
CFLAGS ?= $(OPT) $(OMP) -Wall -Wextra -Wno-unused-function
LDLIBS = -lm

C_SRC = c/train_rnn.c
DATA_DIR ?= data/tinyshakespeare
OUT_DIR ?= out/train

.PHONY: all lib deps install train test test_c refs clean

all: train_cpu test_cpu lib

train_cpu: $(C_SRC)
	$(CC) $(CFLAGS) $< -o $@ $(LDLIBS)

test_cpu: c/test_rnn.c c/reference.h $(C_SRC)
	$(CC) $(CFLAGS) $< -o $@ $(LDLIBS)

# the shared library behind the bindings (pip builds the same file into pyrnn/_crnn*.so)
lib: lib/libpyrnn.so
lib/libpyrnn.so: $(C_SRC)
	@mkdir -p lib
	$(CC) $(CFLAGS) -DPYRNN_NO_MAIN -shared -fPIC $< -o $@ $(LDLIBS)

# everything the package and its tests need, then the package itself (builds the cffi extension)
deps:
	$(PYTHON) -m pip install -q --disable-pip-version-check numpy cffi pytest setuptools
install: deps
	$(PYTHON) -m pip install -q --disable-pip-version-check --no-build-isolation -e .

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
