"""`python -m runtime`: the same CLI as the installed console script (see cli.py)."""

import sys

from metacanvas_deploy.runtime.cli import main

if __name__ == "__main__":
    sys.exit(main())
