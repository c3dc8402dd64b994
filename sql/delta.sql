-- delta: ΔR² and ΔCE_rec between two models (or two token budgets) at matched hook, k and seed, with CIs.
-- Reads: tokens, saes.
-- Δ = X(b) − X(a) (docs/METHODS.md); its CI is the 2.5/97.5 percentiles of Δ over paired resamples (the same
--   sequence draws on both sides). mismatch = [ΔR² > 0 and ΔCE_rec < 0]: R² improves while behaviour
--   gets worse; mismatch_rate is its mean over the seeds of that (hook, k, expansion) cell. SAEs without a
--   seed or budget in their config (external ones) cannot be matched and are left out.
SET VARIABLE compare = coalesce(getvariable('compare'), 'model');       -- 'model' or 'train_tokens': what differs
SET VARIABLE a = coalesce(getvariable('a'), NULL);            -- side a's value (NULL: the smallest)
SET VARIABLE b = coalesce(getvariable('b'), NULL);            -- side b's value (NULL: the largest)
SET VARIABLE min_pos = coalesce(getvariable('min_pos'), 0);   -- first position counted
SET VARIABLE max_pos = coalesce(getvariable('max_pos'), 1000000);  -- last position counted
SET VARIABLE n_boot = coalesce(getvariable('n_boot'), 5000);  -- bootstrap resamples
SET VARIABLE seed = coalesce(getvariable('seed'), 0);         -- seed of the resampling
SET VARIABLE boot_n = boot_n();
SELECT CASE WHEN getvariable('compare') NOT IN ('model', 'train_tokens')
            THEN error('compare must be model or train_tokens, not ' || getvariable('compare')) END;

WITH sides AS (
    SELECT sae_id, hook, layer, k, expansion, seed, train_tokens,
        CASE getvariable('compare') WHEN 'model' THEN model ELSE train_tokens::VARCHAR END AS side,
        CASE getvariable('compare') WHEN 'model' THEN train_tokens::VARCHAR ELSE model END AS fixed
    FROM saes
),
chosen AS (  -- budgets order as numbers, models as text
    SELECT
        coalesce(getvariable('a')::VARCHAR,
                 CASE getvariable('compare') WHEN 'model' THEN min(side) ELSE min(train_tokens)::VARCHAR END) AS a,
        coalesce(getvariable('b')::VARCHAR,
                 CASE getvariable('compare') WHEN 'model' THEN max(side) ELSE max(train_tokens)::VARCHAR END) AS b
    FROM sides
),
stats AS (
    FROM sae_stats(getvariable('min_pos'), getvariable('max_pos'), getvariable('n_boot'), getvariable('seed'),
                   getvariable('boot_n'))
    JOIN sides USING (sae_id)
),
paired AS (
    SELECT sa.hook, sa.layer, sa.k, sa.expansion, sa.seed, sa.fixed, sa.b,
        sa.r2 AS r2_a, sb.r2 AS r2_b, sb.r2 - sa.r2 AS d_r2,
        sa.ce_rec AS ce_rec_a, sb.ce_rec AS ce_rec_b, sb.ce_rec - sa.ce_rec AS d_ce_rec
    FROM stats AS sa
    JOIN stats AS sb USING (hook, layer, k, expansion, seed, fixed, b)
    CROSS JOIN chosen
    WHERE sa.side = chosen.a AND sb.side = chosen.b AND chosen.a <> chosen.b
),
cells AS (
    SELECT hook, layer, k, expansion, seed, fixed,
        any_value(r2_a) FILTER (WHERE b = -1) AS r2_a, any_value(r2_b) FILTER (WHERE b = -1) AS r2_b,
        any_value(d_r2) FILTER (WHERE b = -1) AS d_r2, quantile_cont(d_r2, [0.025, 0.975]) FILTER (WHERE b >= 0) AS ci_r2,
        any_value(ce_rec_a) FILTER (WHERE b = -1) AS ce_rec_a, any_value(ce_rec_b) FILTER (WHERE b = -1) AS ce_rec_b,
        any_value(d_ce_rec) FILTER (WHERE b = -1) AS d_ce_rec, quantile_cont(d_ce_rec, [0.025, 0.975]) FILTER (WHERE b >= 0) AS ci_ce_rec
    FROM paired
    GROUP BY ALL
)
SELECT
    (SELECT a FROM chosen) AS a, (SELECT b FROM chosen) AS b, fixed AS matched, hook, layer, k, expansion, seed,
    r2_a, r2_b, d_r2, ci_r2[1] AS d_r2_lo, ci_r2[2] AS d_r2_hi,
    ce_rec_a, ce_rec_b, d_ce_rec, ci_ce_rec[1] AS d_ce_rec_lo, ci_ce_rec[2] AS d_ce_rec_hi,
    mismatch(d_r2, d_ce_rec) AS mismatch,
    avg(mismatch(d_r2, d_ce_rec)::INTEGER) OVER (PARTITION BY hook, k, expansion, fixed) AS mismatch_rate
FROM cells
ORDER BY layer, hook, k, expansion, fixed, seed;
