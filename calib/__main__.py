"""`python -m calib`: the same CLI as the installed console script (see cli.py)."""

import sys

from metacanvas_deploy.calib.cli import main

if __name__ == "__main__":
    sys.exit(main())
