-- kl_gap: is the SAE's error worse for behaviour than a random error of the same size? Per SAE and baseline.
-- Reads: tokens, saes.
-- gap = mean KL under the SAE / mean KL under the baseline (docs/METHODS.md), for every baseline eval
--   wrote (baseline_kl in _macros.sql): eps (isotropic at the same L2 distance), samecos (random with
--   the SAE's cosine), actdiff (direction of a real activation difference), and study 001's shrinkage test:
--   sae_norm (x rescaled to ‖x̂‖) and norm_corrected (x̂ rescaled to ‖x‖). Per-token view: p10/p50/p90 of kl_sae/kl_baseline over tokens with kl_baseline > 0, and
--   the share of tokens where the SAE is worse. A gap above 1: the SAE's errors point where it hurts.
SET VARIABLE min_pos = coalesce(getvariable('min_pos'), 0);        -- first position counted
SET VARIABLE max_pos = coalesce(getvariable('max_pos'), 1000000);  -- last position counted

WITH long AS (
    FROM baseline_kl() WHERE pos BETWEEN getvariable('min_pos') AND getvariable('max_pos')
)
SELECT s.sae_id, s.model, s.layer, s.hook, s.k, l.baseline,
    avg(l.kl_patched) AS kl_sae, avg(l.kl_base) AS kl_baseline, avg(l.kl_patched) / avg(l.kl_base) AS gap,
    quantile_cont(l.kl_patched / l.kl_base, 0.1) FILTER (WHERE l.kl_base > 0) AS ratio_p10,
    quantile_cont(l.kl_patched / l.kl_base, 0.5) FILTER (WHERE l.kl_base > 0) AS ratio_p50,
    quantile_cont(l.kl_patched / l.kl_base, 0.9) FILTER (WHERE l.kl_base > 0) AS ratio_p90,
    avg((l.kl_patched > l.kl_base)::INTEGER) AS share_sae_worse,
    count(*) AS n_tokens
FROM long AS l
JOIN saes AS s USING (sae_id)
GROUP BY ALL
ORDER BY s.model, s.layer, s.hook, s.k, l.baseline;
