"""The TensorFlow idioms on NumPy: normkit.moments + normkit.batch_normalization, and the Keras-style layer.

    python examples/tf_idioms.py [--calls 300] [--out examples/figures] [--quick]

On the documents' dense example (a batch of 6 rows x 10 features, statistics per feature over the batch:
``tf.nn.moments(data, [0])``), the two primitives and ``normkit.BatchNormalization(momentum=0.99, epsilon=1e-3)``
in training mode give the same output. Every training call of the layer updates its moving averages
(``moving = moving * 0.99 + batch * 0.01``, biased batch variance): they are printed after each call and checked
against that formula, so TensorFlow's UPDATE_OPS pitfall (training without running the update ops) cannot happen.
Inference (``training=False``) then normalizes with the moving averages. Writes tf_idioms.png to --out.
"""

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no screen
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

import normkit  # noqa: E402

DEFAULT_OUT = Path(__file__).resolve().parent / "figures"
N, UNITS = 6, 10
SHOW = 3  # features printed per call


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=300, help="training calls of the layer (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="directory for the PNG (default: %(default)s)")
    parser.add_argument("--quick", action="store_true", help="20 training calls (seconds; for the tests)")
    args = parser.parse_args()
    calls = 20 if args.quick else args.calls

    rng = np.random.default_rng(0)
    # the batches: rows of a dense layer's output w*x, each feature with its own mean and spread
    true_mean = rng.uniform(-2.0, 2.0, UNITS)
    true_std = rng.uniform(0.5, 2.0, UNITS)
    batches = [(true_mean + true_std * rng.standard_normal((N, UNITS))).astype(np.float32) for _ in range(calls)]
    data = batches[0]

    # 1. tf.nn.moments + tf.nn.batch_normalization
    scale2, beta2 = np.ones(UNITS, np.float32), np.zeros(UNITS, np.float32)
    batch_mean, batch_var = normkit.moments(data, [0])
    y_primitives = normkit.batch_normalization(data, batch_mean, batch_var, beta2, scale2, variance_epsilon=1e-3)

    # 2. tf.layers.batch_normalization / Keras BatchNormalization, training mode
    layer = normkit.BatchNormalization(axis=-1, momentum=0.99, epsilon=1e-3)
    y_layer = layer(data, training=True)
    print(f"batch of {N} x {UNITS} features, float32; statistics per feature over axis 0")
    print(f"moments: mean[:{SHOW}] = {np.array2string(batch_mean[:SHOW], precision=4)}, "
          f"variance[:{SHOW}] = {np.array2string(batch_var[:SHOW], precision=4)}")
    print(f"training: max |batch_normalization - BatchNormalization| = {np.abs(y_primitives - y_layer).max():.3e}")

    # 3. every training call updates the moving averages; check against the formula
    expected_mean, expected_var = np.zeros(UNITS), np.ones(UNITS)  # Keras's initial values
    history = {"mean": [expected_mean.copy()], "var": [expected_var.copy()]}
    worst = 0.0
    print(f"moving averages after each training call (first {SHOW} features; true means "
          f"{np.array2string(true_mean[:SHOW], precision=3)}):")
    for i, batch in enumerate(batches):
        if i > 0:
            layer(batch, training=True)
        m, v = normkit.moments(batch.astype(np.float64), [0])
        expected_mean = expected_mean * 0.99 + m * 0.01
        expected_var = expected_var * 0.99 + v * 0.01
        worst = max(worst, np.abs(layer.moving_mean - expected_mean).max(),
                    np.abs(layer.moving_variance - expected_var).max())
        history["mean"].append(layer.moving_mean.astype(np.float64).copy())
        history["var"].append(layer.moving_variance.astype(np.float64).copy())
        print(f"  call {i + 1:4d}: moving_mean {np.array2string(layer.moving_mean[:SHOW], precision=5)}  "
              f"moving_variance {np.array2string(layer.moving_variance[:SHOW], precision=5)}")
    print(f"moving averages vs moving * 0.99 + batch * 0.01 over {calls} calls: max |difference| = {worst:.3e}")

    # 4. inference: the moving averages, not the batch's statistics
    y_infer = layer(data, training=False)
    y_ref = normkit.batch_normalization(data, layer.moving_mean, layer.moving_variance, layer.beta, layer.gamma,
                                        variance_epsilon=1e-3)
    print(f"inference: max |BatchNormalization(training=False) - batch_normalization(moving stats)| = "
          f"{np.abs(y_infer - y_ref).max():.3e}")

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    steps = np.arange(calls + 1)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, key, target, title in ((axes[0], "mean", true_mean, "moving_mean"),
                                   (axes[1], "var", true_std ** 2 * (N - 1) / N,
                                    "moving_variance (target: (N-1)/N * true variance)")):
        h = np.array(history[key])
        for f in range(SHOW):
            ax.plot(steps, h[:, f], color=colors[f], label=f"feature {f}")
            ax.axhline(target[f], color=colors[f], ls="--", lw=0.8)
        ax.set_xlabel("training calls")
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=8)
    fig.suptitle("normkit.BatchNormalization(momentum=0.99): the moving averages move on every training call "
                 "(dashed: where they head)", fontsize=10)
    fig.tight_layout()
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "tf_idioms.png"
    fig.savefig(path, dpi=80)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
