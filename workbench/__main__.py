"""`python -m workbench ...` is the `workbench` command (and what `torchrun -m workbench` runs)."""

import sys

from workbench.cli import main

sys.exit(main())
