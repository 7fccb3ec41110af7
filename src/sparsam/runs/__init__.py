"""The run directory: what ``sparsam train`` writes and ``sparsam report`` / ``analyze`` read.

``run`` (the bookkeeping during a run: metrics, best model, checkpoints, summary, resume),
``rundir`` (the layout; finding and reading runs back: ``load_run``, ``find_runs``, ``RunRecord``),
``checkpoint`` and ``schema`` (writing the files atomically, checking them on reading), ``tables``
and ``figures`` (the report). These build on ``sparsam.train``'s config and method registry;
``sparsam.train`` re-exports the names a user needs.
"""
