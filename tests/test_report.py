"""The report: every figure drawn from the named queries, embedded in the HTML, captioned; missing tables skipped."""

from __future__ import annotations

import base64
import dataclasses
import io
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from click.testing import CliRunner
from matplotlib.image import imread

import actstore.report  # noqa: F401  (the module; the package attribute `actstore.report` is the function)
from actstore import records as rec
from actstore.cli.report import report as command
from actstore.errors import UsageError

rp = sys.modules["actstore.report"]

HOOKS = ("blocks.0.hook_resid_post", "blocks.2.hook_resid_post")
KS = (4, 8)
N_SEQ, SEQ_LEN, D_MODEL, D_SAE, DEAD = 6, 8, 16, 32, 3  # the last DEAD latents never fire
IMG = re.compile(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"')


def _write_sae(run: Path, hook: str, k: int, rng: np.random.Generator) -> str:
    """One SAE's records in eval's and train's schemas, with plausible (random) numbers."""
    sae_id, n = f"{hook}__k{k}_x2_1k_s0", N_SEQ * SEQ_LEN

    def u(lo: float, hi: float) -> np.ndarray:
        return rng.uniform(lo, hi, n).astype(np.float32)

    sst, ce_orig = u(1, 2), u(2, 3)
    sse = sst * u(0.02, 0.1) / k
    tokens = pl.DataFrame(
        {
            "seq": np.repeat(np.arange(N_SEQ), SEQ_LEN).astype(np.int32),
            "pos": np.tile(np.arange(SEQ_LEN), N_SEQ).astype(np.int16),
            "token": rng.integers(0, 50, n).astype(np.int32),
            "next_token": rng.integers(0, 50, n).astype(np.int32),
            **{"ce_orig": ce_orig, "ce_zero": ce_orig + u(1, 2), "kl_zero": u(1, 2), "x_norm": u(3, 4)},
            **{"recon_norm": u(3, 4), "err_norm": np.sqrt(sse), "sse": sse, "sst": sst, "dot": u(8, 9)},
            **{"cos": u(0.9, 1), "relerr": u(0.1, 0.3), "l0": np.full(n, k, np.float32)},
            **{"ce_patched": ce_orig + u(0, 0.1), "kl_patched": u(0.01, 0.1)},
            **{f"{m}_{b}": u(0.01, 0.1) for b in ("eps", "samecos", "actdiff") for m in ("ce", "kl")},
            "rate_bits": u(5 * k, 6 * k),
            "store": ["synthetic.zarr"] * n,
        }
    )
    latent = np.argsort(rng.random((n, D_SAE - DEAD)), axis=1)[:, :k]
    codes = pl.DataFrame(
        {
            "seq": np.repeat(tokens["seq"].to_numpy(), k),
            "pos": np.repeat(tokens["pos"].to_numpy(), k),
            "latent": latent.ravel().astype(np.int32),
            "value": rng.uniform(0.5, 2, n * k).astype(np.float32),
        }
    )
    fires = np.bincount(latent.ravel(), minlength=D_SAE)
    latents = pl.DataFrame(
        {"latent": np.arange(D_SAE, dtype=np.int32), "fires": fires, "firing_rate": fires / n}
    ).with_columns(dec_norm=pl.lit(1.0, pl.Float32))
    layer = int(hook.split(".")[1])
    saes = pl.DataFrame(
        [{"model": "synthetic", "hook": hook, "layer": layer, "d_model": D_MODEL, "d_sae": D_SAE, "k": k,
          "expansion": 2, "train_tokens": 1000, "seed": 0, "architecture": "topk", "path": ""}]
    )  # fmt: skip
    step = np.arange(1, 6)
    curves = pl.DataFrame(
        {"step": step, "tokens": step * 200, "mse": 1 / step, "nmse": 0.5 / step, "explained_variance": 1 - 0.5 / step,
         "fvu": 0.5 / step, "l0": [float(k)] * 5, "dead_frac": [0.0] * 5, "batch_usage": [0.9] * 5,
         "lr": [1e-3] * 5, "aux_loss": [0.0] * 5}
    )  # fmt: skip
    frames = {"tokens": tokens, "codes": codes, "latents": latents, "saes": saes, "curves": curves}
    rec.write_parts(run, sae_id, frames)
    return sae_id


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """2 hooks × 2 k of synthetic records, and a `layers` table."""
    path, rng = tmp_path_factory.mktemp("report") / "run", np.random.default_rng(0)
    for hook in HOOKS:
        for k in KS:
            _write_sae(path, hook, k, rng)
    layers = pl.DataFrame(
        {"store": "synthetic.zarr", "model": "synthetic", "hook": list(HOOKS), "layer": [0, 2], "d_model": D_MODEL,
         "n_tokens": N_SEQ * SEQ_LEN, "pr": [3.0, 5.0], "pr_deflated": [2.5, 4.0], "variance": [1.0, 2.0],
         "top_share": [0.3, 0.2]}
    )  # fmt: skip
    rec.write_parts(path, "abc123", {"layers": layers}, partition="store_key")
    return path


@pytest.fixture(scope="module")
def written(run) -> Path:
    return rp.report(str(run))


def test_report_writes_markdown_and_self_contained_html_into_run_report(run, written):
    assert written == (run / "report").resolve()
    page = (written / "report.html").read_text()
    assert (written / "report.md").is_file() and page.startswith("<!doctype html>")
    assert not re.search(r'(src|href)="(?!data:)', page), "the HTML must not load anything from outside"


def test_every_embedded_image_decodes_and_matches_the_markdown(written):
    images = IMG.findall((written / "report.html").read_text())
    linked = re.findall(r"!\[[^\]]*\]\((figures/[\w.]+\.png)\)", (written / "report.md").read_text())
    assert len(images) == len(linked) == len(rp.FIGURES)
    for data, link in zip(images, linked, strict=True):
        png = base64.b64decode(data, validate=True)
        assert png == (written / link).read_bytes()
        pixels = imread(io.BytesIO(png), format="png")
        assert pixels.shape[0] > 100 and pixels.shape[1] > 100


def test_every_figure_has_a_two_line_caption(written):
    markdown, page = (written / "report.md").read_text(), (written / "report.html").read_text()
    for spec in rp.FIGURES:
        block = markdown.split(f"(figures/{spec.name}.png)", 1)[1].split("\n## ", 1)[0]
        lines = [line for line in block.strip().splitlines() if line.strip()]
        assert lines[0].startswith(spec.what) and f"`{spec.query}`" in lines[0]
        assert lines[1] == spec.healthy and spec.healthy.startswith("Healthy:")
    assert page.count("<figcaption>") == len(rp.FIGURES) and page.count("<br>Healthy:") == len(rp.FIGURES)


def test_summary_table_lists_every_sae(written):
    markdown, page = (written / "report.md").read_text(), (written / "report.html").read_text()
    for hook in HOOKS:
        for k in KS:
            assert f"| {hook}__k{k}_x2_1k_s0 |" in markdown
            assert f"<td>{hook}__k{k}_x2_1k_s0</td>" in page


def test_run_without_layers_table_notes_the_skipped_figure_and_cli_prints_both_paths(run, tmp_path):
    bare = tmp_path / "bare"
    shutil.copytree(run / "records", bare / "records", ignore=shutil.ignore_patterns("layers"))
    result = CliRunner().invoke(command, [str(bare), "--out", str(tmp_path / "out"), "--quiet"])
    assert result.exit_code == 0, result.output
    out = (tmp_path / "out").resolve()
    assert result.output.split() == [str(out / "report.md"), str(out / "report.html")]
    markdown = (out / "report.md").read_text()
    assert "Skipped: this run has no `layers` table (`actstore layers STORE --run RUN` writes it)." in markdown
    assert "figures/participation_ratio.png" not in markdown and not (out / "figures/participation_ratio.png").exists()
    assert len(IMG.findall((out / "report.html").read_text())) == len(rp.FIGURES) - 1


def test_run_without_records_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="no records/"):
        rp.report(str(tmp_path))
    assert not (tmp_path / "report").exists()


def test_a_directory_holding_other_files_is_never_replaced(run, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(UsageError, match="holds no report"):
        rp.report(str(run), str(tmp_path))
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_a_failed_report_leaves_the_previous_one_intact(run, tmp_path, monkeypatch):
    cheap = [spec for spec in rp.FIGURES if spec.name == "r2_vs_ce_rec"]
    monkeypatch.setattr(rp, "FIGURES", cheap)
    first = rp.report(str(run), str(tmp_path / "out"))
    before = (first / "report.md").read_text()

    def broken(df: pl.DataFrame):
        raise RuntimeError("plot failed")

    monkeypatch.setattr(rp, "FIGURES", [dataclasses.replace(cheap[0], plot=broken)])
    with pytest.raises(RuntimeError, match="plot failed"):
        rp.report(str(run), str(first))
    assert (first / "report.md").read_text() == before and (first / "figures/r2_vs_ce_rec.png").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no .partial or .old left behind
