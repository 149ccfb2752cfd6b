"""`python -m mc_export`: the same CLI as the installed console script (see cli.py)."""

import sys

from metacanvas_deploy.mc_export.cli import main

if __name__ == "__main__":
    sys.exit(main())
