-- eps_zscores: study 001's "how pathological are the errors?": per SAE, the distribution over tokens of the
--   z-score of the SAE's KL among N ε-random draws of its error's norm at the same token (eval --patch-pos P
--   --eps-draws N; only P replaced, KL read at P).
-- Reads: eps_zscores, saes.
-- z = (KL_SAE − mean of the draws' KL) / their SD (ddof 1). A benign SAE error would look like one more draw:
--   median z near 0 and about 2.5% of tokens above z = 1.96 (for a roughly normal KL spread). share_above
--   is the empirical share of draws at least as bad as the SAE (a rank, free of any normal assumption).
SELECT s.sae_id, s.model, s.layer, s.hook, s.k, any_value(z.pos) AS patch_pos, any_value(z.n_draws) AS n_draws,
    count(*) AS n_tokens,
    median(z.z) AS z_median, avg(z.z) AS z_mean,
    quantile_cont(z.z, 0.1) AS z_p10, quantile_cont(z.z, 0.9) AS z_p90, max(z.z) AS z_max,
    avg((z.z > 1.96)::INTEGER) AS share_z_above_1_96, avg((z.z > 3)::INTEGER) AS share_z_above_3,
    avg(z.share_above) AS mean_share_draws_worse,
    avg(z.kl_sae) AS kl_sae, avg(z.kl_mean) AS kl_draws, avg(z.kl_sae) / avg(z.kl_mean) AS gap
FROM eps_zscores AS z
JOIN saes AS s USING (sae_id)
WHERE z.z IS NOT NULL AND NOT isnan(z.z)
GROUP BY ALL
ORDER BY s.model, s.layer, s.hook, s.k;
