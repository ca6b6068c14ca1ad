"""`python -m flows.cli`: the pgdr command line, as the `pgdr` entry point runs it."""

import sys

from flows.cli.main import main

sys.exit(main())
