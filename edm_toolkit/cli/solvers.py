"""edm solvers: the registered solvers with their order, cost and options."""

import click

from ..solvers import SOLVERS
from ..solvers.base import solver_options


def nfe_formula(solver) -> str:
    """The network evaluations for N steps as a formula a*N + b (every solver's cost is affine in N)."""
    a = solver.evaluations(20) - solver.evaluations(10)
    a //= 10
    b = solver.evaluations(10) - 10 * a
    head = "N" if a == 1 else f"{a}N"
    return head if b == 0 else f"{head} {'+' if b > 0 else '-'} {abs(b)}"


def option_text(solver, field: str) -> str:
    """KEY=VALUE of one option; lower_order_final also says when the final steps use lower orders."""
    text = f"{field}={getattr(solver, field)!r}"
    return f"{text} [{solver.final_steps()}]" if field == "lower_order_final" else text


@click.command()
def solvers():
    """List the solvers: name, order, network evaluations for N steps, options (set with --solver-opt KEY=VALUE).

    lower_order_final (multistep exponential integrators): whether the last steps to sigma_min use lower orders;
    'reference' follows the method's own reference code, shown in brackets for N steps (final step to 0 included),
    'always' and 'never' override it.
    """
    rows = []
    for name in SOLVERS.names():
        solver = SOLVERS.create(name)
        options = ", ".join(option_text(solver, key) for key in solver_options(solver))
        summary = (type(solver).__doc__ or "").strip().splitlines()[0].split(": ")[0].rstrip(".,:")
        summary = summary if len(summary) <= 70 else summary[:67] + "..."
        cost = nfe_formula(solver) if solver.fixed_cost else f"adaptive (>= {nfe_formula(solver)})"
        rows.append((name, str(getattr(solver, "order", "?")), cost, options or "-", summary))
    widths = [max(len(r[i]) for r in rows + [("name", "order", "NFE", "options", "")]) for i in range(4)]
    click.echo(f"{'name':{widths[0]}}  {'order':{widths[1]}}  {'NFE':{widths[2]}}  {'options':{widths[3]}}  description")
    for row in rows:
        click.echo("  ".join(f"{cell:{width}}" for cell, width in zip(row[:4], widths)) + "  " + row[4])
    click.echo("\nlower_order_final: 'reference' = the method's own code (in brackets), or 'always' / 'never'; "
               "lms, ipndm and deis never lower their final steps.")
