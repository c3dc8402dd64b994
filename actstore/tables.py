"""The records tables as data: every column's name, type and one-line meaning, defined once.

Why: the Parquet records are the contract between the steps that write them and every reader (the SQL
of `sql/`, the report, a collaborator's bare DuckDB). Writers cast their frames to these schemas (an
unknown or missing column is a bug, caught at write time); `actstore sql` builds empty typed views from
them; the bundle README and docs/METHODS.md describe the same columns. Definitions of the numbers are
in docs/METHODS.md; this module says which columns exist and what each holds.
"""

from __future__ import annotations

from dataclasses import dataclass

SCHEMA_VERSION = "1"

# The perturbation baselines: random errors of the SAE error's size (docs/METHODS.md). Eval patches each
# and writes ce_<name>/kl_<name>; the SQL macro `baseline_kl` finds them as the tokens table's kl_*
# columns other than kl_patched and kl_zero, so adding one here is the only change a new baseline needs.
BASELINES = {
    "eps": "ε-random, same L2 distance",
    "samecos": "random, same cosine",
    "actdiff": "activation difference",
    "sae_norm": "x at the SAE's norm",
    "norm_corrected": "x̂ at x's norm",
}
PATCHES = ("patched", "zero", *BASELINES)  # what eval patches besides the clean pass (`orig`)


@dataclass(frozen=True)
class Column:
    name: str
    type: str  # a DuckDB type: VARCHAR, INTEGER, SMALLINT, BIGINT, FLOAT, DOUBLE, BOOLEAN
    meaning: str


@dataclass(frozen=True)
class Table:
    name: str
    about: str  # one row per …
    partition: str  # the Hive key of its directories: sae_id, or a hash key for per-store/per-model tables
    columns: tuple[Column, ...]
    writer: str  # the command that writes it (named in hints when a run lacks the table)

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.columns]


def _cols(spec: str) -> tuple[Column, ...]:
    """Columns from lines `name TYPE meaning`."""
    out = []
    for line in filter(str.strip, spec.splitlines()):
        name, type_, meaning = line.strip().split(None, 2)
        out.append(Column(name, type_, meaning))
    return tuple(out)


def _patch_columns() -> str:
    lines = ["ce_orig FLOAT next-token cross-entropy of the clean model (NULL at the last position)"]
    what = {"patched": "the SAE's x̂", "zero": "zeros (ablation)"} | {
        b: f"the {d} baseline" for b, d in BASELINES.items()
    }
    for patch in PATCHES:
        lines.append(f"ce_{patch} FLOAT cross-entropy with {what[patch]} patched in at the hook")
        lines.append(f"kl_{patch} FLOAT KL(P_clean ‖ Q) over the vocabulary with {what[patch]} patched in")
    lines += [
        "grad_norm FLOAT ‖∂(Σ CE)/∂x‖ at the token (eval --sensitivity; NULL without)",
        "iso_sens FLOAT Hutchinson estimate of tr(JᵀFJ)/d: an isotropic error of norm r has swd ½r²·iso_sens",
    ]
    for patch in PATCHES:
        lines.append(f"fo_{patch} FLOAT g·δ for {what[patch]}: its first-order share of the summed CE change")
        lines.append(f"swd_{patch} FLOAT ½ (Jδ)ᵀF(Jδ) for {what[patch]}: the second-order expansion of its KL")
    return "\n".join(lines)


TOKEN_KEY = """
store VARCHAR eval store the token comes from (as given to eval)
seq INTEGER sequence index in the store
pos SMALLINT position in the sequence
"""

TABLES: dict[str, Table] = {
    t.name: t
    for t in (
        Table(
            "saes",
            "one row per SAE",
            "sae_id",
            _cols("""
            model VARCHAR model the SAE's activations come from
            hook VARCHAR TransformerLens hook name
            layer INTEGER block of the hook (-1 before the first block, NULL after the last)
            n_layers INTEGER blocks of the model
            depth DOUBLE relative depth layer / n_layers: what cross-model queries match on
            d_model INTEGER width of the hook's activations (the SAE's d_in)
            d_sae INTEGER latents
            k INTEGER active latents per token (TopK; NULL for other architectures)
            expansion INTEGER d_sae / d_model
            train_tokens BIGINT tokens the SAE was trained on
            seed INTEGER initialisation seed
            data_seed INTEGER seed of the order the training data came in (NULL: not trained by actstore)
            architecture VARCHAR topk, relu or jumprelu
            path VARCHAR directory of the SAE's weights
            lr DOUBLE peak learning rate (NULL: not trained by actstore)
            still_improving DOUBLE relative drop of the batch FVU over the last tenth of the steps before the decay
            undertrained BOOLEAN still_improving above actstore's threshold: the curve was still falling steeply
            train_seconds DOUBLE wall time of the SAE's own training steps (reads shared with a sweep excluded)
        """),
            "`actstore train` (our SAEs) or `actstore eval` (external ones)",
        ),
        Table(
            "tokens",
            "one row per (SAE, eval token)",
            "sae_id",
            _cols(
                TOKEN_KEY
                + """
            patch_pos SMALLINT the only patched position (NULL: every position); SQL's tokens view holds NULL, tokens_single the rest
            token INTEGER token id at pos
            next_token INTEGER token id at pos + 1 (-1 at the last position)
            x_norm FLOAT ‖x‖
            recon_norm FLOAT ‖x̂‖
            err_norm FLOAT ‖e‖ = ‖x − x̂‖
            sse FLOAT ‖e‖²
            sst FLOAT ‖x − μ‖², μ the eval-set mean of the hook
            dot FLOAT x·x̂
            cos FLOAT x·x̂ / (‖x‖‖x̂‖)
            relerr FLOAT ‖e‖ / (‖x‖ + 1e-10)
            l0 FLOAT active latents
            rate_bits FLOAT rate proxy: Σ −log₂ p_i over active latents + 8 bits per value
        """
                + _patch_columns()
            ),
            "eval",
        ),
        Table(
            "eps_zscores",
            "one row per (SAE, eval sequence) at eval's --patch-pos P, with --eps-draws N",
            "sae_id",
            _cols(
                TOKEN_KEY
                + """
            n_draws INTEGER ε-random draws at this token
            err_norm FLOAT ‖e‖ at P: the norm of every draw's error
            kl_sae FLOAT KL(P_clean ‖ Q) at P with the SAE's x̂ at P alone
            ce_sae FLOAT cross-entropy at P with the SAE's x̂ at P alone
            kl_mean DOUBLE mean KL at P over the draws
            kl_sd DOUBLE sample standard deviation (ddof 1) of the draws' KL
            z DOUBLE (kl_sae − kl_mean) / kl_sd: how many SDs the SAE sits above random errors of its size
            share_above DOUBLE share of draws with KL ≥ kl_sae
            ce_mean DOUBLE mean cross-entropy at P over the draws
        """
            ),
            "`actstore eval EVAL_STORE --run RUN --patch-pos P --eps-draws N`",
        ),
        Table(
            "eps_draws",
            "one row per (SAE, eval sequence, ε-random draw) at eval's --patch-pos P",
            "sae_id",
            _cols(
                TOKEN_KEY
                + """
            draw INTEGER index of the draw (the same directions for every SAE: paired)
            kl FLOAT KL(P_clean ‖ Q) at P with the draw at P alone
            ce FLOAT cross-entropy at P with the draw at P alone
        """
            ),
            "`actstore eval EVAL_STORE --run RUN --patch-pos P --eps-draws N`",
        ),
        Table(
            "codes",
            "one row per (SAE, eval token, active latent)",
            "sae_id",
            _cols("""
            seq INTEGER sequence index in the eval store
            pos SMALLINT position in the sequence
            latent INTEGER latent index
            value FLOAT its activation
        """),
            "`actstore eval EVAL_STORE --run RUN`",
        ),
        Table(
            "latents",
            "one row per (SAE, latent)",
            "sae_id",
            _cols("""
            latent INTEGER latent index
            fires BIGINT eval tokens it was active on
            firing_rate DOUBLE fires / eval tokens
            dec_norm FLOAT norm of its decoder row
        """),
            "`actstore eval EVAL_STORE --run RUN`",
        ),
        Table(
            "evals",
            "one row per SAE evaluation",
            "sae_id",
            _cols("""
            store VARCHAR eval store
            n_seq INTEGER sequences evaluated
            n_tokens BIGINT tokens evaluated
            seed INTEGER seed of the baselines' random draws
            patch_pos INTEGER the only patched position (NULL: every position)
            options VARCHAR every eval option, as JSON
            actstore VARCHAR actstore version
            created VARCHAR UTC time written
        """),
            "`actstore eval EVAL_STORE --run RUN`",
        ),
        Table(
            "curves",
            "one row per (SAE, logged training step)",
            "sae_id",
            _cols("""
            step INTEGER optimiser steps so far
            tokens BIGINT training tokens so far
            seconds DOUBLE wall time of the SAE's own steps so far
            mse DOUBLE mean over the batch of ‖e‖²/d
            nmse DOUBLE normalised MSE Σ‖e‖² / Σ‖x − mean(x)‖² on the batch (a mean predictor scores 1)
            nmse_uncentred DOUBLE mean over the batch of ‖e‖²/‖x‖² (not mean-centred: a zero predictor scores 1)
            explained_variance DOUBLE 1 − fvu
            fvu DOUBLE Σ‖e‖² / Σ‖x − mean(x)‖² on the batch
            l0 DOUBLE mean active latents per token
            dead_frac DOUBLE share of latents silent for the dead window
            batch_usage DOUBLE share of latents active in the batch
            lr DOUBLE learning rate of the step
            aux_loss DOUBLE AuxK loss
        """),
            "`actstore train`",
        ),
        Table(
            "darkmatter",
            "one row per SAE: its linear error probe",
            "sae_id",
            _cols("""
            hook VARCHAR hook of the SAE
            store VARCHAR eval store the probe was fitted on
            min_pos INTEGER first position the probe was fitted and scored on
            split VARCHAR which tokens fit and which score
            probe_form VARCHAR linear (004 Eq. 10/11: b·x) or affine (b·x + c): the form of every probe and norm fit
            n_fit BIGINT tokens the probe was fitted on (even sequences)
            n_test BIGINT held-out tokens (odd sequences)
            vector_r2 DOUBLE held-out R² of x → e, mean over dimensions
            fvu DOUBLE held-out FVU of the SAE
            fvu_linear DOUBLE fvu − fvu_nonlinear on held-out tokens (004 Fig. 1: the part a linear map of x explains)
            fvu_nonlinear DOUBLE ‖NonlinearError‖² / SST on held-out tokens
            norm_r2_err DOUBLE held-out R² of x → ‖e‖²
            norm_r2_x DOUBLE held-out R² of x → ‖x‖²
            norm_r2_recon DOUBLE held-out R² of x → ‖x̂‖²
            norm_r2_nonlinear DOUBLE held-out R² of x → ‖NonlinearError‖²
            fvu_pursuit DOUBLE held-out FVU of gradient pursuit on the SAE's decoder at each token's own L0 (004 §6.1)
            fvu_nonlinear_pursuit DOUBLE the nonlinear FVU of the pursuit reconstructions (the probe refitted on them)
            prev_sae_id VARCHAR the SAE one layer below whose reconstructions predict this one's error (--prev-layer)
            prev_r2_err DOUBLE held-out R² (mean over dimensions) of that SAE's x̂ → e, affine (004 §6.2)
            prev_r2_linear DOUBLE the same for → LinearError
            prev_r2_nonlinear DOUBLE the same for → NonlinearError
            probe VARCHAR file of the probe's weights
        """),
            "`actstore darkmatter RUN`",
        ),
        Table(
            "darkmatter_tokens",
            "one row per (SAE, held-out eval token)",
            "sae_id",
            _cols(
                TOKEN_KEY
                + """
            err_norm FLOAT ‖e‖ of the token
            linear_norm FLOAT ‖LinearError‖: the probe's prediction of e from x (004 Fig. 12)
            nonlinear_norm FLOAT ‖NonlinearError‖ = ‖e − LinearError‖
            ce_linear FLOAT cross-entropy with x̂ + LinearError patched in
            kl_linear FLOAT KL(P_clean ‖ Q) with x̂ + LinearError patched in
            ce_nonlinear FLOAT cross-entropy with x̂ + NonlinearError patched in
            kl_nonlinear FLOAT KL(P_clean ‖ Q) with x̂ + NonlinearError patched in
        """
            ),
            "`actstore darkmatter RUN`",
        ),
        Table(
            "layers",
            "one row per (store, hook)",
            "store_key",
            _cols("""
            store VARCHAR the store (absolute path or URL)
            model VARCHAR model of the store
            hook VARCHAR hook name
            layer INTEGER block of the hook
            d_model INTEGER width of the activations
            n_tokens BIGINT tokens the moments were taken over
            pr DOUBLE participation ratio (Σλ)²/Σλ² of the covariance
            pr_deflated DOUBLE the same without the top eigen-direction
            variance DOUBLE Σλ, total variance
            top_share DOUBLE λ_max / Σλ
        """),
            "`actstore eval` or `actstore layers STORE --run RUN`",
        ),
        Table(
            "positions",
            "one row per (eval store, hook, position, dimension)",
            "store_key",
            _cols("""
            store VARCHAR eval store (as given to eval, like the tokens table's)
            hook VARCHAR hook name
            pos SMALLINT position in the sequence
            dim INTEGER activation dimension
            n BIGINT evaluated tokens at pos
            dev_sum DOUBLE Σ over those tokens of (x − μ)[dim], μ the tokens table's sst mean
        """),
            "`actstore eval EVAL_STORE --run RUN`",
        ),
        Table(
            "vocab",
            "one row per (model, token id seen)",
            "model_key",
            _cols("""
            model VARCHAR model name
            token INTEGER token id
            text VARCHAR the token's text
        """),
            "`actstore eval EVAL_STORE --run RUN`",
        ),
    )
}


# The SQL views over the tables' files, where they differ from "one view per table, every row": the
# every-position and single-position evaluations share the tokens table's files (a patch_pos key) and are
# read as two views, so no query mixes them by accident.
VIEWS: dict[str, tuple[str, str]] = {
    "tokens": ("tokens", "patch_pos IS NULL"),
    "tokens_single": ("tokens", "patch_pos IS NOT NULL"),
}


def views() -> list[tuple[str, str, str | None]]:
    """(view, table, row filter) of every SQL view: one per table, tokens split by its evaluation mode."""
    out: list[tuple[str, str, str | None]] = []
    for table in TABLES:
        found = [(v, t, f) for v, (t, f) in VIEWS.items() if t == table]
        out += found or [(table, table, None)]
    return out


def polars_schema(table: str) -> dict:
    """The polars dtypes of a table's columns (what writers cast to)."""
    import polars as pl

    types = {
        "VARCHAR": pl.String,
        "INTEGER": pl.Int32,
        "SMALLINT": pl.Int16,
        "BIGINT": pl.Int64,
        "FLOAT": pl.Float32,
        "DOUBLE": pl.Float64,
        "BOOLEAN": pl.Boolean,
    }
    return {c.name: types[c.type] for c in TABLES[table].columns}


def empty_view_sql(table: str) -> str:
    """`SELECT … WHERE false` with the table's typed columns: the view of a table a run lacks."""
    t = TABLES[table]
    cols = [f"NULL::VARCHAR AS {t.partition}"] + [f"NULL::{c.type} AS {c.name}" for c in t.columns]
    return f"SELECT {', '.join(cols)} WHERE false"
