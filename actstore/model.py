"""Loading a model through TransformerLens's TransformerBridge, and naming its hookpoints.

Why one module: every step that runs a model (harvest now, eval later) must agree on what `--model`
means — a shipped model (`tiny`, `tiny-192`: in the package), a local Hugging Face model directory, or a hub name — and on
the canonical TransformerLens hook names (`blocks.{L}.hook_resid_post`, …) the store is keyed by.
"""

from __future__ import annotations

import os
import platform
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from actstore.errors import UsageError
from actstore.tiny import SHIPPED_MODELS

HUB_PROBE_TIMEOUT_S = 3.0  # one request to learn whether the hub answers (HF_HUB_ETAG_TIMEOUT overrides)
COMPUTE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_LAYER = re.compile(r"^blocks\.(\d+)\.")


@dataclass
class LoadedModel:
    """A booted bridge plus what the store's provenance needs to say about it."""

    bridge: Any
    name: str
    source: str  # "shipped", "local" or "hub"
    device: str
    compute_dtype: str
    _per_token_hooks: list[str] | None = None
    _hook_shapes: dict[str, tuple[int, ...]] | None = None  # per-token hook -> its shape after (batch, pos)
    _refiring: frozenset[str] = frozenset()  # per-token hooks that fire more than once in a forward pass

    @property
    def n_layers(self) -> int:
        return int(self.bridge.cfg.n_layers)

    @property
    def n_ctx(self) -> int:
        return int(self.bridge.cfg.n_ctx)

    @property
    def tokenizer(self) -> Any:
        return self.bridge.tokenizer

    def config_summary(self) -> dict[str, Any]:
        cfg = self.bridge.cfg
        keys = ("n_layers", "d_model", "n_heads", "d_head", "d_mlp", "d_vocab", "n_ctx", "architecture")
        return {k: getattr(cfg, k) for k in keys if isinstance(getattr(cfg, k, None), (int, str))}


def resolve_device(device: str) -> str:
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {device} asked for, but torch sees no CUDA device; use --device cpu")
    if device == "mps" and not torch.backends.mps.is_available():
        raise UsageError("--device mps asked for, but this torch build has no MPS; use --device cpu")
    if device not in ("cpu", "mps") and not device.startswith("cuda"):
        raise UsageError(f"unknown --device {device!r}; use cpu, cuda or cuda:N")
    return device


def runtime_description(device: str) -> dict[str, str | None]:
    """What a store's bits depend on beyond its settings: the device's name and torch's (CUDA's, cuDNN's)
    versions. Cheap: no model, and torch.cuda is asked only for a CUDA device."""
    out: dict[str, str | None] = {"torch": torch.__version__, "cuda": torch.version.cuda}
    if device.startswith("cuda"):
        out["device_name"] = torch.cuda.get_device_name(device if ":" in device else None)
        cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
        out["cudnn"] = None if cudnn is None else str(cudnn)
    else:
        out["device_name"] = platform.processor() or platform.machine()
        capability = getattr(torch.backends.cpu, "get_cpu_capability", None)
        out["cpu_capability"] = capability() if capability is not None else None
    return out


def runtime_change(recorded: dict[str, Any], current: dict[str, Any]) -> str | None:
    """What differs between two runtime descriptions, in words ("torch 2.4.0 → 2.5.1"), or None."""
    names = {"device_name": "device", "cpu_capability": "CPU capability", "torch": "torch", "cuda": "CUDA"}
    diffs = [
        f"{label} {recorded.get(key)} → {current.get(key)}"
        for key, label in names.items()
        if key in recorded and recorded.get(key) != current.get(key)
    ]
    return ", ".join(diffs) or None


def check_runtime(device: str, compute_dtype: str) -> None:
    """The options every step that runs the model shares: a device torch has and a known compute dtype."""
    if compute_dtype not in COMPUTE_DTYPES:
        raise UsageError(f"unknown --compute-dtype {compute_dtype!r}; use one of {', '.join(COMPUTE_DTYPES)}")
    resolve_device(device)


def load_model(name: str, device: str = "cpu", compute_dtype: str = "float32") -> LoadedModel:
    """Boot a shipped model (`tiny`, `tiny-192`), a local HF directory or a hub name through TransformerBridge, in eval mode."""
    if compute_dtype not in COMPUTE_DTYPES:
        raise UsageError(f"unknown compute dtype {compute_dtype!r}; use one of {', '.join(COMPUTE_DTYPES)}")
    device = resolve_device(device)
    if name in SHIPPED_MODELS:
        shipped = SHIPPED_MODELS[name][1]
        if not (shipped / "model.safetensors").exists():
            raise UsageError(
                f"the {name} model's weights are missing from {shipped}; run examples/train_tiny_model.py --model {name}"
            )
        target, source = str(shipped), "shipped"
    elif Path(name).expanduser().is_dir():
        target, source = str(Path(name).expanduser().resolve()), "local"
        if not (Path(target) / "config.json").exists():
            raise UsageError(f"{name} is a directory but has no config.json; give a Hugging Face model directory")
    else:
        target, source = name, "hub"
    # before the slow imports: a hub name that cannot load fails in seconds
    offline = source == "hub" and _hub_needs_offline(name)
    import transformers
    from transformer_lens.model_bridge import TransformerBridge

    transformers.utils.logging.disable_progress_bar()  # our own bar is the one progress line
    transformers.utils.logging.set_verbosity_error()
    import logging

    logging.getLogger("huggingface_hub").setLevel(logging.ERROR)  # retry chatter when the hub is unreachable
    try:
        with _hub_switched_off(offline):
            bridge = TransformerBridge.boot_transformers(target, device=device, dtype=COMPUTE_DTYPES[compute_dtype])
    except Exception as exc:  # HF raises many types (OSError, ValueError, HTTP errors) for an unknown model
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(
            f"could not load model {name!r} ({first[:160]}); give {' or '.join(map(repr, SHIPPED_MODELS))}, a local Hugging Face model "
            "directory, or a hub name that is cached or reachable"
        ) from exc
    bridge.eval()
    return LoadedModel(bridge=bridge, name=name, source=source, device=device, compute_dtype=compute_dtype)


def _offline() -> bool:
    from huggingface_hub import constants

    flags = (os.environ.get(v, "").upper() for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    return bool(constants.HF_HUB_OFFLINE) or any(f in ("1", "ON", "YES", "TRUE") for f in flags)


def _hub_needs_offline(name: str) -> bool:
    """Fail in seconds on a hub name that cannot load; True when it must load from the cache offline.

    Why: with the hub unreachable, transformers retries file by file — 30–50 s (measured) before failing
    on a model that is not cached, minutes before loading one that is. One request with a short timeout
    tells whether the hub answers at all. If it does (even "not found"), the ordinary path runs and
    reports what the hub said; if not, a cached model loads with the hub switched off, and one that is
    not cached is this one-line error.
    """
    from huggingface_hub import HfApi, try_to_load_from_cache
    from huggingface_hub.errors import HfHubHTTPError

    shipped = " or ".join(map(repr, SHIPPED_MODELS))
    try:
        cached = isinstance(try_to_load_from_cache(name, "config.json"), str)
    except Exception:  # HFValidationError: not of the form org/name
        raise UsageError(
            f"could not load model {name!r}: it is neither a shipped model ({shipped}), an existing directory nor "
            "a hub name (org/model); check the spelling or the path"
        ) from None
    fix = f"download it on a machine with network (hf download {name}), or give {shipped} or a local model directory"
    if _offline():
        if cached:
            return True  # (the flag may have been set after huggingface_hub read it at import)
        raise UsageError(
            f"could not load model {name}: not in the local Hugging Face cache and HF_HUB_OFFLINE is set; {fix}"
        )
    timeout = float(os.environ.get("HF_HUB_ETAG_TIMEOUT") or HUB_PROBE_TIMEOUT_S)
    try:
        HfApi().model_info(name, timeout=timeout)
    except HfHubHTTPError:  # the hub answered: the loading path gives its own error (unknown, gated…)
        return False
    except Exception as exc:  # connection refused, DNS, timeout, TLS: nothing will come from the hub
        if cached:
            return True
        raise UsageError(
            f"could not load model {name}: not in the local Hugging Face cache and the hub is unreachable "
            f"({type(exc).__name__}); {fix}"
        ) from None
    return False


@contextmanager
def _hub_switched_off(active: bool) -> Iterator[None]:
    """Offline mode for the block (huggingface_hub reads its flag at import; transformers asks it per call)."""
    if not active:
        yield
        return
    from huggingface_hub import constants

    saved = constants.HF_HUB_OFFLINE, os.environ.get("HF_HUB_OFFLINE")
    constants.HF_HUB_OFFLINE, os.environ["HF_HUB_OFFLINE"] = True, "1"
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = saved[0]
        if saved[1] is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = saved[1]


def hook_layer(hook: str) -> int | None:
    """The block a hook lives in; -1 before the first block; None after the last (needs the full pass)."""
    m = _LAYER.match(hook)
    if m:
        return int(m.group(1))
    if hook.startswith(("hook_embed", "hook_pos_embed", "embed.")):
        return -1
    return None


def blocks_after(hook: str) -> int | None:
    """The first block a residual-stream hook's value feeds (L for resid_pre of L, L + 1 for resid_post);
    None for other hooks, which can only be patched inside a full forward pass."""
    layer = hook_layer(hook)
    if layer is None or layer < 0 or not hook.endswith((".hook_resid_pre", ".hook_resid_post")):
        return None
    return layer + (1 if hook.endswith("post") else 0)


def stop_layer(hooks: list[str]) -> int | None:
    """Where the forward pass may stop once every hook has fired (`stop_at_layer`), or None."""
    layers = [hook_layer(h) for h in hooks]
    if any(layer is None for layer in layers):
        return None
    return max(layers) + 1  # type: ignore[type-var]


def hook_patterns(names: list[str]) -> list[str]:
    """Hook names with the layer folded into `{L}`, so a list of valid hooks fits on one line."""
    return sorted({_LAYER.sub("blocks.{L}.", n) for n in names})


def per_token_hooks(model: LoadedModel) -> list[str]:
    """Hooks that fire once per token with shape (batch, pos, …): the ones a store can hold.

    Found by one forward pass on 22 tokens caching everything (cheap, and cached on the model), because
    TransformerLens also lists hooks that never fire for an architecture or are per head-pair. The same
    pass records each hook's shape, so allocating a store needs no forward pass of its own, and which
    hooks fire more than once, after which `capture` must not stop the pass early.
    """
    if getattr(model, "_per_token_hooks", None) is None:
        # batch 2 × 11 positions: no head count or rotary table is likely to share those sizes
        tokens = torch.arange(22).reshape(2, 11) % int(model.bridge.cfg.d_vocab)
        fired: dict[int, int] = {}

        def count(tensor: Any, hook: Any) -> None:
            fired[id(hook)] = fired.get(id(hook), 0) + 1

        bridge = model.bridge
        with warnings.catch_warnings(), torch.inference_mode():
            warnings.simplefilter("ignore")  # "skipped gated-off hooks": those never fire, as wanted
            with bridge.hooks(fwd_hooks=[(_everything, count)]):
                _, cache = bridge.run_with_cache(tokens.to(model.device))
        shapes = {n: tuple(a.shape[2:]) for n, a in cache.items() if a.ndim >= 3 and tuple(a.shape[:2]) == (2, 11)}
        points = bridge.hook_dict
        model._refiring = frozenset(n for n in shapes if fired.get(id(points.get(n)), 0) > 1)
        model._per_token_hooks, model._hook_shapes = sorted(shapes), shapes
    return model._per_token_hooks


def _everything(name: str) -> bool:
    return True


def hook_shape(model: LoadedModel, hook: str) -> tuple[int, ...]:
    """A per-token hook's shape after (batch, pos): (d_model,) for the residual stream, (heads, d_head) for hook_z."""
    per_token_hooks(model)
    if hook not in (model._hook_shapes or {}):
        check_hooks(model, [hook])
    return model._hook_shapes[hook]  # type: ignore[index]


def check_hooks(model: LoadedModel, hooks: list[str]) -> None:
    valid = per_token_hooks(model)
    bad = [h for h in hooks if h not in valid]
    if bad:
        raise UsageError(
            f"unknown hookpoint {', '.join(bad)} (a store holds hooks that fire once per token); "
            f"valid ones (L = 0…{model.n_layers - 1}): " + ", ".join(hook_patterns(valid))
        )


class _AllCaptured(Exception):
    """Raised from the last wanted hook: the rest of the forward pass computes nothing the caller keeps."""


@torch.inference_mode()
def capture(model: LoadedModel, tokens: torch.Tensor, hooks: list[str]) -> dict[str, torch.Tensor]:
    """Activations at `hooks` for a batch of token ids, stopping as soon as the last of them has fired.

    Why not `run_with_cache(stop_at_layer=…)` alone: a hook in the last block stops nothing there, so the
    final norm and the unembedding (as costly as all of Pythia-70M's blocks together) ran for nothing.
    The forward is still run_with_cache's own (same kwargs, same kernels): the values are bit-identical.
    """
    kept: dict[str, torch.Tensor] = {}
    early = len(set(hooks)) if not (set(hooks) & _refiring(model)) else None

    def keeper(name: str) -> Any:
        def keep(tensor: Any, hook: Any = None) -> Any:
            kept[name] = (tensor[0] if isinstance(tensor, tuple) else tensor).detach()
            if len(kept) == early:
                raise _AllCaptured
            return tensor

        return keep

    bridge = model.bridge
    try:
        with bridge.hooks(fwd_hooks=[(h, keeper(h)) for h in hooks]):
            bridge.run_with_cache(tokens, names_filter=_nothing, stop_at_layer=stop_layer(hooks))
    except _AllCaptured:
        pass
    missing = [h for h in hooks if h not in kept]
    if missing:
        raise UsageError(f"hook {', '.join(missing)} did not fire in {model.name}'s forward pass; choose another")
    return {h: kept[h] for h in hooks}


def _refiring(model: LoadedModel) -> frozenset[str]:
    """Hooks whose last value is not their first (found once per model, on a 22-token pass)."""
    per_token_hooks(model)
    return model._refiring


def _nothing(name: str) -> bool:
    """run_with_cache's names_filter when the hooks are ours: cache nothing itself."""
    return False
