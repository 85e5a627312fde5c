// isa.h: which kernels a model runs. One build holds the kernels (kernels.h) of every instruction set
// the compiler can target, each compiled under its own target pragma; a model takes the set this CPU
// runs best (CPUID) unless PYRNN_ISA or pyrnn_set_isa names one.
//   x86-64 (with gcc): sse2 (the baseline), avx2 (AVX2 + FMA, x86-64-v3), avx512 (x86-64-v4), avx512bf16
//   (+ VDPBF16PS); aarch64 and other compilers: the one set the compiler's flags select (neon on aarch64)
// A build for one CPU (-DPYRNN_ONE_ISA, which the Makefile's ARCH= and PYRNN_ARCH add with their -march,
// or any -march with AVX) holds only the set its flags select; so does the GPU trainer's C++ host side.
#pragma once
#include "common.h"
#include "kernel_table.h"   // the Kernels table each set fills, the k-block, bf16 rounding

// ----------------------------------------------------------------------------
// the kernel sets this build holds, widest last (a test build's stand-in first, so never the default)

// (a build whose own flags already reach AVX targets one CPU: it holds that CPU's set alone)
#if !defined(PYRNN_ONE_ISA) && !defined(__CUDACC__) && defined(__GNUC__) && !defined(__clang__) && \
    defined(__x86_64__) && !defined(__AVX__)
#define KERNEL_ISA sse2
#define KERNEL_NAME "sse2"
#define VEC_FLOATS 4
#define MR 6
#define BF16_NATIVE 0
#include "kernels.h"

#pragma GCC push_options
#pragma GCC target("arch=x86-64-v3")
#define KERNEL_ISA avx2
#define KERNEL_NAME "avx2"
#define VEC_FLOATS 8
#define MR 6
#define BF16_NATIVE 0
#include "kernels.h"
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("arch=x86-64-v4")
#define KERNEL_ISA avx512
#define KERNEL_NAME "avx512"
#define VEC_FLOATS 16
#define MR 8
#define BF16_NATIVE 0
#include "kernels.h"
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("arch=x86-64-v4,avx512bf16")
#define KERNEL_ISA avx512bf16
#define KERNEL_NAME "avx512bf16"
#define VEC_FLOATS 16
#define MR 8
#define BF16_NATIVE 1
#include "kernels.h"
#pragma GCC pop_options

#ifdef PYRNN_TEST_PAIRS
#pragma GCC push_options
#pragma GCC target("arch=x86-64-v3")
#define KERNEL_ISA avx2pairs
#define KERNEL_NAME "avx2pairs"
#define VEC_FLOATS 8
#define MR 6
#define BF16_NATIVE 2
#include "kernels.h"
#pragma GCC pop_options
#define KERNEL_SETS_TEST { "avx2pairs", cpu_avx2, &kernels_fp32_avx2pairs, &kernels_bf16_avx2pairs },
#else
#define KERNEL_SETS_TEST
#endif

static int cpu_avx2(void) { return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"); }
static int cpu_avx512(void) {
    return cpu_avx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") &&
           __builtin_cpu_supports("avx512cd");
}
static int cpu_avx512bf16(void) { return cpu_avx512() && __builtin_cpu_supports("avx512bf16"); }
static int cpu_any(void) { return 1; }
#define KERNEL_SETS KERNEL_SETS_TEST \
    { "sse2", cpu_any, &kernels_fp32_sse2, &kernels_bf16_sse2 }, \
    { "avx2", cpu_avx2, &kernels_fp32_avx2, &kernels_bf16_avx2 }, \
    { "avx512", cpu_avx512, &kernels_fp32_avx512, &kernels_bf16_avx512 }, \
    { "avx512bf16", cpu_avx512bf16, &kernels_fp32_avx512bf16, &kernels_bf16_avx512bf16 },

#else   // one set: the one the compiler's own flags select
#if defined(__AVX512F__) && defined(__AVX512BF16__)
#define ONE_ISA_NAME "avx512bf16"
#define VEC_FLOATS 16
#define MR 8
#define BF16_NATIVE 1
#elif defined(__AVX512F__)
#define ONE_ISA_NAME "avx512"
#define VEC_FLOATS 16
#define MR 8
#elif defined(__AVX2__) && defined(__FMA__)
#define ONE_ISA_NAME "avx2"
#define VEC_FLOATS 8
#define MR 6
#elif defined(__ARM_NEON)
#define ONE_ISA_NAME "neon"
#define VEC_FLOATS 4
#define MR 8
#elif defined(__SSE2__)
#define ONE_ISA_NAME "sse2"
#define VEC_FLOATS 4
#define MR 6
#else
#define ONE_ISA_NAME "portable"
#define VEC_FLOATS 4
#define MR 6
#endif
#ifndef BF16_NATIVE
#define BF16_NATIVE 0
#endif
#define KERNEL_ISA one
#define KERNEL_NAME ONE_ISA_NAME
#include "kernels.h"
static int cpu_any(void) { return 1; }
#define KERNEL_SETS { ONE_ISA_NAME, cpu_any, &kernels_fp32_one, &kernels_bf16_one },
#endif

typedef struct { const char* name; int (*cpu_runs)(void); const Kernels* fp32; const Kernels* bf16; } KernelSet;
static const KernelSet kernel_sets[] = { KERNEL_SETS };
enum { N_KERNEL_SETS = sizeof(kernel_sets) / sizeof(kernel_sets[0]) };

// ----------------------------------------------------------------------------
// the choice: made once when the library loads (PYRNN_ISA, else the widest set this CPU runs), or
// again by pyrnn_set_isa; each model keeps the set it was made with

static const KernelSet* kernel_choice;   // read and written atomically: set_isa may run beside a model's creation
static char kernel_choice_error[512];

// "sse2, avx2, avx512, avx512bf16": the sets this build holds (cpu_only: those this CPU runs)
static void kernel_set_names(char* out, size_t size, int cpu_only) {
    out[0] = 0;
    for (int i = 0; i < N_KERNEL_SETS; i++)
        if (!cpu_only || kernel_sets[i].cpu_runs())
            snprintf(out + strlen(out), size - strlen(out), "%s%s", out[0] ? ", " : "", kernel_sets[i].name);
}

// name NULL or "": the widest set this CPU runs
static int kernel_choose(const char* name) {
    char built[128], runs[128];
    kernel_set_names(built, sizeof(built), 0);
    kernel_set_names(runs, sizeof(runs), 1);
    for (int i = N_KERNEL_SETS - 1; i >= 0; i--) {
        const KernelSet* k = &kernel_sets[i];
        if (name && *name && strcmp(name, k->name) != 0) continue;
        if (!k->cpu_runs()) {
            if (!name || !*name) continue;
            snprintf(kernel_choice_error, sizeof(kernel_choice_error),
                     "PYRNN_ISA=%s: this CPU cannot run the %s kernels (it runs %s)", name, name, runs);
            return fail("%s", kernel_choice_error);
        }
        kernel_choice_error[0] = 0;
        __atomic_store_n(&kernel_choice, k, __ATOMIC_RELEASE);
        return 0;
    }
    snprintf(kernel_choice_error, sizeof(kernel_choice_error),
             "PYRNN_ISA=%s: unknown kernel set (this build holds %s; this CPU runs %s)", name, built, runs);
    return fail("%s", kernel_choice_error);
}

__attribute__((constructor)) static void kernel_choose_at_load(void) {
#if defined(__x86_64__) && defined(__GNUC__)
    __builtin_cpu_init();   // constructors may run before libgcc's own, which fills what cpu_supports reads
#endif
    kernel_choose(getenv("PYRNN_ISA"));
}

// the set a new model takes
static const KernelSet* kernel_set_chosen(void) {
    const KernelSet* k = __atomic_load_n(&kernel_choice, __ATOMIC_ACQUIRE);
    if (!k) fail("%s", kernel_choice_error);
    return k;
}

// the set new models take ("avx2"), or NULL with the reason in pyrnn_last_error
const char* pyrnn_isa(void) {
    const KernelSet* k = kernel_set_chosen();
    return k ? k->name : NULL;
}

// models made from now on take this set (NULL or "": the widest this CPU runs); -1 if it cannot
int pyrnn_set_isa(const char* name) { return kernel_choose(name); }

// the sets this build holds, and those this CPU runs
const char* pyrnn_isa_list(int cpu_only) {
    static __thread char names[128];
    kernel_set_names(names, sizeof(names), cpu_only);
    return names;
}
