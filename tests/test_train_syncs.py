"""Host syncs in the training loop: none per step beyond the logging steps (and one per batch for a whole
sweep once latents can be dead), counted on CPU by wrapping every tensor operation that waits for a device's
result; on CUDA, `torch.cuda.set_sync_debug_mode("error")` over the same steps.

Why: on a GPU each read of a device value (a float for the progress bar, a bincount, a boolean mask) stalls
the host until the device has caught up, so the next kernels are launched into an idle device. A CPU runs
synchronously, so there the property is checked by counting the calls that would wait on a GPU.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import actstore
from actstore.run import SAESpec
from actstore.steps.train import TrainOptions
from actstore.trainee import Trainee, count_dead

PACKAGE = str(Path(actstore.__file__).parent)
# Tensor methods whose result is a host value (or whose output shape depends on the data): on a GPU each
# waits for the device. `to`/`cpu`/`numpy` copies to the host count too.
SYNCING_METHODS = ("item", "tolist", "cpu", "numpy", "nonzero", "__bool__", "__float__", "__int__", "__index__")
SYNCING_FUNCTIONS = ("bincount", "nonzero", "unique", "masked_select")


def _called_from_package() -> str | None:
    """`file:line` of the actstore frame that made the call (None when torch made it for itself)."""
    import sys

    frame = sys._getframe(2)
    if frame.f_code.co_filename.startswith(PACKAGE):
        return f"{Path(frame.f_code.co_filename).name}:{frame.f_lineno}"
    return None


def _has_mask(index: object) -> bool:
    """A boolean tensor among the indices: an output (or update) shaped by the data, hence a sync."""
    parts = index if isinstance(index, tuple) else (index,)
    return any(isinstance(p, torch.Tensor) and p.dtype == torch.bool for p in parts)


@contextlib.contextmanager
def counting_syncs() -> Iterator[Counter]:
    """Count, by `file:line` of actstore's code, the calls that read a device value on the host."""
    seen: Counter = Counter()
    patches: list[tuple[object, str, object]] = []

    def wrap(owner: object, name: str, syncs=lambda *a, **k: True) -> None:
        original = getattr(owner, name)

        def counted(*args, **kwargs):
            where = _called_from_package()
            if where is not None and syncs(*args, **kwargs):
                seen[f"{name} {where}"] += 1
            return original(*args, **kwargs)

        patches.append((owner, name, original))
        setattr(owner, name, counted)

    for name in SYNCING_METHODS:
        wrap(torch.Tensor, name)
    for name in SYNCING_FUNCTIONS:
        wrap(torch, name)
    wrap(torch.Tensor, "__getitem__", lambda self, index: _has_mask(index))
    wrap(torch.Tensor, "__setitem__", lambda self, index, value: _has_mask(index))
    wrap(torch.Tensor, "to", lambda self, *a, **k: any(str(v).startswith("cpu") for v in (*a, *k.values())))
    try:
        yield seen
    finally:
        for owner, name, original in reversed(patches):
            setattr(owner, name, original)


def _data(n: int, d: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


def _syncs_per_step(steps: int, n_saes: int, dead_tokens: int, log_every: int = 10**9) -> tuple[int, Counter]:
    """Syncs counted over `steps` steps (after one warm-up) of `n_saes` SAEs driven as the sweep drives them."""
    o = TrainOptions(batch_size=64, dead_tokens=dead_tokens, log_every=log_every)
    x = _data(64 * (steps + 2))
    trainees = [Trainee(SAESpec("h", 4, 4, 10**9, s), 16, o, x.mean(0)) for s in range(n_saes)]
    for t in trainees:
        t.train_step(x[:64])
    with counting_syncs() as seen:
        for s in range(1, steps + 1):
            counts = count_dead(trainees)
            for t, n_dead in zip(trainees, counts, strict=True):
                t.train_step(x[64 * s : 64 * (s + 1)], n_dead)
    return sum(seen.values()), seen


def test_no_host_sync_in_a_training_step():
    """Before any latent can be dead and between logging steps, a step reads nothing back from the device
    (the old step read its FVU, the fire counts' bincount, the dead mask's any/nonzero and two masks)."""
    for n_saes, steps in ((1, 3), (3, 6)):
        total, seen = _syncs_per_step(steps, n_saes, dead_tokens=10**9)
        assert total == 0, dict(seen)


def test_once_latents_can_die_a_sweep_reads_its_dead_counts_once_per_batch():
    """The AuxK loss's shapes follow the number of dead latents (k_aux = min(d_in/2, dead)), so it is read:
    once per batch for every SAE of the sweep together, not once per SAE and step."""
    for n_saes, steps in ((1, 3), (3, 6)):
        total, seen = _syncs_per_step(steps, n_saes, dead_tokens=64)
        assert total == steps, dict(seen)


def test_a_logging_step_reads_its_values_in_one_sync_per_sae():
    total, seen = _syncs_per_step(6, 2, dead_tokens=10**9, log_every=3)
    assert total == 2 * 2, dict(seen)  # steps 3 and 6 of each SAE (the warm-up step was step 1)


def test_the_counter_sees_the_syncs_it_is_meant_to_catch():
    """The machinery itself: every kind of read above is counted when actstore's code makes it."""
    t = torch.ones(4)
    with counting_syncs() as seen:
        exec(  # compiled as if it were a file of the package, like the calls inside a training step
            compile(
                "float(t.sum()); bool(t.any()); t[t > 0]; t[t > 0] = 1; torch.bincount(t.long()); t.nonzero(); "
                "t.tolist(); t.to('cpu'); t.to(torch.float64)",
                f"{PACKAGE}/probe.py",
                "exec",
            ),
            {"t": t, "torch": torch},
        )
    assert sum(seen.values()) == 8, dict(seen)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")
def test_no_sync_in_cuda_training_steps():
    """On a GPU, between logging steps and before latents can die, any synchronising call raises."""
    o = TrainOptions(batch_size=256, dead_tokens=10**9, log_every=10**9, device="cuda")
    x = _data(256 * 6, d=64).cuda()
    trainees = [Trainee(SAESpec("h", 8, 4, 10**9, s), 64, o, x.mean(0)) for s in range(2)]
    for t in trainees:
        t.train_step(x[:256])
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for s in range(1, 6):
            counts = count_dead(trainees)
            for t, n_dead in zip(trainees, counts, strict=True):
                t.train_step(x[256 * s : 256 * (s + 1)], n_dead)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


def test_the_sync_free_replacements_give_the_same_integers():
    """The dead latents' indices, the fire counts and the by-latent offsets: exactly what nonzero, a
    boolean mask and bincount gave (the step's numbers are unchanged)."""
    from actstore.sae import _by_latent, count_fired
    from actstore.trainee import _first_true

    gen = torch.Generator().manual_seed(1)
    for n, rows, k in ((50, 300, 6), (4096, 512, 32), (7, 0, 3)):
        idx = torch.randint(0, n, (rows, k), generator=gen)
        acts = torch.randn(rows, k, generator=gen).relu()
        assert torch.equal(count_fired(acts, idx, n), torch.bincount(idx[acts > 0], minlength=n))
        counts = torch.bincount(idx.reshape(-1), minlength=n)
        assert torch.equal(_by_latent(idx, n)[2], torch.cat([counts.new_zeros(1), counts.cumsum(0)[:-1]]))
        mask = torch.rand(n, generator=gen) < 0.3
        want = mask.nonzero().squeeze(1)
        got = _first_true(mask, len(want))
        assert (got is None and len(want) == 0) or torch.equal(got, want)


def test_data_parallel_ranks_ask_rank_0_about_checkpoints_only_on_logging_batches(monkeypatch):
    """The broadcast of rank 0's clock is a host sync: it must not run on every batch."""
    from actstore import distributed
    from actstore.steps import train

    asked = []
    monkeypatch.setattr(distributed, "broadcast", lambda value, w: asked.append(value) or value)
    o = TrainOptions(data_parallel=True, checkpoint_seconds=0, log_every=5)
    world = distributed.World(rank=1, size=2)
    due = [train._checkpoint_due(0.0, o, world, n) for n in range(1, 21)]
    assert due == [n % 5 == 0 for n in range(1, 21)]  # due at once, but only asked on logging batches
    assert len(asked) == 4
    alone = [train._checkpoint_due(0.0, o, distributed.World(), n) for n in range(1, 4)]
    assert alone == [True] * 3 and len(asked) == 4  # one process: its own clock, every batch, no broadcast
