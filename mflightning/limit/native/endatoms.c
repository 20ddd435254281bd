/* Fused passes over the end atoms of the reduced solver, on a CPU (mflightning.limit.native).
 *
 * Blocks of atoms in the lanes of a vector, the samples one at a time, glibc's vector exp
 * (endatoms_body.h): the P x n intermediates of mflightning/limit/endatoms.py never exist, and
 * the sigmoid core costs one vector exp. A layer's parts run side by side on OpenMP threads.
 * Compiled at first use by mflightning.limit.native (cc -O3 -march=native -fopenmp, once per
 * precision: -DMFL_REAL_BITS=64 or 32; without OpenMP, -fopenmp-simd and the parts one after
 * another); the fields and buffers are torch tensors' memory. */
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#ifdef _OPENMP
#include <omp.h>
#include <pthread.h>
#endif

/* glibc's libmvec has vector variants of exp and expf; declaring them lets the compiler
 * vectorise the sigmoid loops without -ffast-math (which would drop NaN semantics). Built with
 * -DMFL_SCALAR_EXP where libmvec is missing. */
#ifndef MFL_SCALAR_EXP
#pragma omp declare simd notinbranch
extern double exp(double);
#pragma omp declare simd notinbranch
extern float expf(float);
#endif

enum { CORE_IDENTITY = 0, CORE_RELU = 1, CORE_SIGMOID = 2 };
enum { STEP_THETA = 1, STEP_BIAS = 2, STEP_READOUT = 4 };
enum { MAX_WIDTH = 16 };  /* widest input X; mflightning.limit.native.MAX_WIDTH */
enum { FIXED_WIDTH = 12 }; /* widest input with its own unrolled passes */
/* most atoms per vector block: part i of a layer keeps its core values at rows x (start +
 * KEPT_LANES i); mflightning.limit.native.KEPT_LANES */
enum { KEPT_LANES = 8 };
/* scratch rows of rows elements the passes need: the fixed form's g and lane sums of x_grad
 * ((1 + FIXED_WIDTH) x rows vectors of up to 8 lanes); mflightning.limit.native.SCRATCH_ROWS */
enum { SCRATCH_ROWS = 8 * (1 + FIXED_WIDTH) };

/* An end layer, or one part of it (see EndLayer in endatoms.py); scalars in double for both
 * precisions, pointers to elements of the layer's precision. */
typedef struct {
    int64_t rows, width, outputs, atoms; /* P, q, C', n */
    const void *x;                       /* X transposed: x[j * rows + p] */
    void *theta;                         /* theta[k * theta_stride[0] + j * theta_stride[1]] */
    int64_t theta_stride[2];
    double theta_offset;
    void *bias; /* bias[k * bias_stride], or NULL */
    int64_t bias_stride;
    void *readout; /* readout[c * readout_stride[0] + k * readout_stride[1]] */
    int64_t readout_stride[2];
    double readout_offset;
    double inner, outer, shift, count; /* phi(u) = outer core(inner u) + shift; M */
    int32_t core;                      /* CORE_* */
    /* the fixed form's core values, kept by the forward pass for the backward pass, or NULL:
     * block b of 32 / sizeof(REAL) atoms at kept + b * rows vectors */
    void *kept;
} end_layer;

typedef void (*mfl_task)(void *context, int part);

#ifdef _OPENMP
/* Set in a child forked after this library was loaded: the OpenMP runtime's threads did not
 * survive the fork, and a parallel region there would wait for them forever (as torch's own
 * parallel ops do in such a child), so the parts run one after another. */
static int forked_child;
static void after_fork_in_child(void) { forked_child = 1; }
__attribute__((constructor)) static void watch_forks(void) {
    pthread_atfork(NULL, NULL, after_fork_in_child);
}
#endif

/* task(context, i) for 0 <= i < parts, side by side on the OpenMP runtime's threads: the
 * process's runtime, torch's own libgomp once torch is loaded, so the threads that torch's ops
 * left spinning take the parts (a second runtime's threads would compete with them for the
 * cores); a smaller team than asked for takes the parts in turn. One after another without
 * OpenMP (-fopenmp-simd only) or in a forked child. */
static void run_parts(mfl_task task, void *context, int parts) {
#ifdef _OPENMP
    if (parts > 1 && !forked_child) {
#pragma omp parallel num_threads(parts)
        {
            const int team = omp_get_num_threads();
            for (int part = omp_get_thread_num(); part < parts; part += team)
                task(context, part);
        }
        return;
    }
#endif
    for (int part = 0; part < parts; ++part)
        task(context, part);
}

/* one precision per object file (MFL_REAL_BITS 64 or 32), compiled side by side and linked */
#if MFL_REAL_BITS == 32
#define REAL float
#define EXP expf
#define VECTOR_EXP _ZGVdN8v_expf
#define NAME(f) f##_f32
#else
#define REAL double
#define EXP exp
#define VECTOR_EXP _ZGVdN4v_exp
#define NAME(f) f##_f64
#endif
#if defined(__AVX2__) && !defined(MFL_SCALAR_EXP) /* libmvec's AVX2 exp, called on vectors */
typedef REAL exp_vector __attribute__((vector_size(32)));
extern exp_vector VECTOR_EXP(exp_vector);
#endif
#include "endatoms_body.h"
