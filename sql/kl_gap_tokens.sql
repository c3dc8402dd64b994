-- kl_gap_tokens: per SAE, the tokens at the patched position with the largest mean KL gap (study 001's table).
-- Reads: tokens, saes, vocab (the token's text, written by eval).
-- Study 001's per-token gap is a difference: gap = kl_sae − kl_baseline on each occurrence of the token,
--   then per SAE and token id: n occurrences, mean gap, its SD and standard error (rare tokens' means are
--   noisy: 001 finds no correlation of the gap with frequency), and the ratio of mean KLs for comparison.
--   Tokens seen fewer than min_count times are skipped (001: at least 5). A mean gap can be negative.
SET VARIABLE min_count = coalesce(getvariable('min_count'), 5);   -- fewest occurrences counted
SET VARIABLE top = coalesce(getvariable('top'), 20);              -- rows per SAE
SET VARIABLE baseline = coalesce(getvariable('baseline'), 'eps'); -- a baseline of kl_gap (eps, samecos, actdiff, sae_norm, norm_corrected)
SET VARIABLE min_pos = coalesce(getvariable('min_pos'), 0);       -- first position counted

WITH long AS (FROM baseline_kl() WHERE pos >= getvariable('min_pos') AND baseline = getvariable('baseline')),
per_token AS (
    SELECT sae_id, baseline, token, count(*) AS n,
        avg(kl_patched - kl_base) AS gap, stddev_samp(kl_patched - kl_base) AS gap_sd,
        avg(kl_patched) / avg(kl_base) AS ratio
    FROM long
    GROUP BY ALL
    HAVING count(*) >= getvariable('min_count')
)
SELECT s.model, s.hook, s.k, p.sae_id, p.baseline, p.token, v.text, p.n, p.gap, p.gap_sd,
    p.gap_sd / sqrt(p.n) AS gap_se, p.ratio
FROM per_token AS p
JOIN saes AS s USING (sae_id)
LEFT JOIN vocab AS v ON v.model = s.model AND v.token = p.token
QUALIFY row_number() OVER (PARTITION BY p.sae_id ORDER BY p.gap DESC, p.token) <= getvariable('top')
ORDER BY s.model, s.layer, s.hook, s.k, p.sae_id, p.gap DESC, p.token;
