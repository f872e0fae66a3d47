"""What the DCDM KSP and the NetworkPC share: options, model loading, the
grid and cell flags, and the network evaluator. Geometry comes from (in
order) deepcd_petsc.set_flags() or set_stencil() (the whole grid, or each
rank's own block), or is derived from the operator's rows; the grid from
the DMDA attached to the KSP/PC, or -<prefix>_dcdm_grid."""
import hashlib
import time

import numpy as np
from petsc4py import PETSc

from .errors import SetupError, raise_on_all
from .layout import FlatView, flat_dmda  # noqa: F401 (flat_dmda re-exported)
from .scenes import AIR, FLUID, SOLID

DEVICES = ("cpu", "cuda")
DTYPE_NAMES = ("float32", "float64", "bfloat16")


class NetworkContext:
    kind = "ksp"   # options are -<prefix><kind>_dcdm_*

    def __init__(self):
        from .petsc_compat import finalize_before_teardown
        finalize_before_teardown()
        self.model_path = None     # -model; None: the shipped model for the grid's dimension
        self.device = "cpu"
        self.dtype = "float32"
        self.threads = None
        self.levels = None         # cap on the V-cycle network's levels
        self.kcycle_levels = None  # -kcycle N; None: by the grid's dimension (kcycle())
        self.grid = None
        self.grid_dim = 3          # the DMDA's dimension, once set up
        self.net = None
        self.ckpt = None
        self.loaded = None         # _model_key() of the loaded network
        self.evaluator = None
        self.setup_s = {}
        self.rows_dinv = None      # D⁻¹ on kept Dirichlet rows (else None)
        self.work = None
        self.flags = None          # user geometry: (flags, open_faces)
        self.user_stencil = None   # set_stencil's (7, ...) coefficients
        self.geometry_source = None
        self.grid_source = None
        self.op_state = None       # (Mat handle, state) the evaluator was built for
        self.torch_device = None
        self.derived = None        # digests of (flags, dirichlet, decoupled rows, stencil) read off that operator
        self.stencil = None        # (7, zm, ym, xm) diag + couplings for the network, until it is built
        self.periodic = None       # (z, y, x) periodic axes of that stencil
        self.operator_path = None  # what the network's levels apply (-ksp_view)

    # -- options ------------------------------------------------------------
    def option_prefix(self, obj):
        return (obj.getOptionsPrefix() or "") + f"{self.kind}_dcdm_"

    def read_options(self, obj):
        pre = self.option_prefix(obj)
        opts = PETSc.Options(pre)
        def text(name, default):  # petsc4py treats a None default as "required"
            return opts.getString(name) if opts.hasName(name) else default
        self.model_path = text("model", self.model_path)
        dev = text("device", self.device)
        if dev.split(":")[0] not in DEVICES:
            raise SetupError(f"-{pre}device {dev!r}: use cpu or cuda[:N]")
        dt = text("dtype", self.dtype)
        if dt not in DTYPE_NAMES:
            raise SetupError(f"-{pre}dtype {dt!r}: use one of {', '.join(DTYPE_NAMES)}")
        th = opts.getInt("threads", self.threads or 0)
        if th < 0:
            raise SetupError(f"-{pre}threads must be >= 0, got {th}")
        lv = opts.getInt("levels", self.levels or 0)
        if lv < 0:
            raise SetupError(f"-{pre}levels must be >= 1 (0: the model's own rule), got {lv}")
        if (lv or None) != self.levels:
            self.reset_network()
        self.levels = lv or None
        if opts.hasName("kcycle"):
            kc = opts.getInt("kcycle")
            if kc < 0:
                raise SetupError(f"-{pre}kcycle must be >= 0 (levels with a K-cycle; 0: V-cycle), got {kc}")
            if kc != self.kcycle_levels:
                self.reset_network()
            self.kcycle_levels = kc
        grid = text("grid", None)
        if grid is not None:
            try:
                g = tuple(int(v) for v in grid.split(","))
                assert len(g) in (2, 3) and min(g) >= 1
            except (ValueError, AssertionError):
                raise SetupError(f"-{pre}grid {grid!r}: expected nx,ny,nz (or nx,ny for 2D)") from None
            self.grid = g + (1,) * (3 - len(g))
        if (dev, dt) != (self.device, self.dtype):
            self.reset_network()
        self.device, self.dtype, self.threads = dev, dt, th or None
        return opts

    # -- set-up ---------------------------------------------------------------
    def reset_network(self):
        if self.evaluator is not None:
            self.evaluator.destroy()
        self.evaluator = None
        self._free_rows()
        self.setup_s = {}

    def _free_rows(self):
        for v in (self.rows_dinv, self.work):
            if v is not None:
                v.destroy()
        self.rows_dinv = self.work = None

    def setup_network(self, obj, A):
        """Load the model and build the evaluator for A's geometry; again
        when A changed since (a new operator, or the same Mat assembled
        anew: time stepping with moving obstacles) and the geometry is
        derived from it, but only when that geometry differs. PETSc does
        not call a Python KSP's setUp again for a new operator of the same
        size, so solve() calls this too."""
        from .evaluator import NetworkEvaluator
        from .model import DTYPES
        state = (A.handle, A.stateGet())
        rebuild = self.evaluator is not None
        if rebuild and (state == self.op_state or self.flags is not None
                        or self.user_stencil is not None):
            return          # unchanged; set_flags/set_stencil geometry does not follow A's values
        t0 = time.perf_counter()
        before = self.derived
        da, own = self._grid(obj, A)
        try:
            dim = 2 if da.getSizes()[2] == 1 else 3
            self.grid_dim = dim
            tg = time.perf_counter()
            if not rebuild and self._model_key(dim) != self.loaded:
                # set_flags or a new operator keeps the loaded model: a time
                # stepping code calling set_flags every step reloaded it each time
                self._load_model(obj, A, dim)
            t1 = time.perf_counter()
            self._free_rows()
            flags, dirichlet = self._geometry(da, A)
            self.operator_ready(da)
            t2 = time.perf_counter()
            if rebuild:
                if self._same_geometry(before, A):
                    self.op_state = state   # re-assembled, same obstacles: keep the network
                    self.stencil = None
                    return
                self.evaluator.destroy()
                self.evaluator = None
            self.evaluator = NetworkEvaluator(self.net, da, flags, dirichlet,
                                              DTYPES[self.dtype], self.torch_device,
                                              stencil_local=self.stencil,
                                              periodic=self.periodic, kcycle=self.kcycle())
            self.stencil = None    # the network holds its own float32 copy
        finally:
            if own:
                da.destroy()
        self.setup_s = {"model": t1 - tg, "geometry": (tg - t0) + (t2 - t1),
                        "evaluator": time.perf_counter() - t2}
        self.op_state = state

    def operator_ready(self, da):
        """Called once A's stencil (self.stencil, None on the flags path) is
        read, before the network takes it: DCDM's island deflation."""

    def kcycle(self):
        """Levels, from the finest, whose coarse correction is a K-cycle
        (mgnet._kcycle): -kcycle, else mgnet.default_kcycle (1 on 2D
        grids, 0 on 3D ones)."""
        from .mgnet import default_kcycle
        return self.kcycle_levels if self.kcycle_levels is not None else default_kcycle(self.grid_dim)

    def _model_key(self, dim=3):
        """What the loaded network depends on: another value reloads it.
        Without -model, the shipped model for the grid's dimension."""
        from .model import default_model_path
        return (self.model_path or default_model_path(dim), self.dtype, self.device, self.levels,
                self.threads)

    def _load_model(self, obj, A, dim=3):
        import torch
        from .memory import tune_malloc
        from .model import ModelFileError, load_model
        if self.threads:
            torch.set_num_threads(self.threads)
        self.torch_device = self._device(A.getComm())
        if self.torch_device == "cpu":
            tune_malloc()
        key = self._model_key(dim)
        path = key[0]
        try:
            self.net, self.ckpt = load_model(path, self.dtype, self.torch_device)
        except ModelFileError as e:
            raise SetupError(f"-{self.option_prefix(obj)}model: {e}") from None
        if self.levels:
            if not hasattr(self.net, "level_cap"):
                raise SetupError(f"-{self.option_prefix(obj)}levels: the model {path!r} "
                                 f"has a fixed depth (U-Net); the option is for V-cycle models")
            self.net.level_cap = self.levels
        self.loaded = key

    @property
    def loaded_path(self):
        """The loaded model's file (-model, or the shipped one it defaulted to)."""
        return self.loaded[0] if self.loaded else None

    def apply_network(self, x, y, scale, views=None):
        """y = f(scale·x) on the fluid cells, and (scaled) D⁻¹x on the
        decoupled rows of systems that keep Dirichlet rows (PETSc's
        tutorials): the network leaves non-fluid cells at zero, so without
        this no direction could ever fix their residual. `views`: torch
        views of x's and y's local arrays, if the caller has them.
        Returns the scale actually used: the network is positively
        homogeneous, so scaling only protects float32's range and is
        skipped (1.0) when the input is comfortably inside it."""
        if self.evaluator.unscaled_ok(scale):
            scale = 1.0
        self.evaluator.apply(x, y, scale, views)
        y.stateIncrease()   # torch wrote y's memory: PETSc must not reuse cached norms
        if self.rows_dinv is not None:
            self.work.pointwiseMult(self.rows_dinv, x)
            y.axpy(scale, self.work)
        return scale

    def _dirichlet_rows(self, A, rows, scale):
        """s·D⁻¹ restricted to `rows` (a local bool mask), or None when no
        rank has such a row. The network approximates c·A_unit⁻¹ for the
        unit stencil; A = s·A_unit on the fluid rows, so s·D⁻¹ puts the two
        parts of a direction on the same footing."""
        from mpi4py import MPI
        comm = A.getComm().tompi4py()
        if not comm.allreduce(bool(rows.any()), op=MPI.LOR):
            return
        total, count = comm.allreduce(np.array(scale, dtype=float))
        s = total / count if count > 0 else 1.0
        self.rows_dinv = A.createVecRight()
        A.getDiagonal(self.rows_dinv)
        with self.rows_dinv as d:     # restored with a new state (no cached norms)
            keep = rows.ravel() & (d != 0)
            d[keep] = s / d[keep]
            d[~keep] = 0.0
        self.work = self.rows_dinv.duplicate()

    def _device(self, comm):
        import torch
        if not self.device.startswith("cuda"):
            return "cpu"
        if not torch.cuda.is_available():
            raise SetupError(f"device {self.device!r} asked for, but torch sees no CUDA device")
        if ":" in self.device:
            return self.device
        # one GPU per rank, chosen from the node-local rank
        local = comm.tompi4py().Split_type(__import__("mpi4py").MPI.COMM_TYPE_SHARED).Get_rank()
        return f"cuda:{local % torch.cuda.device_count()}"

    def _grid(self, obj, A):
        """(3D DMDA with dof 1 matching A's rows, whether we created it). A
        2D DMDA becomes the 3D DMDA of sizes (nx, ny, 1) with the same
        processor grid and ownership ranges (flat_dmda): its global
        numbering is the 2D one, so A's rows, the halo exchange and the
        network need no 2D variant."""
        dm = obj.getDM()
        if dm is not None and dm.getType() == PETSc.DM.Type.DA:
            dim = dm.getDimension()
            if dim not in (2, 3) or dm.getDof() != 1:
                raise SetupError(f"DCDM needs a 2D or 3D DMDA with dof 1; the attached DMDA is "
                                 f"{dim}D with dof {dm.getDof()}")
            own = dim == 2
            da = FlatView(dm) if own else dm
            try:
                self._check_rows(da, A, "the attached DMDA")
            except SetupError:
                if own:
                    da.destroy()
                raise
            self.grid_source = f"{dim}D DMDA attached to the solver"
            return da, own
        if self.grid is None:
            raise SetupError("DCDM needs the grid: attach a 2D or 3D DMDA (KSPSetDM/PCSetDM, with "
                             f"KSPSetDMActive false) or give -{self.option_prefix(obj)}grid "
                             "nx,ny,nz (or nx,ny for 2D)")
        da = PETSc.DMDA().create(dim=3, sizes=self.grid, dof=1, stencil_width=1,
                                 stencil_type=PETSc.DMDA.StencilType.BOX, comm=A.getComm())
        try:
            self._check_rows(da, A, f"-{self.option_prefix(obj)}grid {','.join(map(str, self.grid))}")
        except SetupError:
            da.destroy()
            raise
        self.grid_source = "-grid option"
        return da, True

    @staticmethod
    def _check_rows(da, A, what):
        (xs, xe), (ys, ye), (zs, ze) = da.getRanges()
        nloc = (xe - xs) * (ye - ys) * (ze - zs)
        nglob = int(np.prod(da.getSizes()))
        rows, cols = A.getSizes()
        if rows[1] != nglob:
            raise SetupError(f"grid mismatch: {what} has {nglob} cells "
                               f"({'x'.join(map(str, da.getSizes()))}), the operator has {rows[1]} rows")
        if rows[0] != nloc:
            raise SetupError(f"grid mismatch: {what} gives this rank {nloc} cells, "
                               f"the operator {rows[0]} rows (decompose A like the DMDA)")

    def _geometry(self, da, A):
        """(flags, dirichlet) of this rank's block in the DMDA layout."""
        (xs, xe), (ys, ye), (zs, ze) = da.getRanges()
        local = (ze - zs, ye - ys, xe - xs)
        if self.flags is not None:
            flags, faces = self.flags
            block, self.geometry_source = _user_block(da, flags, "set_flags", ())
            block = block.astype(np.int8)
            from .model import dirichlet_from_ghosted
            ghosted = _ghosted(da, block, faces)
            if da.getSizes()[2] == 1:
                self._flat_stencil(block, ghosted)
            return block, dirichlet_from_ghosted(ghosted)
        if self.user_stencil is not None:
            return self._given_stencil(da, local)
        self.geometry_source = "derived from the operator"
        from .stencil import read_aij
        aij = read_aij(da, A, local)     # the rows read once, in C (None: NumPy reads them)
        flags, dirichlet, rows, scale = geometry_from_operator(da, A, local, with_rows=True,
                                                               aij=aij)
        flags = self._operator_stencil(da, A, local, flags, dirichlet, aij)
        del aij
        if self.stencil is not None:
            scale = (1.0, 1)   # the network applies A's own scale
        self._dirichlet_rows(A, rows, scale)
        if self.rows_dinv is not None:
            self.geometry_source += ", with Dirichlet rows (solved by their diagonal)"
        # the stencil by digest (a float64 copy would cost 56 bytes per
        # cell), scale-free: the network does not change with A's scale
        digest = ""
        if self.stencil is not None:
            digest = _scaled_digest(self.stencil)
        # flags, Dirichlet fractions and rows by digest too: kept whole they
        # held 10 bytes per cell for the KSP's lifetime (256³: 168 MB)
        self.derived = tuple(np.array(v) for v in (_digest(flags), _digest(dirichlet),
                                                   _digest(rows), digest))
        return flags, dirichlet

    def _flat_stencil(self, block, ghosted):
        """A 2D grid's network applies the stencil of its flags (the unit
        5-point operator, open faces in the diagonal) with Galerkin coarse
        levels: the flags path's max-pooled coarse flags took up to 18
        iterations where these take 10 (512² spheres, smoke); its fine
        level keeps the compact passes (MGNet.prepare, unit couplings)."""
        from . import stencil
        from .mgnet import MGNet
        if not isinstance(self.net, MGNet):
            raise SetupError("this model (a U-Net) is 3D only; 2D grids need a V-cycle model")
        st = stencil.from_flags(block, ghosted)
        self.stencil, self.periodic = st.packed(), st.periodic
        self.operator_path = "unit 5-point operator of the cell flags (2D), Galerkin coarse levels"

    def _operator_stencil(self, da, A, local, flags, dirichlet, aij_rows=None):
        """Read A's 7-point stencil (AIJ rows, or probing a matrix-free A)
        and keep it for the network (self.stencil) unless A is a multiple
        of the operator the flags path builds, on every rank: that path
        (fused kernels) applies it exactly. Returns the flags to use (a
        probed operator's active rows). An error on one rank is raised on
        all (the others would wait in the next collective). `aij_rows`: A's
        rows as stencil.read_aij read them (else read here)."""
        from . import stencil
        from .mgnet import MGNet
        comm = A.getComm().tompi4py()
        self.stencil = self.periodic = None
        flat = da.getSizes()[2] == 1
        if not isinstance(self.net, MGNet):
            if flat:
                raise SetupError("this model (a U-Net) is 3D only; 2D grids need a V-cycle model")
            self.operator_path = "unit 7-point operator of the cell flags (this model reads flags only)"
            return flags
        aij = A.getType().endswith("aij")
        st, err = None, None
        try:
            if not aij:
                st = stencil.probe(da, A, local)
            elif aij_rows is not None:
                st = aij_rows.stencil()
            else:
                st = stencil.from_aij(da, A, local)
        except SetupError as e:
            err = str(e)
        raise_on_all(comm, err)
        points = "5-point" if flat else "7-point"
        if aij and not flat:     # (2D: always the coefficients, see _flat_stencil)
            s = st.unit_scale(flags, dirichlet, _ghosted(da, flags))
            scales = comm.allgather(s)
            known = [v for v in scales if v is not None and v == v]
            if all(v is not None for v in scales) and (
                    not known or max(known) - min(known) <= 1e-8 * max(abs(v) for v in known)):
                self.operator_path = "unit 7-point operator of the cell flags (scaled)"
                return flags
        if aij:
            self.operator_path = f"the operator's {points} coefficients (AIJ), Galerkin coarse levels"
        else:
            flags = np.where(st.active(), FLUID, SOLID).astype(np.int8)
            self.operator_path = (f"the operator's {points} coefficients (probed, "
                                  f"{st.matmults} MatMults), Galerkin coarse levels")
        self.stencil = st.packed()
        self.periodic = st.periodic
        return flags

    def _given_stencil(self, da, local):
        """(flags, dirichlet) of set_stencil's coefficients: fluid = rows
        coupled to a neighbour (as a probed operator's), the network
        applying the coefficients themselves (MGNet; a flags-only model
        gets the flags)."""
        from .mgnet import MGNet
        from .stencil import Stencil, periodic_axes
        st, self.geometry_source = _user_block(da, self.user_stencil, "set_stencil", (7,))
        st = Stencil.from_packed(st, periodic_axes(da))
        flags = np.where(st.active(), FLUID, SOLID).astype(np.int8)
        self.stencil = self.periodic = None
        if isinstance(self.net, MGNet):
            self.stencil, self.periodic = st.packed(), st.periodic
            self.operator_path = "the coefficients given to set_stencil, Galerkin coarse levels"
        else:
            self.operator_path = "unit 7-point operator of the cell flags (this model reads flags only)"
        return flags, np.zeros(local)

    def _same_geometry(self, before, A):
        """Whether the geometry just derived equals `before` on every rank."""
        from mpi4py import MPI
        same = all(np.array_equal(a, b) for a, b in zip(before, self.derived))
        return A.getComm().tompi4py().allreduce(same, op=MPI.LAND)

    # -- view -------------------------------------------------------------------
    def view_network(self, viewer):
        p = viewer.printfASCII
        if self.net is None:
            p(f"  model: {self.model_path or '(shipped default)'} (not loaded yet)\n")
            p(f"  device {self.device}, dtype {self.dtype}\n")
            return
        p(f"  model: {self.loaded_path}{'' if self.model_path else ' (shipped default)'}\n")
        shape = self.evaluator.shape if self.evaluator is not None else None
        geo = getattr(self.evaluator, "geo", None)
        plan = geo.get("plan") if isinstance(geo, dict) else None
        levels = (len(plan) + 1 if plan is not None
                  else self.net.levels_for(shape) if shape else None)
        desc = self.net.describe(shape, levels) if plan is not None else self.net.describe(shape)
        p(f"    {desc}; {self.net.n_params()} parameters, "
          f"receptive field {self.net.receptive_field(levels)} cells\n")
        meta = self.ckpt.get("meta", {})
        if meta:
            p(f"    trained: scenes {meta.get('scenes')}, sizes {meta.get('n')}, "
              f"{meta.get('steps')} steps, source {meta.get('revision')}\n")
        import torch
        p(f"  device {self.device}, dtype {self.dtype}, torch threads {torch.get_num_threads()}\n")
        p(f"  grid: {self.grid_source}; geometry: {self.geometry_source}\n")
        if self.operator_path:
            p(f"  network levels apply: {self.operator_path}\n")
        if isinstance(geo, dict) and geo.get("rough") is not None:
            from .mgnet import ROUGH
            p(f"  rough coefficients: {100 * geo['rough']:.0f}% of the cells have opposite couplings "
              f"differing > {ROUGH:g}x; the learned gates are at most 1 there (no over-relaxation)\n")
        if plan is not None:
            from .mgnet import describe_plan
            p(f"  network coarsening (axes halved per level): {describe_plan(plan)}\n")
        if isinstance(geo, dict) and any("coef" in lv for lv in geo.get("levels", ())):
            how = "-kcycle" if self.kcycle_levels is not None else f"default for {self.grid_dim}D grids"
            if geo.get("kcycle_auto"):
                from .ksp import KCYCLE_SLOW
                how = (f"switched on at iteration {geo['kcycle_auto']} of a solve: ‖r‖/‖r₀‖ was above "
                       f"{KCYCLE_SLOW:g}, on coefficients that vary cell by cell without deflated islands")
            k = geo.get("kcycle", 0)
            p("  coarse corrections: " + (f"K-cycle on the finest {k} level(s) (two coarse cycles, "
              "energy-minimising combination), V-cycle below" if k else "V-cycle") + f" ({how})\n")
        if isinstance(geo, dict) and "levels" in geo:     # (a V-cycle network's)
            six = [str(l) for l, lv in enumerate(geo["levels"])
                   if "coef" in lv and lv["coef"].shape[-3:] == (1, 1, 1) and lv["fluid"].numel() > 1]
            if six:
                p(f"  network levels with one coupling per face direction (no planes): {', '.join(six)}\n")
        if self.setup_s:
            p("  set-up: " + ", ".join(f"{k} {v:.3f} s" for k, v in self.setup_s.items()) + "\n")
        ev = self.evaluator
        if ev is not None:
            if ev.dec is not None:
                d = ev.dec
                grid = "x".join(map(str, d.padded))
                grid = f"{grid} grid (not padded)" if d.padded == d.shape else f"{grid} padded grid"
                p(f"  distributed evaluation: {d.procs[0]}x{d.procs[1]}x{d.procs[2]} aligned blocks "
                  f"of the {grid} on {d.active_ranks} rank(s)\n")
            if getattr(ev, "geo", None) is not None and hasattr(self.net, "kernels_name"):
                p(f"  network inference: {self.net.kernels_name(ev.geo)}\n")
            if ev.calls:
                p(f"  network: {ev.calls} applications, {ev.forward_s / ev.calls * 1e3:.2f} ms each"
                  + (f", halo exchange {ev.halo.seconds / ev.calls * 1e3:.2f} ms each"
                     if ev.halo is not None else "") + "\n")


def _digest(a):
    """blake2b of an array's dtype, shape and bytes (equality of geometries)."""
    a = np.ascontiguousarray(a)
    h = hashlib.blake2b(f"{a.dtype}{a.shape}".encode(), digest_size=32)
    h.update(memoryview(a).cast("B"))
    return h.hexdigest()


def _scaled_digest(st, chunk=1 << 18):
    """sha256 of st / (its largest |coupling|, else 1) rounded to float32,
    st (7, ...) packed: the network keeps the coefficients in float32, so
    a change below that precision does not change it; half the bytes to
    hash (1024²: 84 ms of set-up). Fed in chunks through one small buffer
    (the same digest as hashing the whole quotient, without a second copy
    of the stencil)."""
    c = st[1:]       # the largest |coupling| (NaN if any), else 1
    ref = float(np.maximum(c.max(initial=0.0), -c.min(initial=0.0))) or 1.0
    flat = np.ascontiguousarray(st).reshape(-1)
    buf = np.empty(min(chunk, flat.size), np.float32)
    h = hashlib.sha256()
    for i in range(0, flat.size, chunk):
        part = flat[i:i + chunk]
        out = buf[:part.size]
        np.divide(part, ref, out=out, casting="same_kind")
        h.update(out)
    return h.hexdigest()


def _ghosted(da, flags, open_faces=()):
    """This rank's flags with one ghost layer from the neighbours (SOLID
    beyond the grid, AIR beyond `open_faces`)."""
    from .stencil import ghost_layer
    p = np.rint(ghost_layer(da, flags, SOLID)).astype(np.int8)
    return _open(da, p, open_faces)


def _open(da, p, open_faces):
    """AIR in the ghost layer of p beyond the open faces this block touches."""
    (xs, ys, zs), (xm, ym, zm) = da.getCorners()
    nx, ny, nz = da.getSizes()
    for face in open_faces:
        axis = {"x": 2, "y": 1, "z": 0}[face[0]]
        lo, n = (zs, ys, xs)[axis], (nz, ny, nx)[axis]
        hi = lo + (zm, ym, xm)[axis]
        if (face[1] == "+" and hi == n) or (face[1] == "-" and lo == 0):
            idx = [slice(None)] * 3
            idx[axis] = -1 if face[1] == "+" else 0
            p[tuple(idx)] = AIR
    return p


def _user_block(da, arr, what, lead):
    """This rank's block (lead + (zm, ym, xm)) of what the application
    gave `what` (set_flags, set_stencil): the whole grid, the same on every
    rank; this rank's block of the DMDA's ownership range; or the local
    part of a global Vec (flat, x fastest). Returns (block, the form's
    name). A shape that fits neither is reported on every rank (the
    others would wait in the next collective)."""
    (xs, xe), (ys, ye), (zs, ze) = da.getRanges()
    local = (ze - zs, ye - ys, xe - xs)
    nx, ny, nz = da.getSizes()
    block, form, err = None, None, None
    n = int(np.prod(lead + local))
    if isinstance(arr, tuple):        # ("vec", local values, global size)
        _, vals, size = arr
        if size != int(np.prod(lead + (nz, ny, nx))) or vals.size != n:
            err = (f"{what}: the Vec has {size} entries, {vals.size} on rank {da.getComm().getRank()}; "
                   f"the DMDA needs {int(np.prod(lead + (nz, ny, nx)))}, {n} there "
                   f"(create it with the DMDA's createGlobalVec)")
        else:
            # a dof-k Vec interleaves the k values of a cell
            block = np.moveaxis(vals.reshape(local + lead), -1, 0) if lead else vals.reshape(local)
            form = f"{what} (global Vec)"
    elif arr.shape == lead + (nz, ny, nx):
        block = arr[(slice(None),) * len(lead) + (slice(zs, ze), slice(ys, ye), slice(xs, xe))]
        form = f"{what} (whole grid)"
    elif arr.shape == lead + local:
        block, form = arr, f"{what} (this rank's block)"
    else:
        err = (f"{what}: an array of shape {arr.shape} on rank {da.getComm().getRank()} is neither "
               f"the grid {lead + (nz, ny, nx)} nor this rank's block {lead + local} "
               f"(z {zs}:{ze}, y {ys}:{ye}, x {xs}:{xe}, the DMDA's ownership range)")
    raise_on_all(da.getComm().tompi4py(), err)
    return np.ascontiguousarray(block), form


def geometry_from_operator(da, A, local, with_rows=False, aij=None, kernels=True):
    """Flags and Dirichlet fractions read off A's rows: a row with
    off-diagonal couplings is fluid, its diagonal excess (diag − Σ|offdiag|)
    / diag is its Dirichlet fraction; a non-fluid cell is air when a fluid
    row couples to it (a Dirichlet row kept in the system, as PETSc's
    tutorials do) or when it lies next to a fluid cell with excess (a
    Dirichlet value eliminated into the diagonal); others are solid.
    Matrix-free operators: all fluid. `with_rows`: also return the mask of
    decoupled rows to solve by their diagonal and the operator's scale.
    The rows: `aij` (stencil.read_aij's, one C pass), else read here, in C
    where the kernels are available and `kernels`, else in NumPy (the same
    results bit for bit)."""
    from . import stencil
    n = int(np.prod(local))
    if not A.getType().endswith("aij"):   # shell/matrix-free: no rows to read
        out = (np.zeros(local, np.int8), np.zeros(local))
        return out + (np.zeros(local, bool), (0.0, 0)) if with_rows else out
    if aij is None and kernels:
        aij = stencil.read_aij(da, A, local)
    if aij is not None:
        diag, rowabs, nnz = aij.diag, aij.rowabs, aij.nnz
    else:
        diag, rowabs, nnz, rows, cols = _row_sums_numpy(A, n)
    off = rowabs - np.abs(diag)
    noff = nnz - (diag != 0)
    fluid = noff > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        dirichlet = np.where(fluid & (diag > 0), np.clip((diag - off) / diag, 0.0, 1.0), 0.0)
    dirichlet[dirichlet < 1e-10] = 0.0
    # cells that fluid rows couple to (on any rank): marked through a Vec;
    # read in C, those coupled through in-block faces are marked already,
    # and only the left-over entries' columns go through the Vec
    if aij is not None:
        inblock = aij.coupled.reshape(local)
        coupled_cols = np.unique(aij.rest_cols[fluid[aij.rest_rows]]).astype(PETSc.IntType)
    else:
        inblock = False
        lo, _ = A.getOwnershipRange()
        coupled_cols = np.unique(cols[fluid[rows] & (cols != rows + lo)]).astype(PETSc.IntType)
    marks = da.createGlobalVec()
    marks.set(0.0)
    marks.setValues(coupled_cols, np.ones(len(coupled_cols)), addv=PETSc.InsertMode.ADD_VALUES)
    marks.assemble()
    coupled = (marks.getArray(readonly=True).reshape(local) > 0) | inblock
    marks.destroy()
    # air: non-fluid cells with a fluid neighbour that has a Dirichlet part
    g = da.createGlobalVec()
    with g as ga:
        ga[...] = (dirichlet > 0).astype(float)
    loc = da.createLocalVec()
    da.globalToLocal(g, loc)
    (gxs, gys, gzs), (gxm, gym, gzm) = da.getGhostCorners()
    (xs, ys, zs), _ = da.getCorners()
    p = loc.getArray(readonly=True).reshape(gzm, gym, gxm) > 0
    p = np.pad(p, 1)  # beyond the ghosts: nothing
    oz, oy, ox = zs - gzs + 1, ys - gys + 1, xs - gxs + 1
    nz_, ny_, nx_ = local
    near = np.zeros(local, bool)
    for dz, dy, dx in ((-1, 0, 0), (1, 0, 0), (0, -1, 0), (0, 1, 0), (0, 0, -1), (0, 0, 1)):
        near |= p[oz + dz:oz + dz + nz_, oy + dy:oy + dy + ny_, ox + dx:ox + dx + nx_]
    g.destroy()
    loc.destroy()
    flags = np.full(local, SOLID, np.int8)
    flags[near | coupled] = AIR
    flags[fluid.reshape(local)] = FLUID
    if with_rows:
        # the operator's scale against the unit stencil the network learned
        # (mean |off-diagonal| of fluid rows; 1 for our scenes, h for
        # PETSc's tutorials): local (sum, count)
        scale = (float(off[fluid].sum()), int(noff[fluid].sum()))
        # rows to solve by their diagonal: every decoupled row, but only
        # when the system keeps Dirichlet rows (some fluid row couples to a
        # decoupled one); otherwise decoupled rows never carry a residual
        kept = bool((coupled & ~fluid.reshape(local)).any())
        return flags, dirichlet.reshape(local), ~fluid.reshape(local) & kept, scale
    return flags, dirichlet.reshape(local)


def _row_sums_numpy(A, n):
    """(diagonal, Σ|v|, nonzeros) per local row, and the rows and columns
    of the nonzeros: geometry_from_operator's rows read in NumPy."""
    ai, aj, av = A.getValuesCSR()
    # DMDA matrices store the whole 27-point box pattern, mostly zeros (~56M
    # entries at 128³): drop the zeros first; int32 rows, bincount sums
    keep = av != 0
    rows = np.repeat(np.arange(n, dtype=np.int32), np.diff(ai))[keep]
    cols = aj[keep]
    vals = av[keep]
    rowabs = np.bincount(rows, weights=np.abs(vals), minlength=n)
    nnz = np.bincount(rows, minlength=n)
    dvec = A.createVecLeft()
    A.getDiagonal(dvec)
    diag = dvec.getArray(readonly=True).real.copy()
    dvec.destroy()
    return diag, rowabs, nnz, rows, cols


def _targets(obj):
    """The DCDM/NetworkPC contexts of a KSP (and its PC) or a PC."""
    targets = []
    if isinstance(obj, PETSc.KSP):
        if obj.getType() == PETSc.KSP.Type.PYTHON:
            targets.append(obj.getPythonContext())
        pc = obj.getPC()
        if pc.getType() == PETSc.PC.Type.PYTHON:
            targets.append(pc.getPythonContext())
    elif isinstance(obj, PETSc.PC) and obj.getType() == PETSc.PC.Type.PYTHON:
        targets.append(obj.getPythonContext())
    return [t for t in targets if isinstance(t, NetworkContext)]


def _given(obj, arr, what, check):
    """The application's array or Vec, checked on every rank of obj's
    communicator (one rank's bad values fail all of them)."""
    err = None
    if isinstance(arr, PETSc.Vec):
        vals = arr.getArray(readonly=True).real.copy()
        out = ("vec", vals, arr.getSize())
    else:
        out = vals = np.asarray(arr)
    try:
        check(vals)
    except SetupError as e:
        err = str(e)
    raise_on_all(obj.getComm().tompi4py(), err)
    return out


def set_flags(obj, flags, open_faces=()):
    """Give a DCDM KSP and/or NetworkPC the cell flags of the application,
    0 fluid / 1 solid / 2 air, and its open domain faces ("x-", ..., "z+"):
    either this rank's block (zm, ym, xm) of the DMDA's ownership range
    (da.getRanges()), or a global Vec of the DMDA, so that no rank holds the
    whole grid; or, for small problems, the whole grid (nz, ny, nx), the
    same on every rank. Collective. `obj` is the KSP (its PC is set too when
    it is a NetworkPC) or a PC."""
    def check(f):
        if isinstance(flags, PETSc.Vec):
            if np.any(f != np.rint(f)):
                raise SetupError("set_flags: the Vec's flag values must be whole numbers 0, 1, 2")
        elif f.ndim not in (2, 3) or not np.issubdtype(f.dtype, np.integer):
            raise SetupError("set_flags: flags must be an integer array: this rank's block "
                             "(zm, ym, xm) or the whole grid (nz, ny, nx); (ym, xm) or "
                             "(ny, nx) on a 2D grid")
        if ((f < 0) | (f > 2)).any():
            raise SetupError("set_flags: flag values must be 0 (fluid), 1 (solid) or 2 (air)")
    given = _given(obj, flags, "set_flags", check)
    if isinstance(given, tuple):
        given = ("vec", given[1].astype(np.int8), given[2])
    else:
        given = given.astype(np.int8)
        if given.ndim == 2:
            given = given[None]       # (ny, nx): a 2D grid, the flat (1, ny, nx) view
    targets = _targets(obj)
    for t in targets:
        t.flags = (given, tuple(open_faces))
        t.user_stencil = None
        t.reset_network()
    return len(targets)


def set_stencil(obj, stencil):
    """Give a DCDM KSP and/or NetworkPC the application's 7-point operator
    per cell instead of letting it read the assembled matrix (a matrix-free
    operator then needs no probing): float (7, zm, ym, xm) for this rank's
    block of the DMDA's ownership range, the diagonal A[i, i] then the
    couplings −A[i, nb] to the z−, z+, y−, y+, x−, x+ neighbours (0 where
    there is none: walls, beyond the grid; a Dirichlet neighbour adds to
    the diagonal only); or the whole grid (7, nz, ny, nx), the same on
    every rank; or a global Vec of a dof-7 DMDA on the same grid and split.
    Periodic axes come from the DMDA. Rows without couplings are left to
    the Krylov method. On a 2D grid, (7, ym, xm) or (7, ny, nx) with zero
    z couplings. Collective."""
    def check(a):
        if not isinstance(stencil, PETSc.Vec) and (a.ndim not in (3, 4) or a.shape[0] != 7):
            raise SetupError(f"set_stencil: expected an array (7, zm, ym, xm) or (7, nz, ny, nx), "
                             f"(7, ym, xm) or (7, ny, nx) on a 2D grid; got shape {a.shape}")
        if not np.isfinite(a).all():
            raise SetupError("set_stencil: the coefficients hold NaN or Inf")
    given = _given(obj, stencil, "set_stencil", check)
    if not isinstance(given, tuple):
        given = given.astype(np.float64)
        if given.ndim == 3:
            given = given[:, None]    # 2D: the flat (7, 1, ny, nx) view
    targets = _targets(obj)
    for t in targets:
        t.user_stencil = given
        t.flags = None
        t.reset_network()
    return len(targets)
