"""`python -m headscreen`: the same command line as the `headscreen` script."""

import sys

from headscreen.daemon.cli import main

if __name__ == "__main__":
    sys.exit(main())
