-- kstar: k*(t), the smallest k with CE_rec ≥ t, per model and depth, and its ratio between models.
-- The ratio divides by the reference model's k*(t) at the same layer and target.
-- Reads: tokens, saes.
-- One curve per model, hook, expansion and token budget: CE_rec averaged over seeds per k; k* interpolates linearly in k between the last k below t and the
--   first k at or above it (docs/METHODS.md). NULL when no k of the sweep reaches t; the smallest k when it
--   already does (below_sweep = true: k* is at most that).
SET VARIABLE targets = coalesce(getvariable('targets'), '0.95,0.97,0.98,0.99');  -- comma-separated CE_rec targets
SET VARIABLE ref_model = coalesce(getvariable('ref_model'), (SELECT min(model) FROM saes));  -- the ratio's denominator
SET VARIABLE min_pos = coalesce(getvariable('min_pos'), 0);        -- first position counted
SET VARIABLE max_pos = coalesce(getvariable('max_pos'), 1000000);  -- last position counted

WITH curve AS (  -- one sweep curve per model, hook, expansion and budget; seeds averaged
    SELECT s.model, s.layer, s.hook, s.expansion, s.train_tokens, s.k, avg(t.ce_rec) AS ce_rec
    FROM sae_stats(getvariable('min_pos'), getvariable('max_pos'), 0, 0, 0) AS t
    JOIN saes AS s USING (sae_id)
    WHERE t.b = -1 AND t.ce_rec IS NOT NULL
    GROUP BY ALL
),
steps AS (
    SELECT *, lag(k) OVER w AS k_prev, lag(ce_rec) OVER w AS ce_prev, row_number() OVER w AS i
    FROM curve WINDOW w AS (PARTITION BY model, hook, expansion, train_tokens ORDER BY k)
),
targets AS (SELECT unnest(string_split(getvariable('targets')::VARCHAR, ',')::DOUBLE[]) AS target),
first_hit AS (
    SELECT model, layer, hook, expansion, train_tokens, target, arg_min(k, k) AS k, arg_min(k_prev, k) AS k_prev,
        arg_min(ce_rec, k) AS ce, arg_min(ce_prev, k) AS ce_prev, arg_min(i, k) AS i
    FROM steps CROSS JOIN targets
    WHERE ce_rec >= target
    GROUP BY ALL
),
kstar AS (
    SELECT c.model, c.layer, c.hook, c.expansion, c.train_tokens, t.target, h.i = 1 AS below_sweep,
        CASE WHEN h.i = 1 THEN h.k
             WHEN h.k IS NOT NULL THEN h.k_prev + (t.target - h.ce_prev) * (h.k - h.k_prev) / (h.ce - h.ce_prev)
        END AS k_star
    FROM (SELECT DISTINCT model, layer, hook, expansion, train_tokens FROM curve) AS c
    CROSS JOIN targets AS t
    LEFT JOIN first_hit AS h USING (model, layer, hook, expansion, train_tokens, target)
)
SELECT x.model, x.layer, x.hook, x.expansion, x.train_tokens, x.target, x.k_star, x.below_sweep,
    x.k_star / r.k_star AS ratio_to_ref, getvariable('ref_model') AS ref_model
FROM kstar AS x
LEFT JOIN kstar AS r
    ON r.model = getvariable('ref_model') AND r.hook = x.hook AND r.expansion = x.expansion
    AND r.train_tokens = x.train_tokens AND r.target = x.target
ORDER BY x.model, x.layer, x.hook, x.expansion, x.train_tokens, x.target;
