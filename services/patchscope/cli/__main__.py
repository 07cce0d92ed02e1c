"""`python -m patchscope.cli`: the same as the `patchscope` console script."""

import sys

from patchscope.cli import main

sys.exit(main())
