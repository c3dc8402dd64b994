-- cross_sae_predictability: does one SAE's per-token error norm predict another's? (every pair)
-- Pairs are SAEs evaluated on the same tokens (same store, seq, pos).
-- Reads: tokens, saes.
-- corr: Pearson correlation of ‖e_i‖ and ‖e_j‖ over all tokens. heldout_r2: least squares
--   ‖e_j‖ ≈ a·‖e_i‖ + c fitted on even sequences, R² on odd ones (docs/METHODS.md). High values across
--   different k or depths say the error is a property of the token, not of one dictionary.
SET VARIABLE min_pos = coalesce(getvariable('min_pos'), 0);        -- first position counted
SET VARIABLE max_pos = coalesce(getvariable('max_pos'), 1000000);  -- last position counted

WITH e AS (
    SELECT sae_id, store, seq, pos, err_norm, seq % 2 = 0 AS fit
    FROM tokens WHERE pos BETWEEN getvariable('min_pos') AND getvariable('max_pos')
),
pairs AS (
    SELECT i.sae_id AS sae_i, j.sae_id AS sae_j, i.fit, i.err_norm AS x, j.err_norm AS y
    FROM e AS i JOIN e AS j USING (store, seq, pos)
    WHERE i.sae_id <> j.sae_id
),
fits AS (
    SELECT sae_i, sae_j, regr_slope(y, x) FILTER (WHERE fit) AS a, regr_intercept(y, x) FILTER (WHERE fit) AS c,
        corr(x, y) AS corr
    FROM pairs GROUP BY ALL
),
scored AS (
    SELECT p.sae_i, p.sae_j, any_value(f.corr) AS corr,
        1 - sum((p.y - f.a * p.x - f.c) ^ 2) / (var_pop(p.y) * count(*)) AS heldout_r2,
        count(*) AS n_test
    FROM pairs AS p JOIN fits AS f USING (sae_i, sae_j)
    WHERE NOT p.fit
    GROUP BY ALL
)
SELECT si.hook AS hook_i, si.layer AS layer_i, si.k AS k_i, sj.hook AS hook_j, sj.layer AS layer_j, sj.k AS k_j, sc.corr, sc.heldout_r2, sc.n_test,
    sc.sae_i, sc.sae_j
FROM scored AS sc
JOIN saes AS si ON si.sae_id = sc.sae_i
JOIN saes AS sj ON sj.sae_id = sc.sae_j
ORDER BY si.layer, si.k, sj.layer, sj.k;
