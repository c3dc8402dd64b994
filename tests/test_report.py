"""The report: every figure drawn from the named queries, embedded in the HTML, captioned; missing tables skipped."""

from __future__ import annotations

import base64
import dataclasses
import io
import re
import shutil
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from click.testing import CliRunner
from matplotlib.image import imread

from actstore import analytics, figures, plotting
from actstore.cli.report import report as command
from actstore.errors import UsageError
from actstore.run import SAESpec, write_tables
from actstore.steps import report as rp

# blocks.10 after blocks.2: depth order comes from the `layer` column, not from sorting hook names as text.
HOOKS = {"blocks.2.hook_resid_post": 2, "blocks.10.hook_resid_post": 10}
KS = (4, 8)
N_SEQ, SEQ_LEN, D_MODEL, D_SAE, DEAD = 6, 8, 16, 32, 3  # the last DEAD latents never fire
IMG = re.compile(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"')


def _write_sae(run: Path, hook: str, k: int, rng: np.random.Generator) -> str:
    """One SAE's records in the schemas of train, eval and darkmatter, with plausible (random) numbers."""
    sae_id, n = SAESpec(hook, k, expansion=2, tokens=1000, seed=0).sae_id, N_SEQ * SEQ_LEN

    def u(lo: float, hi: float, size: int = n) -> np.ndarray:
        return rng.uniform(lo, hi, size).astype(np.float32)

    sst, ce_orig = u(1, 2), u(2, 3)
    sse = sst * u(0.02, 0.1) / k
    ce_patched = ce_orig + u(0.01, 0.1)
    tokens = pl.DataFrame(
        {
            "store": ["synthetic.zarr"] * n,
            "seq": np.repeat(np.arange(N_SEQ), SEQ_LEN).astype(np.int32),
            "pos": np.tile(np.arange(SEQ_LEN), N_SEQ).astype(np.int16),
            "token": rng.integers(0, 50, n).astype(np.int32),
            "next_token": rng.integers(0, 50, n).astype(np.int32),
            "x_norm": u(3, 4),
            "recon_norm": u(3, 4),
            "err_norm": np.sqrt(sse),
            "sse": sse,
            "sst": sst,
            "dot": u(8, 9),
            "cos": u(0.9, 1),
            "relerr": u(0.1, 0.3),
            "l0": np.full(n, k, np.float32),
            "rate_bits": u(5 * k, 6 * k),
            "ce_orig": ce_orig,
            "ce_zero": ce_orig + u(1, 2),
            "kl_zero": u(1, 2),
            "ce_patched": ce_patched,
            "kl_patched": u(0.01, 0.1),
            **{f"{m}_{b}": u(0.01, 0.1) for b in ("eps", "samecos", "actdiff") for m in ("ce", "kl")},
        }
    )
    other = np.random.default_rng(k)  # eval --sensitivity's columns, drawn apart (the draws below stay)
    tokens = tokens.with_columns(
        fo_patched=(pl.col("ce_patched") - pl.col("ce_orig")) * other.uniform(0.5, 1.5, n),
        swd_patched=pl.col("kl_patched") * other.uniform(0.5, 1.5, n),
        swd_eps=pl.col("kl_eps") * other.uniform(0.5, 1.5, n),
        iso_sens=pl.col("kl_eps") / (0.5 * pl.col("sse")) * other.uniform(0.5, 1.5, n),
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
        {"latent": np.arange(D_SAE, dtype=np.int32), "fires": fires, "firing_rate": fires / n, "dec_norm": 1.0}
    )
    saes = pl.DataFrame(
        {
            "model": "synthetic",
            "hook": hook,
            "layer": HOOKS[hook],
            "n_layers": 12,
            "d_model": D_MODEL,
            "d_sae": D_SAE,
            "k": k,
            "expansion": 2,
            "train_tokens": 1000,
            "seed": 0,
            "architecture": "topk",
            "path": "",
            "lr": 1e-3,
            "still_improving": 0.06 if k == 4 else 0.01,  # one SAE still learning when its rate decayed
            "undertrained": k == 4,
        }
    )
    step = np.arange(1, 6)
    curves = pl.DataFrame(
        {
            "step": step,
            "tokens": step * 200,
            "mse": 1 / step,
            "nmse": 0.5 / step,
            "explained_variance": 1 - 0.5 / step,
            "fvu": 0.5 / step,
            "l0": float(k),
            "dead_frac": 0.0,
            "batch_usage": 0.9,
            "lr": 1e-3,
            "aux_loss": 0.0,
        }
    )
    darkmatter = pl.DataFrame(
        {
            "hook": hook,
            "store": "synthetic.zarr",
            "n_fit": n // 2,
            "n_test": n // 2,
            "vector_r2": 0.5,
            "fvu": 0.1,
            "fvu_linear": 0.06,
            "fvu_nonlinear": 0.04,
            "norm_r2_err": 0.7,
            "probe": "probe.safetensors",
        }
    )
    held_out = tokens.filter(pl.col("seq") % 2 == 1).select("store", "seq", "pos", "ce_orig", "ce_patched")
    darkmatter_tokens = held_out.select(
        "store",
        "seq",
        "pos",
        ce_linear=(pl.col("ce_orig") + pl.col("ce_patched")) / 2,
        kl_linear=pl.lit(0.03),
        ce_nonlinear=pl.col("ce_patched") - 0.001,
        kl_nonlinear=pl.lit(0.05),
    )
    frames = {"tokens": tokens, "codes": codes, "latents": latents, "saes": saes, "curves": curves}
    write_tables(run, sae_id, frames | {"darkmatter": darkmatter, "darkmatter_tokens": darkmatter_tokens})
    z = rng.normal(1.0, 2.0, N_SEQ)
    eps = pl.DataFrame({"store": "synthetic.zarr", "seq": np.arange(N_SEQ), "pos": 4, "n_draws": 50, "z": z})
    write_tables(run, sae_id, {"eps_zscores": eps}, part="pos4")  # eval --patch-pos 4 --eps-draws 50
    return sae_id


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """2 hooks × 2 k of synthetic records (with dark matter), and a `layers` table."""
    path, rng = tmp_path_factory.mktemp("report") / "run", np.random.default_rng(0)
    for hook in HOOKS:
        for k in KS:
            _write_sae(path, hook, k, rng)
    layers = pl.DataFrame(
        {
            "store": "synthetic.zarr",
            "model": "synthetic",
            "hook": list(HOOKS),
            "layer": list(HOOKS.values()),
            "d_model": D_MODEL,
            "n_tokens": N_SEQ * SEQ_LEN,
            "pr": [3.0, 5.0],
            "pr_deflated": [2.5, 4.0],
            "variance": [1.0, 2.0],
            "top_share": [0.3, 0.2],
        }
    )
    write_tables(path, "abc123", {"layers": layers})
    return path


@pytest.fixture(scope="module")
def written(run) -> Path:
    return rp.report(str(run))


def test_report_writes_markdown_and_self_contained_html_into_run_report(run, written):
    assert written == (run / "report").resolve()
    page, markdown = (written / "report.html").read_text(), (written / "report.md").read_text()
    assert page.startswith("<!doctype html>") and page.rstrip().endswith("</html>")
    assert not re.search(r'(src|href)="(?!data:)', page), "the HTML must not load anything from outside"
    # every table the report reads exists in this run; the cross-model ones say why a one-model run has none
    skipped = [line for line in markdown.splitlines() if "Skipped" in line]
    assert len(skipped) == 2 and all("needs SAEs of two models" in line for line in skipped), skipped
    lr_table = markdown.split("(query `lr_sweep`)", 1)[1].split("\n#", 1)[0]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lr_table.splitlines() if line.startswith("|")]
    flags = [dict(zip(rows[0], r, strict=True))["undertrained"] for r in rows[2:]]
    assert sorted(flags) == ["False", "False", "True", "True"]  # the two k = 4 SAEs were still learning
    assert len(IMG.findall(page)) == len(rp.FIGURES)
    for table in rp.TABLES:
        assert f"{table.title} (query `{table.query}`)" in markdown
    assert sorted(p.name for p in written.parent.iterdir()) == ["records", "report"]  # no .partial or .old


def test_every_embedded_image_decodes_and_matches_the_markdown(written):
    images = IMG.findall((written / "report.html").read_text())
    linked = re.findall(r"!\[[^\]]*\]\((figures/[\w.]+\.png)\)", (written / "report.md").read_text())
    assert len(images) == len(linked) == len(rp.FIGURES)
    assert sorted(p.name for p in (written / "figures").iterdir()) == sorted(f"{s.name}.png" for s in rp.FIGURES)
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


def test_summary_table_lists_every_sae_in_depth_order(written):
    markdown, page = (written / "report.md").read_text(), (written / "report.html").read_text()
    ids = [SAESpec(hook, k, 2, 1000, 0).sae_id for hook in HOOKS for k in KS]
    assert ids[0] == "blocks.2.hook_resid_post__k4_x2_1k_s0"
    for sae_id in ids:
        assert f"| {sae_id} |" in markdown and f"<td>{sae_id}</td>" in page
    rows = [markdown.index(f"| {sae_id} |") for sae_id in ids]
    assert rows == sorted(rows)


def test_darkmatter_tables_list_every_sae(written):
    markdown = (written / "report.md").read_text()
    patch = markdown.split("query `darkmatter_patch`)", 1)[1]
    header = patch.strip().splitlines()[0]
    assert "closed_linear" in header and "closed_nonlinear" in header and "sae_id" not in header
    assert sum(line.startswith("| synthetic |") for line in patch.splitlines()) == len(HOOKS) * len(KS)


def test_panels_follow_the_layer_column_and_curves_need_no_parsable_sae_id(run):
    by_pos = analytics.query(str(run), "kl_gap_by_pos")
    assert [title for title, _ in plotting.by_panel(by_pos)] == list(HOOKS)
    curves = analytics.query(str(run), "curves").with_columns(sae_id=pl.format("external-{}-{}", "hook", "k"))
    fig = figures.plot_curves(curves)
    visible = [ax for ax in fig.axes if ax.get_visible() and ax.get_title()]
    assert len(visible) == len(HOOKS) * len(figures.CURVE_METRICS)
    assert {ax.get_title().split("\n")[0] for ax in visible} == set(HOOKS)
    assert [h.get_label() for h in fig.legends[0].legend_handles] == [f"k={k}" for k in KS]


def test_run_without_layers_or_darkmatter_notes_the_skipped_parts_and_cli_prints_both_paths(run, tmp_path):
    bare = tmp_path / "bare"
    shutil.copytree(run / "records", bare / "records", ignore=shutil.ignore_patterns("layers", "darkmatter*"))
    result = CliRunner().invoke(command, [str(bare), "--out", str(tmp_path / "out"), "--quiet"])
    assert result.exit_code == 0, result.output
    out = (tmp_path / "out").resolve()
    assert result.output.split() == [str(out / "report.md"), str(out / "report.html")]
    markdown = (out / "report.md").read_text()
    assert (
        "Skipped: this run has no `layers` table (`actstore eval` or `actstore layers STORE --run RUN` writes it)."
        in markdown
    )
    assert "Skipped: this run has no `darkmatter` table (`actstore darkmatter RUN` writes it)." in markdown
    assert "Skipped: this run has no `darkmatter_tokens` table (`actstore darkmatter RUN` writes it)." in markdown
    assert markdown.count("Skipped:") == 3 + 2  # and the two cross-model tables of a one-model run
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
