-- sensitivity: does the model's sensitivity explain the SAE's behavioural damage? Per SAE evaluated with
--   `eval --sensitivity`: the first-order and Fisher predictions beside what was measured, and the
--   alignment ratio, the analytic KL gap, with a 95% bootstrap CI over sequences.
-- Reads: tokens, saes.
-- d_ce = Σ(ce_patched − ce_orig) per token with a next token; d_ce_first_order = Σ fo_patched (g·δ, the exact
--   first-order prediction of the summed CE change under the every-position patch) on the same scale;
--   fo_ratio = their quotient (→ 1 for small errors). swd_ratio = Σ swd_patched / Σ kl_patched (the
--   second-order expansion of KL against the measured KL). alignment = Σ swd_patched / Σ ½‖e‖²·iso_sens:
--   how much more than an isotropic error of its size the SAE's error points where the model is sensitive
--   (eps_alignment, the same for the ε-random baseline, should be near 1); analytic_gap = Σ swd_patched /
--   Σ swd_eps beside the measured gap Σ kl_patched / Σ kl_eps. CIs: percentile intervals of `n_boot`
--   resamples of sequences (the SAEs evaluated on the most common number of sequences).
SET VARIABLE min_pos = coalesce(getvariable('min_pos'), 0);        -- first position counted
SET VARIABLE max_pos = coalesce(getvariable('max_pos'), 1000000);  -- last position counted
SET VARIABLE n_boot = coalesce(getvariable('n_boot'), 1000);       -- bootstrap resamples
SET VARIABLE seed = coalesce(getvariable('seed'), 0);              -- seed of the resampling

WITH per_seq AS (
    SELECT sae_id, seq,
        sum(ce_patched - ce_orig) AS d_ce, count(ce_orig) AS n_ce, sum(fo_patched) AS fo,
        sum(kl_patched) AS kl, sum(swd_patched) AS swd, sum(kl_eps) AS kl_eps, sum(swd_eps) AS swd_eps,
        sum(0.5 * sse * iso_sens) AS iso, count(*) AS n
    FROM tokens
    WHERE fo_patched IS NOT NULL AND pos BETWEEN getvariable('min_pos') AND getvariable('max_pos')
    GROUP BY sae_id, seq
),
per_sae AS (
    SELECT sae_id, count(*) AS n_seq, sum(n) AS n_tokens, sum(n_ce) AS n_ce,
        sum(d_ce) AS d_ce, sum(fo) AS fo, sum(kl) AS kl, sum(swd) AS swd, sum(kl_eps) AS kl_eps,
        sum(swd_eps) AS swd_eps, sum(iso) AS iso,
        list(swd ORDER BY seq) AS l_swd, list(iso ORDER BY seq) AS l_iso, list(swd_eps ORDER BY seq) AS l_swd_eps
    FROM per_seq GROUP BY sae_id
),
boot AS (
    SELECT sae_id,
        ci(list_dot_product(w, l_swd) / list_dot_product(w, l_iso)) AS alignment_ci,
        ci(list_dot_product(w, l_swd) / list_dot_product(w, l_swd_eps)) AS analytic_gap_ci
    FROM boot_counts((SELECT mode(n_seq) FROM per_sae), getvariable('n_boot'), getvariable('seed')), per_sae
    WHERE n_seq = (SELECT mode(n_seq) FROM per_sae)
    GROUP BY sae_id
)
SELECT s.model, s.layer, s.hook, s.k, s.d_sae, s.train_tokens, s.seed, p.n_seq, p.n_tokens,
    p.d_ce / p.n_ce AS d_ce, p.fo / p.n_ce AS d_ce_first_order, p.fo / p.d_ce AS fo_ratio,
    p.kl / p.n_tokens AS kl, p.swd / p.n_tokens AS swd, p.swd / p.kl AS swd_ratio,
    p.swd / p.iso AS alignment, b.alignment_ci[1] AS alignment_lo, b.alignment_ci[2] AS alignment_hi,
    p.swd_eps / p.iso AS eps_alignment,
    p.swd / p.swd_eps AS analytic_gap, b.analytic_gap_ci[1] AS analytic_gap_lo, b.analytic_gap_ci[2] AS analytic_gap_hi,
    p.kl / p.kl_eps AS measured_gap, p.sae_id
FROM per_sae AS p
JOIN saes AS s USING (sae_id)
LEFT JOIN boot AS b USING (sae_id)
ORDER BY s.model, s.layer, s.hook, s.k, s.d_sae, s.train_tokens, s.seed;
