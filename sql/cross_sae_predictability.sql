-- cross_sae_predictability: does one SAE's per-token error norm predict another's? (every pair)
-- Pairs are SAEs evaluated on the same tokens (same store, seq, pos).
-- Reads: tokens, saes.
-- form=eq13 (default; study 004, Eq. 13): ‖e_j‖² ≈ c·‖e_i‖², one scalar c, no intercept, fitted by least
--   squares on even sequences (c = Σxy/Σx²); heldout_r2 = 1 − Σ(y − c·x)²/Σ(y − ȳ)² on odd ones.
--   form=affine: the earlier variant, ‖e_j‖ ≈ a·‖e_i‖ + b on unsquared norms. corr: Pearson correlation
--   of the regressed quantities over all tokens. High values across different k or depths say the error
--   is a property of the token, not of one dictionary.
SET VARIABLE form = coalesce(getvariable('form'), 'eq13');         -- eq13 (‖e‖², no intercept) or affine (‖e‖, intercept)
SET VARIABLE min_pos = coalesce(getvariable('min_pos'), 0);        -- first position counted
SET VARIABLE max_pos = coalesce(getvariable('max_pos'), 1000000);  -- last position counted
SELECT CASE WHEN getvariable('form') NOT IN ('eq13', 'affine')
            THEN error('form must be eq13 or affine, not ' || getvariable('form')) END;

WITH e AS (
    SELECT sae_id, store, seq, pos, seq % 2 = 0 AS fit,
        CASE getvariable('form') WHEN 'eq13' THEN sse::DOUBLE ELSE err_norm::DOUBLE END AS v
    FROM tokens WHERE pos BETWEEN getvariable('min_pos') AND getvariable('max_pos')
),
pairs AS (
    SELECT i.sae_id AS sae_i, j.sae_id AS sae_j, i.fit, i.v AS x, j.v AS y
    FROM e AS i JOIN e AS j USING (store, seq, pos)
    WHERE i.sae_id <> j.sae_id
),
fits AS (
    SELECT sae_i, sae_j,
        CASE getvariable('form') WHEN 'eq13' THEN sum(x * y) FILTER (WHERE fit) / sum(x * x) FILTER (WHERE fit)
             ELSE regr_slope(y, x) FILTER (WHERE fit) END AS c,
        CASE getvariable('form') WHEN 'eq13' THEN 0 ELSE regr_intercept(y, x) FILTER (WHERE fit) END AS b,
        corr(x, y) AS corr
    FROM pairs GROUP BY ALL
),
scored AS (
    SELECT p.sae_i, p.sae_j, any_value(f.corr) AS corr, any_value(f.c) AS c,
        1 - sum((p.y - f.c * p.x - f.b) ^ 2) / (var_pop(p.y) * count(*)) AS heldout_r2,
        count(*) AS n_test
    FROM pairs AS p JOIN fits AS f USING (sae_i, sae_j)
    WHERE NOT p.fit
    GROUP BY ALL
)
SELECT si.hook AS hook_i, si.layer AS layer_i, si.k AS k_i, sj.hook AS hook_j, sj.layer AS layer_j, sj.k AS k_j,
    sc.corr, sc.c, sc.heldout_r2, sc.n_test, getvariable('form') AS form, sc.sae_i, sc.sae_j
FROM scored AS sc
JOIN saes AS si ON si.sae_id = sc.sae_i
JOIN saes AS sj ON sj.sae_id = sc.sae_j
ORDER BY si.layer, si.k, sj.layer, sj.k;
