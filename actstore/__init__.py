"""actstore: a data-centric activation store for sparse-autoencoder research.

Harvest a model's activations once into Zarr; everything after is a query. Each CLI command is a step
function here (`actstore harvest` ⇔ `actstore.harvest`); the steps' modules live in `actstore.steps`, so a
function never shadows the module that defines it.
"""

__version__ = "0.1.0"

from actstore.analytics import query  # noqa: E402  (ad-hoc SQL: actstore.analytics.sql; actstore.sql holds the files)
from actstore.errors import ActstoreError, StoreError, UsageError  # noqa: E402
from actstore.info import store_info  # noqa: E402
from actstore.run import SAESpec  # noqa: E402
from actstore.steps.bundle import create as bundle_create  # noqa: E402
from actstore.steps.bundle import verify as bundle_verify  # noqa: E402
from actstore.steps.darkmatter import DarkmatterOptions, darkmatter  # noqa: E402
from actstore.steps.demo import demo  # noqa: E402
from actstore.steps.evaluate import EvalOptions, evaluate  # noqa: E402
from actstore.steps.harvest import HarvestOptions, harvest  # noqa: E402
from actstore.steps.layers import write_layers as layers  # noqa: E402
from actstore.steps.report import report  # noqa: E402
from actstore.steps.train import Sweep, TrainOptions, sweep, train  # noqa: E402

__all__ = [
    "ActstoreError",
    "DarkmatterOptions",
    "EvalOptions",
    "HarvestOptions",
    "SAESpec",
    "StoreError",
    "Sweep",
    "TrainOptions",
    "UsageError",
    "__version__",
    "bundle_create",
    "bundle_verify",
    "darkmatter",
    "demo",
    "evaluate",
    "harvest",
    "layers",
    "query",
    "report",
    "store_info",
    "sweep",
    "train",
]
