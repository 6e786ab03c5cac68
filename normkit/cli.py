"""The ``normkit`` command line: a thin click wrapper over library functions."""

from __future__ import annotations

import click

import normkit
from normkit import registry


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
    click.echo(f"dispatch order: {', '.join(registry.get_backend_order())}")


@main.command("check")
@click.argument("backend")
@click.option("--op", "ops", multiple=True, help="Only this op (repeatable; aliases such as gn work).")
@click.option("--dtype", "dtypes", multiple=True, type=click.Choice(["float32", "float64"]), help="Only this dtype.")
@click.option("--quick", is_flag=True, help="A smaller set of cases.")
@click.option("--all-failures", is_flag=True, help="Print every failure, not the first 40.")
def check_command(backend: str, ops: tuple[str, ...], dtypes: tuple[str, ...], quick: bool,
                  all_failures: bool) -> None:
    """Run BACKEND's kernels against the reference on the hard cases (the conformance kit); exit 1 on failure."""
    from normkit import testing

    try:
        op_names = [normkit.get(op).name for op in ops] or None
        report = testing.check_backend(backend, ops=op_names, dtypes=list(dtypes) or None, quick=quick)
    except ValueError as exc:  # unknown op or backend
        raise click.UsageError(str(exc)) from None
    click.echo(report.format(limit=None if all_failures else 40))
    if report:
        raise SystemExit(1)
