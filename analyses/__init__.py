"""The studies, one module each, found by the `workbench` command through the `workbench.analyses`
entry points in pyproject.toml (this package imports nothing, so `python -m analyses.<name>` runs
each module once).

Each module is runnable: `python -m analyses.<name>`, or `workbench run <name>`.
"""
