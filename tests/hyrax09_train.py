"""A user's Hyrax 0.13 training script, run by the tests in a subprocess.

``python hyrax09_train.py CONFIG.json`` trains ``TinyModel`` (a pass-through) on ``CountingDataset``
(``HyraxRandomDataset`` whose ``get_image`` appends ``"<pid> <idx>"`` to a log file, so a
test can count provider reads in every process) with Hyrax's train verb, then prints one
JSON line: ``{"result": ...}`` with what the test checks. The options (JSON): ``cache``
(``"raycache"`` or ``"hyrax"``), ``size``, ``shape``, ``epochs``, ``batch_size``,
``num_workers``, ``persistent_workers``, ``distributed``, ``latency_s``, ``reads_log``,
``results_dir``, ``raycache`` (the ``[raycache]`` table), and ``check``: instead of
training, compare what the shared cache holds with Hyrax's own resolution of every item.

With ``distributed``, the script makes Hyrax's train verb take its multi-GPU path on
CPU: Hyrax 0.13 uses ``idist.Parallel`` only when ``torch.cuda.device_count() > 1`` and
always with the ``nccl`` backend, so the verb is shown ``device_count() == 2`` and its
``idist.Parallel`` is given ``backend="gloo"``. That is the only change to Hyrax.
"""

import functools
import json
import os
import sys
import time
import types

import hyrax09_standins

hyrax09_standins.install()

OPTIONS = json.loads(open(sys.argv[1]).read()) if len(sys.argv) > 1 else {}
if OPTIONS.get("cache") == "raycache":
    # The one line a user adds at the top of a script or notebook (module level, so
    # that the ranks Hyrax spawns, which re-import this script, run it too).
    import raycache.hyrax

    raycache.hyrax.install()

import numpy as np  # noqa: E402
from hyrax.datasets.random.hyrax_random_dataset import HyraxRandomDataset  # noqa: E402


def _metadata_value(dataset, column, idx):
    return dataset._metadata_table[column][idx]


class CountingDataset(HyraxRandomDataset):
    """``HyraxRandomDataset`` that logs every image read, with a read latency.

    Hyrax 0.13's ``HyraxDataset.__init__`` sets a ``get_<column>`` attribute per metadata
    column as a method bound to a local function, which pickle cannot restore ("no
    attribute 'getter'"): the train verb's ``idist.Parallel`` then fails to start its
    ranks, whichever cache is used. This class replaces those attributes by picklable
    partials of a module-level function, the same in every process.
    """

    def __init__(self, config, data_location):
        super().__init__(config, data_location)
        for column in self._metadata_table.colnames:
            if isinstance(self.__dict__.get(f"get_{column}"), types.MethodType):
                setattr(self, f"get_{column}", functools.partial(_metadata_value, self, column))

    if OPTIONS.get("state_identity"):
        # raycache derives a cache's identity from the dataset's state; an astropy Table
        # (the metadata) digests differently once pickled into a spawned rank, so the
        # DDP test states what determines the items instead.
        def cache_identity(self):
            cfg = self._config["data_set"]["HyraxRandomDataset"]
            return f"{self.data_location}|{cfg['size']}|{list(cfg['shape'])}|{cfg['seed']}"

    def get_image(self, idx):
        # O_APPEND writes of one short line are atomic: every process logs to one file.
        fd = os.open(OPTIONS["reads_log"], os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        try:
            os.write(fd, f"{os.getpid()} {int(idx)}\n".encode())
        finally:
            os.close(fd)
        if OPTIONS.get("latency_s"):
            time.sleep(OPTIONS["latency_s"])
        return super().get_image(idx)


from hyrax.models.model_registry import hyrax_model  # noqa: E402
from torch import nn  # noqa: E402


@hyrax_model
class TinyModel(nn.Module):
    """Passes its input through; one weight for the optimizer. Picklable for DDP ranks."""

    def __init__(self, config, data_sample=None):
        super().__init__()
        self.weight = nn.Linear(1, 1)
        self.config = config

    def forward(self, x):
        return x[0] if isinstance(x, (tuple, list)) else x

    def train_batch(self, batch):
        self.forward(batch)
        return {"loss": 0.0}

    def validate_batch(self, batch):
        self.forward(batch)
        return {"loss": 0.0}

    @staticmethod
    def prepare_inputs(data_dict):
        return (data_dict["data"]["image"], np.array([], dtype=np.float32))


def make_config():
    import hyrax

    h = hyrax.Hyrax()
    group = {
        "dataset_class": "CountingDataset",
        "data_location": OPTIONS["results_dir"],
        "primary_id_field": "object_id",
        "fields": ["image", "object_id"],
    }
    h.set_config(
        "data_request", {"train": {"data": dict(group)}, "validate": {"data": dict(group)}}
    )
    h.set_config("split", {"train": 0.8, "validate": 0.2, "rng_seed": 7})
    h.set_config("data_set.HyraxRandomDataset.size", OPTIONS.get("size", 200))
    h.set_config("data_set.HyraxRandomDataset.shape", OPTIONS.get("shape", [2, 8, 8]))
    h.set_config("data_set.use_cache", True)
    h.set_config("data_set.seed", 11)
    h.set_config("model.name", "TinyModel")
    h.set_config("train.epochs", OPTIONS.get("epochs", 2))
    h.set_config("general.results_dir", OPTIONS["results_dir"])
    h.set_config("general.distributed", bool(OPTIONS.get("distributed")))
    h.set_config("data_loader.batch_size", OPTIONS.get("batch_size", 32))
    h.set_config("data_loader.num_workers", OPTIONS.get("num_workers", 0))
    if OPTIONS.get("num_workers"):
        h.set_config("data_loader.persistent_workers", bool(OPTIONS.get("persistent_workers")))
    if OPTIONS.get("raycache"):
        h.set_config("raycache", OPTIONS["raycache"])
    return h, h.config


def show_two_devices():
    """Hyrax 0.13 trains on several processes only with >1 CUDA device, and with nccl."""
    import hyrax.verbs.train as train_verb
    import ignite.distributed as idist
    import torch

    torch.cuda.device_count = lambda: 2

    class GlooParallel(idist.Parallel):
        def __init__(self, backend=None, **kwargs):
            super().__init__(backend="gloo", **kwargs)

    train_verb.idist = type("idist", (), {"Parallel": GlooParallel})


def main():
    h, config = make_config()
    if OPTIONS.get("check"):
        result = check_cache(config)
    else:
        if OPTIONS.get("distributed"):
            show_two_devices()
        start = time.perf_counter()
        h.train()
        result = {"wall_s": time.perf_counter() - start}
    print("RESULT " + json.dumps(result), flush=True)
    if OPTIONS.get("check"):
        # The check has detached its cache and said all it has to: skip the ~3 s of Ray's
        # and torch's teardown. A training run exits as usual (its exit sends inserts).
        sys.stdout.flush()
        os._exit(0)


def check_cache(config):
    """Compare each item in the shared cache with Hyrax's own resolution of it.

    Hyrax's own ``DataProvider`` (with its own cache: ``install()`` was not called in
    this process) resolves every index; raycache's ``DataCache`` over the same dataset
    answers ``try_fetch`` from the shared cache the training processes filled.
    """
    from hyrax.pytorch_ignite import setup_dataset

    import raycache.hyrax

    provider = setup_dataset(config, splits=("train",))["train"]
    assert type(provider.data_cache).__module__ == "hyrax.datasets.data_cache"
    cache = raycache.hyrax.DataCache(config, provider.prepped_datasets, {"data": False})
    shared = cache.shared_caches["data"]
    wrong, missing = [], []
    for idx in range(len(provider)):
        item, augmented = cache.try_fetch("data", idx)
        own = provider.resolve_data(idx)["data"]
        if item is None:
            missing.append(idx)
        elif augmented or set(item) != set(own) or item["object_id"] != own["object_id"]:
            wrong.append(idx)
        elif not np.array_equal(item["image"], own["image"]):
            wrong.append(idx)
    stats = shared.stats()
    cache.disable()
    return {
        "name": shared.name,
        "wrong": wrong,
        "missing": missing,
        "items": stats["items"],
        "bytes": stats["bytes"],
        "item_bytes": int(np.asarray(own["image"]).nbytes),
    }


if __name__ == "__main__":
    main()
