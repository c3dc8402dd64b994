"""actstore: a data-centric activation store for sparse-autoencoder research.

Harvest a model's activations once into Zarr; everything after is a query. Each CLI command is a
function here with the same name and options (`actstore harvest` ⇔ `actstore.harvest`).
"""

__version__ = "0.1.0"

# Imported eagerly on purpose: `actstore.harvest`, `actstore.train` … must be the functions, and a
# lazily resolved name would be shadowed by its submodule as soon as anything imports the submodule.
from actstore import bundle  # noqa: E402  (a module: bundle.create, bundle.verify)
from actstore.analytics import query  # noqa: E402  (ad-hoc SQL: actstore.analytics.sql; actstore.sql holds the files)
from actstore.darkmatter import darkmatter  # noqa: E402
from actstore.demo import demo  # noqa: E402
from actstore.errors import ActstoreError, StoreError, UsageError  # noqa: E402
from actstore.evaluate import EvalOptions, evaluate  # noqa: E402
from actstore.geometry import write_layers as layers  # noqa: E402
from actstore.harvest import HarvestOptions, harvest  # noqa: E402
from actstore.info import store_info  # noqa: E402
from actstore.report import report  # noqa: E402
from actstore.train import SAESpec, TrainOptions, sweep, train  # noqa: E402

__all__ = [
    "ActstoreError",
    "EvalOptions",
    "HarvestOptions",
    "SAESpec",
    "StoreError",
    "TrainOptions",
    "UsageError",
    "__version__",
    "bundle",
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
