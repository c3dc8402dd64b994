-- delta: ΔR² and ΔCE_rec between two models at matched relative depth (or two token budgets), with CIs.
-- Reads: tokens, saes, positions.
-- Δ = X(b) − X(a) (docs/METHODS.md). compare=model: a is the smaller model and b the larger (by d_model,
--   then n_layers; never by name), and SAEs pair when their hooks sit at the same depth = layer / n_layers
--   (within depth_tol, or by `layers`) and k, expansion, train_tokens and seed agree; study 000's 70M layer 3
--   of 6 pairs with 410M layer 12 of 24. compare=train_tokens: a is the smallest budget, b the largest, at
--   the same model, hook, k, expansion and seed. The CI is the 2.5/97.5 percentiles of Δ over paired
--   resamples of sequences (the same draws on both sides). cohens_d = (mean_b − mean_a) / √((sd_a² + sd_b²)/2)
--   over the per-sequence CE_rec of each side. mismatch = [ΔR² > 0 and ΔCE_rec < 0]: R² improves while
--   behaviour gets worse; mismatch_rate is its mean over the seeds of that (depth, k, expansion) cell.
SET VARIABLE compare = coalesce(getvariable('compare'), 'model');       -- 'model' or 'train_tokens': what differs
SET VARIABLE a = coalesce(getvariable('a'), NULL);            -- side a (NULL: the smaller model, or the smallest budget)
SET VARIABLE b = coalesce(getvariable('b'), NULL);            -- side b (NULL: the larger model, or the largest budget)
SET VARIABLE depth = coalesce(getvariable('depth'), NULL);    -- only this relative depth, e.g. 0.5 (NULL: every matched depth)
SET VARIABLE depth_tol = coalesce(getvariable('depth_tol'), 0.01);  -- how close two depths must be to pair
SET VARIABLE layers = coalesce(getvariable('layers'), NULL);  -- explicit pairs 'LA:LB,…' (layer of a : layer of b)
SET VARIABLE ce_unit = coalesce(getvariable('ce_unit'), 'pooled');  -- CE_rec pooled over tokens, or 'seq': mean of per-sequence CE_rec
SET VARIABLE min_pos = coalesce(getvariable('min_pos'), 0);   -- first position counted
SET VARIABLE max_pos = coalesce(getvariable('max_pos'), 1000000);  -- last position counted
SET VARIABLE n_boot = coalesce(getvariable('n_boot'), 5000);  -- bootstrap resamples
SET VARIABLE seed = coalesce(getvariable('seed'), 0);         -- seed of the resampling
SET VARIABLE boot_n = boot_n();
SELECT CASE WHEN getvariable('compare') NOT IN ('model', 'train_tokens')
            THEN error('compare must be model or train_tokens, not ' || getvariable('compare')) END;
SELECT check_ce_unit(getvariable('ce_unit'));
SET VARIABLE a = coalesce(getvariable('a')::VARCHAR, CASE getvariable('compare') WHEN 'model' THEN smaller_model()
                                                     ELSE (SELECT min(train_tokens) FROM saes)::VARCHAR END);
SET VARIABLE b = coalesce(getvariable('b')::VARCHAR, CASE getvariable('compare') WHEN 'model' THEN larger_model()
                                                     ELSE (SELECT max(train_tokens) FROM saes)::VARCHAR END);
SELECT CASE WHEN getvariable('compare') = 'model' THEN check_models(getvariable('a'), getvariable('b'))
            AND check_depth_pairs(getvariable('a'), getvariable('b'), getvariable('depth_tol'), getvariable('layers'),
                                  getvariable('depth')) END;
SELECT CASE WHEN getvariable('compare') = 'train_tokens' AND getvariable('a') = getvariable('b')
            THEN error('a and b are both ' || getvariable('a') || ' tokens; the budgets here are: '
                       || (SELECT string_agg(DISTINCT train_tokens::VARCHAR, ', ') FROM saes))
            WHEN getvariable('compare') = 'train_tokens'
             AND NOT EXISTS (SELECT 1 FROM saes WHERE train_tokens::VARCHAR = getvariable('a'))
            THEN error('no SAEs trained on ' || getvariable('a') || ' tokens (a); budgets here: '
                       || (SELECT string_agg(DISTINCT train_tokens::VARCHAR, ', ') FROM saes))
            WHEN getvariable('compare') = 'train_tokens'
             AND NOT EXISTS (SELECT 1 FROM saes WHERE train_tokens::VARCHAR = getvariable('b'))
            THEN error('no SAEs trained on ' || getvariable('b') || ' tokens (b); budgets here: '
                       || (SELECT string_agg(DISTINCT train_tokens::VARCHAR, ', ') FROM saes)) END;

WITH pairs AS (  -- (SAE of side a, SAE of side b) for every matched cell
    SELECT x.sae_id AS sae_a, y.sae_id AS sae_b, p.depth, x.hook AS hook_a, y.hook AS hook_b,
        x.layer AS layer_a, y.layer AS layer_b, x.k, x.expansion, x.train_tokens AS matched, x.seed
    FROM depth_pairs(getvariable('a'), getvariable('b'), getvariable('depth_tol'), getvariable('layers')) AS p
    JOIN saes AS x ON x.model = getvariable('a') AND x.hook = p.hook_a
    JOIN saes AS y ON y.model = getvariable('b') AND y.hook = p.hook_b
        AND y.k = x.k AND y.expansion = x.expansion AND y.train_tokens = x.train_tokens AND y.seed = x.seed
    WHERE getvariable('compare') = 'model'
      AND (getvariable('depth') IS NULL OR abs(p.depth - getvariable('depth')) <= getvariable('depth_tol'))
    UNION ALL
    SELECT x.sae_id, y.sae_id, coalesce(x.depth, x.layer / x.n_layers), x.hook, y.hook, x.layer, y.layer,
        x.k, x.expansion, x.model, x.seed
    FROM saes AS x
    JOIN saes AS y ON y.model = x.model AND y.hook = x.hook AND y.k = x.k AND y.expansion = x.expansion
        AND y.seed = x.seed
    WHERE getvariable('compare') = 'train_tokens'
      AND x.train_tokens::VARCHAR = getvariable('a') AND y.train_tokens::VARCHAR = getvariable('b')
      AND (getvariable('depth') IS NULL OR abs(coalesce(x.depth, x.layer / x.n_layers) - getvariable('depth')) <= getvariable('depth_tol'))
),
stats AS MATERIALIZED (
    SELECT sae_id, b, r2, ce_rec_seq, ce_rec_seq_sd,
        CASE getvariable('ce_unit') WHEN 'seq' THEN ce_rec_seq ELSE ce_rec END AS ce_rec
    FROM sae_stats(getvariable('min_pos'), getvariable('max_pos'), getvariable('n_boot'), getvariable('seed'),
                   getvariable('boot_n'))
    WHERE sae_id IN (SELECT sae_a FROM pairs UNION SELECT sae_b FROM pairs)
),
paired AS (
    SELECT p.*, sa.b, sa.r2 AS r2_a, sb.r2 AS r2_b, sb.r2 - sa.r2 AS d_r2,
        sa.ce_rec AS ce_rec_a, sb.ce_rec AS ce_rec_b, sb.ce_rec - sa.ce_rec AS d_ce_rec,
        (sb.ce_rec_seq - sa.ce_rec_seq) / sqrt((sa.ce_rec_seq_sd ^ 2 + sb.ce_rec_seq_sd ^ 2) / 2) AS cohens_d
    FROM pairs AS p
    JOIN stats AS sa ON sa.sae_id = p.sae_a
    JOIN stats AS sb ON sb.sae_id = p.sae_b AND sb.b = sa.b
),
cells AS (
    SELECT sae_a, sae_b, depth, hook_a, hook_b, layer_a, layer_b, k, expansion, matched, seed,
        any_value(r2_a) FILTER (WHERE b = -1) AS r2_a, any_value(r2_b) FILTER (WHERE b = -1) AS r2_b,
        any_value(d_r2) FILTER (WHERE b = -1) AS d_r2, quantile_cont(d_r2, [0.025, 0.975]) FILTER (WHERE b >= 0) AS ci_r2,
        any_value(ce_rec_a) FILTER (WHERE b = -1) AS ce_rec_a, any_value(ce_rec_b) FILTER (WHERE b = -1) AS ce_rec_b,
        any_value(d_ce_rec) FILTER (WHERE b = -1) AS d_ce_rec, quantile_cont(d_ce_rec, [0.025, 0.975]) FILTER (WHERE b >= 0) AS ci_ce_rec,
        any_value(cohens_d) FILTER (WHERE b = -1) AS cohens_d
    FROM paired
    GROUP BY ALL
)
SELECT
    getvariable('a') AS a, getvariable('b') AS b, matched, depth, layer_a, layer_b, hook_a, hook_b, k, expansion, seed,
    sae_a, sae_b,
    r2_a, r2_b, d_r2, ci_r2[1] AS d_r2_lo, ci_r2[2] AS d_r2_hi,
    ce_rec_a, ce_rec_b, d_ce_rec, ci_ce_rec[1] AS d_ce_rec_lo, ci_ce_rec[2] AS d_ce_rec_hi, cohens_d,
    mismatch(d_r2, d_ce_rec) AS mismatch,
    sum(seed_mismatch / pairs_of_seed) OVER cell / sum(1.0 / pairs_of_seed) OVER cell AS mismatch_rate
FROM (SELECT *,  -- a seed with several pairs (lr twins) counts once: its pairs' mean, weighted 1/pairs
          avg(mismatch(d_r2, d_ce_rec)::INTEGER) OVER (PARTITION BY depth, hook_a, k, expansion, matched, seed) AS seed_mismatch,
          count(*) OVER (PARTITION BY depth, hook_a, k, expansion, matched, seed) AS pairs_of_seed
      FROM cells)
WINDOW cell AS (PARTITION BY depth, hook_a, k, expansion, matched)
ORDER BY depth, hook_a, k, expansion, matched, seed, sae_a, sae_b;
