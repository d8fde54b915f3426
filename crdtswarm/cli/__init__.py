"""The ``crdtswarm`` command line (click + rich).

Each command lives in its own module and registers itself on the `cli` group in
`crdtswarm.cli.app`; `main` runs the group and turns every expected failure into
one line on stderr and a non-zero exit status (a traceback only with ``--debug``).
"""

from crdtswarm.cli.app import main

__all__ = ["main"]
