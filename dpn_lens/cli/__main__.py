"""``python -m dpn_lens.cli`` is the ``dpn-lens`` command."""

import sys

from dpn_lens.cli.app import main

sys.exit(main())
