/* Fused CPU kernels (see kernels.py): float64 vector kernels for DCDM's
 * Krylov work, then the float32 kernels of the V-cycle network's inference.
 *
 * Each kernel makes one pass over its vectors where torch needs one pass
 * per operation; reductions return this rank's partial sums (the caller
 * adds them over the ranks). Threads: OpenMP with an explicit count, bound
 * at load time to the OpenMP runtime torch already loaded. Partial sums
 * are per thread and added in thread order, so for a given build a result
 * depends only on the thread count, never on timing.
 */
#include <math.h>
#include <omp.h>
#include <stdlib.h>
#include <string.h>

#define MAXT 512   /* threads */
#define MAXK 16    /* vectors per fused reduction */
#define BLOCK 2048 /* cells per inner block: the block of `a` stays in L1 */

typedef struct { double v[MAXK]; char pad[64]; } partial_t;

static void add_partials(const partial_t *part, int nt, int k, double *out)
{
    for (int j = 0; j < k; j++) {
        double s = 0.0;
        for (int t = 0; t < nt; t++) s += part[t].v[j];
        out[j] = s;
    }
}

static int clamp_threads(int nt)
{
    return nt < 1 ? 1 : (nt > MAXT ? MAXT : nt);
}

/* Runs fn over [0, n) in blocks of BLOCK cells on nt threads; each thread
 * accumulates k sums, added in thread order into out. */
typedef void (*block_fn)(long i0, long i1, const void *ctx, double *acc);

static void reduce_blocks(long n, int nt, int k, block_fn fn, const void *ctx, double *out)
{
    nt = clamp_threads(nt);
    partial_t part[nt];
    int used = 1;
#pragma omp parallel num_threads(nt)
    {
        int t = omp_get_thread_num();
#pragma omp single
        used = omp_get_num_threads();
        double acc[MAXK] = {0};
#pragma omp for schedule(static)
        for (long i0 = 0; i0 < n; i0 += BLOCK)
            fn(i0, i0 + BLOCK < n ? i0 + BLOCK : n, ctx, acc);
        for (int j = 0; j < k; j++) part[t].v[j] = acc[j];
    }
    add_partials(part, used, k, out);
}

/* out[j] = a·B[j], j < k, in one pass over a. */
struct dots { const double *a; int k; const double *const *B; };

static void dots_block(long i0, long i1, const void *ctx, double *acc)
{
    const struct dots *c = ctx;
    for (int j = 0; j < c->k; j++) {
        const double *a = c->a, *b = c->B[j];
        double s = 0.0;
#pragma omp simd reduction(+:s)
        for (long i = i0; i < i1; i++) s += a[i] * b[i];
        acc[j] += s;
    }
}

int deepcd_dots(long n, const double *a, int k, const double *const *B, double *out, int nt)
{
    if (k > MAXK) return -1;
    struct dots c = {a, k, B};
    reduce_blocks(n, nt, k, dots_block, &c, out);
    return 0;
}

/* d -= sum_j c[j] P[j]; q -= sum_j c[j] Q[j]; then out = (d·r, d·q), all
 * in one pass (A-orthogonalising a direction and its image under A). */
struct orth { int k; const double *c; const double *const *P, *const *Q; double *d, *q;
              const double *r; };

static void orth_block(long i0, long i1, const void *ctx, double *acc)
{
    const struct orth *o = ctx;
    double *d = o->d, *q = o->q;
    const double *r = o->r;
    for (int j = 0; j < o->k; j++) {
        const double *p = o->P[j], *pq = o->Q[j];
        double cj = o->c[j];
#pragma omp simd
        for (long i = i0; i < i1; i++) {
            d[i] -= cj * p[i];
            q[i] -= cj * pq[i];
        }
    }
    double a1 = 0.0, a2 = 0.0;
#pragma omp simd reduction(+:a1, a2)
    for (long i = i0; i < i1; i++) {
        a1 += d[i] * r[i];
        a2 += d[i] * q[i];
    }
    acc[0] += a1;
    acc[1] += a2;
}

int deepcd_orth_update(long n, int k, const double *c, const double *const *P,
                       const double *const *Q, double *d, double *q, const double *r,
                       double *out, int nt)
{
    if (k > MAXK) return -1;
    struct orth o = {k, c, P, Q, d, q, r};
    reduce_blocks(n, nt, 2, orth_block, &o, out);
    return 0;
}

/* x += alpha d; r -= alpha q; out[0] = r·r (the new residual's square). */
struct step { double alpha; double *x; const double *d; double *r; const double *q; };

static void step_block(long i0, long i1, const void *ctx, double *acc)
{
    const struct step *s = ctx;
    double alpha = s->alpha, *x = s->x, *r = s->r;
    const double *d = s->d, *q = s->q;
    double rr = 0.0;
#pragma omp simd reduction(+:rr)
    for (long i = i0; i < i1; i++) {
        x[i] += alpha * d[i];
        double ri = r[i] - alpha * q[i];
        r[i] = ri;
        rr += ri * ri;
    }
    acc[0] += rr;
}

int deepcd_step(long n, double alpha, double *x, const double *d, double *r,
                const double *q, double *out, int nt)
{
    struct step s = {alpha, x, d, r, q};
    reduce_blocks(n, nt, 1, step_block, &s, out);
    return 0;
}

/* ---- the V-cycle network's inference path (float32, mgnet.py) -----------
 * Fields of a level are (D, H, W) arrays; x and s live in zero-bordered
 * (D+2, H+2, W+2) buffers whose border holds the neighbours' halo (MPI) or
 * zeros, so a 7-point stencil reads its neighbours without a padded copy.
 * Each kernel is one pass where torch makes six to ten. The arithmetic
 * follows mgnet.py's torch path term by term (the compiler may contract
 * a*b+c into one rounding, so results agree to float32 rounding, not bits).
 */
#define ROW(p, z, y, H2, W2) ((p) + (((long)(z) + 1) * (H2) + (y) + 1) * (W2) + 1)

/* `zt` (the exported kernels' argument): 1 on 3D grids, 0 on 2D ones
 * (nz = 1 on every rank: the z couplings and ghosts are zero), where each
 * stencil reads 4 neighbours and couplings instead of 6. Both variants are
 * compiled from one body (ZT_DISPATCH), so the 3D arithmetic is unchanged. */
#define ZT_DISPATCH(body, ...) do { if (zt) body(__VA_ARGS__, 1); else body(__VA_ARGS__, 0); } while (0)
/* Inside a parallel region zt is a variable again (OpenMP outlines the
 * loop before inlining), which kept the simd loops scalar: ZT_SPLIT(loop)
 * compiles the loop twice with zt_ a constant, chosen per row. */
#define ZT_SPLIT(...) do { if (zt) { const int zt_ = 1; __VA_ARGS__ } \
                           else { const int zt_ = 0; __VA_ARGS__ } } while (0)

/* children of aggregate I of a halved axis of n cells (nc = n / 2
 * aggregates): f, or 3 for the last one of an odd axis (mgnet.fold_odd) */
#define LAST3(I, nc, n, f) ((f) == 2 && (I) == (nc) - 1 && ((n) & 1) ? 3 : (f))

/* the unit operator's neighbour sum (6 neighbours; 4 on a 2D grid) */
static inline __attribute__((always_inline)) float nbsum(const float *c, int x, long P, long W2,
                                                         int zt)
{
    if (!zt)
        return c[x - W2] + c[x + W2] + c[x - 1] + c[x + 1];
    return c[x - P] + c[x + P] + c[x - W2] + c[x + W2] + c[x - 1] + c[x + 1];
}

/* b = fluid ∘ (scale·r) on level 0's (D, H, W) field: the float64 residual
 * r, (d, h, w) in its corner (zero beyond: the padding to a multiple),
 * cast on the way in, as torch's r.float().mul_(scale) * fluid does */
void deepcd_mg_input(int d, int h, int w, int D, int H, int W, const double *r, float scale,
                     const float *fluid, float *b, int nt)
{
#pragma omp parallel for collapse(2) schedule(static) num_threads(clamp_threads(nt))
    for (int z = 0; z < D; z++)
        for (int y = 0; y < H; y++) {
            long u = ((long)z * H + y) * W;
            int n = z < d && y < h ? w : 0;
            const double *ri = r + ((long)z * h + y) * w;
#pragma omp simd
            for (int x = 0; x < n; x++) b[u + x] = ((float)ri[x] * scale) * fluid[u + x];
            for (int x = n; x < W; x++) b[u + x] = 0.0f;
        }
}

/* s = dinv * b (the first smoothing step, from x = 0) */
void deepcd_mg_first(int D, int H, int W, const float *b, const float *dinv, float *sp, int nt)
{
    long H2 = H + 2, W2 = W + 2;
#pragma omp parallel for collapse(2) schedule(static) num_threads(clamp_threads(nt))
    for (int z = 0; z < D; z++)
        for (int y = 0; y < H; y++) {
            long u = ((long)z * H + y) * W;
            float *so = ROW(sp, z, y, H2, W2);
#pragma omp simd
            for (int x = 0; x < W; x++) so[x] = dinv[u + x] * b[u + x];
        }
}

/* s = D⁻¹(b − A x) with A x = diag·x − (sum of the 6 neighbours), as
 * D⁻¹(b + neighbours) − x: x is zero off the fluid (gates, prolongation and
 * D⁻¹ carry the fluid mask), so D⁻¹·diag·x = x and diag need not be read */
static inline __attribute__((always_inline)) void
mg_resid(int D, int H, int W, const float *xp, const float *b, const float *dinv, float *sp,
         int nt, int zt)
{
    long H2 = H + 2, W2 = W + 2, P = H2 * W2;
#pragma omp parallel for collapse(2) schedule(static) num_threads(clamp_threads(nt))
    for (int z = 0; z < D; z++)
        for (int y = 0; y < H; y++) {
            long u = ((long)z * H + y) * W;
            const float *c = ROW(xp, z, y, H2, W2);
            float *so = ROW(sp, z, y, H2, W2);
            ZT_SPLIT(_Pragma("omp simd") for (int x = 0; x < W; x++) {
                float nb = nbsum(c, x, P, W2, zt_);
                so[x] = (nb + b[u + x]) * dinv[u + x] - c[x];
            });
        }
}

void deepcd_mg_resid(int D, int H, int W, const float *xp, const float *b, const float *dinv,
                     float *sp, int zt, int nt)
{
    ZT_DISPATCH(mg_resid, D, H, W, xp, b, dinv, sp, nt);
}

/* g ∘ (w ∗ s) at cell x of a row of s: a smoothing step's update, the
 * learned 7-point stencil (centre, −z, +z, −y, +y, −x, +x) times the gate */
static inline __attribute__((always_inline)) float
smooth_update(const float *c, int x, long P, long W2, const float *w, float g, int zt)
{
    if (!zt)
        return (c[x] * w[0] + w[3] * c[x - W2] + w[4] * c[x + W2] + w[5] * c[x - 1]
                + w[6] * c[x + 1]) * g;
    return (c[x] * w[0] + w[1] * c[x - P] + w[2] * c[x + P] + w[3] * c[x - W2]
            + w[4] * c[x + W2] + w[5] * c[x - 1] + w[6] * c[x + 1]) * g;
}

/* x (+)= g ∘ (w ∗ s) over a level (the gate carries the fluid mask);
 * `first`: x starts from zero */
static inline __attribute__((always_inline)) void
mg_step(int D, int H, int W, const float *sp, const float *w, const float *g, float *xp,
        int first, int nt, int zt)
{
    long H2 = H + 2, W2 = W + 2, P = H2 * W2;
#pragma omp parallel for collapse(2) schedule(static) num_threads(clamp_threads(nt))
    for (int z = 0; z < D; z++)
        for (int y = 0; y < H; y++) {
            long u = ((long)z * H + y) * W;
            const float *c = ROW(sp, z, y, H2, W2);
            float *xo = ROW(xp, z, y, H2, W2);
            if (first) {
                ZT_SPLIT(_Pragma("omp simd") for (int x = 0; x < W; x++)
                             xo[x] = smooth_update(c, x, P, W2, w, g[u + x], zt_););
            } else {
                ZT_SPLIT(_Pragma("omp simd") for (int x = 0; x < W; x++)
                             xo[x] += smooth_update(c, x, P, W2, w, g[u + x], zt_););
            }
        }
}

void deepcd_mg_step(int D, int H, int W, const float *sp, const float *w, const float *g,
                    float *xp, int first, int zt, int nt)
{
    ZT_DISPATCH(mg_step, D, H, W, sp, w, g, xp, first, nt);
}

/* out = x + g ∘ (w ∗ s) as float64 on the (d, h, w) corner: the last step
 * of level 0's post-smoother writing the network's output straight into
 * the caller's float64 array (the cast fused in; xp is left as it was) */
static inline __attribute__((always_inline)) void
mg_step_out(int D, int H, int W, const float *sp, const float *w, const float *g,
            const float *xp, int d, int h, int wd, double *out, int nt, int zt)
{
    long H2 = H + 2, W2 = W + 2, P = H2 * W2;
    (void)D;
#pragma omp parallel for collapse(2) schedule(static) num_threads(clamp_threads(nt))
    for (int z = 0; z < d; z++)
        for (int y = 0; y < h; y++) {
            long u = ((long)z * H + y) * W;
            const float *c = ROW(sp, z, y, H2, W2), *xi = ROW(xp, z, y, H2, W2);
            double *o = out + ((long)z * h + y) * wd;
            ZT_SPLIT(_Pragma("omp simd") for (int x = 0; x < wd; x++) {
                float v = xi[x] + smooth_update(c, x, P, W2, w, g[u + x], zt_);
                o[x] = v;
            });
        }
}

void deepcd_mg_step_out(int D, int H, int W, const float *sp, const float *w, const float *g,
                        const float *xp, int d, int h, int wd, double *out, int zt, int nt)
{
    ZT_DISPATCH(mg_step_out, D, H, W, sp, w, g, xp, d, h, wd, out, nt);
}

/* coarse b = mask ∘ pool2(b − fluid ∘ (diag·x − neighbours)), D, H, W even */
void deepcd_mg_restrict(int D, int H, int W, const float *xp, const float *b, const float *diag,
                        const float *fluid, const float *cmask, float *cb, int nt)
{
    long H2 = H + 2, W2 = W + 2, P = H2 * W2;
    int Dc = D / 2, Hc = H / 2, Wc = W / 2;
#pragma omp parallel for collapse(2) schedule(static) num_threads(clamp_threads(nt))
    for (int Z = 0; Z < Dc; Z++)
        for (int Y = 0; Y < Hc; Y++) {
            float acc[Wc > 0 ? Wc : 1];
            for (int X = 0; X < Wc; X++) acc[X] = 0.0f;
            for (int dz = 0; dz < 2; dz++)
                for (int dy = 0; dy < 2; dy++) {
                    int z = 2 * Z + dz, y = 2 * Y + dy;
                    long u = ((long)z * H + y) * W;
                    const float *c = ROW(xp, z, y, H2, W2);
                    const float *bu = b + u, *fu = fluid + u, *du = diag + u;
                    /* both children of a coarse cell per step (stride-2 loads
                     * vectorise; an acc[x >> 1] scatter did not) */
#pragma omp simd
                    for (int X = 0; X < Wc; X++) {
                        int x = 2 * X;
                        float nb0 = c[x - P] + c[x + P] + c[x - W2] + c[x + W2] + c[x - 1] + c[x + 1];
                        float nb1 = c[x + 1 - P] + c[x + 1 + P] + c[x + 1 - W2] + c[x + 1 + W2]
                                    + c[x] + c[x + 2];
                        float a = acc[X] + (bu[x] - fu[x] * (du[x] * c[x] - nb0));
                        acc[X] = a + (bu[x + 1] - fu[x + 1] * (du[x + 1] * c[x + 1] - nb1));
                    }
                }
            long v = ((long)Z * Hc + Y) * Wc;
            for (int X = 0; X < Wc; X++) cb[v + X] = acc[X] * 0.125f * cmask[v + X];
        }
}

/* the same for aggregates of fz × fy × fx cells (a 2D grid's 1 × 2 × 2) */
static inline __attribute__((always_inline)) void
mg_restrict_s(int D, int H, int W, int fz, int fy, int fx, const float *xp, const float *b,
              const float *diag, const float *fluid, const float *cmask, float *cb, int nt, int zt)
{
    long H2 = H + 2, W2 = W + 2, P = H2 * W2;
    /* an odd (periodic) axis: its last aggregate takes three cells
     * (mgnet.fold_odd, halo.ragged_shape) */
    int Dc = D / fz, Hc = H / fy, Wc = W / fx;
    float inv = 1.0f / (float)(fz * fy * fx);
#pragma omp parallel for collapse(2) schedule(static) num_threads(clamp_threads(nt))
    for (int Z = 0; Z < Dc; Z++)
        for (int Y = 0; Y < Hc; Y++) {
            float acc[Wc > 0 ? Wc : 1];
            for (int X = 0; X < Wc; X++) acc[X] = 0.0f;
            int nz = LAST3(Z, Dc, D, fz), ny = LAST3(Y, Hc, H, fy);
            for (int dz = 0; dz < nz; dz++)
                for (int dy = 0; dy < ny; dy++) {
                    int z = fz * Z + dz, y = fy * Y + dy;
                    long u = ((long)z * H + y) * W;
                    const float *c = ROW(xp, z, y, H2, W2);
                    const float *bu = b + u, *fu = fluid + u, *du = diag + u;
                    if (fx == 2) {
                        ZT_SPLIT(_Pragma("omp simd") for (int X = 0; X < Wc; X++) {
                            int x = 2 * X;
                            float r0 = bu[x] - fu[x] * (du[x] * c[x] - nbsum(c, x, P, W2, zt_));
                            float r1 = bu[x + 1]
                                       - fu[x + 1] * (du[x + 1] * c[x + 1] - nbsum(c, x + 1, P, W2, zt_));
                            acc[X] += r0 + r1;
                        }
                        if (W & 1) {
                            int x = W - 1;
                            acc[Wc - 1] += bu[x] - fu[x] * (du[x] * c[x] - nbsum(c, x, P, W2, zt_));
                        });
                    } else {
                        ZT_SPLIT(_Pragma("omp simd") for (int x = 0; x < W; x++)
                            acc[x] += bu[x] - fu[x] * (du[x] * c[x] - nbsum(c, x, P, W2, zt_)););
                    }
                }
            long v = ((long)Z * Hc + Y) * Wc;
            for (int X = 0; X < Wc; X++) cb[v + X] = acc[X] * inv * cmask[v + X];
        }
}

void deepcd_mg_restrict_s(int D, int H, int W, int fz, int fy, int fx, const float *xp,
                          const float *b, const float *diag, const float *fluid,
                          const float *cmask, float *cb, int zt, int nt)
{
    ZT_DISPATCH(mg_restrict_s, D, H, W, fz, fy, fx, xp, b, diag, fluid, cmask, cb, nt);
}

/* (the nearest-neighbour prolongation x += (scale · e(parent)) ∘ fluid is
 * deepcd_mg_prolong_s with factors 2, 2, 2) */

/* ---- the V-cycle's passes for levels with coefficients (stencil.py) ----
 * coef: six (D, H, W) planes, z-, z+, y-, y+, x-, x+ (the order of
 * mgnet._FACES), zero on inactive rows and towards inactive cells; tnorm:
 * the per-row scale of the smoothing taps' face weights (smooth_update_c). */
/* face f's coupling of cell u + x: a plane per face (cs = 1), or one value
 * per face for the whole level (cs = 0: mgnet's axis-uniform levels, six
 * floats; the same arithmetic, so the same result, as their planes) */
#define KC(k, f, N, u, x, cs) ((cs) ? (k)[(f) * (N) + (u) + (x)] : (k)[f])
static inline __attribute__((always_inline)) float
coupled(const float *c, long u, int x, long N, long P, long W2, const float *k, int zt, int cs)
{
    if (!zt)      /* a 2D grid: no z neighbours, the z planes are never read */
        return KC(k, 2, N, u, x, cs) * c[x - W2] + KC(k, 3, N, u, x, cs) * c[x + W2]
               + KC(k, 4, N, u, x, cs) * c[x - 1] + KC(k, 5, N, u, x, cs) * c[x + 1];
    return KC(k, 0, N, u, x, cs) * c[x - P] + KC(k, 1, N, u, x, cs) * c[x + P]
           + KC(k, 2, N, u, x, cs) * c[x - W2] + KC(k, 3, N, u, x, cs) * c[x + W2]
           + KC(k, 4, N, u, x, cs) * c[x - 1] + KC(k, 5, N, u, x, cs) * c[x + 1];
}
/* ZT_SPLIT for cs too (a variable again inside parallel regions) */
#define ZC_SPLIT(...) do { if (cs) { const int cs_ = 1; ZT_SPLIT(__VA_ARGS__); } \
                           else { const int cs_ = 0; ZT_SPLIT(__VA_ARGS__); } } while (0)
/* the exported coefficient passes: cs and zt as compile-time constants */
#define ZC_DISPATCH(body, ...) do { if (cs) ZT_DISPATCH(body, __VA_ARGS__, 1); \
                                    else ZT_DISPATCH(body, __VA_ARGS__, 0); } while (0)


static inline __attribute__((always_inline)) void
mgc_resid(int D, int H, int W, const float *xp, const float *b, const float *dinv,
          const float *coef, float *sp, int nt, int cs, int zt)
{
    long H2 = H + 2, W2 = W + 2, P = H2 * W2, N = (long)D * H * W;
#pragma omp parallel for collapse(2) schedule(static) num_threads(clamp_threads(nt))
    for (int z = 0; z < D; z++)
        for (int y = 0; y < H; y++) {
            long u = ((long)z * H + y) * W;
            const float *c = ROW(xp, z, y, H2, W2);
            float *so = ROW(sp, z, y, H2, W2);
            ZC_SPLIT(_Pragma("omp simd") for (int x = 0; x < W; x++)
                so[x] = (coupled(c, u, x, N, P, W2, coef, zt_, cs_) + b[u + x]) * dinv[u + x] - c[x];);
        }
}

void deepcd_mgc_resid(int D, int H, int W, const float *xp, const float *b, const float *dinv,
                      const float *coef, float *sp, int cs, int zt, int nt)
{
    ZC_DISPATCH(mgc_resid, D, H, W, xp, b, dinv, coef, sp, nt);
}

/* r = fluid·(b − A x) unscaled (x in the padded xp, ghosts filled): the
 * K-cycle's residual after its first step (mgnet._kcycle_fused); through
 * D⁻¹ and back it lost digits where the diagonal is large (jumps) */
static inline __attribute__((always_inline)) void
mgc_bax(int D, int H, int W, const float *xp, const float *b, const float *diag,
        const float *fluid, const float *coef, float *r, int nt, int cs, int zt)
{
    long H2 = H + 2, W2 = W + 2, P = H2 * W2, N = (long)D * H * W;
#pragma omp parallel for collapse(2) schedule(static) num_threads(clamp_threads(nt))
    for (int z = 0; z < D; z++)
        for (int y = 0; y < H; y++) {
            long u = ((long)z * H + y) * W;
            const float *c = ROW(xp, z, y, H2, W2);
            ZC_SPLIT(_Pragma("omp simd") for (int x = 0; x < W; x++)
                r[u + x] = fluid[u + x] * (b[u + x] - (diag[u + x] * c[x]
                                                       - coupled(c, u, x, N, P, W2, coef, zt_, cs_))););
        }
}

void deepcd_mgc_bax(int D, int H, int W, const float *xp, const float *b, const float *diag,
                    const float *fluid, const float *coef, float *r, int cs, int zt, int nt)
{
    ZC_DISPATCH(mgc_bax, D, H, W, xp, b, diag, fluid, coef, r, nt);
}

/* the taps' per-face weight min(c_f · tnorm, 1), tnorm = 1/√(c_max·c_mean)
 * of the row (mgnet.prepare): computed here, not stored (24 bytes per cell
 * and level less) */
/* a ternary, not fminf: fminf's NaN rules kept the loop scalar (10x slower) */
static inline float tw1(float v) { return v < 1.0f ? v : 1.0f; }
#define TW(f) tw1(KC(k, f, N, u, x, cs) * t)
static inline __attribute__((always_inline)) float
smooth_update_c(const float *c, long u, int x, long N, long P, long W2, const float *w,
                const float *k, const float *tn, float g, int zt, int cs)
{
    float t = tn[u + x];
    if (!zt)
        return (c[x] * w[0] + w[3] * TW(2) * c[x - W2] + w[4] * TW(3) * c[x + W2]
                + w[5] * TW(4) * c[x - 1] + w[6] * TW(5) * c[x + 1]) * g;
    return (c[x] * w[0] + w[1] * TW(0) * c[x - P] + w[2] * TW(1) * c[x + P]
            + w[3] * TW(2) * c[x - W2] + w[4] * TW(3) * c[x + W2]
            + w[5] * TW(4) * c[x - 1] + w[6] * TW(5) * c[x + 1]) * g;
}
#undef TW

static inline __attribute__((always_inline)) void
mgc_step(int D, int H, int W, const float *sp, const float *w, const float *coef,
         const float *tnorm, const float *g, float *xp, int first, int nt, int cs, int zt)
{
    long H2 = H + 2, W2 = W + 2, P = H2 * W2, N = (long)D * H * W;
#pragma omp parallel for collapse(2) schedule(static) num_threads(clamp_threads(nt))
    for (int z = 0; z < D; z++)
        for (int y = 0; y < H; y++) {
            long u = ((long)z * H + y) * W;
            const float *c = ROW(sp, z, y, H2, W2);
            float *xo = ROW(xp, z, y, H2, W2);
            if (first) {
                ZC_SPLIT(_Pragma("omp simd") for (int x = 0; x < W; x++)
                    xo[x] = smooth_update_c(c, u, x, N, P, W2, w, coef, tnorm, g[u + x], zt_, cs_););
            } else {
                ZC_SPLIT(_Pragma("omp simd") for (int x = 0; x < W; x++)
                    xo[x] += smooth_update_c(c, u, x, N, P, W2, w, coef, tnorm, g[u + x], zt_, cs_););
            }
        }
}

void deepcd_mgc_step(int D, int H, int W, const float *sp, const float *w, const float *coef,
                     const float *tnorm, const float *g, float *xp, int first, int cs, int zt, int nt)
{
    ZC_DISPATCH(mgc_step, D, H, W, sp, w, coef, tnorm, g, xp, first, nt);
}

/* (the 2x2x2 restriction of coefficient levels is deepcd_mgc_restrict_s
 * with factors 2, 2, 2) */

/* ---- semi-coarsened levels: factors fz, fy, fx ∈ {1, 2} per axis ----
 * The same restriction (average of the children's residuals) and
 * prolongation as above for aggregates of fz × fy × fx cells (anisotropic
 * operators coarsen only their strongly coupled axes, mgnet.coarsening_plan). */
/* a row's residual b − (diag·x − Σ coupling·x): six values couple inactive
 * rows to their neighbours too, so there it is masked (planes hold zeros) */
static inline __attribute__((always_inline)) float
row_resid(const float *b, const float *diag, const float *fl, const float *c, long u, int x, long N,
          long P, long W2, const float *coef, int zt, int cs)
{
    float r = b[u + x] - (diag[u + x] * c[x] - coupled(c, u, x, N, P, W2, coef, zt, cs));
    return cs ? r : fl[u + x] * r;
}

static inline __attribute__((always_inline)) void
mgc_restrict_s(int D, int H, int W, int fz, int fy, int fx, const float *xp, const float *b,
               const float *diag, const float *coef, const float *fl, const float *cmask, float *cb,
               int nt, int cs, int zt)
{
    long H2 = H + 2, W2 = W + 2, P = H2 * W2, N = (long)D * H * W;
    /* odd (periodic) axes as in mg_restrict_s */
    int Dc = D / fz, Hc = H / fy, Wc = W / fx;
    float inv = 1.0f / (float)(fz * fy * fx);
#pragma omp parallel for collapse(2) schedule(static) num_threads(clamp_threads(nt))
    for (int Z = 0; Z < Dc; Z++)
        for (int Y = 0; Y < Hc; Y++) {
            float acc[Wc > 0 ? Wc : 1];
            for (int X = 0; X < Wc; X++) acc[X] = 0.0f;
            int nz = LAST3(Z, Dc, D, fz), ny = LAST3(Y, Hc, H, fy);
            for (int dz = 0; dz < nz; dz++)
                for (int dy = 0; dy < ny; dy++) {
                    int z = fz * Z + dz, y = fy * Y + dy;
                    long u = ((long)z * H + y) * W;
                    const float *c = ROW(xp, z, y, H2, W2);
                    if (fx == 2) {      /* both children per step (stride-2 loads vectorise) */
                        ZC_SPLIT(_Pragma("omp simd") for (int X = 0; X < Wc; X++) {
                            int x = 2 * X;
                            float r0 = row_resid(b, diag, fl, c, u, x, N, P, W2, coef, zt_, cs_);
                            float r1 = row_resid(b, diag, fl, c, u, x + 1, N, P, W2, coef, zt_, cs_);
                            acc[X] += r0 + r1;
                        }
                        if (W & 1)
                            acc[Wc - 1] += row_resid(b, diag, fl, c, u, W - 1, N, P, W2, coef, zt_, cs_););
                    } else {
                        ZC_SPLIT(_Pragma("omp simd") for (int x = 0; x < W; x++)
                            acc[x] += row_resid(b, diag, fl, c, u, x, N, P, W2, coef, zt_, cs_););
                    }
                }
            long v = ((long)Z * Hc + Y) * Wc;
            for (int X = 0; X < Wc; X++) cb[v + X] = acc[X] * inv * cmask[v + X];
        }
}

void deepcd_mgc_restrict_s(int D, int H, int W, int fz, int fy, int fx, const float *xp,
                           const float *b, const float *diag, const float *coef, const float *fl,
                           const float *cmask, float *cb, int cs, int zt, int nt)
{
    ZC_DISPATCH(mgc_restrict_s, D, H, W, fz, fy, fx, xp, b, diag, coef, fl, cmask, cb, nt);
}

void deepcd_mg_prolong_s(int D, int H, int W, int fz, int fy, int fx, const float *e, float scale,
                         const float *fluid, float *xp, int nt)
{
    long H2 = H + 2, W2 = W + 2;
    /* an odd axis' last cell belongs to the last aggregate (restriction) */
    int Dc = D / fz, Hc = H / fy, Wc = W / fx;
#pragma omp parallel for collapse(2) schedule(static) num_threads(clamp_threads(nt))
    for (int z = 0; z < D; z++)
        for (int y = 0; y < H; y++) {
            long u = ((long)z * H + y) * W;
            int Z = z / fz < Dc ? z / fz : Dc - 1, Y = y / fy < Hc ? y / fy : Hc - 1;
            const float *ec = e + ((long)Z * Hc + Y) * Wc, *fu = fluid + u;
            float *xo = ROW(xp, z, y, H2, W2);
            if (fx == 2) {
#pragma omp simd
                for (int X = 0; X < Wc; X++) {
                    float v = scale * ec[X];
                    xo[2 * X] += v * fu[2 * X];
                    xo[2 * X + 1] += v * fu[2 * X + 1];
                }
                if (W & 1) xo[W - 1] += scale * ec[Wc - 1] * fu[W - 1];
            } else {
#pragma omp simd
                for (int x = 0; x < W; x++)
                    xo[x] += scale * ec[x] * fu[x];
            }
        }
}

/* ---- set-up: a coefficient level's operator from the stencil (mgnet.prepare) ----
 * sd = diag·fluid and sc_f = coef_f·fluid·fluid(nb_f) (a coupling to an
 * inactive cell is Dirichlet: x is 0 there), a 2D grid's z faces (zt = 0)
 * zero; st (7, D, H, W), fp the fluid mask with one ghost layer. out: the
 * largest coupling, the smallest nonzero one (+inf: none) and whether one
 * is NaN, for mgnet._uniform_couplings. One pass where torch made ~20. */
void deepcd_couplings(int D, int H, int W, const double *st, const float *fp, double *sd,
                      double *sc, double *out, int zt, int nt)
{
    long H2 = H + 2, W2 = W + 2, P = H2 * W2, N = (long)D * H * W;
    long off[6] = {-P, P, -W2, W2, -1, 1};
    double hi = zt ? -INFINITY : 0.0, lo = INFINITY;    /* (2D: the zero z faces count) */
    int nan = 0;
#pragma omp parallel for collapse(2) schedule(static) num_threads(clamp_threads(nt)) \
    reduction(max:hi) reduction(min:lo) reduction(|:nan)
    for (int z = 0; z < D; z++)
        for (int y = 0; y < H; y++) {
            long u = ((long)z * H + y) * W;
            const float *f = ROW(fp, z, y, H2, W2);
            for (int x = 0; x < W; x++) sd[u + x] = st[u + x] * f[x];
            for (int q = 0; q < 6; q++) {
                double *o = sc + q * N + u;
                if (!zt && q < 2) {
                    for (int x = 0; x < W; x++) o[x] = 0.0;
                    continue;
                }
                const double *c = st + (q + 1) * N + u;
                const float *g = f + off[q];
#pragma omp simd reduction(max:hi) reduction(min:lo) reduction(|:nan)
                for (int x = 0; x < W; x++) {
                    double v = c[x] * g[x] * f[x];
                    o[x] = v;
                    hi = v > hi ? v : hi;
                    lo = v != 0.0 && v < lo ? v : lo;
                    nan |= v != v;
                }
            }
        }
    out[0] = hi;
    out[1] = lo;
    out[2] = nan;
}

/* [Σz, Σy, Σx, n] of mgnet.axis_strengths: each row's per-axis coupling
 * max(c₋ + c₊, 0) over their sum, summed over the n rows with couplings;
 * st (7, n). (Rows without couplings add 0/1, as there.) */
struct strengths { const double *c; long n; };

static void strengths_block(long i0, long i1, const void *ctx, double *acc)
{
    const struct strengths *s = ctx;
    const double *c = s->c;
    long n = s->n;
    double fz = 0.0, fy = 0.0, fx = 0.0, cnt = 0.0;
#pragma omp simd reduction(+:fz, fy, fx, cnt)
    for (long i = i0; i < i1; i++) {
        double az = c[i] + c[n + i], ay = c[2 * n + i] + c[3 * n + i],
               ax = c[4 * n + i] + c[5 * n + i];
        az = az < 0.0 ? 0.0 : az;
        ay = ay < 0.0 ? 0.0 : ay;
        ax = ax < 0.0 ? 0.0 : ax;
        double tot = az + ay + ax, d = tot > 0.0 ? tot : 1.0;
        fz += az / d;
        fy += ay / d;
        fx += ax / d;
        cnt += tot > 0.0 ? 1.0 : 0.0;
    }
    acc[0] += fz;
    acc[1] += fy;
    acc[2] += fx;
    acc[3] += cnt;
}

void deepcd_axis_strengths(long n, const double *st, double *out, int nt)
{
    struct strengths s = {st + n, n};
    reduce_blocks(n, nt, 4, strengths_block, &s, out);
}

/* ---- set-up: the gates of a 2D level (mgnet.level_gates) ----
 * Per cell, for the O hidden channels of all of a level's smoothers at once:
 *   h_o = gelu(b1_o + Σ_c Σ_(3×3) w1 · geometry_c),  gate_j = 2σ(b2_j + Σ_o w2_jo h_o) · fluid
 * in one pass over the cells (torch wrote and re-read the O hidden planes:
 * gelu alone took ~40 ms at 1024²). gelu's erf is torch's own CPU formula
 * (Abramowitz–Stegun 7.1.26) and exp Cephes' expf, written so that the loops
 * vectorise (libm's expf does not without -ffast-math): the gates equal
 * torch's to float32 rounding. gp: C planes (H+2, W+2) with one ghost layer;
 * w2 (S, O) (block-diagonal over the smoothers); out (S, H, W). */
/* (no-trapping-math: lets GCC turn the clamps into blends where the CPU has
 * no masked vectors (AVX2); it changes no result. fp-contract=fast: FMAs,
 * ~35% of this kernel's time, safe here although the library is built
 * without them: every cell goes through the same whole-tile vector code,
 * never a scalar remainder, so its arithmetic does not depend on its place) */
#define NO_TRAPS __attribute__((optimize("no-trapping-math", "fp-contract=fast")))
NO_TRAPS static inline float exp_v(float x)
{
    x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
    /* n = rint(x·log2 e) by adding and removing 1.5·2²³ (floorf does not vectorise) */
    float n = (1.44269504088896341f * x + 12582912.0f) - 12582912.0f;
    float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    int e = ((int)n + 127) << 23;
    float two_n;
    memcpy(&two_n, &e, sizeof two_n);
    return p * two_n;
}

NO_TRAPS static inline float gelu_v(float x)
{
    float a = fabsf(x) * 0.70710678118654752f;     /* erf's argument x/√2, unsigned */
    float t = 1.0f / (0.3275911f * a + 1.0f);
    float r = (((1.061405429f * t - 1.453152027f) * t + 1.421413741f) * t - 0.284496736f) * t
              + 0.254829592f;
    float erf_a = 1.0f - r * t * exp_v(-a * a);
    return 0.5f * x * (1.0f + copysignf(erf_a, x));
}

/* a tile: GATE_TILE cells of a row; the convolution keeps GATE_VL cells ×
 * GATE_OB channels in registers (GCC vector extensions: ~2x the speed of
 * the per-channel loops). Every pass runs over whole tiles (the rows are
 * copied zero-padded), so a cell's arithmetic never depends on where the
 * block or the tile ends: serial and distributed gates agree bit for bit. */
#define GATE_TILE 64
#ifdef __AVX512F__      /* 16 accumulators + the input fit the 32 vector registers */
#define GATE_VL 16
#define GATE_OB 16
#else                   /* AVX2 and less: 8 + 1 of 16 (the sums are the same, in the same order) */
#define GATE_VL 8
#define GATE_OB 8
#endif
typedef float gate_v __attribute__((vector_size(GATE_VL * sizeof(float))));

NO_TRAPS void deepcd_gates2d(int H, int W, int C, int O, int S, const float *gp, const float *w1,
                    const float *b1, const float *w2, const float *b2, const float *fluid,
                    float *out, int nt)
{
    long W2 = W + 2, P = (long)(H + 2) * W2, N = (long)H * W;
    int Ob = (O + GATE_OB - 1) / GATE_OB * GATE_OB, R = GATE_TILE + 2;
    float wp[Ob * C * 9], bp[Ob];            /* zero channels up to a whole block */
    for (int o = 0; o < Ob; o++) {
        bp[o] = o < O ? b1[o] : 0.0f;
        for (int i = 0; i < C * 9; i++) wp[o * C * 9 + i] = o < O ? w1[o * C * 9 + i] : 0.0f;
    }
#pragma omp parallel for collapse(2) schedule(static) num_threads(clamp_threads(nt))
    for (int y = 0; y < H; y++)
        for (int x0 = 0; x0 < W; x0 += GATE_TILE) {
            int n = W - x0 < GATE_TILE ? W - x0 : GATE_TILE;
            float in[C * 3][R], h[Ob][GATE_TILE], z[GATE_TILE];
            for (int c = 0; c < C; c++)
                for (int dy = 0; dy < 3; dy++) {
                    float *r = in[c * 3 + dy];
                    memcpy(r, gp + c * P + (y + dy) * W2 + x0, (n + 2) * sizeof(float));
                    for (int x = n + 2; x < R; x++) r[x] = 0.0f;
                }
            for (int o0 = 0; o0 < Ob; o0 += GATE_OB)
                for (int xv = 0; xv < GATE_TILE; xv += GATE_VL) {
                    gate_v acc[GATE_OB], v;
                    for (int k = 0; k < GATE_OB; k++) acc[k] = (gate_v){0} + bp[o0 + k];
                    for (int c = 0; c < C; c++)
                        for (int t = 0; t < 9; t++) {
                            memcpy(&v, &in[c * 3 + t / 3][xv + t % 3], sizeof v);
                            for (int k = 0; k < GATE_OB; k++)
                                acc[k] += wp[((o0 + k) * C + c) * 9 + t] * v;
                        }
                    for (int k = 0; k < GATE_OB; k++) memcpy(&h[o0 + k][xv], &acc[k], sizeof v);
                }
            for (int o = 0; o < O; o++) {
#pragma omp simd
                for (int x = 0; x < GATE_TILE; x++) h[o][x] = gelu_v(h[o][x]);
            }
            long u = (long)y * W + x0;
            for (int j = 0; j < S; j++) {
                for (int x = 0; x < GATE_TILE; x++) z[x] = b2[j];
                for (int o = 0; o < O; o++) {
                    float w = w2[j * O + o];
                    if (w == 0.0f) continue;      /* another smoother's channel */
#pragma omp simd
                    for (int x = 0; x < GATE_TILE; x++) z[x] += w * h[o][x];
                }
#pragma omp simd
                for (int x = 0; x < GATE_TILE; x++) z[x] = 2.0f / (1.0f + exp_v(-z[x]));
                for (int x = 0; x < n; x++) out[j * N + u + x] = z[x] * fluid[u + x];
            }
        }
}

/* ---- set-up: Galerkin coarsening of a coefficient level (float64) ----
 * mgnet.galerkin_coarsen in one pass (torch made ~30 strided passes): for
 * aggregates of fz × fy × fx cells (each 1 or 2) the coarse diagonal sums
 * the children's diag·active minus the couplings between children, a
 * coarse face coupling sums the children's couplings across that face,
 * both divided by g (a power of 2: exact); `scale` gets the children's
 * Σ|diag·active| (prepare's test for dead coarse rows). coef and ccoef:
 * six planes in mgnet._FACES order (z−, z+, y−, y+, x−, x+). */
void deepcd_galerkin(int D, int H, int W, int fz, int fy, int fx, const double *diag,
                     const double *coef, const float *active, double g, double *cdiag,
                     double *ccoef, double *scale, int nt)
{
    int Dc = D / fz, Hc = H / fy, Wc = W / fx, f[3] = {fz, fy, fx};
    long N = (long)D * H * W, Nc = (long)Dc * Hc * Wc;
#pragma omp parallel for collapse(2) schedule(static) num_threads(clamp_threads(nt))
    for (int Z = 0; Z < Dc; Z++)
        for (int Y = 0; Y < Hc; Y++) {
            long v = ((long)Z * Hc + Y) * Wc;
            double *d = cdiag + v, *s = scale + v;
            for (int X = 0; X < Wc; X++) d[X] = s[X] = 0.0;
            for (int q = 0; q < 6; q++)
                for (int X = 0; X < Wc; X++) ccoef[q * Nc + v + X] = 0.0;
            for (int dz = 0; dz < fz; dz++)
                for (int dy = 0; dy < fy; dy++)
                    for (int dx = 0; dx < fx; dx++) {
                        long u = ((long)(fz * Z + dz) * H + fy * Y + dy) * W + dx;
                        int pos[3] = {dz, dy, dx};
#pragma omp simd
                        for (int X = 0; X < Wc; X++) {
                            double a = diag[u + (long)fx * X] * (double)active[u + (long)fx * X];
                            d[X] += a;
                            s[X] += fabs(a);
                        }
                        for (int q = 0; q < 6; q++) {
                            /* a child on the face's side of its aggregate couples out of it */
                            int axis = q / 2, outer = pos[axis] == ((q & 1) ? f[axis] - 1 : 0);
                            const double *c = coef + q * N + u;
                            double *o = outer ? ccoef + q * Nc + v : d, sign = outer ? 1.0 : -1.0;
#pragma omp simd
                            for (int X = 0; X < Wc; X++) o[X] += sign * c[(long)fx * X];
                        }
                    }
            for (int X = 0; X < Wc; X++) d[X] /= g;
            for (int q = 0; q < 6; q++)
                for (int X = 0; X < Wc; X++) ccoef[q * Nc + v + X] /= g;
        }
}

/* ---- reading an assembled operator's rows (stencil.py, context.py) ----
 *
 * One pass over this rank's AIJ rows in CSR form: ai (n + 1 row starts), aj
 * (global columns), av (float64 values); indices int32 or int64 (`wide`),
 * as PETSc was built. Row r is cell (k, j, i) of the zm×ym×xm block,
 * r = i + xm (j + ym k), global row lo + r. Explicit zeros are skipped (DMDA
 * matrices store the 27-point box pattern, mostly zeros). Per row:
 *   nnz[r]      its nonzeros;
 *   rowabs[r]   Σ|v| over them, in entry order (as np.bincount adds);
 *   st[0 n + r] the diagonal (column lo + r), 0 when absent;
 *   st[(1 + f) n + r] = −v for the entry whose column is the row plus face
 *               f's in-block offset (−xm·ym, +xm·ym, −xm, +xm, −1, +1 in
 *               stencil.FACES order) when that neighbour lies inside the
 *               block; −0.0 without one. stencil.from_aij's offset test: when
 *               offsets coincide (a block one cell thick) the last face
 *               matching decides, and if its neighbour is outside the block
 *               the entry is left over;
 *   rest        the left-over entries (block faces: other ranks, periodic
 *               wrap; and anything beyond the 7 points) as rows in
 *               rest[0, cap) and CSR positions in rest[cap, 2 cap), in
 *               entry order, for the caller's exact-neighbour test;
 *   coupled[c]  1 when a fluid row of the block (one with an off-diagonal
 *               nonzero) has a classified coupling to cell c (the caller
 *               adds the left-over entries' columns).
 * Returns the number of left-over entries (written only when ≤ cap: call
 * again with more room), −1 when out of memory. Each thread reads a
 * contiguous range of rows; results do not depend on the thread count. */
typedef struct { long *rp; long n, size; int fail; } restbuf_t;

static void rest_push(restbuf_t *b, long r, long p)
{
    if (b->fail) return;
    if (b->n == b->size) {
        long size = b->size ? 2 * b->size : 256;
        long *q = realloc(b->rp, 2 * size * sizeof(long));
        if (!q) { b->fail = 1; return; }
        b->rp = q;
        b->size = size;
    }
    b->rp[2 * b->n] = r;
    b->rp[2 * b->n + 1] = p;
    b->n++;
}

static inline __attribute__((always_inline)) long csr_index(const void *a, long p, int wide)
{
    return wide ? (long)((const long long *)a)[p] : (long)((const int *)a)[p];
}

static inline __attribute__((always_inline)) void
csr_row(long r, int k, int j, int i, int zm, int ym, int xm, long lo, const void *ai,
        const void *aj, const double *av, long n, double *st, double *rowabs, int *nnz,
        restbuf_t *rb, int wide)
{
    const long P = (long)xm * ym, g = lo + r;
    double s[7] = {0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0}, a = 0.0;
    int cnt = 0;
    long p1 = csr_index(ai, r + 1, wide);
    for (long p = csr_index(ai, r, wide); p < p1; p++) {
        double v = av[p];
        if (v == 0.0) continue;                 /* NaN is kept, as av != 0 keeps it */
        cnt++;
        a += fabs(v);
        long d = csr_index(aj, p, wide) - g;
        int f;
        if (d == 0) f = 6;
        else if (d == 1) f = i < xm - 1 ? 5 : -1;
        else if (d == -1) f = i > 0 ? 4 : -1;
        else if (d == xm) f = j < ym - 1 ? 3 : -1;
        else if (d == -xm) f = j > 0 ? 2 : -1;
        else if (d == P) f = k < zm - 1 ? 1 : -1;
        else if (d == -P) f = k > 0 ? 0 : -1;
        else f = -1;
        if (f >= 0) s[f] += v;
        else rest_push(rb, r, p);
    }
    st[r] = s[6];
    for (int f = 0; f < 6; f++) st[(1 + f) * n + r] = -s[f];
    rowabs[r] = a;
    nnz[r] = cnt;
}

static inline int csr_fluid(const double *st, const int *nnz, long r)
{
    return nnz[r] - (st[r] != 0.0) > 0;
}

long deepcd_csr_read(int zm, int ym, int xm, long lo, const void *ai, const void *aj, int wide,
                     const double *av, double *st, double *rowabs, int *nnz,
                     unsigned char *coupled, long *rest, long cap, int nt)
{
    const long P = (long)xm * ym, n = P * zm;
    nt = clamp_threads(nt);
    restbuf_t *bufs = calloc(nt, sizeof(restbuf_t));
    if (!bufs) return -1;
    int used = 1;
#pragma omp parallel num_threads(nt)
    {
        int t = omp_get_thread_num(), m = omp_get_num_threads();
        if (t == 0) used = m;
        long r0 = n * t / m, r1 = n * (t + 1) / m;
        int i = (int)(r0 % xm), j = (int)((r0 / xm) % ym), k = (int)(r0 / P);
        restbuf_t *rb = bufs + t;
        for (long r = r0; r < r1; r++) {
            if (wide) csr_row(r, k, j, i, zm, ym, xm, lo, ai, aj, av, n, st, rowabs, nnz, rb, 1);
            else csr_row(r, k, j, i, zm, ym, xm, lo, ai, aj, av, n, st, rowabs, nnz, rb, 0);
            if (++i == xm) { i = 0; if (++j == ym) { j = 0; k++; } }
        }
#pragma omp barrier
        /* cells that in-block fluid rows couple to: row c − off_f reaches c
         * through face f when c has that neighbour inside the block */
        const double *c0 = st + n, *c1 = st + 2 * n, *c2 = st + 3 * n, *c3 = st + 4 * n,
                     *c4 = st + 5 * n, *c5 = st + 6 * n;
        i = (int)(r0 % xm), j = (int)((r0 / xm) % ym), k = (int)(r0 / P);
        for (long c = r0; c < r1; c++) {
            unsigned char mk =
                (i > 0 && c5[c - 1] != 0.0 && csr_fluid(st, nnz, c - 1)) ||
                (i < xm - 1 && c4[c + 1] != 0.0 && csr_fluid(st, nnz, c + 1)) ||
                (j > 0 && c3[c - xm] != 0.0 && csr_fluid(st, nnz, c - xm)) ||
                (j < ym - 1 && c2[c + xm] != 0.0 && csr_fluid(st, nnz, c + xm)) ||
                (k > 0 && c1[c - P] != 0.0 && csr_fluid(st, nnz, c - P)) ||
                (k < zm - 1 && c0[c + P] != 0.0 && csr_fluid(st, nnz, c + P));
            coupled[c] = mk;
            if (++i == xm) { i = 0; if (++j == ym) { j = 0; k++; } }
        }
    }
    long total = 0;
    int fail = 0;
    for (int t = 0; t < used; t++) { total += bufs[t].n; fail |= bufs[t].fail; }
    if (!fail && total <= cap) {
        long o = 0;
        for (int t = 0; t < used; t++) {
            for (long q = 0; q < bufs[t].n; q++, o++) {
                rest[o] = bufs[t].rp[2 * q];
                rest[cap + o] = bufs[t].rp[2 * q + 1];
            }
        }
    }
    for (int t = 0; t < nt; t++) free(bufs[t].rp);
    free(bufs);
    return fail ? -1 : total;
}

/* out = [Σ e·cb, Σ e·(A e)] over a coefficient level (e in the padded xp,
 * its ghost layer filled; e is 0 on inactive cells): the coarse
 * correction's energy-optimal step (mgnet._energy_step) in one pass */
static inline __attribute__((always_inline)) void
mgc_energy(int D, int H, int W, const float *xp, const float *cb, const float *diag,
           const float *coef, double *out, int nt, int cs, int zt)
{
    long H2 = H + 2, W2 = W + 2, P = H2 * W2, N = (long)D * H * W;
    double num = 0.0, den = 0.0;
#pragma omp parallel for collapse(2) schedule(static) reduction(+:num, den) \
    num_threads(clamp_threads(nt))
    for (int z = 0; z < D; z++)
        for (int y = 0; y < H; y++) {
            long u = ((long)z * H + y) * W;
            const float *c = ROW(xp, z, y, H2, W2);
            float n1 = 0.0f, d1 = 0.0f;
            ZC_SPLIT(_Pragma("omp simd reduction(+:n1, d1)") for (int x = 0; x < W; x++) {
                float e = c[x];
                n1 += e * cb[u + x];
                d1 += e * (diag[u + x] * e - coupled(c, u, x, N, P, W2, coef, zt_, cs_));
            });
            num += n1;
            den += d1;
        }
    out[0] = num;
    out[1] = den;
}

void deepcd_mgc_energy(int D, int H, int W, const float *xp, const float *cb, const float *diag,
                       const float *coef, double *out, int cs, int zt, int nt)
{
    ZC_DISPATCH(mgc_energy, D, H, W, xp, cb, diag, coef, out, nt);
}

/* Island deflation (islands.py): w = (AZ)^T d from its cross entries (a
 * face from cell p to vector m: w[m] -= c d_p, w[label p] += c d_p) and
 * own entries (w[label p] += v d_p); rows ascending, one thread (w is small). */
void deepcd_defl_gather(long n, const int *rows, const int *cols, const double *vals,
                        const int *label, long n2, const int *rows2, const double *vals2,
                        const double *d, double *w)
{
    for (long i = 0; i < n; i++) {
        int p = rows[i], l = label[p];
        double t = vals[i] * d[p];
        w[cols[i]] -= t;
        if (l >= 0) w[l] += t;
    }
    for (long i = 0; i < n2; i++) w[label[rows2[i]]] += vals2[i] * d[rows2[i]];
}

/* d += s Z y: d[i] += s y[label[i]] where label[i] >= 0. */
void deepcd_defl_scatter(long n, const int *label, const double *y, double s, double *d)
{
    for (long i = 0; i < n; i++)
        if (label[i] >= 0) d[i] += s * y[label[i]];
}
