"""`python -m analyses.<name>` entry point shared by every analysis module."""

from __future__ import annotations

import sys


def main(analysis_name: str) -> None:
    """Run `workbench run <analysis_name> <args>` with this process's arguments."""
    from workbench.cli import main as cli_main

    sys.exit(cli_main(["run", analysis_name, *sys.argv[1:]]))
