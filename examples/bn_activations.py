"""What BatchNorm does to a layer's activations: Linear(100, 50), then BatchNorm1d(50), torch.nn's and normkit's.

    python examples/bn_activations.py [--batch 512] [--out examples/figures] [--quick]

The pre-activations of a dense layer (inputs with a non-zero mean and a large spread) have a different mean and
variance in every feature; after BatchNorm in training mode each feature has mean ~0 and (biased) variance ~1 over
the batch. normkit.torch.BatchNorm1d and torch.nn.BatchNorm1d start from the same state and give the same output and
running statistics (the maximum difference is printed). Writes bn_activations.png to --out.
"""

import argparse
import copy
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no screen
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

import normkit.torch as nt  # noqa: E402

DEFAULT_OUT = Path(__file__).resolve().parent / "figures"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="directory for the PNG (default: %(default)s)")
    parser.add_argument("--quick", action="store_true", help="a batch of 64 (seconds; for the tests)")
    args = parser.parse_args()
    batch = 64 if args.quick else args.batch

    torch.manual_seed(0)
    linear = nn.Linear(100, 50)
    x = 3.0 * torch.randn(batch, 100) + 1.0           # inputs with a mean and a spread: shifted, wide pre-activations
    with torch.no_grad():
        h = linear(x)                                   # the pre-activations, (batch, 50)

    bn_torch = nn.BatchNorm1d(50)
    bn_normkit = nt.BatchNorm1d(50)
    bn_normkit.load_state_dict(copy.deepcopy(bn_torch.state_dict()))
    with torch.no_grad():
        y_torch, y = bn_torch(h), bn_normkit(h)         # training mode: batch statistics, running stats updated

    before_mean, before_var = h.mean(0), h.var(0, unbiased=False)
    after_mean, after_var = y.mean(0), y.var(0, unbiased=False)
    print(f"Linear(100, 50) then BatchNorm1d(50), batch {batch}, float32, training mode")
    print(f"before BN: per-feature mean in [{before_mean.min():.4f}, {before_mean.max():.4f}], "
          f"variance in [{before_var.min():.4f}, {before_var.max():.4f}]")
    print(f"after BN: max |mean| = {after_mean.abs().max():.3e}, "
          f"variance in [{after_var.min():.6f}, {after_var.max():.6f}]")
    diffs = {"output": (y - y_torch).abs().max().item(),
             "running_mean": (bn_normkit.running_mean - bn_torch.running_mean).abs().max().item(),
             "running_var": (bn_normkit.running_var - bn_torch.running_var).abs().max().item()}
    print("max |normkit - torch.nn|: " + ", ".join(f"{k} {v:.3e}" for k, v in diffs.items()))

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    ax = axes[0]
    bins = 60
    ax.hist(h.flatten().numpy(), bins=bins, alpha=0.6, density=True, label="before BN (pre-activations)")
    ax.hist(y.flatten().numpy(), bins=bins, alpha=0.6, density=True, label="after normkit BatchNorm1d")
    ax.set_title("all activations of the layer")
    ax.set_xlabel("value")
    ax.legend(fontsize=8)
    feats = torch.arange(50)
    for ax, b, a, what, target in ((axes[1], before_mean, after_mean, "mean", 0.0),
                                   (axes[2], before_var, after_var, "variance (biased)", 1.0)):
        ax.bar(feats - 0.2, b.numpy(), width=0.4, label="before BN")
        ax.bar(feats + 0.2, a.numpy(), width=0.4, label="after BN")
        ax.axhline(target, color="k", lw=0.8, ls="--")
        ax.set_title(f"per-feature {what} over the batch")
        ax.set_xlabel("feature")
        ax.legend(fontsize=8)
    fig.suptitle(f"Linear(100, 50) -> BatchNorm1d(50), batch of {batch}; "
                 f"max |normkit - torch.nn| = {diffs['output']:.1e}", fontsize=10)
    fig.tight_layout()
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "bn_activations.png"
    fig.savefig(path, dpi=80)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
