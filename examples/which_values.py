"""Which values each norm normalizes together: BatchNorm, LayerNorm, InstanceNorm, GroupNorm on a batch of images.

    python examples/which_values.py [--channels 6] [--groups 2] [--size 240] [--out examples/figures] [--quick]

A synthetic batch of 4 images (smooth patterns plus noise, a different offset and contrast per image and channel;
nothing is downloaded) goes through normkit.get(op).forward for the four ops. The figure is drawn in the style of
the Group Normalization paper (Wu & He 2018, figure 2): a cube with axes N (batch), C (channels) and H, W (the
pixels, one axis); the blue cells are the values that one statistic (one saved mean and rstd) covers. Which cells
those are is read back from what normkit computed: each (sample, channel) column is matched to the saved set
statistics that reproduce its output. The documents' batch has 3 channels, where GroupNorm can only be InstanceNorm
(3 groups) or LayerNorm (1 group); the default of 6 channels in 2 groups shows a group that is neither. Each op's
output statistics per set are printed (mean ~0, biased variance ~1). Writes which_values.png to --out.
"""

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no screen
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

import normkit  # noqa: E402

DEFAULT_OUT = Path(__file__).resolve().parent / "figures"
N = 4


def synthetic_batch(n, c, size, rng):
    """Smooth stripes and blobs plus noise; every (image, channel) with its own offset and contrast."""
    v, u = np.meshgrid(np.linspace(0, 1, size), np.linspace(0, 1, size), indexing="ij")
    x = np.empty((n, c, size, size), np.float32)
    for i in range(n):
        for j in range(c):
            fx, fy, phase = rng.uniform(1, 4), rng.uniform(1, 4), rng.uniform(0, 2 * np.pi)
            pattern = np.sin(2 * np.pi * (fx * u + fy * v) + phase) + np.exp(-((u - 0.5) ** 2 + (v - 0.5) ** 2) * 8)
            x[i, j] = rng.uniform(-3, 3) + rng.uniform(0.5, 2.0) * pattern + 0.1 * rng.standard_normal((size, size))
    return x


def run_ops(x, groups):
    """Each op's forward: (label, output, saved statistics, the output viewed so that one set spans `axes`, axes)."""
    n = x.shape[0]
    results = []
    y, saved = normkit.get("bn").forward(x, training=True)
    results.append(("BatchNorm", y, saved, y, (0, 2, 3)))
    y, saved = normkit.get("ln").forward(x, x.shape[1:])
    results.append(("LayerNorm", y, saved, y, (1, 2, 3)))
    y, saved = normkit.get("in").forward(x)
    results.append(("InstanceNorm", y, saved, y, (2, 3)))
    y, saved = normkit.get("gn").forward(x, groups)
    results.append((f"GroupNorm ({groups} groups)", y, saved, y.reshape(n, groups, -1), (2,)))
    return results


def membership(x, y, saved):
    """For every (sample, channel) column, the index of the saved set whose (mean, rstd) gives its output."""
    n, c = x.shape[:2]
    mean, rstd = saved.mean.astype(np.float64).ravel(), saved.rstd.astype(np.float64).ravel()
    xs = x.reshape(n, c, -1)[:, :, :256].astype(np.float64)
    ys = y.reshape(n, c, -1)[:, :, :256].astype(np.float64)
    # err[n, c, s] = max over the column's first values of |(x - mean_s) * rstd_s - y|
    err = np.abs((xs[..., None] - mean) * rstd - ys[..., None]).max(axis=2)
    best = err.argmin(axis=2)
    assert (err.min(axis=2) < 1e-3).all(), "a column matches none of the saved statistics"
    return best


def draw_cube(ax, chosen, title):
    n, c = chosen.shape
    filled = np.ones((n, c, 1), bool)
    colors = np.where(chosen[..., None], "#3b75c4", "#f2f2f2")
    ax.voxels(filled, facecolors=colors, edgecolors="#555555", linewidth=0.4, alpha=0.95)
    ax.set_box_aspect((n, c, 3.5))
    ax.set_xlabel("N", labelpad=-12)
    ax.set_ylabel("C", labelpad=-12)
    ax.set_zlabel("H, W", labelpad=-14)
    ax.set_xticks([]), ax.set_yticks([]), ax.set_zticks([])
    ax.view_init(elev=22, azim=-60)
    ax.set_title(title, fontsize=9)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--channels", type=int, default=6)
    parser.add_argument("--groups", type=int, default=2, help="GroupNorm's groups; must divide --channels")
    parser.add_argument("--size", type=int, default=240, help="image height and width")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="directory for the PNG (default: %(default)s)")
    parser.add_argument("--quick", action="store_true", help="32x32 images (seconds; for the tests)")
    args = parser.parse_args()
    size = 32 if args.quick else args.size
    c = args.channels

    x = synthetic_batch(N, c, size, np.random.default_rng(0))
    print(f"batch {N} x {c} x {size} x {size}, float32, eps 1e-5; input per (image, channel) mean in "
          f"[{x.mean(axis=(2, 3)).min():.2f}, {x.mean(axis=(2, 3)).max():.2f}]")
    fig = plt.figure(figsize=(13, 3.8))
    for k, (label, y, saved, view, axes) in enumerate(run_ops(x, args.groups)):
        sets = membership(x, y, saved)
        count = saved.mean.size
        per_set = x.size // count
        mean, var = normkit.moments(view, axes)  # the output's statistics over each set
        print(f"{label:22s} saved mean shape {str(saved.mean.shape):8s} {count:3d} sets of {per_set:7d} values; "
              f"output per set: max |mean| = {np.abs(mean).max():.3e}, variance in [{var.min():.6f}, {var.max():.6f}]")
        ax = fig.add_subplot(1, 4, k + 1, projection="3d")
        draw_cube(ax, sets == sets[0, 0], f"{label}\n{count} sets of {per_set} values\n(saved mean {saved.mean.shape})")
    fig.suptitle(f"Which values share one mean and variance (blue: one set), batch {N}x{c}x{size}x{size}",
                 fontsize=10)
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.02, top=0.78, wspace=0.05)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "which_values.png"
    fig.savefig(path, dpi=80)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
