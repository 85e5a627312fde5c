// dist.h: data-parallel runs over MPI (-DUSE_MPI, built with mpicc: ./train_cpu_mpi). The ranks of
// MPI_COMM_WORLD split the global batch: rank r of R trains streams [r*B/R, (r+1)*B/R) of the same
// char-rnn layout as one process, keeps their hidden states, and holds a full replica of the model.
// Every collective the trainer makes is here, each return code checked. Without USE_MPI there is
// one rank and every function is a local no-op, so the plain build never needs MPI.
//
// Failures: a rank that fails alone must never leave the others waiting in a collective. So every
// point where a rank can fail is followed by an agreement (dist_agree) that all ranks reach, and
// all leave together with the lowest failing rank's message. A failing MPI call itself leaves no
// way to agree: it is the one place that aborts the job (MPI_Abort), after saying why.
#pragma once
#include "common.h"
#ifdef USE_MPI
#include <mpi.h>
#endif

typedef struct {
    int rank, size;
    int local_rank, local_ranks;   // on this machine, whose cores (and GPUs) the ranks share
    double comm_ms;      // time in the step's collectives, waiting for the slowest rank included
    int step_averaged;   // the backend called dist_step_mean in its last train_step
} Dist;

static Dist dist = { 0, 1, 0, 1, 0.0, 0 };

// the first global stream of this rank, which trains local_B of them
static int dist_first_stream(int local_B) { return dist.rank * local_B; }

#ifdef USE_MPI

static double dist_now_ms(void) { return MPI_Wtime() * 1e3; }

__attribute__((noreturn)) static void dist_abort(const char* call, int rc, const char* file, int line) {
    char why[MPI_MAX_ERROR_STRING] = "unknown error";
    int len = 0;
    MPI_Error_string(rc, why, &len);
    fprintf(stderr, "error: rank %d: %s failed: %s (%s:%d); stopping every rank\n", dist.rank, call, why, file, line);
    fflush(stderr);
    MPI_Abort(MPI_COMM_WORLD, 1);
    exit(1);   // MPI_Abort does not return; if it did, this rank still stops
}
#define MPI_CHECK(call) \
    do { int rc_ = (call); if (rc_ != MPI_SUCCESS) dist_abort(#call, rc_, __FILE__, __LINE__); } while (0)

// MPI counts are ints: larger buffers go in pieces (a buffer of 2^30 floats is 4 GiB)
#define DIST_CHUNK (1 << 30)

static int dist_init(void) {
    int rc = MPI_Init(NULL, NULL);
    if (rc != MPI_SUCCESS) return fail("MPI_Init failed (error %d): start the trainer with mpiexec", rc);
    // errors come back as codes to check instead of ending the process inside MPI
    MPI_CHECK(MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN));
    MPI_CHECK(MPI_Comm_rank(MPI_COMM_WORLD, &dist.rank));
    MPI_CHECK(MPI_Comm_size(MPI_COMM_WORLD, &dist.size));
    MPI_Comm node;
    MPI_CHECK(MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, dist.rank, MPI_INFO_NULL, &node));
    MPI_CHECK(MPI_Comm_rank(node, &dist.local_rank));
    MPI_CHECK(MPI_Comm_size(node, &dist.local_ranks));
    MPI_CHECK(MPI_Comm_free(&node));
    return 0;
}

static void dist_finalize(void) { MPI_CHECK(MPI_Finalize()); }

// every rank calls this at the same point with its own outcome (0 or -1). Returns 0 when every rank
// succeeded, else -1 on every rank with the lowest failing rank's message in pyrnn_last_error().
static int dist_agree(int status) {
    if (dist.size == 1) return status;
    int mine = status ? dist.rank : dist.size, first;
    MPI_CHECK(MPI_Allreduce(&mine, &first, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD));
    if (first == dist.size) return 0;
    if (dist.rank == first && first > 0) {   // name the rank when it is not the one that prints
        char why[sizeof(pyrnn_error_msg)];
        snprintf(why, sizeof(why), "%s", pyrnn_error_msg);
        fail("rank %d: %s", first, why);
    }
    MPI_CHECK(MPI_Bcast(pyrnn_error_msg, (int)sizeof(pyrnn_error_msg), MPI_CHAR, first, MPI_COMM_WORLD));
    return -1;
}

// sums x[0..n) over the ranks and agrees on status in the same all-reduce (n <= 7)
static int dist_agree_sum(int status, double* x, int n) {
    if (dist.size == 1) return status;
    double buf[8];
    buf[0] = status ? 1.0 : 0.0;
    for (int i = 0; i < n; i++) buf[i + 1] = x[i];
    MPI_CHECK(MPI_Allreduce(MPI_IN_PLACE, buf, n + 1, MPI_DOUBLE, MPI_SUM, MPI_COMM_WORLD));
    if (buf[0] > 0.0) return dist_agree(status);   // someone failed: who, and why
    for (int i = 0; i < n; i++) x[i] = buf[i + 1];
    return 0;
}

// in place: the mean of buf over the ranks
static void dist_mean_floats(float* buf, size_t n) {
    for (size_t i = 0; i < n; i += DIST_CHUNK) {
        int count = n - i < DIST_CHUNK ? (int)(n - i) : DIST_CHUNK;
        MPI_CHECK(MPI_Allreduce(MPI_IN_PLACE, buf + i, count, MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD));
    }
    float inv = 1.0f / (float)dist.size;   // exact for a power of two
    #pragma omp parallel for schedule(static) if ((long)n > (1L << 16))
    for (long i = 0; i < (long)n; i++) buf[i] *= inv;
}

// rank 0's all (L, B, H) receives every rank's mine (L, B/R, H), in global stream order (all is
// only read on rank 0); the driver keeps local_B * H within an int
static void dist_gather_streams(float* all, const float* mine, int L, int local_B, int H) {
    size_t block = (size_t)local_B * H;
    if (dist.size == 1) { memcpy(all, mine, (size_t)L * block * sizeof(float)); return; }
    for (int l = 0; l < L; l++) {   // layer l of rank r lands at streams [r*B/R, (r+1)*B/R) of layer l
        float* dst = dist.rank == 0 ? all + (size_t)l * dist.size * block : NULL;
        MPI_CHECK(MPI_Gather(mine + l * block, (int)block, MPI_FLOAT, dst, (int)block, MPI_FLOAT, 0, MPI_COMM_WORLD));
    }
}

// whether every rank holds the same x
static int dist_same(uint32_t x) {
    if (dist.size == 1) return 1;
    uint32_t lo_hi[2] = { x, UINT32_MAX - x };   // min of both: the smallest and the largest x
    MPI_CHECK(MPI_Allreduce(MPI_IN_PLACE, lo_hi, 2, MPI_UINT32_T, MPI_MIN, MPI_COMM_WORLD));
    return lo_hi[0] == UINT32_MAX - lo_hi[1];
}

#else   // one process

static int dist_init(void) { return 0; }
static void dist_finalize(void) {}
static int dist_agree(int status) { return status; }
static int dist_agree_sum(int status, double* x, int n) { (void)x; (void)n; return status; }
static void dist_mean_floats(float* buf, size_t n) { (void)buf; (void)n; }
static void dist_gather_streams(float* all, const float* mine, int L, int local_B, int H) {
    memcpy(all, mine, (size_t)L * local_B * H * sizeof(float));
}
static int dist_same(uint32_t x) { (void)x; return 1; }
static double dist_now_ms(void) { return 0.0; }

#endif

// A backend's train_step calls this between its backward pass and its update, on every rank, with
// the outcome so far (0 or -1) and this rank's mean loss over its B/R streams: the ranks agree on the
// step and average the loss (one all-reduce of two numbers), then the gradients (one in-place
// all-reduce of the whole contiguous buffer). Each rank's mean over its rows becomes the mean over
// the global B*T rows, as in one process. Host buffers; a GPU backend averages on the device instead
// (cuda/mpi_nccl.cuh) and sets dist.step_averaged itself.
static int dist_step_mean(int status, float* loss, float* grads, size_t n) {
    dist.step_averaged = 1;
    if (dist.size == 1) return status;
    double t0 = dist_now_ms(), sum = *loss;
    if (dist_agree_sum(status, &sum, 1)) return -1;
    *loss = (float)(sum / dist.size);
    dist_mean_floats(grads, n);
    dist.comm_ms += dist_now_ms() - t0;
    return 0;
}
