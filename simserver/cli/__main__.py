"""``python -m simserver.cli``: the same as the ``simserver`` console script."""

import sys

from simserver.cli import main

sys.exit(main())
