"""Preloading: Ray tasks read every provider item into chunks that the cache owns.

The package is split by the process that runs the code:

- ``task`` and ``readers`` run in Ray worker processes: a generator task per preload
  slot reads units of items with threads and yields a chunk per unit.
- ``run``, ``units`` and ``progress`` run in the directory actor: ``PreloadRun`` starts
  the slots and registers their chunks, ``UnitScheduler`` decides which indices each
  unit holds and what trainers may reserve meanwhile (with
  ``raycache.reservations.ReservationPolicy``), ``Progress`` counts what was stored.

``prestart`` runs in the process that creates a cache: it has Ray start the readers'
worker processes while the directory actor starts.

``preload_threads`` bounds the reads in flight over all tasks together, the meaning
Hyrax gives the knob.
"""

from raycache.preload.prestart import prestart_readers
from raycache.preload.run import PreloadRun
from raycache.preload.task import read_units, read_units_task
from raycache.preload.units import index_runs

__all__ = ["PreloadRun", "index_runs", "prestart_readers", "read_units", "read_units_task"]
