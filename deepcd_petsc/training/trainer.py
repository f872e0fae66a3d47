"""Training loop: scale-invariant loss, Adam, resumable checkpoints, loss
plot and model card."""
import math
import os
import platform
import subprocess
import time

import numpy as np
import torch

from ..mgnet import DEFAULT_MG_CONFIG
from ..model import atomic_save, build, read_checkpoint, save_checkpoint
from .data import make_geometry


def dcdm_loss(b, q, op):
    """Kaneda et al.'s loss: mean ‖b − (qᵀb / qᵀAq)·A q‖². The optimal step
    removes the unknown scale of f, so L(c·q) = L(q) for any c ≠ 0."""
    Aq = op(q)
    dims = tuple(range(1, b.dim()))
    qb = (q * b).sum(dims, keepdim=True)
    qAq = (q * Aq).sum(dims, keepdim=True)
    res = b - qb / (qAq + 1e-30) * Aq
    return (res * res).sum(dims).mean()


def source_revision():
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        return subprocess.run(["git", "-C", here, "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, timeout=5).stdout.strip() or "unknown"
    except Exception:
        return "unknown"


def train_seeds(seed, count):
    """Training geometry seeds: 1000·(seed+1) + i, disjoint from the small
    evaluation seeds (1, 2, 3, ...) used by `deepcd evaluate`."""
    return [1000 * (seed + 1) + i for i in range(count)]


def train(out, n=32, scenes=("spheres", "smoke", "liquid", "box"), steps=1000,
          time_budget=None, seed=0, lanczos=400, geometries=3, batch=8, lr=1e-3,
          device="cpu", cache=None, resume=False, config=None, log=print,
          checkpoint_every=60.0, progress=True, stop_at=None, init=None, n2d=(), deflate=0):
    """Train a network (default: the V-cycle network); writes `out` (checkpoint), returns (model, meta).
    `n`: N³ training grids; `n2d`: N² grids besides (the scenes' 2D
    versions, 5-point operators): one model serves 2D and 3D DMDAs.
    `geometries`/`lanczos`: one count, or one per size (the 3D sizes, then
    the 2D ones). `deflate`: box size of the KSP's island deflation applied in
    the loss (training/deflation.py; 0: the plain loss)."""
    torch.manual_seed(seed)
    state = None
    state_path = out + ".state"
    if resume:
        if not (os.path.exists(out) and os.path.exists(state_path)):
            raise ValueError(f"cannot resume: {out!r} and its training state {state_path!r} must both exist")
        ck = read_checkpoint(out)
        state = torch.load(state_path, map_location="cpu", weights_only=True)
        config = ck["config"]
        meta0 = ck["meta"]
        scenes, n, seed = meta0["scenes"], meta0["n"], meta0["seed"]
        n2d = meta0.get("n2d") or ()
        lanczos, geometries, batch, lr = (meta0[k] for k in ("lanczos", "geometries", "batch", "lr"))
        deflate = meta0.get("deflate", 0)
    if init and not state:
        # fine-tune: architecture and weights from an existing model
        ck0 = read_checkpoint(init)
        config = ck0["config"]
        model = build(config)
        model.load_state_dict(ck0["state_dict"])
    else:
        model = build(config or DEFAULT_MG_CONFIG)
    model.to(device)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    t_data = time.perf_counter()
    sizes = [] if n is None else [n] if isinstance(n, int) else list(n)
    n2d = list(n2d or ())
    shapes = [(s,) * 3 for s in sizes] + [(1, s, s) for s in n2d]
    if not shapes:
        raise ValueError("no training sizes: give 3D sizes (--n), 2D sizes (--n2d) or both")
    per_size = [geometries] * len(shapes) if isinstance(geometries, int) else list(geometries)
    if len(per_size) != len(shapes):
        raise ValueError(f"--geometries needs one count or one per size ({len(shapes)})")
    steps_l = [lanczos] * len(shapes) if isinstance(lanczos, int) else list(lanczos)
    if len(steps_l) != len(shapes):
        raise ValueError(f"--lanczos needs one count or one per size ({len(shapes)})")
    geos = []
    for shape, count, m in zip(shapes, per_size, steps_l):
        for scene in scenes:
            for s in train_seeds(seed, count):
                geos.append(make_geometry(scene, shape, s, m, cache))
    t_data = time.perf_counter() - t_data
    log(f"training data: {len(geos)} geometries at sizes {sizes} (3D) and {n2d} (2D), "
        f"{lanczos} Lanczos steps each, {t_data:.1f} s")
    if steps == 0 and not state:
        return None, {"steps": 0, "losses": [], "data_s": t_data, "geometries": len(geos)}
    ops = [g.op.to(device=device) for g in geos]
    defl = [None] * len(geos)
    if deflate:
        from .deflation import TrainingDeflation
        defl = [TrainingDeflation.of(g.stencil, deflate) for g in geos]
        defl = [d if d is None else d.to(device) for d in defl]
        log(f"island deflation in the loss (boxes of {deflate} cells a side): "
            + (", ".join(f"{g.name} {d.islands}+{d.count - d.islands}" for g, d in zip(geos, defl)
                         if d is not None) or "no training operator has islands"))
    gen = torch.Generator().manual_seed(seed)
    step, losses, elapsed0 = 0, [], 0.0
    if state:
        model.load_state_dict(ck["state_dict"])
        opt.load_state_dict(state["optimizer"])
        step, losses, elapsed0 = state["step"], list(state["losses"]), state["elapsed"]
        gen.set_state(state["gen"])
        log(f"resuming {out} at step {step}")
    meta = {"scenes": list(scenes), "n": n, "n2d": n2d, "seed": seed, "lanczos": lanczos,
            "geometries": geometries, "batch": batch, "lr": lr, "deflate": deflate,
            "train_seeds": train_seeds(seed, max(per_size)), "device": str(device),
            "torch": torch.__version__, "revision": source_revision(),
            "host": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(), "data_s": t_data,
            "init": (meta0.get("init") if state else (os.path.abspath(init) if init else None))}
    total = steps
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=total, initial=step, desc="train", mininterval=2.0)
    t0 = time.perf_counter()
    last_ckpt = t0

    def snapshot():
        meta.update(steps=step, losses=losses, train_s=elapsed0 + time.perf_counter() - t0)
        # the training state (Adam moments, RNG) lives beside the model, so
        # the model file itself stays small and shippable
        atomic_save({"optimizer": opt.state_dict(), "step": step, "losses": losses,
                     "elapsed": elapsed0 + time.perf_counter() - t0,
                     "gen": gen.get_state()}, state_path)
        save_checkpoint(out, model, meta)

    model.train()
    while step < (stop_at or total):
        elapsed = elapsed0 + time.perf_counter() - t0
        if time_budget and elapsed >= time_budget:
            break
        frac = max(step / total, elapsed / time_budget if time_budget else 0.0)
        for gr in opt.param_groups:
            gr["lr"] = lr * (0.1 + 0.45 * (1 + math.cos(math.pi * min(frac, 1.0))))
        gi = int(np.random.default_rng([seed, step]).integers(len(geos)))  # resumable
        g = geos[gi]
        b = g.sample(batch, gen).to(device)
        if defl[gi] is not None:
            b = defl[gi].residual(b)
        geo = model.prepare(g.flags, g.dirichlet, device=device, **g.prepare_kw)
        q = model(b[:, None], geo)[:, 0]
        if defl[gi] is not None:
            q = defl[gi].project(q)
        loss = dcdm_loss(b, q, ops[gi])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        losses.append(loss.item())
        if bar:
            bar.update(1)
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}", refresh=False)
        if time.perf_counter() - last_ckpt > checkpoint_every:
            snapshot()
            last_ckpt = time.perf_counter()
    if bar:
        bar.close()
    model.eval()
    snapshot()
    return model, meta


def loss_plot(losses, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.semilogy(losses, alpha=0.3, label="batch")
    w = max(1, len(losses) // 50)
    if len(losses) >= w:
        sm = np.convolve(losses, np.ones(w) / w, mode="valid")
        ax.semilogy(np.arange(w - 1, len(losses)), sm, label=f"mean of {w}")
    ax.set_xlabel("step")
    ax.set_ylabel("loss ‖b − (qᵀb/qᵀAq) Aq‖²")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def rows_shapes(rows):
    """(z, y, x) of the evaluated grids: N³, or (1, N, N) for 2D rows."""
    return sorted({(r["n"],) * 3 if r.get("dim", 3) == 3 else (1, r["n"], r["n"]) for r in rows}) \
        or [(32,) * 3]


def _grid(shape):
    return f"{shape[-1]}²" if shape[0] == 1 else f"{shape[0]}³"


def write_model_card(path, model_path, meta, rows, command, cost=None):
    """Markdown card: how the model was made and how well it does."""
    from ..tables import markdown_table
    from ..model import load_model
    net, _ = load_model(model_path)
    lines = [f"# deepcd model card: `{os.path.basename(model_path)}`", "",
             f"- Reproduce: `{command}`",
             f"- Architecture: `{net.config}` ({net.describe()}); {net.n_params()} parameters",
             "- Levels and receptive field by grid size: " + ", ".join(
                 f"{_grid(sh)}: {net.levels_for(sh)} levels, receptive field "
                 f"{net.receptive_field(net.levels_for(sh))} cells" for sh in rows_shapes(rows)),
             f"- Data: scenes {', '.join(meta['scenes'])} at sizes "
             + " and ".join(t for t in ((f"{meta['n']} (N³)" if meta["n"] is not None else ""),
                                        (f"{meta['n2d']} (N², the scenes' 2D versions)"
                                         if meta.get("n2d") else "")) if t) + ", "
             f"{meta['geometries']} geometries per scene and size (seeds {meta['train_seeds']}), "
             f"{meta['lanczos']} Lanczos steps per geometry, low half of the Ritz spectrum weighted x9",
             f"- Training: {meta['steps']} Adam steps, batch {meta['batch']}, lr {meta['lr']} (cosine to lr/10)"
             + (f", fine-tuned from `{os.path.basename(meta['init'])}`" if meta.get("init") else "")
             + (f", the DCDM KSP's island deflation in the loss (boxes of {meta['deflate']} cells a side)"
                if meta.get("deflate") else "") + "; "
             f"data {meta['data_s']:.0f} s + training {meta['train_s']:.0f} s on {meta['device']} "
             f"({meta['host']}, {meta['threads']} torch thread(s)), torch {meta['torch']}, source {meta['revision']}",
             f"- Final loss (mean of last 100 steps): {np.mean(meta['losses'][-100:]):.4f}"]
    if cost:
        lines.append(f"- Cost of one application: {cost}")
    lines += ["", "## Evaluation (held-out seeds; iterations to ‖r‖/‖b‖ ≤ 1e-6, torch float64 Krylov)", "",
              markdown_table(rows, ["scene", "grid", "seed", "dcdm", "cg", "cg_jacobi", "dcdm_s"],
                             ["scene", "grid", "seed", "DCDM", "CG", "CG+Jacobi", "DCDM time (s)"]), ""]
    with open(path, "w") as f:
        f.write("\n".join(lines))
