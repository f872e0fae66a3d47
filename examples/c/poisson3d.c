/*
 * poisson3d: a plain C PETSc program -- a 3D cell-centred Poisson problem on
 * a DMDA, solved with whatever KSP/PC the options name. It knows nothing of
 * deepcd_petsc; PETSc loads the DCDM solver through petsc4py when run with
 * -python:
 *
 *   ./poisson3d -n 64 -python -ksp_type python -ksp_python_type deepcd_petsc.DCDM
 *   ./poisson3d -n 64 -python -ksp_type fcg -pc_type python \
 *               -pc_python_type deepcd_petsc.NetworkPC
 *   mpiexec -n 2 ./poisson3d -n 64 -python -ksp_type python \
 *               -ksp_python_type deepcd_petsc.DCDM
 *
 * Operator: 7-point stencil, walls are Neumann except the top face (z = nz),
 * which is Dirichlet p = 0 (an open top, as in a smoke simulation); an
 * optional solid sphere (-sphere) makes an obstacle. Right-hand side: a
 * smooth source made compatible with the boundary conditions.
 */
#include <petscdmda.h>
#include <petscksp.h>

typedef struct {
  PetscInt  n[3];
  PetscBool sphere;
} AppCtx;

static PetscBool Solid(const AppCtx *app, PetscInt i, PetscInt j, PetscInt k)
{
  PetscReal x, y, z, r;
  if (!app->sphere) return PETSC_FALSE;
  if (i < 0 || j < 0 || k < 0 || i >= app->n[0] || j >= app->n[1] || k >= app->n[2]) return PETSC_FALSE;
  x = (i + 0.5) / app->n[0] - 0.5;
  y = (j + 0.5) / app->n[1] - 0.5;
  z = (k + 0.5) / app->n[2] - 0.4;
  r = 0.2;
  return (PetscBool)(x * x + y * y + z * z <= r * r);
}

static PetscErrorCode Assemble(DM da, Mat A, Vec b, const AppCtx *app)
{
  PetscInt      xs, ys, zs, xm, ym, zm, i, j, k, d, nc;
  PetscScalar ***barr, v[7];
  MatStencil    row, col[7];
  const PetscInt di[6] = {-1, 1, 0, 0, 0, 0}, dj[6] = {0, 0, -1, 1, 0, 0}, dk[6] = {0, 0, 0, 0, -1, 1};

  PetscFunctionBeginUser;
  PetscCall(DMDAGetCorners(da, &xs, &ys, &zs, &xm, &ym, &zm));
  PetscCall(DMDAVecGetArray(da, b, &barr));
  for (k = zs; k < zs + zm; k++)
    for (j = ys; j < ys + ym; j++)
      for (i = xs; i < xs + xm; i++) {
        row.i = i; row.j = j; row.k = k;
        if (Solid(app, i, j, k)) { /* decoupled row */
          v[0] = 1.0;
          PetscCall(MatSetValuesStencil(A, 1, &row, 1, &row, v, INSERT_VALUES));
          barr[k][j][i] = 0.0;
          continue;
        }
        nc = 1; v[0] = 0.0; col[0] = row;
        for (d = 0; d < 6; d++) {
          PetscInt ii = i + di[d], jj = j + dj[d], kk = k + dk[d];
          if (kk >= app->n[2]) { v[0] += 1.0; continue; }                 /* open top: Dirichlet */
          if (ii < 0 || jj < 0 || kk < 0 || ii >= app->n[0] || jj >= app->n[1]) continue; /* wall */
          if (Solid(app, ii, jj, kk)) continue;                          /* obstacle: Neumann */
          v[0] += 1.0;
          col[nc].i = ii; col[nc].j = jj; col[nc].k = kk; v[nc] = -1.0; nc++;
        }
        PetscCall(MatSetValuesStencil(A, 1, &row, nc, col, v, INSERT_VALUES));
        {
          PetscReal x = (i + 0.5) / app->n[0], y = (j + 0.5) / app->n[1], z = (k + 0.5) / app->n[2];
          barr[k][j][i] = PetscSinReal(2 * PETSC_PI * x) * PetscCosReal(3 * PETSC_PI * y) * (1.0 - z) + 0.3 * PetscSinReal(5 * PETSC_PI * z);
        }
      }
  PetscCall(DMDAVecRestoreArray(da, b, &barr));
  PetscCall(MatAssemblyBegin(A, MAT_FINAL_ASSEMBLY));
  PetscCall(MatAssemblyEnd(A, MAT_FINAL_ASSEMBLY));
  PetscCall(MatSetOption(A, MAT_SYMMETRIC, PETSC_TRUE));
  PetscCall(MatSetOption(A, MAT_SPD, PETSC_TRUE));
  PetscFunctionReturn(0);
}

int main(int argc, char **argv)
{
  DM                 da;
  Mat                A;
  Vec                x, b, r;
  KSP                ksp;
  AppCtx             app;
  PetscInt           n = 32, its, nmax = 3;
  PetscReal          rnorm, bnorm;
  PetscLogDouble     t0, t1, t2;
  KSPConvergedReason reason;

  PetscCall(PetscInitialize(&argc, &argv, NULL, "3D cell-centred Poisson on a DMDA"));
  PetscCall(PetscOptionsGetInt(NULL, NULL, "-n", &n, NULL));
  app.n[0] = app.n[1] = app.n[2] = n;
  PetscCall(PetscOptionsGetIntArray(NULL, NULL, "-grid", app.n, &nmax, NULL));
  app.sphere = PETSC_FALSE;
  PetscCall(PetscOptionsGetBool(NULL, NULL, "-sphere", &app.sphere, NULL));

  PetscCall(DMDACreate3d(PETSC_COMM_WORLD, DM_BOUNDARY_NONE, DM_BOUNDARY_NONE, DM_BOUNDARY_NONE, DMDA_STENCIL_BOX,
                         app.n[0], app.n[1], app.n[2], PETSC_DECIDE, PETSC_DECIDE, PETSC_DECIDE, 1, 1, NULL, NULL, NULL, &da));
  PetscCall(DMSetFromOptions(da));
  PetscCall(DMSetUp(da));
  PetscCall(DMCreateMatrix(da, &A));
  PetscCall(DMCreateGlobalVector(da, &b));
  PetscCall(VecDuplicate(b, &x));
  PetscCall(VecDuplicate(b, &r));
  PetscCall(Assemble(da, A, b, &app));

  PetscCall(KSPCreate(PETSC_COMM_WORLD, &ksp));
  PetscCall(KSPSetOperators(ksp, A, A));
  PetscCall(KSPSetDM(ksp, da));              /* the grid, for DCDM's network */
  /* operators and rhs are ours; PETSc 3.25 added which uses to turn off */
#if PETSC_VERSION_GE(3, 25, 0)
  PetscCall(KSPSetDMActive(ksp, KSP_DMACTIVE_ALL, PETSC_FALSE));
#else
  PetscCall(KSPSetDMActive(ksp, PETSC_FALSE));
#endif
  PetscCall(KSPSetType(ksp, KSPCG));
  PetscCall(KSPSetNormType(ksp, KSP_NORM_UNPRECONDITIONED));
  PetscCall(KSPSetFromOptions(ksp));
  PetscCall(PetscTime(&t0));
  PetscCall(KSPSetUp(ksp));
  PetscCall(PetscTime(&t1));
  PetscCall(KSPSolve(ksp, b, x));
  PetscCall(PetscTime(&t2));

  PetscCall(KSPGetIterationNumber(ksp, &its));
  PetscCall(KSPGetConvergedReason(ksp, &reason));
  PetscCall(MatMult(A, x, r));
  PetscCall(VecAYPX(r, -1.0, b));
  PetscCall(VecNorm(r, NORM_2, &rnorm));
  PetscCall(VecNorm(b, NORM_2, &bnorm));
  PetscCall(PetscPrintf(PETSC_COMM_WORLD, "poisson3d %" PetscInt_FMT "x%" PetscInt_FMT "x%" PetscInt_FMT ": iterations %" PetscInt_FMT ", reason %s, true residual %.3e, setup %.3f s, solve %.3f s\n",
                        app.n[0], app.n[1], app.n[2], its, KSPConvergedReasons[reason], (double)(rnorm / bnorm), t1 - t0, t2 - t1));

  PetscCall(KSPDestroy(&ksp));
  PetscCall(VecDestroy(&r));
  PetscCall(VecDestroy(&x));
  PetscCall(VecDestroy(&b));
  PetscCall(MatDestroy(&A));
  PetscCall(DMDestroy(&da));
  PetscCall(PetscFinalize());
  return reason > 0 ? 0 : 1;
}
