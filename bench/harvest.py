"""Harvest throughput against the bare forward pass, and bytes per value for every codec.

    python bench/harvest.py [--model tiny|pythia-70m-shape|DIR] [--tokens 131072] [--batch-size 32]
                            [--seq-len 128] [--hooks ...] [--compute-dtype float32]

Runs, in one process, on the same model, batches and tokens:
  1. the bare forward pass capturing nothing (the whole model, as a user would run it);
  2. the bare forward pass with `stop_at_layer` after the last hooked layer (the issue's yardstick; with a
     hook in the last block it stops nothing and runs the final norm and the unembedding);
  3. the bare forward pass stopped the moment the last hook fires, keeping nothing (the least any harvest
     must pay);
  4. capture only: `model.capture` and the copy to float16, no store;
  5. `actstore.steps.harvest` into a fresh store (tokenizing, capture, conversion, compression, writing, commits).
The passes run in interleaved rounds (A B C D E, A B C D E, …) so this shared machine's load hits each
alike; each pass reports its median and best round, and the load average before and after.
Then writes the harvested activations with each codec and reports bytes/value, write speed and, for the
lossy ones, the relative error. `pythia-70m-shape` is a randomly initialised GPT-NeoX with Pythia-70M's
shape (d=512, 6 layers, 50k vocabulary), built locally: the compute profile of a real model, offline.
The last line is one JSON object of the headline figures.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch
import zarr

from actstore import store as st
from actstore.corpus import CorpusOptions, token_sequences
from actstore.model import capture, load_model, stop_layer
from actstore.steps.harvest import HarvestOptions, harvest
from actstore.tiny import random_pythia

GOAL = 0.95  # harvest's time within 5% of the least any harvest must pay: the forward up to the last hook
CODECS = ("none", "lz4", "zstd", "bitround-7", "bitround-5", "bitround-3")  # lz4 is the default (store.DEFAULT_CODEC)


class Stop(Exception):
    """Raised once every hook has fired: the rest of the pass is skipped, as harvest's capture does."""


def timed(fn) -> tuple[float, float]:
    """Wall and process CPU seconds: on a shared machine the CPU seconds say what the pass itself cost."""
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - t0, time.process_time() - c0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--tokens", type=int, default=131072)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--hooks", default="blocks.1.hook_resid_post,blocks.3.hook_resid_post,blocks.5.hook_resid_post")
    ap.add_argument("--compute-dtype", default="float32")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-codecs", action="store_true", help="skip the codec table (saves time under load)")
    args = ap.parse_args()
    hooks = args.hooks.split(",")
    tmp = Path(tempfile.mkdtemp(prefix="actstore-bench-"))
    try:
        model_name = random_pythia(tmp / "model") if args.model == "pythia-70m-shape" else args.model
        model = load_model(model_name, args.device, args.compute_dtype)
        opts = CorpusOptions(corpus="builtin", split="train", seq_len=args.seq_len)
        batches = []
        for b in token_sequences(opts, model.tokenizer, batch_seqs=args.batch_size):
            batches.append(torch.from_numpy(b.astype(np.int64)).to(args.device))
            if sum(len(x) for x in batches) * args.seq_len >= args.tokens:
                break
        n_tok = sum(x.numel() for x in batches)
        stop = stop_layer(hooks)

        @torch.inference_mode()
        def forward(stop_at=None):
            for x in batches:
                model.bridge(x, stop_at_layer=stop_at)
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()

        @torch.inference_mode()
        def forward_to_last_hook():
            for x in batches:
                fired = set()

                def stop_when_all_fired(tensor, hook, name):
                    fired.add(name)
                    if len(fired) == len(hooks):
                        raise Stop

                try:
                    with model.bridge.hooks(fwd_hooks=[(h, partial(stop_when_all_fired, name=h)) for h in hooks]):
                        model.bridge(x, stop_at_layer=stop)
                except Stop:
                    pass
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()

        def capture_only():
            for x in batches:
                {h: a.to(torch.float16).cpu() for h, a in capture(model, x, hooks).items()}

        def run_harvest():
            out = tmp / "h.zarr"
            shutil.rmtree(out, ignore_errors=True)
            harvest(
                str(out),
                HarvestOptions(
                    model=model_name,
                    hooks=tuple(hooks),
                    seq_len=args.seq_len,
                    tokens=n_tok,
                    batch_size=args.batch_size,
                    split="train",
                    compute_dtype=args.compute_dtype,
                    device=args.device,
                ),
                loaded=model,
            )

        forward(stop)  # warm-up
        load_before = os.getloadavg()
        passes = {
            "full": forward,
            "stop": lambda: forward(stop),
            "last_hook": forward_to_last_hook,
            "capture": capture_only,
            "harvest": run_harvest,
        }
        times: dict[str, list[float]] = {name: [] for name in passes}
        cpu: dict[str, list[float]] = {name: [] for name in passes}
        for _ in range(args.repeats):
            for name, fn in passes.items():
                wall, used = timed(fn)
                times[name].append(wall)
                cpu[name].append(used)
        med = {k: statistics.median(v) for k, v in times.items()}
        best = {k: min(v) for k, v in times.items()}
        med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
        load_after = os.getloadavg()
        labels = {
            "full": "bare forward, whole model",
            "stop": f"bare forward, stop_at_layer={stop}",
            "last_hook": "bare forward, stopped at last hook",
            "capture": "capture only (no store)",
            "harvest": "actstore harvest",
        }
        print(
            f"model {args.model}, {n_tok:,} tokens, batch {args.batch_size} x {args.seq_len}, "
            f"hooks {', '.join(hooks)}, compute {args.compute_dtype} on {args.device}, torch threads {torch.get_num_threads()}, "
            f"{args.repeats} interleaved rounds, load average {load_before[0]:.1f} before, {load_after[0]:.1f} after"
        )
        print(
            f"{'pass':<38}{'tokens/s (median)':>18}{'vs stop (median)':>18}{'vs stop (best)':>16}{'CPU s':>8}{'vs stop':>9}"
        )
        for name, label in labels.items():
            print(
                f"{label:<38}{n_tok / med[name]:>18,.0f}{med['stop'] / med[name]:>17.2f}x{best['stop'] / best[name]:>15.2f}x"
                f"{med_cpu[name]:>8.2f}{med_cpu['stop'] / med_cpu[name]:>8.2f}x"
            )

        # Codecs: the harvested activations, written once per codec.
        codecs = () if args.no_codecs else CODECS
        src = st.open_store(str(tmp / "h.zarr"))
        acts = {h: src["acts"][h][:] for h in hooks}
        n_values = sum(a.size for a in acts.values())
        print(f"\n{'codec':<14}{'bytes/value':>12}{'ratio':>8}{'write MB/s':>12}{'max rel err':>13}{'RMS rel err':>13}")
        codec_rows = {}
        for codec in codecs:
            out = tmp / f"codec-{codec}.zarr"
            group = zarr.open_group(str(out), mode="w")
            t0 = time.perf_counter()
            for h, a in acts.items():
                filters, compressors = st.codec_chain(codec, "float16", 2)
                arr = group.create_array(
                    h.replace(".", "_"),
                    shape=a.shape,
                    chunks=(args.batch_size, *a.shape[1:]),
                    dtype=a.dtype,
                    filters=filters,
                    compressors=compressors,
                )
                arr[:] = a
            dt = time.perf_counter() - t0
            size = st.bytes_on_disk(out)
            row = {
                "bytes_per_value": size / n_values,
                "ratio": 2 * n_values / size,
                "write_MBps": 2 * n_values / dt / 1e6,
            }
            if st.is_lossy(codec):
                errs = []
                for a in acts.values():
                    x = a.astype(np.float32)
                    e = st.apply_lossy(codec, a).astype(np.float32) - x
                    errs.append(((e**2).sum(-1), (x**2).sum(-1)))
                row["max_rel"] = float(max(np.sqrt(es / np.maximum(xs, 1e-30)).max() for es, xs in errs))
                row["rms_rel"] = float(np.sqrt(sum(es.sum() for es, _ in errs) / sum(xs.sum() for _, xs in errs)))
            codec_rows[codec] = row
            print(
                f"{codec:<14}{row['bytes_per_value']:>12.3f}{row['ratio']:>7.2f}x{row['write_MBps']:>12.0f}"
                f"{row.get('max_rel', 0):>13.2e}{row.get('rms_rel', 0):>13.2e}"
            )

        headline = {
            "harvest_vs_forward": round(med["full"] / med["harvest"], 3),
            "harvest_vs_stopped_forward": round(med["stop"] / med["harvest"], 3),
            "harvest_vs_stopped_forward_best": round(best["stop"] / best["harvest"], 3),
            "harvest_vs_forward_to_last_hook": round(med["last_hook"] / med["harvest"], 3),
            "harvest_vs_stopped_forward_cpu": round(med_cpu["stop"] / med_cpu["harvest"], 3),
            "harvest_tokens_per_s": round(n_tok / med["harvest"]),
            "forward_tokens_per_s": round(n_tok / med["full"]),
            "load_average": round(load_after[0], 1),
            **{f"bytes_per_value_{c}": round(r["bytes_per_value"], 3) for c, r in codec_rows.items()},
        }
        print(
            f"harvest vs the bare forward stopped at the last hooked layer: {headline['harvest_vs_forward_to_last_hook']}"
            f" (goal ≥ {GOAL}; median of the rounds)"
        )
        print(json.dumps({**headline, "goal": GOAL}))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
