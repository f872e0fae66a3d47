"""Run by tests/test_triton.py in its own process: the Triton V-cycle
kernels under Triton's interpreter (TRITON_INTERPRET=1, CPU tensors)
against kernels.c and the torch path. Prints one JSON line of relative
differences per case."""
import json
import os
import sys

os.environ["TRITON_INTERPRET"] = "1"     # before triton is imported

import torch  # noqa: E402

from deepcd_petsc.model import default_model_path, dirichlet_fraction, load_model  # noqa: E402
from deepcd_petsc.scenes import make_flags  # noqa: E402


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def case(scene, shape, cap, into):
    net, _ = load_model(default_model_path())
    net.level_cap = cap
    flags, faces = make_flags(scene, shape, 3)
    with torch.inference_mode():
        geo = net.prepare(flags, dirichlet_fraction(flags, faces), dtype=torch.float32)
        r = torch.randn(1, 1, *shape, generator=torch.Generator().manual_seed(1))
        c = net(r, geo)                      # kernels.c
        net.fused = False
        t = net(r, geo)                      # torch
        net.fused = "triton"
        tr = net(r, geo)
        out = {"scene": scene, "shape": shape, "levels": geo["L"],
               "dense_bottom": "dense" in geo["levels"][-1],
               "triton_vs_c": rel(tr, c), "triton_vs_torch": rel(tr, t), "c_vs_torch": rel(c, t),
               "nonzero": bool(tr.abs().max() > 0)}
        if into:
            r64 = r[0, 0].double().contiguous()
            a = torch.full_like(r64, float("nan"))
            done = net.apply_into(r64, a, geo, 0.5)
            net.fused = True
            b = torch.full_like(r64, float("nan"))
            net.apply_into(r64, b, geo, 0.5)
            out.update(into_done=done, into_triton_vs_c=rel(a, b), into_finite=bool(torch.isfinite(a).all()))
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    # padded odd grid, three levels, dense bottom, the float64 entry/exit
    case("liquid", (17, 16, 16), None, True)
    # the coarsest level by sweeps (too big for the dense matrix)
    if "--all" in sys.argv:
        case("box", (24, 24, 16), 2, False)
