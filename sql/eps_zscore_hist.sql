-- eps_zscore_hist: the distribution over tokens of the SAE's z-score among ε-random draws (study 001's
--   "how pathological"), as a histogram per SAE: the numbers behind the report's z-score figure.
-- Reads: eps_zscores, saes.
-- z is clamped to [z_min, z_max] so the tails land in the end bins; share = tokens in the bin / the SAE's tokens.
SET VARIABLE bin = coalesce(getvariable('bin'), 0.5);     -- bin width in standard deviations
SET VARIABLE z_min = coalesce(getvariable('z_min'), -4);  -- lower clamp
SET VARIABLE z_max = coalesce(getvariable('z_max'), 12);  -- upper clamp
SELECT CASE WHEN getvariable('bin') <= 0 THEN error('bin must be positive, not ' || getvariable('bin')) END;

WITH z AS (
    SELECT sae_id, greatest(getvariable('z_min'), least(getvariable('z_max'), z)) AS zc,
        median(z) OVER (PARTITION BY sae_id) AS z_median, count(*) OVER (PARTITION BY sae_id) AS n_sae
    FROM eps_zscores WHERE z IS NOT NULL AND NOT isnan(z)
)
SELECT s.sae_id, s.model, s.layer, s.hook, s.k,
    floor(z.zc / getvariable('bin')) * getvariable('bin') AS z_from,
    count(*) AS n_tokens, count(*) / any_value(z.n_sae) AS share, any_value(z.z_median) AS z_median
FROM z JOIN saes AS s USING (sae_id)
GROUP BY ALL
ORDER BY s.model, s.layer, s.hook, s.k, z_from;
