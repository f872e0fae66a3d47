/* Fused float64 vector kernels for DCDM's Krylov work (see kernels.py).
 *
 * Each kernel makes one pass over its vectors where torch needs one pass
 * per operation; reductions return this rank's partial sums (the caller
 * adds them over the ranks). Threads: OpenMP with an explicit count, bound
 * at load time to the OpenMP runtime torch already loaded. Partial sums
 * are per thread and added in thread order, so a result depends only on
 * the thread count, never on timing.
 */
#include <omp.h>

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

/* out[j] = a·B[j], j < k, in one pass over a. */
int deepcd_dots(long n, const double *a, int k, const double *const *B, double *out, int nt)
{
    if (k > MAXK) return -1;
    nt = clamp_threads(nt);
    partial_t part[nt];
    int used = 1;
#pragma omp parallel num_threads(nt)
    {
        int t = omp_get_thread_num();
#pragma omp single
        used = omp_get_num_threads();
        double s[MAXK] = {0};
#pragma omp for schedule(static)
        for (long i0 = 0; i0 < n; i0 += BLOCK) {
            long i1 = i0 + BLOCK < n ? i0 + BLOCK : n;
            for (int j = 0; j < k; j++) {
                const double *b = B[j];
                double acc = 0.0;
#pragma omp simd reduction(+:acc)
                for (long i = i0; i < i1; i++) acc += a[i] * b[i];
                s[j] += acc;
            }
        }
        for (int j = 0; j < k; j++) part[t].v[j] = s[j];
    }
    add_partials(part, used, k, out);
    return 0;
}

/* d -= sum_j c[j] P[j]; q -= sum_j c[j] Q[j]; then out = (d·r, d·q), all
 * in one pass (A-orthogonalising a direction and its image under A). */
int deepcd_orth_update(long n, int k, const double *c, const double *const *P,
                       const double *const *Q, double *d, double *q, const double *r,
                       double *out, int nt)
{
    if (k > MAXK) return -1;
    nt = clamp_threads(nt);
    partial_t part[nt];
    int used = 1;
#pragma omp parallel num_threads(nt)
    {
        int t = omp_get_thread_num();
#pragma omp single
        used = omp_get_num_threads();
        double dr = 0.0, dq = 0.0;
#pragma omp for schedule(static)
        for (long i0 = 0; i0 < n; i0 += BLOCK) {
            long i1 = i0 + BLOCK < n ? i0 + BLOCK : n;
            for (int j = 0; j < k; j++) {
                const double *p = P[j], *pq = Q[j];
                double cj = c[j];
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
            dr += a1;
            dq += a2;
        }
        part[t].v[0] = dr;
        part[t].v[1] = dq;
    }
    add_partials(part, used, 2, out);
    return 0;
}

/* x += alpha d; r -= alpha q; out[0] = r·r (the new residual's square). */
int deepcd_step(long n, double alpha, double *x, const double *d, double *r,
                const double *q, double *out, int nt)
{
    nt = clamp_threads(nt);
    partial_t part[nt];
    int used = 1;
#pragma omp parallel num_threads(nt)
    {
        int t = omp_get_thread_num();
#pragma omp single
        used = omp_get_num_threads();
        double rr = 0.0;
#pragma omp for schedule(static)
        for (long i0 = 0; i0 < n; i0 += BLOCK) {
            long i1 = i0 + BLOCK < n ? i0 + BLOCK : n;
            double acc = 0.0;
#pragma omp simd reduction(+:acc)
            for (long i = i0; i < i1; i++) {
                x[i] += alpha * d[i];
                double ri = r[i] - alpha * q[i];
                r[i] = ri;
                acc += ri * ri;
            }
            rr += acc;
        }
        part[t].v[0] = rr;
    }
    add_partials(part, used, 1, out);
    return 0;
}
