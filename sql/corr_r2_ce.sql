-- corr_r2_ce: per relative depth, does a higher R² go with a higher CE_rec across the sweep and across models?
-- Reads: tokens, saes, positions.
-- Study 000's table, per depth, token budget and expansion: each (model, k) at that depth (hooks paired to
--   the smallest model's by depth = layer / n_layers, within depth_tol) is one point, its R² and CE_rec
--   averaged over seeds (lr twins first). pooled: Pearson correlation over the points (k and scale vary).
--   within_k: the same after subtracting, for each k, the mean over the models at that k from both
--   (docs/METHODS.md), so what k drives is taken out and what scale does remains; n = 2 models × 6 k in
--   study 000. NULL with one model (one point per k).
SET VARIABLE depth_tol = coalesce(getvariable('depth_tol'), 0.01);  -- how close two depths must be to pool
SET VARIABLE train_tokens = coalesce(getvariable('train_tokens'), NULL);  -- only SAEs of this token budget (NULL: all)
SET VARIABLE ce_unit = coalesce(getvariable('ce_unit'), 'pooled');  -- CE_rec pooled over tokens, or 'seq': mean of per-sequence CE_rec
SET VARIABLE min_pos = coalesce(getvariable('min_pos'), 0);        -- first position counted
SET VARIABLE max_pos = coalesce(getvariable('max_pos'), 1000000);  -- last position counted
SELECT check_ce_unit(getvariable('ce_unit'));

WITH anchors AS (  -- the smallest model's hooks: the depths points are pooled at
    SELECT hook AS anchor, layer AS anchor_layer, depth FROM model_hooks() WHERE model = smaller_model()
),
grouped AS (  -- each (model, hook) with the anchor depth it sits at
    SELECT h.model, h.hook, a.anchor, a.anchor_layer, a.depth
    FROM model_hooks() AS h JOIN anchors AS a ON abs(h.depth - a.depth) <= getvariable('depth_tol')
),
guard AS (
    SELECT CASE WHEN max(n) > 1 THEN error('depth_tol ' || getvariable('depth_tol')::DOUBLE
        || ' puts two hooks of one model at one depth; lower depth_tol') END AS ok
    FROM (SELECT count(*) AS n FROM grouped GROUP BY model, anchor)
),
stats AS (  -- one point per (model, k) at each depth, budget and expansion: seeds averaged
    SELECT g.depth, s.train_tokens, s.expansion, s.model, s.hook, s.k, avg(s.r2) AS r2, avg(s.ce_rec) AS ce_rec,
        count(*) AS n_seeds
    FROM seed_stats(getvariable('min_pos'), getvariable('max_pos'), getvariable('ce_unit')) AS s
    JOIN grouped AS g ON g.model = s.model AND g.hook = s.hook
    WHERE getvariable('train_tokens') IS NULL OR s.train_tokens = getvariable('train_tokens')
    GROUP BY ALL
),
centred AS (
    SELECT *, r2 - avg(r2) OVER w AS r2_c, ce_rec - avg(ce_rec) OVER w AS ce_rec_c
    FROM stats WINDOW w AS (PARTITION BY depth, train_tokens, expansion, k)
)
SELECT depth, train_tokens, expansion, string_agg(DISTINCT hook, ', ' ORDER BY hook) AS hooks,
    count(DISTINCT model) AS n_models, count(DISTINCT k) AS n_k, count(*) AS n_points,
    corr(r2, ce_rec) AS pooled,
    CASE WHEN count(*) > count(DISTINCT k) THEN corr(r2_c, ce_rec_c) END AS within_k
FROM centred, guard
WHERE guard.ok IS NULL
GROUP BY depth, train_tokens, expansion
ORDER BY depth, train_tokens, expansion;
