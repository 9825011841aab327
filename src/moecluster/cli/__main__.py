"""`python -m moecluster.cli ...`: how launchers start every rank (same as the `moecluster` script)."""

import sys

from moecluster.cli import main

sys.exit(main())
