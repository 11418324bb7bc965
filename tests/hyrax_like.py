"""A provider built the way Hyrax 0.8.3's ``DataProvider`` and ``setup_dataset`` build theirs.

The state matters here, not the features: the attributes are those Hyrax 0.8.3's
``DataProvider.__init__`` sets, in the same order, with the same kinds of values, so the
identity rule is tested on the state a real Hyrax provider has:

- ``config``: the whole Hyrax config (every table, the full ``data_request``);
- ``data_request``: this group's definition (``dataset_class``, ``data_location``,
  ``primary_id_field``, ``split_fraction``, ``fields``, filled in when empty);
- ``prepped_datasets``: friendly name -> dataset instance (its own ``_config``,
  ``_metadata_table``, data and ``data_location``);
- ``dataset_getters`` / ``custom_collate_functions`` / ``field_collate_functions``: bound
  methods of the dataset instances;
- ``requested_fields``, ``all_metadata_fields``, ``primary_dataset``,
  ``primary_dataset_id_field_name``, ``split_fraction``, ``primary_data_location``,
  ``split_indices`` (assigned by ``setup_dataset`` after construction), ``_join_fields``,
  ``_join_maps``;
- the primary dataset's public methods pulled up as attributes;
- ``data_cache``: the provider's own cache, built last, then ``start_preload_thread()``.

``setup_dataset`` builds one provider per ``data_request`` group over the same config and
hands each its ``split_indices`` from the groups' ``split_fraction`` (a seeded shuffle),
as Hyrax 0.8.3's ``pytorch_ignite.setup_dataset`` does.
"""

from __future__ import annotations

import copy
import logging

import numpy as np

from raycache import DataCache

logger = logging.getLogger(__name__)


class MetadataTable:
    """Stands in for the astropy Table Hyrax datasets keep (columns by name)."""

    def __init__(self, columns: dict):
        self.columns = dict(columns)
        self.colnames = list(columns)

    def __getitem__(self, name: str):
        return self.columns[name]


class RandomDataset:
    """Built like Hyrax 0.8.3's ``HyraxRandomDataset``: seeded data, ids, metadata table."""

    def __init__(self, config: dict, data_location: str | None = None):
        opts = config["data_set"]["HyraxRandomDataset"]
        rng = np.random.default_rng(opts["seed"])
        self.data = rng.random((opts["size"],) + tuple(opts["shape"]), np.float32)
        start = int(rng.integers(100))
        self.id_list = np.arange(start, start + opts["size"])
        self._config = config
        self._metadata_table = MetadataTable({"object_id": [str(i) for i in self.id_list]})
        self.data_location = data_location

    def __len__(self) -> int:
        return len(self.data)

    def get_image(self, idx: int) -> np.ndarray:
        return self.data[idx]

    def get_object_id(self, idx: int) -> str:
        return str(self.id_list[idx])

    def sample_ids(self) -> list:
        return list(self.id_list[:3])


DATASETS = {"HyraxRandomDataset": RandomDataset}


class DataProvider:
    """The state and construction order of Hyrax 0.8.3's ``DataProvider``."""

    def __init__(self, config: dict, request: dict):
        self.config = config
        self.data_request = request
        self.prepped_datasets = {}
        self.dataset_getters = {}
        self.all_metadata_fields = {}
        self.requested_fields = {}
        self.custom_collate_functions = {}
        self.field_collate_functions = {}
        self.primary_dataset = None
        self.primary_dataset_id_field_name = None
        self.split_fraction = None
        self.primary_data_location = None
        self.split_indices = None
        self._join_fields = {}
        self._join_maps = {}
        self.prepare_datasets()
        self.pull_up_primary_dataset_methods()
        self.data_cache = DataCache(config, self)
        self.data_cache.start_preload_thread()

    def prepare_datasets(self) -> None:
        for friendly_name, definition in self.data_request.items():
            dataset = DATASETS[definition["dataset_class"]](
                config=self.config, data_location=definition.get("data_location")
            )
            self.prepped_datasets[friendly_name] = dataset
            if not definition.get("fields", []):
                definition["fields"] = [m[4:] for m in dir(dataset) if m.startswith("get_")]
            self.field_collate_functions[friendly_name] = {
                field: None for field in definition["fields"]
            }
            self.dataset_getters[friendly_name] = {
                m[4:]: getattr(dataset, m) for m in dir(dataset) if m.startswith("get_")
            }
            self.all_metadata_fields[friendly_name] = [
                f"{col}_{friendly_name}" for col in dataset._metadata_table.colnames
            ]
            if definition.get("primary_id_field") not in (None, False):
                self.primary_dataset = friendly_name
                self.primary_dataset_id_field_name = definition["primary_id_field"]
                self.split_fraction = definition.get("split_fraction")
                self.primary_data_location = definition.get("data_location")
            self.requested_fields[friendly_name] = tuple(definition["fields"])

    def pull_up_primary_dataset_methods(self) -> None:
        dataset = self.prepped_datasets[self.primary_dataset]
        for name in dir(dataset):
            if name.startswith(("_", "get_")) or not callable(getattr(dataset, name)):
                continue
            if not hasattr(self, name):
                setattr(self, name, getattr(dataset, name))

    def __len__(self) -> int:
        return len(self.prepped_datasets[self.primary_dataset])

    def __getitem__(self, idx: int) -> dict:
        return self.resolve_data(idx)

    def resolve_data(self, idx: int) -> dict:
        cached = self.data_cache.try_fetch(idx)
        if cached is not None:
            return cached
        out = {}
        for friendly_name, fields in self.requested_fields.items():
            getters = self.dataset_getters[friendly_name]
            out[friendly_name] = {field: getters[field](idx) for field in fields}
        out["object_id"] = str(out[self.primary_dataset][self.primary_dataset_id_field_name])
        self.data_cache.insert_into_cache(idx, out)
        return out


def hyrax_config(changes: dict | None = None) -> dict:
    """Return a Hyrax-style config with train and validate groups over one dataset.

    ``changes`` maps a path of keys, a tuple such as ``("data_loader", "batch_size")``,
    to a new value.
    """
    config = {
        "general": {"dev_mode": False, "data_dir": "./data", "results_dir": "./results"},
        "model": {"name": "HyraxAutoencoder"},
        "optimizer": {"name": "torch.optim.SGD"},
        "torch.optim.SGD": {"lr": 0.01, "momentum": 0.9},
        "train": {"epochs": 3, "split": "train", "shuffle": True},
        "data_loader": {"batch_size": 32},
        "data_set": {
            "use_cache": True,
            "preload_cache": False,
            "preload_threads": 4,
            "seed": 7,
            "nan_mode": False,
            "HyraxRandomDataset": {"size": 40, "shape": [2, 3, 3], "seed": 0},
        },
        "data_request": {
            "train": {
                "data": {
                    "dataset_class": "HyraxRandomDataset",
                    "data_location": "./data",
                    "primary_id_field": "object_id",
                    "split_fraction": 0.8,
                }
            },
            "validate": {
                "data": {
                    "dataset_class": "HyraxRandomDataset",
                    "data_location": "./data",
                    "primary_id_field": "object_id",
                    "split_fraction": 0.2,
                }
            },
        },
    }
    for (*tables, key), value in (changes or {}).items():
        node = config
        for t in tables:
            node = node[t]
        node[key] = value
    return config


def setup_dataset(config: dict) -> dict:
    """Build one provider per data_request group and assign split indices, as Hyrax does."""
    request = copy.deepcopy(config["data_request"])
    providers = {group: DataProvider(config, request[group]) for group in request}
    seed = config["data_set"]["seed"] or None
    order = np.random.default_rng(seed).permutation(len(next(iter(providers.values()))))
    offset = 0
    for provider in providers.values():
        count = int(round(provider.split_fraction * len(order)))
        provider.split_indices = [int(i) for i in order[offset : offset + count]]
        offset += count
    return providers
