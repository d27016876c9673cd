"""The ``edm`` command line. Every user error is reported as one line, ``Error: ...``, with a non-zero exit."""

from __future__ import annotations

import re
import sys
import warnings

import click

from ..errors import CheckpointWarning, EDMToolkitError


class _Group(click.Group):
    """A click group whose errors are one line: the problem and the fix, never a traceback or usage dump."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        try:
            with warnings.catch_warnings():
                warnings.showwarning = _warning_printer(warnings.showwarning)
                result = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.exceptions.Abort:
            _fail("interrupted", 130)
        except click.ClickException as exc:
            hint = f" (see '{exc.ctx.command_path} --help')" if getattr(exc, "ctx", None) else ""
            _fail(exc.format_message() + hint, exc.exit_code)
        except EDMToolkitError as exc:
            _fail(str(exc), 1)
        except KeyboardInterrupt:
            _fail("interrupted", 130)
        except OSError as exc:
            _fail(f"{exc.strerror or exc}: {exc.filename}" if exc.filename else str(exc), 1)
        code = result if isinstance(result, int) else 0
        if standalone_mode:
            sys.exit(code)
        return code


def _warning_printer(show_other):
    """Prints a CheckpointWarning as one ``Warning: ...`` line; other warnings as Python shows them."""
    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, CheckpointWarning):
            one_line = re.sub(r"\s+", " ", str(message)).strip()
            click.echo(f"Warning: {one_line}", err=True)
        else:
            show_other(message, category, filename, lineno, file, line)

    return show


def _fail(message: str, code: int):
    one_line = re.sub(r"\s+", " ", message).strip()
    click.echo(f"Error: {one_line}", err=True)
    sys.exit(code)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="edm-toolkit", message="%(prog)s %(version)s")
def main():
    """edm-toolkit: the EDM design space (Karras et al. 2022) as interchangeable components."""


from . import dataset as _dataset  # noqa: E402  (the subcommands)
from . import fid as _fid  # noqa: E402
from . import files as _files  # noqa: E402
from . import generate as _generate  # noqa: E402
from . import nll as _nll  # noqa: E402
from . import phema as _phema  # noqa: E402
from . import presets as _presets  # noqa: E402
from . import solvers as _solvers  # noqa: E402
from . import train as _train  # noqa: E402
from . import train_classifier as _train_classifier  # noqa: E402

main.add_command(_generate.generate)
main.add_command(_presets.presets)
main.add_command(_files.inspect)
main.add_command(_files.convert)
main.add_command(_solvers.solvers)
main.add_command(_dataset.dataset)
main.add_command(_train.train)
main.add_command(_train_classifier.train_classifier)
main.add_command(_phema.phema)
main.add_command(_fid.fid)
main.add_command(_nll.nll)
