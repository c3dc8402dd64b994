"""The SAEs' reconstructions in the eval store: `recon/<sae_id>/<hook>`, beside the activations they rebuild.

Why in the store: x̂ has the activations' shape, so it takes their chunks and codec and any Zarr reader
lines them up with `acts/<hook>`. Eval writes them; darkmatter fits its probes on them; a bundle can carry them.
"""

from __future__ import annotations

import numpy as np
import zarr

from actstore import store as st
from actstore.errors import StoreError


def recon_array(group: zarr.Group, hook: str, sae_id: str) -> zarr.Array:
    """A fresh `recon/<sae_id>/<hook>` with the activations' shape, chunks, dtype and codec."""
    acts = group["acts"][hook]
    codec = group.attrs.get("codec", {}).get("name", st.DEFAULT_CODEC)
    parent = group.require_group("recon").require_group(sae_id)
    return st.activation_array(
        parent,
        hook,
        acts.shape,
        acts.chunks,
        acts.shards,
        st.stored_dtype(acts),
        codec,
        {"hook": hook, "sae_id": sae_id},
    )


def read_recon(group: zarr.Group, hook: str, sae_id: str, seqs: slice = slice(None)) -> np.ndarray:
    """An SAE's reconstructions written by eval, as float32."""
    try:
        arr = group[f"recon/{sae_id}/{hook}"]
    except KeyError:
        raise StoreError(f"the store has no recon/{sae_id}/{hook}; run `actstore eval` for that SAE") from None
    return st.to_float32(arr[seqs], st.stored_dtype(arr))
