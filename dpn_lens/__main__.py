"""``python -m dpn_lens`` is the ``dpn-lens`` command."""

import sys

from dpn_lens.cli import main

sys.exit(main())
