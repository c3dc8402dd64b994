-- norm_baselines: how well do simple per-token variables predict the SAE's error norm? (study 004, A.3)
-- Reads: tokens, saes; darkmatter (the full-activation probe, beside them) when `actstore darkmatter` ran.
-- Target ‖e‖ (err_norm). Predictors, each a least-squares fit on even sequences scored by R² on odd ones
--   (the probes' split): token identity (each token id's mean ‖e‖ on the fit tokens; ids unseen there get
--   the overall mean), [l0, 1], [‖x‖, 1] and [ce_orig, 1] (the model's loss; tokens without a next token
--   left out). 004 finds all of them well below a probe of the full activation, except token identity at
--   the first layers; `darkmatter`'s norm_r2_err (x → ‖e‖², the squared norm) is shown beside them.
SET VARIABLE min_pos = coalesce(getvariable('min_pos'), 0);        -- first position counted
SET VARIABLE max_pos = coalesce(getvariable('max_pos'), 1000000);  -- last position counted

WITH t AS (
    SELECT sae_id, seq % 2 = 0 AS fit, token, err_norm::DOUBLE AS y, l0::DOUBLE AS l0, x_norm::DOUBLE AS x_norm,
        ce_orig::DOUBLE AS ce
    FROM tokens WHERE pos BETWEEN getvariable('min_pos') AND getvariable('max_pos')
),
long AS (  -- one row per token and scalar predictor
    UNPIVOT (SELECT sae_id, fit, y, l0, x_norm, ce FROM t) ON l0, x_norm, ce INTO NAME predictor VALUE v
),
lines AS (
    SELECT sae_id, predictor, regr_slope(y, v) FILTER (WHERE fit) AS a, regr_intercept(y, v) FILTER (WHERE fit) AS b
    FROM long GROUP BY ALL
),
scalar AS (
    SELECT l.sae_id, l.predictor, 1 - sum((l.y - f.a * l.v - f.b) ^ 2) / (var_pop(l.y) * count(*)) AS heldout_r2,
        count(*) AS n_test
    FROM long AS l JOIN lines AS f USING (sae_id, predictor)
    WHERE NOT l.fit GROUP BY ALL
),
token_means AS (SELECT sae_id, token, avg(y) AS m FROM t WHERE fit GROUP BY ALL),
overall AS (SELECT sae_id, avg(y) AS m FROM t WHERE fit GROUP BY ALL),
identity AS (
    SELECT t.sae_id, 'token' AS predictor,
        1 - sum((t.y - coalesce(tm.m, o.m)) ^ 2) / (var_pop(t.y) * count(*)) AS heldout_r2, count(*) AS n_test
    FROM t LEFT JOIN token_means AS tm USING (sae_id, token) JOIN overall AS o USING (sae_id)
    WHERE NOT t.fit GROUP BY ALL
)
SELECT s.model, s.layer, s.hook, s.k, p.sae_id, p.predictor, p.heldout_r2, p.n_test,
    d.norm_r2_err AS probe_r2_err_sq
FROM (FROM scalar UNION ALL BY NAME FROM identity) AS p
JOIN saes AS s USING (sae_id)
LEFT JOIN darkmatter AS d USING (sae_id)
ORDER BY s.model, s.layer, s.hook, s.k, p.sae_id, p.predictor;
