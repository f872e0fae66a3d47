"""Model files (checkpoints) and the U-Net of the first releases.

The default network is the V-cycle network in mgnet.py; `build` picks the
class from a checkpoint's config ('arch'). The U-Net (arch 'unet'), a
geometry-gated, positively homogeneous network, f(r, flags) ≈ c·A⁻¹ r; why
this shape:
- every layer on the residual path is bias-free and its activation is PReLU,
  so f(c·r) = c·f(r) for c > 0 (a part of f independent of r would dominate
  once the residual is small and stall DCDM);
- geometry (fluid / solid / air) enters only through gates in (0, 1)
  multiplying the features, computed once per geometry and cached, so one
  model serves any obstacle layout and the gates cost nothing per iteration;
- most convolutions run at coarse levels (1/8 the cost per level down), the
  finest level has few channels: the network must cost few MatMults.
"""
import json
import os
import tempfile

import torch
import torch.nn as nn
import torch.nn.functional as F

from .scenes import AIR, FLUID, SOLID

DEFAULT_CONFIG = {
    "channels": [4, 8, 16, 16, 16],   # per level, finest first
    "bottom_blocks": 2,               # residual blocks at the coarsest level
    "level_blocks": 1,                # residual blocks at levels 1..L-2 (down path)
}


class Conv3d(nn.Conv3d):
    """nn.Conv3d that calls oneDNN directly on the CPU.

    PyTorch's CPU dispatcher sends small-channel 3D convolutions to a slow
    generic kernel (measured 5-15x slower here for 4-16 channels at 32^3-64^3);
    oneDNN gives identical results and supports autograd. float64 and CUDA
    keep the standard path.
    """

    def forward(self, x, halo=None, dtype=None, flat=False):
        """`halo`: None for zero padding (one process), or a callable that
        adds the neighbours' cells (zeros on the global boundary). `dtype`:
        compute in this dtype instead of the weights' (cast differentiably).
        `flat`: x is a 2D grid's (z one cell on every rank, no z neighbours)."""
        pad = self.padding
        if halo is not None and self.kernel_size[0] > 1:
            x = halo(x, self.kernel_size[0] // 2)
            pad = (0, 0, 0)
        w, b = self.weight, self.bias
        if flat and self.kernel_size[0] == 3:
            # z ghosts are zero: only the kernel's middle plane meets data,
            # a third of the work (1024²: 127 ms of set-up became ~45)
            x = x if pad[0] else x[:, :, 1:2]
            w = w[:, :, 1:2]
            pad = (0,) + tuple(pad[1:])
        if dtype is not None:
            x, w = x.to(dtype), w.to(dtype)
            b = None if b is None else b.to(dtype)
        if x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16) \
                and torch.backends.mkldnn.is_available():
            if x.dtype == torch.bfloat16 and not onednn_bf16():
                # oneDNN's bf16 convolution needs AVX-512 (or AVX-NE-CONVERT):
                # elsewhere the same bf16 operands in float32, which is what
                # oneDNN accumulates in, then rounded back to bf16
                f = [None if t is None else t.float() for t in (x, w, b)]
                return torch.mkldnn_convolution(*f, pad, self.stride, self.dilation,
                                                self.groups).to(torch.bfloat16)
            return torch.mkldnn_convolution(x, w, b, pad, self.stride, self.dilation, self.groups)
        return F.conv3d(x, w, b, self.stride, pad, self.dilation, self.groups)


def onednn_bf16():
    """Whether oneDNN runs bfloat16 convolutions on this CPU (it refuses
    without AVX-512 BW/VL/DQ or AVX-NE-CONVERT; ONEDNN_MAX_CPU_ISA=AVX2
    makes any CPU answer no, which is how the tests force the fallback)."""
    if _BF16["ok"] is None:
        try:
            _BF16["ok"] = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            _BF16["ok"] = False
    return _BF16["ok"]


_BF16 = {"ok": None}


def pool2(x):
    """2x2x2 average pooling; in float32 for bfloat16 on the CPU, where
    torch has no bfloat16 kernel for it."""
    if x.dtype == torch.bfloat16 and x.device.type == "cpu":
        return F.avg_pool3d(x.float(), 2).to(torch.bfloat16)
    return F.avg_pool3d(x, 2)


def geometry_channels(flags, dirichlet=None):
    """(N, 4, D, H, W): one-hot fluid / solid / air from int flags, and the
    Dirichlet fraction of each fluid cell (air neighbours, open faces
    included, over non-solid neighbours) -- the part of the boundary that
    the flags inside the grid cannot show."""
    f = flags.long()
    if f.dim() == 3:
        f = f[None]
    ch = [(f == FLUID), (f == SOLID), (f == AIR)]
    ch = [c.float() for c in ch]
    ch.append(torch.zeros_like(ch[0]) if dirichlet is None
              else dirichlet.reshape(ch[0].shape).float() * ch[0])
    return torch.stack(ch, 1)


def dirichlet_fraction(flags, open_faces=()):
    """NumPy (nz, ny, nx): air neighbours / non-solid neighbours of each
    fluid cell (0 elsewhere), i.e. (diag − Σ|offdiag|)/diag of A's row."""
    import numpy as np
    from .scenes import padded
    return dirichlet_from_ghosted(padded(np.asarray(flags), set(open_faces)))


def dirichlet_from_ghosted(p):
    """dirichlet_fraction of a block from its flags with one ghost layer
    (a rank's block: the neighbours' cells, air beyond open faces)."""
    import numpy as np
    shape = tuple(s - 2 for s in p.shape)
    nonsolid = np.zeros(shape, np.int8)      # counts (float64 sums were 8x the bytes)
    air = np.zeros(shape, np.int8)
    for sl in ((slice(None, -2), slice(1, -1), slice(1, -1)), (slice(2, None), slice(1, -1), slice(1, -1)),
               (slice(1, -1), slice(None, -2), slice(1, -1)), (slice(1, -1), slice(2, None), slice(1, -1)),
               (slice(1, -1), slice(1, -1), slice(None, -2)), (slice(1, -1), slice(1, -1), slice(2, None))):
        nb = p[sl]
        nonsolid += nb != SOLID
        air += nb == AIR
    return np.where(p[1:-1, 1:-1, 1:-1] == FLUID, air / np.maximum(nonsolid, 1).astype(float), 0.0)


class Gate(nn.Module):
    """Per-level gate in (0, 1) from pooled geometry: depends on flags only."""

    def __init__(self, channels):
        super().__init__()
        self.conv1 = Conv3d(4, 8, 3, padding=1)
        self.conv2 = Conv3d(8, channels, 1)

    def forward(self, geom, halo=None):
        return torch.sigmoid(self.conv2(F.gelu(self.conv1(geom, halo))))


class Block(nn.Module):
    """Bias-free residual block x + conv(PReLU(conv(x))), gated."""

    def __init__(self, c):
        super().__init__()
        self.conv1 = Conv3d(c, c, 3, padding=1, bias=False)
        self.act = nn.PReLU(c, init=0.1)
        self.conv2 = Conv3d(c, c, 3, padding=1, bias=False)

    def forward(self, x, gate, halo=None):
        return x + self.conv2(self.act(self.conv1(x, halo)) * gate, halo)


class DCDMNet(nn.Module):
    def __init__(self, channels=None, bottom_blocks=2, level_blocks=1):
        super().__init__()
        ch = list(channels or DEFAULT_CONFIG["channels"])
        self.config = {"channels": ch, "bottom_blocks": bottom_blocks,
                       "level_blocks": level_blocks}
        L = len(ch)
        self.levels = L
        self.gates = nn.ModuleList(Gate(c) for c in ch)
        self.inp = Conv3d(1, ch[0], 3, padding=1, bias=False)
        self.inp_act = nn.PReLU(ch[0], init=0.1)
        # down path: at level l (>=1) widen channels, then blocks
        self.down = nn.ModuleList(Conv3d(ch[l - 1], ch[l], 3, padding=1, bias=False)
                                  for l in range(1, L))
        self.down_act = nn.ModuleList(nn.PReLU(ch[l], init=0.1) for l in range(1, L))
        self.blocks = nn.ModuleList(
            nn.ModuleList(Block(ch[l]) for _ in range(bottom_blocks if l == L - 1 else level_blocks))
            for l in range(1, L))
        # up path: 1x1 channel reduction at the coarse level, nearest upsampling,
        # skip added, one 3x3x3 convolution at levels >= 1
        self.reduce = nn.ModuleList(Conv3d(ch[l], ch[l - 1], 1, bias=False)
                                    for l in range(1, L))
        self.up = nn.ModuleList(Conv3d(ch[l], ch[l], 3, padding=1, bias=False)
                                for l in range(1, L - 1))
        self.up_act = nn.ModuleList(nn.PReLU(ch[l], init=0.1) for l in range(1, L - 1))
        self.out = Conv3d(ch[0], 1, 3, padding=1, bias=False)

    @property
    def multiple(self):
        """Grid sizes are padded to a multiple of this (2^(levels-1))."""
        return 2 ** (self.levels - 1)

    def multiple_for(self, shape, periodic=None):
        return self.multiple

    def levels_for(self, shape, periodic=None):
        return self.levels

    def describe(self, shape=None):
        return f"U-Net, levels {self.levels}, channels {self.config['channels']}"

    def conv_plan(self, levels=None):
        """(level, C_in, C_out, kernel) of every convolution on the residual
        path, in execution order (cost model, receptive field)."""
        plan = [(0, 1, self.inp.out_channels, 3)]
        for l in range(1, self.levels):
            d = self.down[l - 1]
            plan.append((l, d.in_channels, d.out_channels, 3))
            for blk in self.blocks[l - 1]:
                c = blk.conv1.in_channels
                plan += [(l, c, c, 3), (l, c, c, 3)]
        for l in range(self.levels - 1, 0, -1):
            r = self.reduce[l - 1]
            plan.append((l, r.in_channels, r.out_channels, 1))
            if l - 1 >= 1:
                u = self.up[l - 2]
                plan.append((l - 1, u.in_channels, u.out_channels, 3))
        plan.append((0, self.out.in_channels, 1, 3))
        return plan

    def receptive_field(self, levels=None):
        """Width 2·reach + 1 of the window of input cells that can influence
        one output cell, where reach = Σ (k//2)·2^level over the convolutions
        plus 2^(levels−1) − 1 for where a cell sits inside its coarsest
        cell. Cells farther than `reach` never matter (tight on one side)."""
        reach = sum((k // 2) * 2 ** lvl for lvl, _, _, k in self.conv_plan())
        reach += 2 ** (self.levels - 1) - 1
        return 2 * reach + 1

    def n_params(self):
        return sum(p.numel() for p in self.parameters())

    # -- geometry: computed once per flags array, reused every iteration --
    def prepare(self, flags, dirichlet=None, dtype=torch.float32, device=None, halo=None):
        """Cached per-geometry tensors: padded fluid mask and per-level gates.
        `flags` int (D, H, W); `dirichlet` the float field of
        dirichlet_fraction (None: no open boundary). With `halo` both are one
        rank's block of the padded grid (halo.py aligns it): no padding here."""
        flags = torch.as_tensor(flags).to(device=device)
        if flags.dim() == 3:
            flags = flags[None]
        if dirichlet is not None:
            dirichlet = torch.as_tensor(dirichlet).to(device=device, dtype=torch.float32)
            dirichlet = dirichlet.reshape(flags.shape)
        shape = tuple(flags.shape[-3:])
        pad = [0, 0, 0] if halo is not None else [(-s) % self.multiple for s in shape]
        # padding cells are solid walls
        flags_p = F.pad(flags, (0, pad[2], 0, pad[1], 0, pad[0]), value=SOLID)
        if dirichlet is not None:
            dirichlet = F.pad(dirichlet, (0, pad[2], 0, pad[1], 0, pad[0]))
        geom = geometry_channels(flags_p, dirichlet).to(device=device, dtype=dtype)
        gates, g = [], geom
        for l in range(self.levels):
            if l > 0:
                g = pool2(g)
            gates.append(self.gates[l](g, halo))
        fluid = geom[:, :1]
        return {"shape": shape, "pad": pad, "fluid": fluid, "gates": gates, "halo": halo}

    def forward(self, r, geo):
        """r: (N, 1, D, H, W) residual (any scale); geo from prepare()."""
        pad, halo, gates = geo["pad"], geo["halo"], geo["gates"]
        x = F.pad(r, (0, pad[2], 0, pad[1], 0, pad[0])) * geo["fluid"]
        e = self.inp_act(self.inp(x, halo)) * gates[0]
        skips = [e]
        for l in range(1, self.levels):
            e = pool2(e)
            e = self.down_act[l - 1](self.down[l - 1](e, halo)) * gates[l]
            for blk in self.blocks[l - 1]:
                e = blk(e, gates[l], halo)
            skips.append(e)
        u = skips[-1]
        for l in range(self.levels - 1, 0, -1):
            u = F.interpolate(self.reduce[l - 1](u), scale_factor=2, mode="nearest")
            u = u + skips[l - 1]
            if l - 1 >= 1:
                u = self.up_act[l - 2](self.up[l - 2](u, halo)) * gates[l - 1]
        y = self.out(u, halo) * geo["fluid"]
        D, H, W = geo["shape"]
        return y[..., :D, :H, :W]


def build(config):
    """The network a checkpoint's config describes: 'arch' picks the class
    (the V-cycle network, or the U-Net of the first releases)."""
    config = dict(config)
    arch = config.pop("arch", "unet")
    if arch == "vcycle":
        from .mgnet import MGNet
        return MGNet(**config)
    if arch == "unet":
        return DCDMNet(**config)
    raise TypeError(f"unknown architecture {arch!r}")


# ---------------------------------------------------------------- checkpoints
FORMAT = "deepcd-petsc-model"
VERSION = 1
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}


class ModelFileError(Exception):
    """A model file that cannot be used; the message names file and problem."""


def default_model_path(dim=3):
    """The shipped model for a 3D grid, or for a 2D one (`default2d.pt`:
    the 3D model fine-tuned on the scenes' 2D versions, same architecture
    and kernels; MODEL_CARD_2D.md)."""
    return os.path.join(os.path.dirname(__file__), "models", "default2d.pt" if dim == 2 else "default.pt")


def save_checkpoint(path, model, meta=None):
    """Write {format, version, config, state_dict, meta} atomically."""
    ckpt = {"format": FORMAT, "version": VERSION, "config": model.config,
            "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            # plain JSON types only: loadable with weights_only=True
            "meta": json.loads(json.dumps(meta or {}, default=str))}
    atomic_save(ckpt, path)


def atomic_save(obj, path):
    """torch.save to a temp file in the same directory, then rename: a crash
    never leaves half a file, and readers never see one."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".pt", dir=d)
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def read_checkpoint(path):
    """The checkpoint dict, validated; never executes code from the file
    (weights_only=True)."""
    if not os.path.exists(path):
        raise ModelFileError(f"model file {path!r} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        text = str(e)
        if "Weights only load failed" in text:
            why = "it holds Python objects beyond tensors and plain data, which safe loading refuses"
        else:
            why = f"torch.load failed: {(text.splitlines() or [type(e).__name__])[0][:200]}"
        raise ModelFileError(f"model file {path!r} is not a deepcd checkpoint ({why})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise ModelFileError(f"model file {path!r} is not a deepcd checkpoint "
                             f"(no '{FORMAT}' format tag)")
    if ckpt.get("version") != VERSION:
        raise ModelFileError(f"model file {path!r} has format version {ckpt.get('version')!r}; "
                             f"this deepcd_petsc reads version {VERSION}")
    for key in ("config", "state_dict"):
        if not isinstance(ckpt.get(key), dict):
            raise ModelFileError(f"model file {path!r} lacks its '{key}'")
    return ckpt


def load_model(path=None, dtype="float32", device="cpu"):
    """(model in eval mode, checkpoint dict). Shape or key mismatches between
    the file's config and its weights are reported by parameter name."""
    path = path or default_model_path()
    ckpt = read_checkpoint(path)
    try:
        model = build(ckpt["config"])
    except TypeError as e:
        raise ModelFileError(f"model file {path!r} has an unusable config {ckpt['config']!r} ({e})") from None
    sd = ckpt["state_dict"]
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    if missing or unexpected:
        raise ModelFileError(f"model file {path!r} does not match its architecture: "
                             f"missing {missing[:3]}, unexpected {unexpected[:3]}")
    for k, v in own.items():
        if tuple(sd[k].shape) != tuple(v.shape):
            raise ModelFileError(f"model file {path!r}: parameter {k} has shape "
                                 f"{tuple(sd[k].shape)}, the architecture needs {tuple(v.shape)}")
        if not torch.isfinite(sd[k].float()).all():
            raise ModelFileError(f"model file {path!r}: parameter {k} holds NaN or Inf")
    model.load_state_dict(sd)
    if dtype not in DTYPES:
        raise ModelFileError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    model = model.to(device=device, dtype=DTYPES[dtype]).eval()
    return model, ckpt
