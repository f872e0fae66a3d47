"""Lanczos with full reorthogonalisation on the operator restricted to fluid
cells; Ritz pairs from the tridiagonal eigendecomposition."""
import numpy as np
from scipy.linalg import eigh_tridiagonal


def lanczos_ritz(matvec, n, m, rng, null_tol=1e-8):
    """Ritz values (ascending) and Ritz vectors (rows, float32) of the SPD or
    positive-semidefinite operator `matvec` on R^n after m Lanczos steps.

    The start vector is A·randn, so it lies in range(A) and the Krylov space
    avoids the null space; Ritz values below `null_tol` are dropped anyway.
    Stops early at an invariant subspace.
    """
    m = min(m, n)
    Q = np.empty((m, n))
    alpha, beta = np.empty(m), np.empty(m)
    v = matvec(rng.standard_normal(n))
    v /= np.linalg.norm(v)
    k = m
    for j in range(m):
        Q[j] = v
        w = matvec(v)
        alpha[j] = w @ v
        w -= alpha[j] * v
        if j > 0:
            w -= beta[j - 1] * Q[j - 1]
        for _ in range(2):  # full reorthogonalisation, twice is enough
            w -= (Q[:j + 1] @ w) @ Q[:j + 1]
        beta[j] = np.linalg.norm(w)
        if beta[j] <= 1e-10 * max(abs(alpha[j]), 1.0):
            k = j + 1
            break
        v = w / beta[j]
    evals, evecs = eigh_tridiagonal(alpha[:k], beta[:k - 1])
    keep = evals > null_tol
    vecs = (evecs[:, keep].T @ Q[:k]).astype(np.float32)
    return evals[keep], vecs
