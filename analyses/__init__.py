"""The studies. Importing this package registers every analysis with `workbench.report`.

Each module is runnable: `python -m analyses.<name>`, or `workbench run <name>`.
"""

from analyses import circuits, fact_recall, induction_heads, model_card, sae, superposition  # noqa: F401
