"""``python -m loracore``: the same as the ``loracore`` console command."""

import sys

from loracore.cli import main

sys.exit(main())
