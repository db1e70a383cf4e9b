"""``python -m sglang_dflash``: the ``sglang-dflash`` command."""

import sys

from .cli import main

sys.exit(main())
