"""The ``normkit`` command line: a thin click wrapper over library functions."""

from __future__ import annotations

import os
import warnings

import click

import normkit
from normkit import check_process, registry
from normkit.contract import DTYPES


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(normkit.__version__, prog_name="normkit")
def main() -> None:
    """Fast, correct normalization kernels: list backends, benchmark them, check plugins."""


@main.command("list")
def list_command() -> None:
    """Installed backends in dispatch order: what each implements, and which failed to load."""
    rows = registry.list_backends(load=True)
    for row in rows:
        origin = "built-in" if row.builtin else (f"plugin from {row.package}" if row.package else "run-time")
        click.echo(f"{row.name}  [{origin}]  {row.status}")
        if row.description:
            click.echo(f"    {row.description}")
        for key, value in row.info.items():
            click.echo(f"    {key}: {value}")
        if row.error:
            click.echo(f"    error: {row.error}")
            continue
        ops: dict[str, dict[str, list[str]]] = {}
        for op, direction, dtype in row.implements:
            ops.setdefault(op, {}).setdefault(direction, []).append(dtype)
        for op, directions in ops.items():
            parts = [f"{d} ({', '.join(dts)})" for d, dts in directions.items()]
            click.echo(f"    {op}: {'; '.join(parts)}")
        for label, keys in (("channels-last", row.channels_last), ("by address", row.addresses)):
            directions: dict[str, dict[str, None]] = {}
            dtypes: dict[str, dict[str, None]] = {}
            for op, direction, dtype, _kind in keys:
                directions.setdefault(op, {})[direction] = None
                dtypes.setdefault(op, {})[dtype] = None
            for op, names in directions.items():
                click.echo(f"    {op} {label} ({', '.join(dtypes[op])}): {', '.join(names)}")
    failed = {row.name for row in rows if row.error}  # (the order names them; dispatch skips them)
    click.echo(f"dispatch order: {', '.join(registry.get_backend_order())}"
               + (f" ({', '.join(sorted(failed))}: failed to load, skipped)" if failed else ""))


@main.command("check")
@click.argument("backend")
@click.option("--op", "ops", multiple=True, help="Only this op (repeatable; aliases such as gn work; all: every op).")
@click.option("--dtype", "dtypes", multiple=True, type=click.Choice(DTYPES), help="Only this dtype.")
@click.option("--layout", "layouts", multiple=True, type=click.Choice(["nchw", "nhwc"]),
              help="Only this layout (nhwc: the channels-last kernels the backend declares).")
@click.option("--quick", is_flag=True, help="A smaller set of cases.")
@click.option("--all-failures", is_flag=True, help="Print every failure, not the first 40.")
@click.option("--timeout", type=float, default=300.0, show_default=True, callback=check_process.timeout_option,
              help="Seconds one case may take (a first call that compiles included) before the check stops there; "
                   "inf: no limit.")
def check_command(backend: str, ops: tuple[str, ...], dtypes: tuple[str, ...], layouts: tuple[str, ...],
                  quick: bool, all_failures: bool, timeout: float) -> None:
    """Run BACKEND's kernels against the reference on the hard cases (the conformance kit); exit 1 on failure.
    An installed backend runs in a child process (normkit.check_process): a crash or a hang is a failure too."""
    from normkit import testing

    child = check_process.in_child()
    with warnings.catch_warnings(record=True) as scanned:  # (the child scans the plugins again, and says it)
        try:
            op_names = None if "all" in ops else [normkit.get(op).name for op in ops] or None
            installed = registry._entry(backend).entry_point is not None
        except ValueError as exc:  # unknown op or backend
            raise click.UsageError(str(exc)) from None
    if installed and child is None:
        argv = [backend, *(f"--op={o}" for o in ops), *(f"--dtype={d}" for d in dtypes),
                *(f"--layout={layout}" for layout in layouts), *["--quick"] * quick, *["--all-failures"] * all_failures,
                f"--timeout={timeout!r}"]
        code = check_process.run(backend, argv, timeout)
        if code:
            raise SystemExit(code)
        return
    for w in scanned:
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    try:
        report = testing.check_backend(backend, ops=op_names, dtypes=list(dtypes) or None, quick=quick,
                                       layouts=list(layouts) or None,
                                       **({} if child is None else dict(progress=child.progress, crashed=child.crashed,
                                                                        only=child.only)))
    except ValueError as exc:  # unknown op or backend
        raise click.UsageError(str(exc)) from None
    click.echo(report.format(limit=None if all_failures else 40))
    if child is not None:
        child.finish(1 if report else 0)
    if report:
        raise SystemExit(1)


def _op_choices() -> list[str]:
    return ["all"] + [n for op in normkit.list_ops() for n in (op, *normkit.get(op).aliases)]


def _case_sets() -> list[str]:
    from normkit.cases import CASE_SETS

    return list(CASE_SETS)


def _shape_option(ctx, param, value):
    from normkit.cases import parse_shape

    try:
        return None if value is None else parse_shape(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def _output_option(ctx, param, value):
    """A file to write after the benchmark: its directory must exist and be writable now, not after the run."""
    if value == "":
        raise click.BadParameter("an empty path")
    if value is not None:
        folder = os.path.dirname(os.path.abspath(value))
        if not os.path.isdir(folder):
            raise click.BadParameter(f"directory {folder!r} does not exist")
        if not os.access(folder, os.W_OK) or (os.path.exists(value) and not os.access(value, os.W_OK)):
            raise click.BadParameter(f"{value!r} is not writable")
    return value


def _backend_option(ctx, param, values):
    from normkit import bench

    try:
        return bench._check_backends(values) if values else None
    except registry.UnknownBackendError as exc:
        raise click.BadParameter(str(exc)) from None


@main.command("bench")
@click.option("--op", type=click.Choice(_op_choices(), case_sensitive=False), default="all", show_default=True,
              help="Op name or alias, or all.")
@click.option("--shape", callback=_shape_option, metavar="N,C,...",
              help="Input shape, e.g. 8,256,56,56 (the default); layernorm normalizes over all dims but the first.")
@click.option("--groups", type=click.IntRange(min=1), help="GroupNorm groups [default: 32, or the largest divisor "
              "of C below 32].")
@click.option("--cases", "case_set", type=click.Choice(_case_sets()),
              help="A named case set from normkit.cases instead of --shape/--groups (filtered by --op): "
                   "'reference' is the README's performance table.")
@click.option("--dtype", type=click.Choice(DTYPES), help="[default: float32, or the case set's]; bfloat16 and "
              "float16 store the data in 16 bits, with float32 weight and bias (PyTorch's baseline too)")
@click.option("--backend", "backends", multiple=True, callback=_backend_option,
              help="Repeatable. [default: every installed backend except 'reference', the pure-NumPy oracle, which "
                   "is slow; name it to include it]")
@click.option("--direction", type=click.Choice(["forward", "backward", "both"]), default="both", show_default=True,
              help="Training forward, backward (with the forward's saved statistics), or both.")
@click.option("--threads", type=click.IntRange(min=1), help="Threads for every backend and PyTorch "
              "[default: all CPUs this process may use].")
@click.option("--repeat", type=click.IntRange(min=1), help="Exactly this many interleaved rounds (overrides "
              "--min-time).")
@click.option("--min-time", type=click.FloatRange(min=0), default=1.0, show_default=True,
              help="Seconds of interleaved rounds per case and direction (at least 5 rounds, at most 1000).")
@click.option("--no-torch", is_flag=True, help="Leave out the PyTorch baseline.")
@click.option("--compile", "compiled", is_flag=True,
              help="Add torch.compile'd torch.nn.functional calls (inductor's C++; needs PyTorch and a C++ compiler; "
                   "compilation is not timed) as a second peer, and each backend's ratio to the faster of the two.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), callback=_output_option,
              help="Also write the results here as JSON.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), callback=_output_option,
              help="Also draw GB/s against the copy ceiling here (.png, .svg, .pdf; needs normkit[plot]).")
@click.option("--model", metavar="NAME", help="Instead of the kernels, time a training and an inference step of a "
              "model from normkit.torch.models (resnet, unet, transformer, transformer_rms, or all) with torch.nn's "
              "norm layers against the same model converted to normkit's (needs PyTorch; takes --backend, --threads).")
@click.option("--layout", type=click.Choice(["nchw", "nhwc"]), default="nchw", show_default=True,
              help="nhwc: the channels-last kernels (batchnorm, groupnorm, instancenorm) against PyTorch on "
                   "channels-last tensors, each backend's NCHW kernel alongside.")
@click.option("--channels-last", "channels_last", is_flag=True, help="With --model: the model and its input in "
              "torch.channels_last.")
@click.option("--quick", is_flag=True, help="With --model: the models' small sizes.")
@click.option("--fuse", is_flag=True, help="With --model: convert(model, fuse=True), norm layers fused with the "
              "activation that follows them.")
@click.option("--steps", type=click.IntRange(min=1), help="With --model: timed steps per mode [default: 20].")
@click.option("--autocast", type=click.Choice(["bfloat16", "float16"]), help="With --model: run the forwards under "
              "torch.autocast('cpu', dtype=...) (mixed precision: 16-bit convolutions and norm-layer inputs).")
@click.option("--control", is_flag=True, help="With --model: also time a second torch.nn copy in the same rounds; "
              "its ratio to the first (torch/torch) is what noise alone makes of two identical models.")
def bench_command(op, shape, groups, case_set, dtype, backends, direction, threads, repeat, min_time, no_torch,
                  compiled, json_path, plot_path, model, layout, channels_last, quick, steps, autocast, fuse,
                  control) -> None:
    """Time the training forward and backward of every selected backend against PyTorch's own CPU kernels and
    against a copy and a read of the same bytes on as many threads (the ceiling), interleaved call by call; print
    a table.
    With --model, time whole models instead (normkit.torch.benchmark)."""
    import sys

    from normkit import bench, cases

    if model is not None:
        _bench_models(model, quick, steps, backends, threads, autocast, channels_last, fuse, control)
        return
    if quick or steps is not None or autocast is not None or channels_last or fuse or control:
        raise click.UsageError("--quick, --steps, --autocast, --channels-last, --fuse and --control apply to --model "
                               "only")
    if plot_path:
        from normkit import bench_plot

        try:
            bench_plot.check_format(plot_path)
        except ImportError as exc:
            raise click.UsageError(str(exc)) from None
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint=["--plot"]) from None
    if case_set and (shape or groups):
        raise click.UsageError("--cases fixes the shapes and groups; drop --shape/--groups, or drop --cases")
    try:
        cases.select_cases(op, shape=shape, groups=groups, dtype=dtype, cases=case_set)
        if threads is not None:
            registry.set_num_threads(threads)
    except ValueError as exc:
        hint = ("--groups" if "groups" in str(exc) else "--threads" if "threads" in str(exc)
                else "--cases" if case_set else "--shape")
        raise click.BadParameter(str(exc), param_hint=[hint]) from None

    with click.progressbar(length=1000, label="benchmarking", file=sys.stderr, show_eta=False,
                           item_show_func=lambda s: s) as bar:
        def progress(done, total, label):
            pos = int(1000 * done / total)
            if pos > bar.pos:
                bar.update(pos - bar.pos, label)

        try:
            result = bench.bench(op, shape=shape, groups=groups, dtype=dtype, cases=case_set, backends=backends,
                                 direction=direction, threads=threads, repeat=repeat, min_time=min_time,
                                 baseline=not no_torch, compile=compiled, layout=layout, progress=progress)
        except ValueError as exc:  # e.g. --layout nhwc with no case that has a layout
            raise click.UsageError(str(exc)) from None
        except MemoryError:
            raise click.ClickException("the arrays of these shapes do not fit in this machine's memory; try a "
                                       "smaller --shape") from None
        except bench.BenchError as exc:
            raise click.ClickException(f"{exc}\ninstalled backends: {', '.join(registry.get_backend_order())}; "
                                       f"try --backend reference") from None
    click.echo(result.format())
    if json_path:
        result.write_json(json_path)
        click.echo(f"wrote {json_path}")
    if plot_path:
        bench_plot.plot(result, plot_path)
        click.echo(f"wrote {plot_path}")


def _bench_models(name: str, quick: bool, steps: int | None, backends: list[str] | None, threads: int | None,
                  autocast: str | None = None, channels_last: bool = False, fuse: bool = False,
                  control: bool = False) -> None:
    """``normkit bench --model NAME``: normkit.torch.benchmark on the models of normkit.torch.models
    (``channels_last``: the model and its 4-D inputs in torch.channels_last; ``fuse``: convert(fuse=True);
    ``control``: a second torch.nn copy timed too)."""
    ctx = click.get_current_context()
    kernel_only = [p for p in ctx.command.params if p.name not in ("model", "quick", "steps", "backends", "threads",
                                                                    "autocast", "channels_last", "fuse", "control")
                   and ctx.get_parameter_source(p.name) is not click.core.ParameterSource.DEFAULT]
    if kernel_only:
        raise click.UsageError(f"--model times whole models; drop {', '.join(p.opts[0] for p in kernel_only)}")
    if backends and len(backends) > 1:
        raise click.BadParameter("with --model, give at most one backend", param_hint=["--backend"])
    try:
        import torch

        from normkit.torch.model_bench import ModelMismatchError, benchmark, format_summary
        from normkit.torch.models import MODELS
    except ImportError as exc:
        raise click.UsageError(f"--model needs PyTorch: pip install 'normkit[torch]' ({exc})") from None
    names = list(MODELS) if name.lower() == "all" else [name.lower()]
    if names[0] not in MODELS:
        raise click.BadParameter(f"unknown model {name!r}; choose from {', '.join(MODELS)}, all",
                                 param_hint=["--model"])
    torch_threads = torch.get_num_threads()
    if threads is not None:
        try:
            registry.set_num_threads(threads)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint=["--threads"]) from None
        torch.set_num_threads(threads)
    try:
        results, untimed = {}, []
        for n in names:
            model, inputs = MODELS[n](quick=quick)
            if channels_last:
                model = model.to(memory_format=torch.channels_last)
                inputs = tuple(t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t
                               for t in (inputs if isinstance(inputs, tuple) else (inputs,)))
            if results:
                click.echo()
            click.echo(f"[{n}{' --quick' if quick else ''}{' --channels-last' if channels_last else ''}"
                       f"{' --fuse' if fuse else ''}]")
            try:
                results[n] = benchmark(model, inputs, steps=20 if steps is None else steps,
                                       backend=backends[0] if backends else None, autocast=autocast, fuse=fuse,
                                       control=control, file=None)
            except ModelMismatchError as exc:
                raise click.ClickException(str(exc)) from None
            except (ValueError, TypeError) as exc:  # the registry's: a pinned backend without this model's op,
                click.echo(f"not timed: {exc}")     # dtype or direction; the other models still run
                untimed.append(n)
                continue
            click.echo(results[n].format())
    finally:
        torch.set_num_threads(torch_threads)
    if len(results) > 1:
        click.echo()
        click.echo(format_summary(results))
    if untimed:
        raise click.ClickException(f"not timed: {', '.join(untimed)} (above)")


if __name__ == "__main__":  # python -m normkit.cli, as the console script
    main()
