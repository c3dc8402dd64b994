-- summary: per SAE, the headline numbers of METHODS.md with bootstrap 95% CIs over sequences.
-- Reads: tokens, saes, codes (or latents).
-- Columns: r2, ce_rec (the seeds' 2 − L_sae/L_orig), ce_loss_recovered (SAELens's), kl (mean KL(P‖Q_sae)),
--   kl_score ((KL_zero − KL_sae)/KL_zero), cos, relerr, mse (mean ‖e‖²/d), l0, rate_bits (rate proxy
--   per token), each with _lo/_hi: the 2.5/97.5 percentiles of n_boot resamples of sequences, every ratio
--   recomputed from the resample's sums. alive (fraction of latents firing on a selected token) has no
--   CI: "fired at least once" is an extreme-value statistic, for which the bootstrap is not valid.
-- CIs need SAEs evaluated on the same sequences: they are given for SAEs with the most common
--   sequence count (boot_n) and resample the same sequences for all of them (paired); others get NULL.
SET VARIABLE min_pos = coalesce(getvariable('min_pos'), 0);        -- first position counted
SET VARIABLE max_pos = coalesce(getvariable('max_pos'), 1000000);  -- last position counted
SET VARIABLE n_boot = coalesce(getvariable('n_boot'), 5000);       -- bootstrap resamples
SET VARIABLE seed = coalesce(getvariable('seed'), 0);              -- seed of the resampling
SET VARIABLE boot_n = (SELECT mode(n) FROM (SELECT count(DISTINCT seq) AS n FROM tokens GROUP BY sae_id));

WITH per_seq AS (  -- the bootstrap's unit: one row of sums per SAE and sequence
    SELECT sae_id, seq,
        count(*)::DOUBLE AS n, count(kl_patched)::DOUBLE AS n_kl,
        sum(sse) AS sse, sum(sst) AS sst, sum(ce_orig) AS ce_orig, sum(ce_patched) AS ce_patched,
        sum(ce_zero) AS ce_zero, sum(kl_patched) AS kl, sum(kl_zero) AS kl_zero, sum(cos) AS cos,
        sum(relerr) AS relerr, sum(l0) AS l0, sum(rate_bits) AS rate
    FROM tokens
    WHERE pos BETWEEN getvariable('min_pos') AND getvariable('max_pos')
    GROUP BY ALL
),
per_sae AS (  -- totals give the estimates; per-sequence lists in seq order feed the resamples
    SELECT sae_id, count(*) AS n_seq, sum(n)::BIGINT AS n_tokens,
        sum(n) AS n, sum(n_kl) AS n_kl, sum(sse) AS sse, sum(sst) AS sst, sum(ce_orig) AS ce_orig,
        sum(ce_patched) AS ce_patched, sum(ce_zero) AS ce_zero, sum(kl) AS kl, sum(kl_zero) AS kl_zero,
        sum(cos) AS cos, sum(relerr) AS relerr, sum(l0) AS l0, sum(rate) AS rate,
        list(n ORDER BY seq) AS l_n, list(n_kl ORDER BY seq) AS l_n_kl, list(sse ORDER BY seq) AS l_sse,
        list(sst ORDER BY seq) AS l_sst, list(ce_orig ORDER BY seq) AS l_ce_orig,
        list(ce_patched ORDER BY seq) AS l_ce_patched, list(ce_zero ORDER BY seq) AS l_ce_zero,
        list(kl ORDER BY seq) AS l_kl, list(kl_zero ORDER BY seq) AS l_kl_zero, list(cos ORDER BY seq) AS l_cos,
        list(relerr ORDER BY seq) AS l_relerr, list(l0 ORDER BY seq) AS l_l0, list(rate ORDER BY seq) AS l_rate
    FROM per_seq
    GROUP BY sae_id
),
resampled AS (  -- one row per SAE and resample: Σ_w of each per-sequence sum
    SELECT sae_id,
        list_dot_product(w, l_n) AS n, list_dot_product(w, l_n_kl) AS n_kl,
        list_dot_product(w, l_sse) AS sse, list_dot_product(w, l_sst) AS sst,
        list_dot_product(w, l_ce_orig) AS ce_orig, list_dot_product(w, l_ce_patched) AS ce_patched,
        list_dot_product(w, l_ce_zero) AS ce_zero, list_dot_product(w, l_kl) AS kl,
        list_dot_product(w, l_kl_zero) AS kl_zero, list_dot_product(w, l_cos) AS cos,
        list_dot_product(w, l_relerr) AS relerr, list_dot_product(w, l_l0) AS l0, list_dot_product(w, l_rate) AS rate
    FROM per_sae, boot_counts(getvariable('boot_n'), getvariable('n_boot'), getvariable('seed'))
    WHERE n_seq = getvariable('boot_n')
),
stats AS (  -- every statistic, once, from sums: on the full set (boot = false) and on each resample
    SELECT sae_id, boot,
        1 - sse / sst AS r2,
        2 - ce_patched / ce_orig AS ce_rec,
        (ce_zero - ce_patched) / (ce_zero - ce_orig) AS ce_loss_recovered,
        kl / n_kl AS kl,
        (kl_zero - kl) / kl_zero AS kl_score,
        cos / n AS cos,
        relerr / n AS relerr,
        sse / n AS sse_per_token,
        l0 / n AS l0,
        rate / n AS rate_bits
    FROM (SELECT false AS boot, sae_id, n, n_kl, sse, sst, ce_orig, ce_patched, ce_zero, kl, kl_zero, cos, relerr, l0, rate
          FROM per_sae
          UNION ALL BY NAME
          SELECT true AS boot, * FROM resampled)
),
intervals AS (
    SELECT sae_id, ci(r2) AS r2, ci(ce_rec) AS ce_rec, ci(ce_loss_recovered) AS ce_loss_recovered, ci(kl) AS kl,
        ci(kl_score) AS kl_score, ci(cos) AS cos, ci(relerr) AS relerr, ci(sse_per_token) AS sse_per_token,
        ci(l0) AS l0, ci(rate_bits) AS rate_bits
    FROM stats WHERE boot GROUP BY sae_id
),
alive AS (
    SELECT sae_id, count(DISTINCT latent) AS n_alive
    FROM codes WHERE pos BETWEEN getvariable('min_pos') AND getvariable('max_pos')
    GROUP BY sae_id
)
SELECT
    s.sae_id, s.model, s.hook, s.layer, s.k, s.d_sae, s.train_tokens, s.seed, p.n_seq, p.n_tokens,
    e.r2, i.r2[1] AS r2_lo, i.r2[2] AS r2_hi,
    e.ce_rec, i.ce_rec[1] AS ce_rec_lo, i.ce_rec[2] AS ce_rec_hi,
    e.ce_loss_recovered, i.ce_loss_recovered[1] AS ce_loss_recovered_lo, i.ce_loss_recovered[2] AS ce_loss_recovered_hi,
    e.kl, i.kl[1] AS kl_lo, i.kl[2] AS kl_hi,
    e.kl_score, i.kl_score[1] AS kl_score_lo, i.kl_score[2] AS kl_score_hi,
    e.cos, i.cos[1] AS cos_lo, i.cos[2] AS cos_hi,
    e.relerr, i.relerr[1] AS relerr_lo, i.relerr[2] AS relerr_hi,
    e.sse_per_token / s.d_model AS mse, i.sse_per_token[1] / s.d_model AS mse_lo, i.sse_per_token[2] / s.d_model AS mse_hi,
    e.l0, i.l0[1] AS l0_lo, i.l0[2] AS l0_hi,
    a.n_alive / s.d_sae AS alive,
    e.rate_bits, i.rate_bits[1] AS rate_bits_lo, i.rate_bits[2] AS rate_bits_hi
FROM saes AS s
JOIN per_sae AS p USING (sae_id)
JOIN stats AS e ON e.sae_id = s.sae_id AND NOT e.boot
LEFT JOIN intervals AS i USING (sae_id)
LEFT JOIN alive AS a USING (sae_id)
ORDER BY s.model, s.layer, s.hook, s.k, s.train_tokens, s.seed;
