"""Train with Hyrax 0.9-0.13 on raycache's shared cache: the one line, and what it changes.

Run (Hyrax installed, or ``scripts/hyrax_env.sh`` and ``PYTHONPATH=.hyrax-0.13``), with a
Ray the processes can find (``ray start --head``, or ``RAY_ADDRESS``)::

    python examples/hyrax09_train.py

The first line below is all a training script or notebook needs. It must run at module
level: the DDP ranks Hyrax spawns (``general.distributed = true``) re-import this script.
"""

import raycache.hyrax

raycache.hyrax.install()  # picks the class for the installed Hyrax; refuses unsupported ones

import hyrax  # noqa: E402


def main() -> None:
    h = hyrax.Hyrax()
    group = {
        "dataset_class": "HyraxRandomDataset",
        "data_location": "./hyrax09-example",
        "primary_id_field": "object_id",
    }
    request = {"train": {"data": dict(group)}, "validate": {"data": dict(group)}}
    h.set_config("data_request", request)
    h.set_config("split", {"train": 0.8, "validate": 0.2})
    h.set_config("data_set.use_cache", True)
    h.set_config("data_set.HyraxRandomDataset.size", 2000)
    h.set_config("model.name", "HyraxLoopback")
    h.set_config("train.epochs", 3)
    h.set_config("data_loader.num_workers", 2)  # forked workers share the one cache
    h.set_config("raycache", {"detached": True})  # keep it for the next job of a sweep
    h.train()

    # The train and validate providers over this dataset filled one cache.
    for name in raycache.list_caches():
        if name.startswith("HyraxRandomDataset-"):
            stats = raycache.cache_stats(name)
            print(f"{name}: {stats['items']} items, {stats['bytes'] / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
