"""Train the seeds' 7-layer fully connected network with BatchNorm on and off, in PyTorch and in pure NumPy.

    python examples/train_bn.py [--framework torch|numpy|both] [--quick] [--epochs 20] [--out examples/figures]

The network of the seed documents (784-1024-512-512-512-256-64-10, leaky_relu, BN before each activation, Adam,
batch 64), on scikit-learn's bundled 8x8 digits (1797 images, so 64 inputs; no download) with a fixed stratified
train/test split. Each framework trains four runs from the same seed: BN on and off at the base learning rate, and
BN on and off at a larger one. It prints the test accuracy and loss per epoch and the final numbers, and writes
PNG figures to --out: accuracy and loss per epoch, and histograms of each hidden layer's pre-activation (the input
of leaky_relu: after BN when BN is on) on the test set at the end of training, at the base learning rate.

- torch: torch.nn layers with normkit.torch.BatchNorm1d when BN is on, torch.optim.Adam.
- numpy: a hand-written MLP (matrix products, leaky_relu, softmax cross-entropy, Adam) whose BatchNorm layers
  are normkit's NumPy frontend: normkit.get("bn").forward / .backward, per-layer running statistics, inference
  mode (running statistics) for the test set.

Both linear layers start as torch.nn.Linear does (uniform in +-1/sqrt(fan_in)); a linear layer followed by BN has no
bias (BN's beta replaces it). --quick: the network at a quarter of the width, 3 epochs, seconds on one core.
Everything runs single-threaded (--threads) so that the numbers do not depend on the machine's core count.
"""

import argparse
import os
import sys
import time

LEAK = 0.01  # torch.nn.functional.leaky_relu's default negative slope


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--framework", choices=["torch", "numpy", "both"], default="both")
    p.add_argument("--quick", action="store_true", help="quarter-width network, 3 epochs")
    p.add_argument("--epochs", type=int, default=None, help="default: 20 (3 with --quick)")
    p.add_argument("--lr", type=float, default=1e-3, help="base learning rate (Adam)")
    p.add_argument("--lr-large", type=float, default=1e-2, help="the larger learning rate")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "figures"))
    p.add_argument("--dpi", type=int, default=80)
    args = p.parse_args(argv)
    if args.epochs is None:
        args.epochs = 3 if args.quick else 20
    return args


ARGS = parse_args()
# BLAS thread counts are read when NumPy/torch load, so set them first, overriding the environment: with a fixed
# thread count (default one) the numbers do not depend on the machine (matrix products sum in a different order
# with more threads; normkit's own results never depend on its thread count)
for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[var] = str(ARGS.threads)

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from sklearn.model_selection import train_test_split  # noqa: E402

import normkit  # noqa: E402

FULL_SIZES = [64, 1024, 512, 512, 512, 256, 64, 10]
QUICK_SIZES = [64, 256, 128, 128, 128, 64, 16, 10]


def load_data(seed):
    """Digits scaled to [0, 1], a fixed stratified 75/25 split."""
    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    return train_test_split(x, y.astype(np.int64), test_size=0.25, random_state=seed, stratify=y)


def init_weights(sizes, rng):
    """torch.nn.Linear's default initialization: weight and bias uniform in +-1/sqrt(fan_in)."""
    out = []
    for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
        bound = 1.0 / np.sqrt(fan_in)
        out.append((rng.uniform(-bound, bound, (fan_in, fan_out)).astype(np.float32),
                    rng.uniform(-bound, bound, fan_out).astype(np.float32)))
    return out


def batches(n, batch, rng):
    order = rng.permutation(n)
    return [order[i:i + batch] for i in range(0, n, batch)]


# ---------------------------------------------------------------- pure NumPy, with normkit's BatchNorm
class NumpyMLP:
    def __init__(self, sizes, bn, rng):
        self.bn, self.op = bn, normkit.get("bn")
        self.W, self.b, self.g, self.beta, self.rm, self.rv = [], [], [], [], [], []
        for i, (w, b) in enumerate(init_weights(sizes, rng)):
            self.W.append(w)
            hidden = i < len(sizes) - 2
            self.b.append(None if bn and hidden else b)
            if bn and hidden:
                c = sizes[i + 1]
                self.g.append(np.ones(c, np.float32))
                self.beta.append(np.zeros(c, np.float32))
                self.rm.append(np.zeros(c, np.float32))
                self.rv.append(np.ones(c, np.float32))

    def params(self):
        return [p for p in self.W + self.b + self.g + self.beta if p is not None]

    def forward(self, x, training):
        """Logits, and what backward needs; self.pre holds each hidden layer's pre-activation."""
        h, cache, self.pre = x, [], []
        for i, w in enumerate(self.W):
            z = h @ w
            if self.b[i] is not None:
                z = z + self.b[i]
            if i == len(self.W) - 1:
                cache.append((h, None, None))
                return z, cache
            saved = None
            if self.bn:
                a, saved = self.op.forward(z, self.rm[i], self.rv[i], weight=self.g[i], bias=self.beta[i],
                                           training=training, momentum=0.1, eps=1e-5)
            else:
                a = z
            self.pre.append(a)
            cache.append((h, z, saved))
            h = np.where(a > 0, a, LEAK * a)

    def backward(self, dlogits, cache):
        """Gradients in the order of params()."""
        n = len(self.W)
        dW, db, dg, dbeta = [None] * n, [None] * n, [None] * (n - 1), [None] * (n - 1)
        dh = dlogits
        for i in reversed(range(n)):
            h, z, saved = cache[i]
            if i < n - 1:  # through leaky_relu, then BN
                a = self.pre[i]
                da = dh * np.where(a > 0, 1.0, LEAK).astype(np.float32)
                if self.bn:
                    dz, dg[i], dbeta[i] = self.op.backward(da, z, saved, self.rm[i], self.rv[i], weight=self.g[i],
                                                           bias=self.beta[i], training=True)
                else:
                    dz = da
            else:
                dz = dh
            dW[i] = h.T @ dz
            if self.b[i] is not None:
                db[i] = dz.sum(0)
            dh = dz @ self.W[i].T
        return [d for d in dW + db + (dg + dbeta if self.bn else []) if d is not None]


def softmax_xent(logits, y):
    """Mean cross-entropy and its gradient with respect to the logits."""
    z = logits - logits.max(1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(1, keepdims=True))
    loss = -logp[np.arange(len(y)), y].mean()
    grad = np.exp(logp)
    grad[np.arange(len(y)), y] -= 1
    return float(loss), (grad / len(y)).astype(np.float32)


class Adam:
    def __init__(self, params, lr, b1=0.9, b2=0.999, eps=1e-8):
        self.p, self.lr, self.b1, self.b2, self.eps, self.t = params, lr, b1, b2, eps, 0
        self.m = [np.zeros_like(p) for p in params]
        self.v = [np.zeros_like(p) for p in params]

    def step(self, grads):
        self.t += 1
        c1, c2 = 1 - self.b1 ** self.t, 1 - self.b2 ** self.t
        for p, g, m, v in zip(self.p, grads, self.m, self.v):
            m *= self.b1
            m += (1 - self.b1) * g
            v *= self.b2
            v += (1 - self.b2) * g * g
            p -= (self.lr * (m / c1) / (np.sqrt(v / c2) + self.eps)).astype(p.dtype)  # in place


def train_numpy(data, sizes, bn, lr, args):
    xtr, xte, ytr, yte = data
    rng = np.random.default_rng(args.seed)
    net = NumpyMLP(sizes, bn, rng)
    opt = Adam(net.params(), lr)
    hist = {"acc": [], "loss": []}
    for _ in range(args.epochs):
        for idx in batches(len(xtr), args.batch, rng):
            logits, cache = net.forward(xtr[idx], training=True)
            _, dlogits = softmax_xent(logits, ytr[idx])
            opt.step(net.backward(dlogits, cache))
        with np.errstate(all="ignore"):
            logits, _ = net.forward(xte, training=False)
            loss, _ = softmax_xent(logits, yte)
        hist["acc"].append(float((logits.argmax(1) == yte).mean()))
        hist["loss"].append(loss)
    hist["pre"] = [p.copy() for p in net.pre]  # test-set pre-activations after the last epoch
    return hist


# ---------------------------------------------------------------- PyTorch, with normkit.torch.BatchNorm1d
def train_torch(data, sizes, bn, lr, args):
    import torch
    from torch import nn

    import normkit.torch as nt

    torch.manual_seed(args.seed)
    xtr, xte, ytr, yte = (torch.from_numpy(a) for a in data)
    rng = np.random.default_rng(args.seed)
    layers = []
    for i, (w, b) in enumerate(init_weights(sizes, rng)):  # the same initial weights as the NumPy version
        hidden = i < len(sizes) - 2
        lin = nn.Linear(*w.shape, bias=not (bn and hidden))
        with torch.no_grad():
            lin.weight.copy_(torch.from_numpy(w.T))
            if lin.bias is not None:
                lin.bias.copy_(torch.from_numpy(b))
        layers.append(lin)
        if hidden:
            layers += ([nt.BatchNorm1d(sizes[i + 1])] if bn else []) + [nn.LeakyReLU(LEAK)]
    model = nn.Sequential(*layers)
    pre = []
    for m in model:
        if isinstance(m, nn.LeakyReLU):
            m.register_forward_hook(lambda mod, inp, out: pre.append(inp[0].detach().numpy().copy()))
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    loss_fn = nn.CrossEntropyLoss()
    hist = {"acc": [], "loss": []}
    for _ in range(args.epochs):
        model.train()
        for idx in batches(len(xtr), args.batch, rng):
            idx = torch.from_numpy(idx)
            opt.zero_grad()
            loss_fn(model(xtr[idx]), ytr[idx]).backward()
            opt.step()
        model.eval()
        pre.clear()
        with torch.no_grad():
            logits = model(xte)
            hist["loss"].append(float(loss_fn(logits, yte)))
        hist["acc"].append(float((logits.argmax(1) == yte).float().mean()))
    hist["pre"] = list(pre)
    return hist


# ---------------------------------------------------------------- figures
def plot_curves(results, fw, args):
    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(10, 3.8))
    epochs = np.arange(1, args.epochs + 1)
    for (bn, lr), h in results.items():
        style = dict(color="C0" if bn else "C3", ls="-" if lr == args.lr else "--",
                     label=f"BN {'on' if bn else 'off'}, lr={lr:g}")
        ax_acc.plot(epochs, h["acc"], marker=".", **style)
        ax_loss.plot(epochs, h["loss"], marker=".", **style)
    ax_acc.set(xlabel="epoch", ylabel="test accuracy", ylim=(0, 1.02))
    ax_loss.set(xlabel="epoch", ylabel="test loss (cross-entropy)", yscale="log")
    ax_acc.legend(loc="lower right")
    for ax in (ax_acc, ax_loss):
        ax.grid(alpha=0.3)
    fig.suptitle(f"{fw}: {'-'.join(map(str, args.sizes))} MLP on sklearn digits, Adam, batch {args.batch}")
    fig.tight_layout()
    path = os.path.join(args.out, f"train_bn_{fw}_curves.png")
    fig.savefig(path, dpi=args.dpi)
    plt.close(fig)
    return path


def plot_hists(results, fw, args):
    on, off = results[(True, args.lr)]["pre"], results[(False, args.lr)]["pre"]
    fig, axes = plt.subplots(2, 3, figsize=(10, 5.2))
    for i, ax in enumerate(axes.flat[:len(on)]):
        a, b = on[i].ravel(), off[i].ravel()
        finite = np.concatenate([a[np.isfinite(a)], b[np.isfinite(b)]])
        lo, hi = np.percentile(finite, [0.5, 99.5]) if finite.size else (-1, 1)
        bins = np.linspace(lo, hi, 60)
        ax.hist(a, bins=bins, density=True, alpha=0.55, color="C0", label="BN on")
        ax.hist(b, bins=bins, density=True, alpha=0.55, color="C3", label="BN off")
        ax.set_title(f"hidden layer {i + 1} ({on[i].shape[1]} units): std {np.nanstd(a):.2g} on, "
                     f"{np.nanstd(b):.2g} off", fontsize=9)
        ax.set_yscale("log")
        ax.tick_params(labelsize=7)
    axes.flat[0].legend(fontsize=8)
    fig.suptitle(f"{fw}: pre-activations (input of leaky_relu; central 99% shown) on the test set after training, "
                 f"lr={args.lr:g}", fontsize=10)
    fig.tight_layout()
    path = os.path.join(args.out, f"train_bn_{fw}_hist.png")
    fig.savefig(path, dpi=args.dpi)
    plt.close(fig)
    return path


def main(args):
    normkit.set_num_threads(args.threads)
    args.sizes = QUICK_SIZES if args.quick else FULL_SIZES
    os.makedirs(args.out, exist_ok=True)
    data = load_data(args.seed)
    print(f"digits: {len(data[0])} train, {len(data[1])} test; network {'-'.join(map(str, args.sizes))}; "
          f"{args.epochs} epochs; batch {args.batch}")
    frameworks = ["torch", "numpy"] if args.framework == "both" else [args.framework]
    for fw in frameworks:
        if fw == "torch":
            import torch
            torch.set_num_threads(args.threads)
        train = train_torch if fw == "torch" else train_numpy
        results = {}
        for lr in (args.lr, args.lr_large):
            for bn in (True, False):
                t0 = time.perf_counter()
                h = train(data, args.sizes, bn, lr, args)
                results[(bn, lr)] = h
                tag = f"{fw:5s} BN {'on ' if bn else 'off'} lr={lr:g}"
                print(f"{tag}: acc " + " ".join(f"{a:.3f}" for a in h["acc"]) +
                      f"  ({time.perf_counter() - t0:.1f} s)")
                print(f"RESULT framework={fw} bn={'on' if bn else 'off'} lr={lr:g} "
                      f"acc={h['acc'][-1]:.4f} loss={h['loss'][-1]:.4f}")
        for path in (plot_curves(results, fw, args), plot_hists(results, fw, args)):
            print(f"wrote {path}")


if __name__ == "__main__":
    main(ARGS)
    sys.exit(0)
