"""What `deepcd simulate` leaves behind (rank 0): steps.csv and stats.json
written after every step (an interrupted run keeps them), PNG frames, a GIF
at the end, the per-step pressure plot, and --compare-stats plots."""
import csv
import json
import os

import numpy as np

from .errors import UserError

TOTALS_DOC = ("pressure_s: KSP set-up + solve per step (synchronised wall time); "
              "step_s: advection, forces, assembly, right-hand side, pressure, projection")


def check_out_dir(path):
    """Create the output folder, or one line on why it cannot be."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise UserError(f"--out {path!r}: cannot create the folder ({e.strerror})") from None
    if not os.path.isdir(path) or not os.access(path, os.W_OK | os.X_OK):
        raise UserError(f"--out {path!r}: the folder is not writable")


def _mpl():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def totals(steps):
    """Run totals from the per-step records."""
    if not steps:
        return {}
    col = lambda k: np.array([r[k] for r in steps], float)  # noqa: E731
    pressure, step = col("pressure_s"), col("step_s")
    return dict(
        steps=len(steps), simulated_time=steps[-1]["t"],
        pressure_s=float(pressure.sum()), pressure_s_per_step=float(pressure.mean()),
        setup_s=float(col("setup_s").sum()), solve_s=float(col("solve_s").sum()),
        step_s=float(step.sum()), step_s_per_step=float(step.mean()),
        pressure_fraction=float(pressure.sum() / step.sum()) if step.sum() > 0 else 0.0,
        iterations_mean=float(col("iterations").mean()), iterations_max=int(col("iterations").max()),
        operator_changes=int(sum(r["operator_changed"] for r in steps)),
        pc_rebuilds=int(sum(r["pc_rebuilt"] for r in steps)),
        network_rebuilds=int(sum(r.get("network_rebuilt", 0) for r in steps)),
        model_loads=int(steps[-1].get("model_loads", 0)),
        div_ratio_max=float(col("div_ratio").max()),
        unconverged=int(sum(r["reason"] <= 0 for r in steps)))


class Recorder:
    """Statistics and frames of one run, written as they come."""

    def __init__(self, out_dir, settings, comm, command):
        self.dir = out_dir
        self.settings = dict(settings, command=command, shape=list(settings["shape"]))
        self.steps = []
        self.frames = []
        self.csv_path = os.path.join(out_dir, "steps.csv")
        self.json_path = os.path.join(out_dir, "stats.json")
        self.frame_dir = os.path.join(out_dir, "frames")
        self.csv = None
        self.writer = None
        self.run_s = 0.0

    def add(self, rec, elapsed):
        self.steps.append(rec)
        self.run_s = elapsed
        if self.writer is None:
            self.csv = open(self.csv_path, "w", newline="")
            self.writer = csv.DictWriter(self.csv, fieldnames=list(rec), extrasaction="ignore")
            self.writer.writeheader()
        self.writer.writerow(rec)
        self.csv.flush()
        self._write_json()
        if not self.settings.get("quiet"):
            print(f"step {rec['step']:4d} t={rec['t']:.3f} its {rec['iterations']:3d} "
                  f"pressure {rec['pressure_s']:.3f} s (set-up {rec['setup_s']:.3f}) "
                  f"step {rec['step_s']:.3f} s  |div u|/|div u*| {rec['div_ratio']:.1e}"
                  + ("  operator changed" if rec["operator_changed"] else ""), flush=True)

    def _write_json(self, extra=None):
        data = dict(settings=self.settings, totals=dict(totals(self.steps), run_s=self.run_s),
                    totals_doc=TOTALS_DOC, steps=self.steps, **(extra or {}))
        tmp = self.json_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(data, f, indent=1)
        os.replace(tmp, self.json_path)   # never a half-written stats.json

    def frame(self, k, t, img, solid):
        """A PNG of the side view now; the RGB image is kept for the GIF."""
        rgb = render(img, solid, self.settings["scene"], f"step {k + 1}, t = {t:.3f}")
        os.makedirs(self.frame_dir, exist_ok=True)
        plt = _mpl()
        plt.imsave(os.path.join(self.frame_dir, f"frame_{k + 1:05d}.png"), rgb)
        self.frames.append(rgb)

    def finish(self, run_s, interrupted=False):
        self.run_s = run_s
        if self.csv is not None:
            self.csv.close()
        self._write_json({"interrupted": interrupted})
        notes = []
        if self.frames and self.settings.get("gif", True):
            notes.append(write_gif(self.frames, os.path.join(self.dir, "animation.gif")))
        if self.steps:
            plot_steps({self.settings.get("solver", "?"): self.steps},
                       os.path.join(self.dir, "pressure.png"), self.settings)
        tot = totals(self.steps)
        if tot:
            print(f"{tot['steps']} steps, {self.settings.get('solver')} on {self.settings.get('ranks')} "
                  f"rank(s): pressure {tot['pressure_s_per_step']:.3f} s/step "
                  f"({100 * tot['pressure_fraction']:.0f}% of the step time), "
                  f"{tot['iterations_mean']:.1f} iterations/step, {tot['operator_changes']} operator "
                  f"changes, {tot['pc_rebuilds']} PC set-ups, max |div u|/|div u*| "
                  f"{tot['div_ratio_max']:.1e}, run {run_s:.1f} s")
        for n in notes:
            if n:
                print(n)
        print(f"wrote {self.json_path}, {self.csv_path}"
              + (f", {len(self.frames)} frames in {self.frame_dir}" if self.frames else ""), flush=True)


def render(img, solid, scene, title):
    """RGB uint8 picture of a side view (z up), obstacle silhouette grey."""
    plt = _mpl()
    import matplotlib
    # matplotlib.colormaps (3.5+): cm.get_cmap is gone from 3.9 on
    cmap = matplotlib.colormaps["inferno" if scene == "smoke" else "Blues"]
    vmax = 1.0
    rgb = cmap(np.clip(img / vmax, 0, 1))[..., :3]
    rgb[solid] = 0.6 * rgb[solid] + 0.4 * np.array([0.75, 0.75, 0.75])
    rgb = rgb[::-1]                                    # z up
    scale = max(1, 256 // max(rgb.shape[:2]))          # small grids: nearest-neighbour zoom
    rgb = np.repeat(np.repeat(rgb, scale, 0), scale, 1)
    fig = plt.figure(figsize=(rgb.shape[1] / 100, rgb.shape[0] / 100 + 0.3), dpi=100)
    ax = fig.add_axes([0, 0, 1, rgb.shape[0] / (rgb.shape[0] + 30)])
    ax.imshow(rgb, interpolation="nearest")
    ax.set_axis_off()
    fig.text(0.5, 1 - 0.5 * 30 / (rgb.shape[0] + 30), f"{scene}: {title}", ha="center",
             va="center", fontsize=8)
    fig.canvas.draw()
    out = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    plt.close(fig)
    return out


def write_gif(frames, path, fps=8):
    """The frames as a GIF through matplotlib's PillowWriter; a note when
    Pillow is missing (the PNG frames stay)."""
    try:
        import PIL  # noqa: F401
    except ImportError:
        return "Pillow is not installed: no GIF (the PNG frames are in frames/)"
    plt = _mpl()
    from matplotlib.animation import FuncAnimation, PillowWriter
    h, w = frames[0].shape[:2]
    fig = plt.figure(figsize=(w / 100, h / 100), dpi=100)
    ax = fig.add_axes([0, 0, 1, 1])
    ax.set_axis_off()
    im = ax.imshow(frames[0])
    anim = FuncAnimation(fig, lambda i: im.set_data(frames[i]) or [im], frames=len(frames))
    anim.save(path, writer=PillowWriter(fps=fps))
    plt.close(fig)
    return f"wrote {path} ({len(frames)} frames)"


def plot_steps(runs, path, settings=None):
    """Per-step pressure time (set-up + solve) and iterations of each run."""
    plt = _mpl()
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(7, 5.5), sharex=True)
    for label, steps in runs.items():
        k = [r["step"] for r in steps]
        line, = ax1.plot(k, [r["pressure_s"] for r in steps], label=f"{label}: set-up + solve")
        ax1.plot(k, [r["setup_s"] for r in steps], ":", color=line.get_color(),
                 label=f"{label}: set-up")
        ax2.plot(k, [r["iterations"] for r in steps], color=line.get_color(), label=label)
    ax1.set_ylabel("pressure time per step (s)")
    ax1.set_yscale("log")
    ax2.set_ylabel("iterations")
    ax2.set_xlabel("step")
    ax1.legend(fontsize=7)
    ax2.legend(fontsize=7)
    if settings:
        shape = "x".join(map(str, settings.get("shape", [])))
        ax1.set_title(f"{settings.get('scene')} {shape}, {settings.get('ranks', '?')} rank(s)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _load(path):
    try:
        with open(path) as f:
            data = json.load(f)
        return data["settings"], data["steps"]
    except FileNotFoundError:
        raise UserError(f"--compare-stats {path!r} does not exist") from None
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"--compare-stats {path!r} is not a simulate stats.json ({e})") from None


def compare(paths, out_dir):
    """One figure with every run's per-step pressure time and iterations,
    and a line of totals per run."""
    runs, first = {}, None
    for p in paths:
        settings, steps = _load(p)
        first = first or settings
        label = f"{settings.get('solver', '?')} ({os.path.basename(os.path.dirname(os.path.abspath(p)))})"
        runs[label] = steps
        t = totals(steps)
        print(f"{label}: {t.get('steps', 0)} steps, pressure {t.get('pressure_s_per_step', 0):.3f} s/step, "
              f"{t.get('iterations_mean', 0):.1f} its/step, {100 * t.get('pressure_fraction', 0):.0f}% of step time")
    path = os.path.join(out_dir, "compare.png")
    plot_steps(runs, path, first)
    print(f"wrote {path}")
    return 0
