// gpu_check.cuh: errors and the driver. Every CUDA / cuDNN / cuBLAS failure becomes one line naming
// the call, e.g. "cudaMalloc: out of memory (cuda/gpu_model.cuh:123)", through common.h's fail:
// nothing here exits. The driver and the device are checked before any other CUDA call, so a
// machine without a usable GPU gets one line saying which of three things is wrong. Also the
// test for a sticky error (one that ends the CUDA context) and cuBLAS's deterministic workspace.
#pragma once
#include "../c/common.h"   // fail, pyrnn_last_error

#include <cublas_v2.h>
#include <cuda_runtime.h>
#include <cudnn.h>

static int gpu_fail(const char* call, const char* what, const char* file, int line) {
    int n = 0;
    while (call[n] && call[n] != '(' && n < 64) n++;   // "cudaMalloc(&p, n)" -> "cudaMalloc"
    return fail("%.*s: %s (%s:%d)", n, call, what, file, line);
}

static int gpu_fail_cudnn(const char* call, cudnnStatus_t s, const char* file, int line) {
    char detail[512];
    detail[0] = 0;
    cudnnGetLastErrorString(detail, sizeof(detail));   // often says which argument was rejected
    char what[768];
    snprintf(what, sizeof(what), "%s%s%s", cudnnGetErrorString(s), detail[0] ? ": " : "", detail);
    for (char* p = what; *p; p++) if (*p == '\n') *p = ' ';
    return gpu_fail(call, what, file, line);
}

#define CUDA_CHECK(call) do { cudaError_t e_ = (call); \
    if (e_ != cudaSuccess) return gpu_fail(#call, cudaGetErrorString(e_), __FILE__, __LINE__); } while (0)
#define CUDNN_CHECK(call) do { cudnnStatus_t s_ = (call); \
    if (s_ != CUDNN_STATUS_SUCCESS) return gpu_fail_cudnn(#call, s_, __FILE__, __LINE__); } while (0)
#define CUBLAS_CHECK(call) do { cublasStatus_t s_ = (call); \
    if (s_ != CUBLAS_STATUS_SUCCESS) return gpu_fail(#call, cublasGetStatusString(s_), __FILE__, __LINE__); \
    } while (0)
// after a kernel launch: a bad configuration or a missing kernel image shows up here, faults at the next sync
#define LAUNCH_CHECK(kernel) do { cudaError_t e_ = cudaGetLastError(); \
    if (e_ != cudaSuccess) return gpu_fail(kernel, cudaGetErrorString(e_), __FILE__, __LINE__); } while (0)

// cudaMalloc of n_bytes (at least 4), NULL on failure, with what it was for in the message
static int gpu_alloc(void* p, size_t n_bytes, const char* what) {
    void** pp = (void**)p;
    cudaError_t e = cudaMalloc(pp, n_bytes ? n_bytes : 4);
    if (e != cudaSuccess) {
        *pp = NULL;
        return fail("cudaMalloc: %s for %s (%zu bytes)", cudaGetErrorString(e), what, n_bytes);
    }
    return 0;
}

// Teardown has no caller left to tell: a failure goes to stderr, once (after a sticky error every
// call would fail the same way)
static void gpu_teardown_warn(const char* call, const char* what) {
    static int warned = 0;
    if (warned++) return;
    int n = 0;
    while (call[n] && call[n] != '(' && n < 64) n++;
    fprintf(stderr, "warning: %.*s: %s (while releasing the GPU model)\n", n, call, what);
}
#define CUDA_RELEASE(call) do { cudaError_t e_ = (call); \
    if (e_ != cudaSuccess) gpu_teardown_warn(#call, cudaGetErrorString(e_)); } while (0)
#define CUDNN_RELEASE(call) do { cudnnStatus_t s_ = (call); \
    if (s_ != CUDNN_STATUS_SUCCESS) gpu_teardown_warn(#call, cudnnGetErrorString(s_)); } while (0)
#define CUBLAS_RELEASE(call) do { cublasStatus_t s_ = (call); \
    if (s_ != CUBLAS_STATUS_SUCCESS) gpu_teardown_warn(#call, cublasGetStatusString(s_)); } while (0)
static void gpu_free(void* p) { if (p) CUDA_RELEASE(cudaFree(p)); }

// After a failed call: the error that every later CUDA call will return, or cudaSuccess. Errors
// that a call reports about itself (a refused configuration, out of memory) leave the context
// usable; an error of a kernel at run time (an illegal address, a launch failure, a device-side
// assert, ...) is sticky: the context is lost, and every later call fails with it.
static cudaError_t gpu_sticky_error(void) {
    (void)cudaGetLastError();        // the failed call's own error, if any: not sticky, so it clears
    return cudaDeviceSynchronize();  // a sticky one comes back from here, and from every call after
}

// cuBLAS picks its workspace per stream unless told one configuration; the cuDNN RNN calls use
// cuBLAS, and determinism (exact resume) needs a fixed one. Set before any handle exists; a value
// the user set stays.
static int gpu_fix_cublas_workspace(void) {
    if (setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8", 0) != 0)
        return fail("setenv CUBLAS_WORKSPACE_CONFIG: %s", strerror(errno));
    return 0;
}

// ----------------------------------------------------------------------------
// the driver and the device: a too-old driver, no driver and no GPU each get their own message

// "580.159.03" from /proc/driver/nvidia/version, or "" where the kernel module does not say
static void nvidia_driver_release(char* out, size_t size) {
    out[0] = 0;
    FILE* f = fopen("/proc/driver/nvidia/version", "r");
    if (!f) return;
    char line[512];
    if (fgets(line, sizeof(line), f)) {
        const char* p = strstr(line, "Kernel Module");
        if (p) {
            p += strlen("Kernel Module");
            while (*p == ' ' || *p == '\t') p++;
            size_t n = 0;
            while (p[n] && p[n] != ' ' && p[n] != '\t' && p[n] != '\n' && n + 1 < size) n++;
            snprintf(out, size, "%.*s", (int)n, p);
        }
    }
    fclose(f);
}

// the oldest driver branch that runs a CUDA major version (its x.0 release)
static const char* driver_branch_for(int cuda_major) {
    return cuda_major >= 13 ? "R580" : cuda_major == 12 ? "R525" : "R450";
}

// CUDA versions are 1000 * major + 10 * minor. Minor-version compatibility lets a driver of the
// same major run a newer minor runtime, so only the major is compared before asking for devices.
static int gpu_check_device(void) {
    int runtime = 0, driver = 0;
    CUDA_CHECK(cudaRuntimeGetVersion(&runtime));
    CUDA_CHECK(cudaDriverGetVersion(&driver));   // 0 when no driver is installed
    int rt_major = runtime / 1000, rt_minor = runtime % 1000 / 10;
    char release[64], found[160];
    nvidia_driver_release(release, sizeof(release));
    if (release[0])
        snprintf(found, sizeof(found), "driver %s, for CUDA %d.%d", release, driver / 1000, driver % 1000 / 10);
    else
        snprintf(found, sizeof(found), "a driver for CUDA %d.%d", driver / 1000, driver % 1000 / 10);
    if (driver == 0)
        return fail("no NVIDIA driver found (libcuda.so.1 is missing or cannot be loaded); this build uses CUDA "
                    "%d.%d, which needs driver %s or newer", rt_major, rt_minor, driver_branch_for(rt_major));
    if (driver / 1000 < rt_major)
        return fail("the NVIDIA driver is too old: found %s, this build uses CUDA %d.%d, which needs driver %s or "
                    "newer; update the driver, or rebuild with a CUDA %d toolkit (nvcc %d: make cuda_deps then "
                    "installs the -cu%d wheels)", found, rt_major, rt_minor, driver_branch_for(rt_major),
                    driver / 1000, driver / 1000, driver / 1000);
    int n_dev = 0;
    cudaError_t e = cudaGetDeviceCount(&n_dev);
    if (e == cudaErrorNoDevice || (e == cudaSuccess && n_dev < 1))
        return fail("no CUDA device found: the NVIDIA driver is installed (%s) but sees no GPU", found);
    if (e == cudaErrorInsufficientDriver)
        return fail("the NVIDIA driver is too old: found %s, this build uses CUDA %d.%d; update the driver to the "
                    "one of CUDA %d.%d or newer", found, rt_major, rt_minor, rt_major, rt_minor);
    if (e != cudaSuccess) return fail("cudaGetDeviceCount: %s (%s)", cudaGetErrorString(e), found);
    return 0;
}
