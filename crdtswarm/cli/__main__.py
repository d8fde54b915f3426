"""``python -m crdtswarm.cli``: the same as the ``crdtswarm`` script."""

import sys

from crdtswarm.cli.app import main

sys.exit(main())
