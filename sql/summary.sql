-- summary: per SAE, the headline numbers of docs/METHODS.md with bootstrap 95% CIs over sequences.
-- Reads: tokens, saes, positions, latents (all positions) or codes (a position range).
-- Columns: r2 (SST centred on the selected positions' mean), ce_rec (study 000's 2 − L_sae/L_orig, pooled
--   over tokens), ce_rec_seq and ce_rec_seq_sd (mean and SD over sequences of each one's own CE_rec),
--   ce_loss_recovered (SAELens's), kl (mean KL(P‖Q_sae)), kl_score ((KL_zero − KL_sae)/KL_zero), cos,
--   relerr, l2_ratio (mean ‖x̂‖/‖x‖), mse (mean ‖e‖²/d), sse_per_token and sst_per_token (study 000's
--   scale check: R² = 1 − SSE/SST), l0, rate_bits (rate proxy per token, indices coded one by one) and
--   rate_bits_set (the same less log₂(l0!): the active indices coded as a set), each with _lo/_hi: the
--   2.5/97.5 percentiles of n_boot resamples of sequences, every ratio recomputed from the resample's sums. alive (fraction of latents firing on a selected token) has no
--   CI: "fired at least once" is an extreme-value statistic, for which the bootstrap is not valid.
-- CIs need SAEs evaluated on the same sequences: they are given for SAEs with the most common
--   sequence count and resample the same sequences for all of them (paired); others get NULL.
SET VARIABLE min_pos = coalesce(getvariable('min_pos'), 0);        -- first position counted
SET VARIABLE max_pos = coalesce(getvariable('max_pos'), 1000000);  -- last position counted
SET VARIABLE all_pos = getvariable('min_pos') = 0 AND getvariable('max_pos') >= 32767;  -- pos is a SMALLINT: ≤ 32767
SET VARIABLE n_boot = coalesce(getvariable('n_boot'), 5000);       -- bootstrap resamples
SET VARIABLE seed = coalesce(getvariable('seed'), 0);              -- seed of the resampling
SET VARIABLE boot_n = boot_n();

WITH stats AS MATERIALIZED (
    FROM sae_stats(getvariable('min_pos'), getvariable('max_pos'), getvariable('n_boot'), getvariable('seed'),
                   getvariable('boot_n'))
),
intervals AS (
    SELECT sae_id, ci(r2) AS r2, ci(ce_rec) AS ce_rec, ci(ce_loss_recovered) AS ce_loss_recovered, ci(kl) AS kl,
        ci(kl_score) AS kl_score, ci(cos) AS cos, ci(relerr) AS relerr, ci(sse_per_token) AS sse_per_token,
        ci(sst_per_token) AS sst_per_token, ci(l2_ratio) AS l2_ratio, ci(ce_rec_seq) AS ce_rec_seq,
        ci(l0) AS l0, ci(rate_bits) AS rate_bits, ci(rate_bits_set) AS rate_bits_set
    FROM stats WHERE b >= 0 GROUP BY sae_id
),
alive AS (  -- over every position: the latents table's firing counts; else the codes at those positions
    SELECT sae_id, count(*) FILTER (WHERE fires > 0) AS n_alive
    FROM latents WHERE getvariable('all_pos')
    GROUP BY sae_id
    UNION ALL
    SELECT sae_id, count(DISTINCT latent) AS n_alive
    FROM codes WHERE pos BETWEEN getvariable('min_pos') AND getvariable('max_pos') AND NOT getvariable('all_pos')
    GROUP BY sae_id
)
SELECT
    s.sae_id, s.model, s.hook, s.layer, s.depth, s.k, s.d_sae, s.train_tokens, s.seed, s.lr, e.n_seq, e.n_tokens::BIGINT AS n_tokens,
    e.r2, i.r2[1] AS r2_lo, i.r2[2] AS r2_hi,
    e.ce_rec, i.ce_rec[1] AS ce_rec_lo, i.ce_rec[2] AS ce_rec_hi,
    e.ce_rec_seq, i.ce_rec_seq[1] AS ce_rec_seq_lo, i.ce_rec_seq[2] AS ce_rec_seq_hi, e.ce_rec_seq_sd,
    e.ce_loss_recovered, i.ce_loss_recovered[1] AS ce_loss_recovered_lo, i.ce_loss_recovered[2] AS ce_loss_recovered_hi,
    e.kl, i.kl[1] AS kl_lo, i.kl[2] AS kl_hi,
    e.kl_score, i.kl_score[1] AS kl_score_lo, i.kl_score[2] AS kl_score_hi,
    e.cos, i.cos[1] AS cos_lo, i.cos[2] AS cos_hi,
    e.relerr, i.relerr[1] AS relerr_lo, i.relerr[2] AS relerr_hi,
    e.l2_ratio, i.l2_ratio[1] AS l2_ratio_lo, i.l2_ratio[2] AS l2_ratio_hi,
    e.sse_per_token / s.d_model AS mse, i.sse_per_token[1] / s.d_model AS mse_lo, i.sse_per_token[2] / s.d_model AS mse_hi,
    e.sse_per_token, i.sse_per_token[1] AS sse_per_token_lo, i.sse_per_token[2] AS sse_per_token_hi,
    e.sst_per_token, i.sst_per_token[1] AS sst_per_token_lo, i.sst_per_token[2] AS sst_per_token_hi,
    e.l0, i.l0[1] AS l0_lo, i.l0[2] AS l0_hi,
    a.n_alive / s.d_sae AS alive,
    e.rate_bits, i.rate_bits[1] AS rate_bits_lo, i.rate_bits[2] AS rate_bits_hi,
    e.rate_bits_set, i.rate_bits_set[1] AS rate_bits_set_lo, i.rate_bits_set[2] AS rate_bits_set_hi
FROM saes AS s
JOIN stats AS e ON e.sae_id = s.sae_id AND e.b = -1
LEFT JOIN intervals AS i ON i.sae_id = s.sae_id
LEFT JOIN alive AS a ON a.sae_id = s.sae_id
ORDER BY s.model, s.layer, s.hook, s.k, s.train_tokens, s.seed;
