"""The ``edm`` command line. Every user error is reported as one line, ``Error: ...``, with a non-zero exit:
2 for a bad option (usage), 1 for a bad file or value found later, 128 + N for signal N (130 for Ctrl-C)."""

from __future__ import annotations

import os
import re
import signal
import sys
import threading
import warnings

import click

from ..errors import CheckpointWarning, EDMToolkitError

_MAX_MESSAGE = 1000  # characters of an error line: a hostile value echoed back must not flood the terminal


class Terminated(KeyboardInterrupt):
    """SIGTERM (or SIGHUP), raised where the process stands, so that it stops as at Ctrl-C: temporary files are
    removed, no half-written output stays, and the exit status is 128 + the signal's number."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _raise_terminated(signum, frame):
    raise Terminated(signum)


class _Group(click.Group):
    """A click group whose errors are one line: the problem and the fix, never a traceback or usage dump.

    An exception that is no user error (a bug) is one line too, naming its type; EDM_TOOLKIT_DEBUG=1 shows the
    traceback instead.
    """

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        previous = _install_signal_handlers()
        try:
            with warnings.catch_warnings():
                warnings.showwarning = _warning_printer(warnings.showwarning)
                result = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.exceptions.Abort as exc:  # click's form of KeyboardInterrupt, the original as its cause
            if isinstance(exc.__cause__, Terminated):
                _fail(f"terminated by signal {exc.__cause__.signum}", 128 + exc.__cause__.signum)
            _fail("interrupted", 130)
        except click.ClickException as exc:
            hint = f" (see '{exc.ctx.command_path} --help')" if getattr(exc, "ctx", None) else ""
            _fail(exc.format_message() + hint, exc.exit_code)
        except EDMToolkitError as exc:
            _fail(str(exc), 1)
        except Terminated as exc:
            _fail(f"terminated by signal {exc.signum}", 128 + exc.signum)
        except KeyboardInterrupt:
            _fail("interrupted", 130)
        except OSError as exc:
            _fail(_os_error(exc), 1)
        except MemoryError:
            _fail("out of memory; use a smaller --batch or fewer images per run", 1)
        except Exception as exc:
            if os.environ.get("EDM_TOOLKIT_DEBUG"):
                raise
            _fail(f"internal error ({type(exc).__name__}: {exc}); this is a bug, please report it (set "
                  "EDM_TOOLKIT_DEBUG=1 to see where it happened)", 1)
        finally:
            _restore_signal_handlers(previous)
        code = result if isinstance(result, int) else 0
        if standalone_mode:
            sys.exit(code)
        return code


def _fail(message: str, code: int):
    one_line = re.sub(r"\s+", " ", message).strip()
    if len(one_line) > _MAX_MESSAGE:
        one_line = one_line[: _MAX_MESSAGE - 3] + "..."
    # Undecodable bytes of a file name (surrogate escapes) are shown as \xNN instead of failing to print.
    click.echo(f"Error: {one_line}".encode("utf-8", "backslashreplace").decode("utf-8"), err=True)
    sys.exit(code)


def _warning_printer(show_other):
    """Prints a CheckpointWarning as one ``Warning: ...`` line; other warnings as Python shows them."""
    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, CheckpointWarning):
            one_line = re.sub(r"\s+", " ", str(message)).strip()
            click.echo(f"Warning: {one_line}", err=True)
        else:
            show_other(message, category, filename, lineno, file, line)

    return show


def _os_error(exc: OSError) -> str:
    reason = exc.strerror or str(exc)
    names = [repr(os.fsdecode(n)) for n in (exc.filename, exc.filename2) if n is not None]
    return f"{reason}: {' -> '.join(names)}" if names else reason


def _install_signal_handlers() -> dict:
    """SIGTERM and SIGHUP stop the command as SIGINT does, where nobody else set a handler (only the main thread
    may set them). Returns the previous handlers."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    previous = {}
    for name in ("SIGTERM", "SIGHUP"):
        signum = getattr(signal, name, None)
        if signum is not None and signal.getsignal(signum) == signal.SIG_DFL:
            previous[signum] = signal.signal(signum, _raise_terminated)
    return previous


def _restore_signal_handlers(previous: dict) -> None:
    for signum, handler in previous.items():
        signal.signal(signum, handler)


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
