"""`python -m loadtests.bench`: see loadtests/bench/cli.py."""

import sys

from loadtests.bench.cli import main

sys.exit(main())
