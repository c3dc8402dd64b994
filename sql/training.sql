-- training: study 003's training report per SAE: steps, wall time, final MSE, normalised MSE, explained variance, L0, dead latents.
-- Reads: curves, saes, latents, evals.
-- final_* average the last `last_rows` logged rows of the curves (one batch is noisy). final_nmse is the
--   mean-centred normalised MSE Σ‖e‖²/Σ‖x − mean(x)‖² (a mean predictor scores 1; explained variance =
--   1 − nmse); final_nmse_uncentred divides by ‖x‖² instead. wall_seconds is the SAE's own steps (a sweep's
--   shared reads excluded); dead_latents = silent for the dead window at the end of training;
--   never_fired_eval = no fire on any of the n_eval_tokens eval tokens (from eval's latents table).
SET VARIABLE last_rows = coalesce(getvariable('last_rows'), 5);  -- logged rows averaged into final_*

WITH tail AS (
    SELECT * FROM curves
    QUALIFY row_number() OVER (PARTITION BY sae_id ORDER BY step DESC) <= getvariable('last_rows')
),
final AS (
    SELECT sae_id, max(step) AS steps, max(tokens) AS tokens, max(seconds) AS seconds, avg(mse) AS mse, avg(nmse) AS nmse,
        avg(nmse_uncentred) AS nmse_uncentred, avg(explained_variance) AS explained_variance, avg(l0) AS l0,
        arg_max(dead_frac, step) AS dead_frac
    FROM tail GROUP BY sae_id
),
eval_dead AS (
    SELECT l.sae_id, count(*) FILTER (WHERE l.fires = 0) AS never_fired_eval, any_value(e.n_tokens) AS n_eval_tokens
    FROM latents AS l
    LEFT JOIN (  -- one evaluation per SAE: the every-position one when a single-position one sits beside it
        SELECT sae_id, arg_min(n_tokens, coalesce(patch_pos, -1)) AS n_tokens FROM evals GROUP BY sae_id
    ) AS e USING (sae_id)
    GROUP BY l.sae_id
)
SELECT s.sae_id, s.model, s.hook, s.layer, s.d_model, s.d_sae, s.k, s.expansion, s.train_tokens, s.seed, s.lr,
    f.steps, coalesce(s.train_seconds, f.seconds) AS wall_seconds,
    f.tokens / coalesce(s.train_seconds, f.seconds) AS tokens_per_second,
    f.mse AS final_mse, f.nmse AS final_nmse, f.explained_variance AS final_explained_variance,
    f.nmse_uncentred AS final_nmse_uncentred, f.l0 AS final_l0,
    round(f.dead_frac * s.d_sae)::BIGINT AS dead_latents, f.dead_frac,
    d.never_fired_eval, d.n_eval_tokens
FROM saes AS s
JOIN final AS f USING (sae_id)
LEFT JOIN eval_dead AS d USING (sae_id)
ORDER BY s.model, s.layer, s.hook, s.k, s.train_tokens, s.seed;
