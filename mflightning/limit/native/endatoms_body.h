/* One precision's fused end-layer passes; included by endatoms.c once per precision, with
 * REAL (the element type), EXP (its exponential) and NAME(f) (the exported name) defined.
 * The formulas are those of mflightning/limit/endatoms.py (docs/theory.md §B.3, §B.4).
 *
 * Two forms of each pass. The fixed form (one output, at most FIXED_WIDTH input features):
 * the width and the core are constants of each inlined copy, a block of atoms sits in the lanes
 * of one vector and the samples are taken one at a time, every sum in a register. The general
 * form (several outputs, or wider inputs): the atom's core values go through a scratch row and
 * each sum takes its own loop. */

static inline __attribute__((always_inline)) REAL NAME(activate)(int32_t core, REAL z) {
    if (core == CORE_RELU)
        return z < (REAL)0 ? (REAL)0 : z; /* NaN stays NaN, as torch's relu */
    if (core == CORE_SIGMOID)
        return (REAL)1 / ((REAL)1 + EXP(-z));
    return z;
}

/* core'(z) from v = core(z) */
static inline __attribute__((always_inline)) REAL NAME(slope)(int32_t core, REAL v) {
    if (core == CORE_RELU)
        return v > (REAL)0 ? (REAL)1 : (REAL)0; /* 1 where relu(z) > 0, as torch's */
    if (core == CORE_SIGMOID)
        return v - v * v;
    return (REAL)1;
}

/* theta'_k = theta_k + theta_offset into weights, and b_k (0 without biases); width is
 * layer->width, a constant in the fixed forms */
static inline __attribute__((always_inline)) REAL NAME(atom_weights)(
    const end_layer *layer, int64_t width, int64_t k, REAL *weights) {
    const REAL *theta = (const REAL *)layer->theta + k * layer->theta_stride[0];
#pragma GCC unroll 12
    for (int64_t j = 0; j < width; ++j)
        weights[j] = theta[j * layer->theta_stride[1]] + (REAL)layer->theta_offset;
    return layer->bias == NULL ? (REAL)0 : ((const REAL *)layer->bias)[k * layer->bias_stride];
}

static inline REAL NAME(readout_weight)(const end_layer *layer, int64_t k, int64_t c) {
    const REAL *readout = (const REAL *)layer->readout;
    return readout[c * layer->readout_stride[0] + k * layer->readout_stride[1]] +
           (REAL)layer->readout_offset;
}

/* ---- forward: out[c * rows + p] += sum_k R'[c, k] (outer core(z[p, k]) + shift) / M ---- */

/* The core values of atom k into values (the general form) */
static inline __attribute__((always_inline)) void NAME(values_general)(
    const end_layer *layer, int32_t core, int64_t k, REAL *restrict weights,
    REAL *restrict values) {
    const int64_t rows = layer->rows;
    const REAL *restrict x = (const REAL *)layer->x;
    const REAL bias = NAME(atom_weights)(layer, layer->width, k, weights);
    const REAL inner = (REAL)layer->inner;
#pragma omp simd
    for (int64_t p = 0; p < rows; ++p)
        values[p] = bias;
    for (int64_t j = 0; j < layer->width; ++j) {
        const REAL *restrict column = x + j * rows;
#pragma omp simd
        for (int64_t p = 0; p < rows; ++p)
            values[p] += column[p] * weights[j];
    }
#pragma omp simd
    for (int64_t p = 0; p < rows; ++p)
        values[p] = NAME(activate)(core, inner * values[p]);
}

static inline __attribute__((always_inline)) void NAME(forward_general)(
    const end_layer *layer, int32_t core, REAL *restrict scratch, REAL *restrict out) {
    const int64_t rows = layer->rows;
    const REAL scale = (REAL)(layer->outer / layer->count);
    const REAL shift = (REAL)(layer->shift / layer->count);
    REAL weights[MAX_WIDTH];
    for (int64_t k = 0; k < layer->atoms; ++k) {
        REAL *restrict values = scratch;
        NAME(values_general)(layer, core, k, weights, values);
        for (int64_t c = 0; c < layer->outputs; ++c) {
            const REAL r = NAME(readout_weight)(layer, k, c), w = r * scale, e = r * shift;
            REAL *restrict row = out + c * rows;
#pragma omp simd
            for (int64_t p = 0; p < rows; ++p)
                row[p] += w * values[p] + e;
        }
    }
}

/* ---- backward: the gradients of each atom's fields and their Euler steps ---- */

/* f <- f - steps[f] df for atom k's stepped fields, from its sums over the samples (sums[j]
 * for theta'_j, sums[width] for the bias, sums[width + 1 + c] for the readout c); the sums of
 * squared gradients go to squares[0], [1], [2] (theta, bias, readout) */
static inline __attribute__((always_inline)) void NAME(step_atom)(
    const end_layer *layer, int64_t k, const REAL *sums, const REAL *grad_sum, int32_t flags,
    const double *steps, REAL *squares) {
    const int64_t width = layer->width;
    const REAL slope_scale = (REAL)(layer->outer * layer->inner / layer->count);
    if (flags & STEP_THETA) {
        REAL *theta = (REAL *)layer->theta + k * layer->theta_stride[0];
        for (int64_t j = 0; j < width; ++j) {
            const REAL d = slope_scale * sums[j];
            squares[0] += d * d;
            theta[j * layer->theta_stride[1]] -= (REAL)steps[0] * d;
        }
    }
    if (flags & STEP_BIAS) {
        const REAL d = slope_scale * sums[width];
        squares[1] += d * d;
        ((REAL *)layer->bias)[k * layer->bias_stride] -= (REAL)steps[1] * d;
    }
    if (flags & STEP_READOUT) {
        REAL *readout = (REAL *)layer->readout + k * layer->readout_stride[1];
        const REAL scale = (REAL)(layer->outer / layer->count);
        const REAL shift = (REAL)(layer->shift / layer->count);
        for (int64_t c = 0; c < layer->outputs; ++c) {
            const REAL d = scale * sums[width + 1 + c] + shift * grad_sum[c];
            squares[2] += d * d;
            readout[c * layer->readout_stride[0]] -= (REAL)steps[2] * d;
        }
    }
}

/* x_grad[j * rows + p] += (outer inner / M) h[p] theta'_j, with the fields before the step */
static inline void NAME(add_input_grad)(const end_layer *layer, const REAL *restrict weights,
                                        const REAL *restrict h, REAL *restrict x_grad) {
    const int64_t rows = layer->rows;
    const REAL slope_scale = (REAL)(layer->outer * layer->inner / layer->count);
    for (int64_t j = 0; j < layer->width; ++j) {
        const REAL t = weights[j] * slope_scale;
        REAL *restrict column = x_grad + j * rows;
#pragma omp simd
        for (int64_t p = 0; p < rows; ++p)
            column[p] += h[p] * t;
    }
}

/* ---- the fixed form: a block of LANES atoms in the lanes of one vector ---- */

typedef REAL NAME(lanes) __attribute__((vector_size(32)));
enum { NAME(LANES) = 32 / sizeof(REAL) };

/* exp of every lane: glibc's vector exp where the CPU has AVX2, else lane by lane */
static inline __attribute__((always_inline)) NAME(lanes) NAME(lanes_exp)(NAME(lanes) z) {
#if defined(__AVX2__) && !defined(MFL_SCALAR_EXP)
    return VECTOR_EXP(z);
#else
    for (int l = 0; l < NAME(LANES); ++l)
        z[l] = EXP(z[l]);
    return z;
#endif
}

static inline __attribute__((always_inline)) NAME(lanes) NAME(lanes_activate)(int32_t core,
                                                                              NAME(lanes) z) {
    const NAME(lanes) zero = {0};
    if (core == CORE_RELU) { /* z, or 0 where z < 0 (NaN stays NaN, as torch's relu) */
        const __typeof__(z < zero) negative = z < zero;
        return (NAME(lanes))((__typeof__(negative))z & ~negative);
    }
    if (core == CORE_SIGMOID)
        return (REAL)1 / ((REAL)1 + NAME(lanes_exp)(-z));
    return z;
}

/* core'(z) from v = core(z) */
static inline __attribute__((always_inline)) NAME(lanes) NAME(lanes_slope)(int32_t core,
                                                                           NAME(lanes) v) {
    const NAME(lanes) zero = {0}, one = zero + (REAL)1;
    if (core == CORE_RELU) { /* 1 where relu(z) > 0, as torch's */
        const __typeof__(v > zero) positive = v > zero;
        return (NAME(lanes))((__typeof__(positive))one & positive);
    }
    if (core == CORE_SIGMOID)
        return v - v * v;
    return one;
}

/* The block of atoms k0 .. k0 + count - 1: inner theta'_j in weights[j], inner b in *bias and
 * R' in *readout, lane by lane; the lanes past count are 0 (they add nothing anywhere). */
static inline __attribute__((always_inline)) void NAME(block_weights)(
    const end_layer *layer, int64_t width, int64_t k0, int64_t count, NAME(lanes) *weights,
    NAME(lanes) *bias, NAME(lanes) *readout) {
    const REAL inner = (REAL)layer->inner;
    REAL atom[FIXED_WIDTH];
    const NAME(lanes) zero = {0};
    for (int64_t j = 0; j < width; ++j)
        weights[j] = zero;
    *bias = *readout = zero;
    for (int64_t l = 0; l < count; ++l) {
        const REAL b = NAME(atom_weights)(layer, width, k0 + l, atom);
        for (int64_t j = 0; j < width; ++j)
            weights[j][l] = inner * atom[j];
        (*bias)[l] = inner * b;
        (*readout)[l] = NAME(readout_weight)(layer, k0 + l, 0);
    }
}

static inline __attribute__((always_inline)) REAL NAME(lanes_sum)(NAME(lanes) v) {
    REAL total = (REAL)0;
    for (int l = 0; l < NAME(LANES); ++l)
        total += v[l];
    return total;
}

/* One output, a constant width and core: per block of LANES atoms and per sample, z, the core
 * and the contribution to out in vectors over the atoms; out's lanes are added at the end. */
static inline __attribute__((always_inline)) void NAME(forward_fixed)(
    const end_layer *layer, int64_t width, int32_t core, NAME(lanes) *restrict partial,
    REAL *restrict out) {
    typedef NAME(lanes) lanes;
    const int64_t rows = layer->rows, atoms = layer->atoms;
    const REAL *restrict x = (const REAL *)layer->x;
    const REAL scale = (REAL)(layer->outer / layer->count);
    const lanes zero = {0};
    lanes weights[FIXED_WIDTH], bias, readout, shift_total = zero;
    for (int64_t p = 0; p < rows; ++p)
        partial[p] = zero;
    for (int64_t k0 = 0; k0 < atoms; k0 += NAME(LANES)) {
        const int64_t count = atoms - k0 < NAME(LANES) ? atoms - k0 : NAME(LANES);
        NAME(block_weights)(layer, width, k0, count, weights, &bias, &readout);
        const lanes w = readout * scale;
        shift_total += readout;
        if (layer->kept != NULL) { /* the block's core values, for the backward pass */
            lanes *restrict kept = (lanes *)layer->kept + (k0 / NAME(LANES)) * rows;
            for (int64_t p = 0; p < rows; ++p) {
                lanes z = bias;
                for (int64_t j = 0; j < width; ++j)
                    z += x[j * rows + p] * weights[j];
                kept[p] = NAME(lanes_activate)(core, z);
                partial[p] += w * kept[p];
            }
        } else {
            for (int64_t p = 0; p < rows; ++p) {
                lanes z = bias;
                for (int64_t j = 0; j < width; ++j)
                    z += x[j * rows + p] * weights[j];
                partial[p] += w * NAME(lanes_activate)(core, z);
            }
        }
    }
    const REAL shift = (REAL)(layer->shift / layer->count) * NAME(lanes_sum)(shift_total);
    for (int64_t p = 0; p < rows; ++p)
        out[p] += NAME(lanes_sum)(partial[p]) + shift;
}

/* One output, a constant width and core: per block of LANES atoms, one loop over the samples
 * for z, the core, g[p] = core'(z) G[p] (kept in scratch) and the readout's sum, a second one
 * for the sums of g; vectors over the atoms, no sum across lanes until the block's steps. The
 * readout weight R' multiplies the sums afterwards (h = g R'). x_grad's lanes (width x rows
 * vectors after the rows of g) are added at the end. */
static inline __attribute__((always_inline)) void NAME(backward_fixed)(
    const end_layer *layer, int64_t width, int32_t core, const REAL *restrict grad,
    const REAL *grad_sum, int32_t flags, const double *steps, NAME(lanes) *restrict scratch,
    REAL *restrict x_grad, REAL *squares) {
    typedef NAME(lanes) lanes;
    const int64_t rows = layer->rows, atoms = layer->atoms;
    const REAL *restrict x = (const REAL *)layer->x;
    const REAL slope_scale = (REAL)(layer->outer / layer->count); /* inner is in the weights */
    const lanes zero = {0};
    lanes *restrict slopes = scratch, *restrict partial = scratch + rows;
    lanes weights[FIXED_WIDTH], bias, readout;
    REAL sums[FIXED_WIDTH + 2], totals[3] = {0, 0, 0}; /* squares, in registers */
    if (x_grad != NULL)
        for (int64_t i = 0; i < width * rows; ++i)
            partial[i] = zero;
    for (int64_t k0 = 0; k0 < atoms; k0 += NAME(LANES)) {
        const int64_t count = atoms - k0 < NAME(LANES) ? atoms - k0 : NAME(LANES);
        NAME(block_weights)(layer, width, k0, count, weights, &bias, &readout);
        lanes readout_sum = zero;
        if (layer->kept != NULL) { /* the core values kept by the forward pass */
            const lanes *restrict kept = (const lanes *)layer->kept + (k0 / NAME(LANES)) * rows;
            for (int64_t p = 0; p < rows; ++p) {
                slopes[p] = grad[p] * NAME(lanes_slope)(core, kept[p]);
                readout_sum += grad[p] * kept[p];
            }
        } else {
            for (int64_t p = 0; p < rows; ++p) {
                lanes z = bias;
                for (int64_t j = 0; j < width; ++j)
                    z += x[j * rows + p] * weights[j];
                const lanes v = NAME(lanes_activate)(core, z);
                slopes[p] = grad[p] * NAME(lanes_slope)(core, v);
                readout_sum += grad[p] * v;
            }
        }
        lanes theta_sums[FIXED_WIDTH], bias_sum = zero;
        for (int64_t j = 0; j < width; ++j)
            theta_sums[j] = zero;
        for (int64_t p = 0; p < rows; ++p) {
            const lanes g = slopes[p];
            bias_sum += g;
            for (int64_t j = 0; j < width; ++j)
                theta_sums[j] += g * x[j * rows + p];
        }
        if (x_grad != NULL) { /* with the fields before the step */
            for (int64_t j = 0; j < width; ++j) {
                const lanes weight = readout * weights[j];
                for (int64_t p = 0; p < rows; ++p)
                    partial[j * rows + p] += slopes[p] * weight;
            }
        }
        for (int64_t l = 0; l < count; ++l) {
            for (int64_t j = 0; j < width; ++j)
                sums[j] = theta_sums[j][l] * readout[l];
            sums[width] = bias_sum[l] * readout[l];
            sums[width + 1] = readout_sum[l];
            NAME(step_atom)(layer, k0 + l, sums, grad_sum, flags, steps, totals);
        }
    }
    for (int i = 0; i < 3; ++i)
        squares[i] += totals[i];
    if (x_grad != NULL) /* the weights carried inner: x_grad = (outer inner / M) sum_k h theta' */
        for (int64_t i = 0; i < width * rows; ++i)
            x_grad[i] += slope_scale * NAME(lanes_sum)(partial[i]);
}

/* Several outputs or a wide input: the core values into a scratch row, h = core'(z) sum_c G[:,
 * c] R'[c], then each sum in its own loop. */
static inline __attribute__((always_inline)) void NAME(backward_general)(
    const end_layer *layer, int32_t core, const REAL *restrict grad, const REAL *grad_sum,
    int32_t flags, const double *steps, REAL *restrict scratch, REAL *restrict x_grad,
    REAL *squares) {
    const int64_t rows = layer->rows, width = layer->width, outputs = layer->outputs;
    const REAL *restrict x = (const REAL *)layer->x;
    REAL *restrict values = scratch, *restrict h = scratch + rows;
    REAL weights[MAX_WIDTH], sums[MAX_WIDTH + 1 + outputs];
    for (int64_t k = 0; k < layer->atoms; ++k) {
        NAME(values_general)(layer, core, k, weights, values);
#pragma omp simd
        for (int64_t p = 0; p < rows; ++p)
            h[p] = (REAL)0;
        for (int64_t c = 0; c < outputs; ++c) {
            const REAL r = NAME(readout_weight)(layer, k, c);
            const REAL *restrict g = grad + c * rows;
#pragma omp simd
            for (int64_t p = 0; p < rows; ++p)
                h[p] += g[p] * r;
        }
#pragma omp simd
        for (int64_t p = 0; p < rows; ++p)
            h[p] *= NAME(slope)(core, values[p]);
        for (int64_t i = 0; i < width + 1 + outputs; ++i) {
            /* (h, X[:, i]), then (h, 1) for the bias, then (G[:, c], values) */
            const REAL *a = i <= width ? h : grad + (i - width - 1) * rows;
            const REAL *b = i < width ? x + i * rows : values;
            REAL total = (REAL)0;
            if (i == width) {
#pragma omp simd reduction(+ : total)
                for (int64_t p = 0; p < rows; ++p)
                    total += a[p];
            } else {
#pragma omp simd reduction(+ : total)
                for (int64_t p = 0; p < rows; ++p)
                    total += a[p] * b[p];
            }
            sums[i] = total;
        }
        if (x_grad != NULL)
            NAME(add_input_grad)(layer, weights, h, x_grad);
        NAME(step_atom)(layer, k, sums, grad_sum, flags, steps, squares);
    }
}

/* ---- the exported passes: one form per (core, width), chosen once per call ---- */

#define DISPATCH_WIDTH(FIXED, GENERAL, CORE)                                                       \
    switch (layer->outputs == 1 ? layer->width : 0) {                                              \
    case 1: FIXED(1, CORE); break;                                                                 \
    case 2: FIXED(2, CORE); break;                                                                 \
    case 3: FIXED(3, CORE); break;                                                                 \
    case 4: FIXED(4, CORE); break;                                                                 \
    case 5: FIXED(5, CORE); break;                                                                 \
    case 6: FIXED(6, CORE); break;                                                                 \
    case 7: FIXED(7, CORE); break;                                                                 \
    case 8: FIXED(8, CORE); break;                                                                 \
    case 9: FIXED(9, CORE); break;                                                                 \
    case 10: FIXED(10, CORE); break;                                                               \
    case 11: FIXED(11, CORE); break;                                                               \
    case 12: FIXED(12, CORE); break;                                                               \
    default: GENERAL(CORE);                                                                        \
    }

/* the form of layer->core, then of its width (FIXED(width, core) or GENERAL(core)) */
#define DISPATCH(FIXED, GENERAL)                                                                   \
    switch (layer->core) {                                                                         \
    case CORE_RELU: DISPATCH_WIDTH(FIXED, GENERAL, CORE_RELU) break;                              \
    case CORE_SIGMOID: DISPATCH_WIDTH(FIXED, GENERAL, CORE_SIGMOID) break;                        \
    default: DISPATCH_WIDTH(FIXED, GENERAL, CORE_IDENTITY)                                         \
    }

/* out (C' x rows) += the layer's contribution S.T (scratch: SCRATCH_ROWS x rows elements) */
static void NAME(forward)(const end_layer *layer, REAL *restrict scratch, REAL *restrict out) {
#define FIXED(w, c) NAME(forward_fixed)(layer, w, c, (NAME(lanes) *)scratch, out)
#define GENERAL(c) NAME(forward_general)(layer, c, scratch, out)
    DISPATCH(FIXED, GENERAL)
#undef FIXED
#undef GENERAL
}

/* Gradients of the loss with respect to each atom's fields and their Euler steps, atom by atom
 * (grad: G = dLoss/dS stored as grad[c * rows + p]; grad_sum[c] = sum_p G[p, c]):
 *   dR[c]   = (outer sum_p G[p, c] core(z[p]) + shift sum_p G[p, c]) / M,
 *   h[p]    = core'(z[p]) sum_c G[p, c] R'[c],
 *   dtheta  = (outer inner / M) sum_p h[p] X[p, :],   db = (outer inner / M) sum_p h[p],
 *   x_grad[j * rows + p] += (outer inner / M) h[p] theta'[j]   (before the step; if x_grad),
 * then f <- f - steps[f] df for each stepped field (flags: STEP_THETA | STEP_BIAS |
 * STEP_READOUT), adding sum df^2 to squares[0], [1], [2] (theta, bias, readout).
 * scratch holds SCRATCH_ROWS x rows elements, 32-byte aligned. */
static void NAME(backward)(const end_layer *layer, const REAL *restrict grad,
                            const REAL *restrict grad_sum, int32_t flags, const double *steps,
                            REAL *restrict scratch, REAL *restrict x_grad, REAL *squares) {
#define FIXED(w, c)                                                                                \
    NAME(backward_fixed)(layer, w, c, grad, grad_sum, flags, steps, (NAME(lanes) *)scratch,       \
                         x_grad, squares)
#define GENERAL(c)                                                                                 \
    NAME(backward_general)(layer, c, grad, grad_sum, flags, steps, scratch, x_grad, squares)
    DISPATCH(FIXED, GENERAL)
#undef FIXED
#undef GENERAL
}

#undef DISPATCH
#undef DISPATCH_WIDTH

/* ---- the entry points: a layer's parts side by side on OpenMP threads ---- */

/* Part `part` of `parts` of a layer: atoms start .. stop - 1 with start = atoms part / parts
 * (as mflightning.limit.endatoms.Workspace.parts), its kept values at rows x (start +
 * KEPT_LANES part). */
static end_layer NAME(part)(const end_layer *layer, int part, int parts) {
    end_layer view = *layer;
    const int64_t start = layer->atoms * part / parts, stop = layer->atoms * (part + 1) / parts;
    view.atoms = stop - start;
    view.theta = (REAL *)layer->theta + start * layer->theta_stride[0];
    if (layer->bias != NULL)
        view.bias = (REAL *)layer->bias + start * layer->bias_stride;
    view.readout = (REAL *)layer->readout + start * layer->readout_stride[1];
    if (layer->kept != NULL)
        view.kept = (REAL *)layer->kept + layer->rows * (start + KEPT_LANES * part);
    return view;
}

typedef struct {
    const end_layer *layer;
    int parts;
    REAL *scratch, *out;
} NAME(forward_pass);

static void NAME(forward_task)(void *context, int part) {
    const NAME(forward_pass) *pass = context;
    const end_layer view = NAME(part)(pass->layer, part, pass->parts);
    NAME(forward)(&view, pass->scratch + part * SCRATCH_ROWS * view.rows,
                  pass->out + part * view.outputs * view.rows);
}

/* The forward pass of a layer in `parts` parts: part i adds its S.T into out + i C' rows
 * (scratch: parts x SCRATCH_ROWS x rows elements). */
void NAME(mfl_forward)(const end_layer *layer, int32_t parts, REAL *scratch, REAL *out) {
    NAME(forward_pass) pass = {layer, parts, scratch, out};
    run_parts(NAME(forward_task), &pass, parts);
}

typedef struct {
    const end_layer *layer;
    int parts;
    const REAL *grad, *grad_sum;
    int32_t flags;
    const double *steps;
    REAL *scratch, *x_grad, *squares;
} NAME(backward_pass);

static void NAME(backward_task)(void *context, int part) {
    const NAME(backward_pass) *pass = context;
    const end_layer view = NAME(part)(pass->layer, part, pass->parts);
    REAL *x_grad = pass->x_grad == NULL ? NULL : pass->x_grad + part * view.width * view.rows;
    NAME(backward)(&view, pass->grad, pass->grad_sum, pass->flags, pass->steps,
                   pass->scratch + part * SCRATCH_ROWS * view.rows, x_grad, pass->squares + 3 * part);
}

/* The backward pass and Euler steps of a layer in `parts` parts: part i accumulates into
 * x_grad + i q rows (or not, if NULL) and squares + 3 i (scratch as mfl_forward's). */
void NAME(mfl_backward)(const end_layer *layer, int32_t parts, const REAL *grad,
                        const REAL *grad_sum, int32_t flags, const double *steps, REAL *scratch,
                        REAL *x_grad, REAL *squares) {
    NAME(backward_pass) pass = {layer, parts, grad, grad_sum, flags, steps, scratch, x_grad, squares};
    run_parts(NAME(backward_task), &pass, parts);
}
