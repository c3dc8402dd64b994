"""Harvest throughput against the bare forward pass, and bytes per value for every codec.

    python bench/harvest.py [--model tiny|pythia-70m-shape|DIR] [--tokens 131072] [--batch-size 32]
                            [--seq-len 128] [--hooks ...] [--compute-dtype float32]

Runs, in one process, on the same model, batches and tokens:
  1. the bare forward pass capturing nothing (the whole model, as a user would run it);
  2. the bare forward pass stopped after the last hooked layer (the least any harvest must pay);
  3. `actstore.steps.harvest` into a fresh store (tokenizing, capture, conversion, compression, writing, commits).
Then writes the harvested activations with each codec and reports bytes/value, write speed and, for the
lossy ones, the relative error. `pythia-70m-shape` is a randomly initialised GPT-NeoX with Pythia-70M's
shape (d=512, 6 layers, 50k vocabulary), built locally: the compute profile of a real model, offline.
The last line is one JSON object of the headline figures.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import zarr

from actstore import store as st
from actstore.corpus import CorpusOptions, token_sequences
from actstore.model import capture, load_model, stop_layer
from actstore.steps.harvest import HarvestOptions, harvest
from actstore.tiny import random_pythia

CODECS = ("none", "lz4", "zstd", "bitround-7", "bitround-5", "bitround-3")  # lz4 is the default (store.DEFAULT_CODEC)


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


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
        # Interleaved rounds, best of each: this machine's noise (±5%) hits every pass alike.
        passes = {"full": forward, "stop": lambda: forward(stop), "capture": capture_only, "harvest": run_harvest}
        best = {name: float("inf") for name in passes}
        for _ in range(args.repeats):
            for name, fn in passes.items():
                best[name] = min(best[name], timed(fn))
        t_full, t_stop, t_capture, t_harvest = (best[k] for k in ("full", "stop", "capture", "harvest"))
        rows = [
            ("bare forward, whole model", t_full),
            (f"bare forward, stop_at_layer={stop}", t_stop),
            ("capture only (no store)", t_capture),
            ("actstore harvest", t_harvest),
        ]
        print(
            f"model {args.model}, {n_tok:,} tokens, batch {args.batch_size} x {args.seq_len}, "
            f"hooks {', '.join(hooks)}, compute {args.compute_dtype} on {args.device}, torch threads {torch.get_num_threads()}"
        )
        print(f"{'pass':<36}{'tokens/s':>12}{'vs bare forward':>18}")
        for name, t in rows:
            print(f"{name:<36}{n_tok / t:>12,.0f}{t_full / t:>17.2f}x")

        # Codecs: the harvested activations, written once per codec.
        src = st.open_store(str(tmp / "h.zarr"))
        acts = {h: src["acts"][h][:] for h in hooks}
        n_values = sum(a.size for a in acts.values())
        print(f"\n{'codec':<14}{'bytes/value':>12}{'ratio':>8}{'write MB/s':>12}{'max rel err':>13}{'RMS rel err':>13}")
        codec_rows = {}
        for codec in CODECS:
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
            "harvest_vs_forward": round(t_full / t_harvest, 3),
            "harvest_vs_stopped_forward": round(t_stop / t_harvest, 3),
            "harvest_tokens_per_s": round(n_tok / t_harvest),
            "forward_tokens_per_s": round(n_tok / t_full),
            **{f"bytes_per_value_{c}": round(r["bytes_per_value"], 3) for c, r in codec_rows.items()},
        }
        print(json.dumps(headline))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
