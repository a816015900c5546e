"""``python -m moeflow.cli``: the ``moeflow`` command."""

import sys

from moeflow.cli import main

sys.exit(main())
