-- kstar: k*(t), the smallest k with CE_rec ≥ t, per model and depth, and the larger model's over the smaller's.
-- Reads: tokens, saes, positions.
-- One curve per model, hook, expansion and token budget: CE_rec averaged over seeds per k; k* interpolates
--   linearly in k between the last k below t and the first k at or above it (docs/METHODS.md, study 000).
--   NULL when no k of the sweep reaches t; the smallest k when it already does (below_sweep: k* is at most
--   that). Sides as in `delta`: a the smaller model, b the larger, hooks paired by relative depth;
--   ratio = k*_b / k*_a. A run with one model gives its k* with b, k_star_b and ratio NULL.
SET VARIABLE targets = coalesce(getvariable('targets'), '0.85,0.9,0.95,0.99');  -- comma-separated CE_rec targets
SET VARIABLE a = coalesce(getvariable('a'), NULL);            -- the smaller model (NULL: by d_model, then n_layers)
SET VARIABLE b = coalesce(getvariable('b'), NULL);            -- the larger model (NULL: by d_model, then n_layers)
SET VARIABLE depth_tol = coalesce(getvariable('depth_tol'), 0.01);  -- how close two depths must be to pair
SET VARIABLE layers = coalesce(getvariable('layers'), NULL);  -- explicit pairs 'LA:LB,…' (layer of a : layer of b)
SET VARIABLE ce_unit = coalesce(getvariable('ce_unit'), 'pooled');  -- CE_rec pooled over tokens, or 'seq': mean of per-sequence CE_rec
SET VARIABLE min_pos = coalesce(getvariable('min_pos'), 0);        -- first position counted
SET VARIABLE max_pos = coalesce(getvariable('max_pos'), 1000000);  -- last position counted
SELECT check_ce_unit(getvariable('ce_unit'));
SET VARIABLE a = coalesce(getvariable('a')::VARCHAR, smaller_model());
SET VARIABLE b = coalesce(getvariable('b')::VARCHAR,
                          CASE WHEN (SELECT count(*) FROM model_order()) > 1 THEN larger_model() END);
SELECT CASE WHEN getvariable('b') IS NOT NULL THEN check_models(getvariable('a'), getvariable('b'))
            AND check_depth_pairs(getvariable('a'), getvariable('b'), getvariable('depth_tol'), getvariable('layers'), NULL)
            WHEN getvariable('a') NOT IN (SELECT model FROM model_order())
            THEN error('model ' || getvariable('a') || ' (a) has no SAEs in this run; it has: ' || models_listed()) END;

WITH curve AS (  -- one sweep curve per model, hook, expansion and budget; seeds averaged (lr twins first)
    SELECT s.model, h.layer, s.hook, s.expansion, s.train_tokens, s.k, avg(s.ce_rec) AS ce_rec
    FROM seed_stats(getvariable('min_pos'), getvariable('max_pos'), getvariable('ce_unit')) AS s
    JOIN model_hooks() AS h USING (model, hook)
    WHERE s.model IN (getvariable('a'), getvariable('b'))
    GROUP BY ALL
    HAVING ce_rec IS NOT NULL AND NOT isnan(ce_rec)
),
steps AS (
    SELECT *, lag(k) OVER w AS k_prev, lag(ce_rec) OVER w AS ce_prev, row_number() OVER w AS i
    FROM curve WINDOW w AS (PARTITION BY model, hook, expansion, train_tokens ORDER BY k)
),
targets AS (SELECT unnest(string_split(getvariable('targets')::VARCHAR, ',')::DOUBLE[]) AS target),
first_hit AS (
    SELECT model, hook, expansion, train_tokens, target, arg_min(k, k) AS k, arg_min(k_prev, k) AS k_prev,
        arg_min(ce_rec, k) AS ce, arg_min(ce_prev, k) AS ce_prev, arg_min(i, k) AS i
    FROM steps CROSS JOIN targets
    WHERE ce_rec >= target
    GROUP BY ALL
),
kstar AS (
    SELECT c.model, c.hook, c.layer, c.expansion, c.train_tokens, t.target, h.i = 1 AS below_sweep,
        CASE WHEN h.i = 1 THEN h.k
             WHEN h.k IS NOT NULL THEN h.k_prev + (t.target - h.ce_prev) * (h.k - h.k_prev) / (h.ce - h.ce_prev)
        END AS k_star
    FROM (SELECT DISTINCT model, hook, layer, expansion, train_tokens FROM curve) AS c
    CROSS JOIN targets AS t
    LEFT JOIN first_hit AS h USING (model, hook, expansion, train_tokens, target)
),
pairs AS (  -- a's hooks, each with b's hook at its depth (none when the run has one model)
    SELECT h.hook AS hook_a, h.depth, p.hook_b, p.layer_b
    FROM model_hooks() AS h
    LEFT JOIN depth_pairs(getvariable('a'), getvariable('b'), getvariable('depth_tol'), getvariable('layers')) AS p
        ON p.hook_a = h.hook
    WHERE h.model = getvariable('a')
)
SELECT getvariable('a') AS a, getvariable('b') AS b, p.depth, x.layer AS layer_a, p.layer_b, x.expansion,
    x.train_tokens, x.target, x.k_star AS k_star_a, y.k_star AS k_star_b, y.k_star / x.k_star AS ratio,
    x.below_sweep AS below_sweep_a, y.below_sweep AS below_sweep_b
FROM kstar AS x
JOIN pairs AS p ON p.hook_a = x.hook
LEFT JOIN kstar AS y
    ON y.model = getvariable('b') AND y.hook = p.hook_b AND y.expansion = x.expansion
    AND y.train_tokens = x.train_tokens AND y.target = x.target
WHERE x.model = getvariable('a')
ORDER BY p.depth, x.expansion, x.train_tokens, x.target;
