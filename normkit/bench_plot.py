"""``normkit bench --plot``: GB/s of every contender per case and direction, against the copy ceiling.

matplotlib is the optional extra ``plot``; it is imported only here, and only when a plot is asked for.
"""

from __future__ import annotations

import os

from .bench import BenchResult, machine_line, shown_name
from .contract import NHWC

MISSING = "--plot needs matplotlib, which is not installed; install it with: pip install 'normkit[plot]'"


class MissingDependencyError(ImportError):
    pass


def require_matplotlib() -> None:
    """Raise MissingDependencyError with an install hint if matplotlib cannot be imported."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise MissingDependencyError(MISSING) from None


def check_format(path) -> None:
    """ValueError unless matplotlib can write ``path``'s file type (checked before a run, not after it)."""
    require_matplotlib()
    from matplotlib.figure import Figure

    kinds = Figure().canvas.get_supported_filetypes()
    suffix = os.path.splitext(str(path))[1].lower().lstrip(".")
    if suffix not in kinds:
        raise ValueError(f"{path!r}: matplotlib writes {', '.join('.' + k for k in sorted(kinds))}, not "
                         f"{'.' + suffix if suffix else 'a name without an extension'}")


def plot(result: BenchResult, path) -> None:
    """Horizontal bars: one group per case and direction, one bar per backend and PyTorch; the copy of the same
    bytes on as many threads, measured in the same rounds, is the black tick that closes each group (the ceiling of
    a pass that writes), a pure read of them the dotted one."""
    require_matplotlib()
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    # a group with channels-last rows has each backend twice, its channels-last and its NCHW kernel: the table's
    # names tell them apart
    channels_last = {(r.label, r.direction) for r in result.rows if r.layout == NHWC}
    groups: dict[tuple[str, str], dict[str, float]] = {}
    names: dict[str, None] = {}
    for r in result.rows:
        name = shown_name(r, (r.label, r.direction) in channels_last)
        groups.setdefault((r.label, r.direction), {})[name] = r.gb_per_s
        if r.kind not in ("copy", "read"):
            names[name] = None
    names = list(names)
    height = 1.0 / (len(names) + 1)

    fig = Figure(figsize=(9, 1.5 + 0.2 * len(groups) * (len(names) + 1)), layout="constrained")
    ax = fig.add_subplot()
    for j, name in enumerate(names):
        ys = [g + j * height for g, values in enumerate(groups.values()) if name in values]
        xs = [values[name] for values in groups.values() if name in values]
        ax.barh(ys, xs, height=height * 0.9, label=name, color=f"C{j}")
    for g, values in enumerate(groups.values()):
        if "copy" in values:
            span = [g - height / 2, g + (len(names) - 0.5) * height]
            ax.plot([values["copy"]] * 2, span, color="black", linewidth=2.5,
                    label="copy (ceiling)" if g == 0 else None)
        if "read" in values:
            span = [g - height / 2, g + (len(names) - 0.5) * height]
            ax.plot([values["read"]] * 2, span, color="black", linewidth=1.5, linestyle=":",
                    label="read (no stores)" if g == 0 else None)
    ax.set_yticks([g + (len(names) - 1) * height / 2 for g in range(len(groups))])
    ax.set_yticklabels([f"{label}\n{direction}" for label, direction in groups], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("GB/s (bytes that must move / median time)")
    ax.set_xlim(left=0)
    ax.grid(axis="x", alpha=0.3)
    fig.legend(loc="outside lower center", ncols=len(names) + 1, fontsize=8)
    ax.margins(y=0.01)
    ax.set_title("normkit bench: " + machine_line(result.machine).replace(" | ", "\n", 1), fontsize=8)
    fig.savefig(path, dpi=120)
