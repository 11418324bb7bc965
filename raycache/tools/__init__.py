"""Tools that ship with raycache but are not the cache: the demo, its workload, memory.

Nothing in the library imports this package. It holds what ``raycache demo`` needs from an
installed package (``demo``, the training workload ``train``) and the PSS-based memory
measuring (``memory``) that the demo, the examples and the memory tests share. The
benchmark suite is not here: it lives in the source tree's ``benchmarks/`` folder, and
``bench`` only finds and starts it.
"""
