"""A small training workload that exercises a shared cache from several trainers.

The torchrun and Ray Train examples, the ``raycache demo`` command and the
multi-trainer tests all train the same small CNN on the same synthetic cutouts, so
that one loop (``raycache.tools.train.loop.train``) is measured and checked everywhere:
each rank checks that it received exactly its ``DistributedSampler`` shard, in
order, with the values the provider holds.

The submodules are imported on their own (``raycache.tools.train.data`` needs only numpy),
so that a preload task unpickling a provider does not import the training code.
"""
