"""raycache's benchmark suite: every scenario against its baselines, in one run.

This folder is a tool of the source tree, not part of the installed library: ``raycache
bench`` (``raycache.tools.bench``) finds it next to the ``raycache`` package of an editable
install and runs ``benchmarks.suite.main``; ``python benchmarks/run_benchmarks.py`` does the
same from a checkout. One module per scenario family (``warm``, ``first_epoch``, ``scale``),
the shared pieces (``providers``, ``baselines``, ``results``, ``common``) and the report
(``report``, which fills in ``docs/benchmarks-template.md``).
"""
