"""actstore: a data-centric activation store for sparse-autoencoder research.

Harvest a model's activations once into Zarr; everything after is a query. Each CLI command is a
function here with the same name and options (`actstore harvest` ⇔ `actstore.harvest`). Imports are
lazy so that `actstore --help` does not wait for torch.
"""

from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "ActstoreError": "actstore.errors",
    "StoreError": "actstore.errors",
    "UsageError": "actstore.errors",
    "HarvestOptions": "actstore.harvest",
    "harvest": "actstore.harvest",
    "store_info": "actstore.info",
}
__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'actstore' has no attribute {name!r}")
