-- proxy_leaderboard: which cheap number predicts an SAE's behavioural damage best across cells? Study 002's
--   D2 gate (sensitivity-weighted distortion against R², with held-out cells) for every proxy at once.
-- Reads: tokens, saes.
-- A cell is one SAE (model × depth × k × expansion × budget × seed). Targets: ce_rec (pooled CE_rec) and kl
--   (mean kl_patched). Proxies (per cell, over the selected positions): fvu = 1 − R², mse = Σsse/(n·d),
--   cos and relerr (means), fo (mean g·δ), swd (mean ½(Jδ)ᵀF(Jδ)), alignment (Σswd / Σ½‖e‖²·iso_sens); the
--   last three need `eval --sensitivity`: when some cells have them, every proxy is compared on those
--   cells only (the same cells for all), otherwise the first four on all cells.
-- Held out: leave-one-cell-out least squares target ≈ a + b·proxy (closed form: residual_i / (1 − h_i),
--   h_i = 1/n + (x_i − x̄)²/Σ(x − x̄)²); loo_rmse over cells, loo_r2 = 1 − PRESS / Σ(y − ȳ)²; rank 1 = the
--   lowest loo_rmse. share_first: over `n_boot` resamples of the cells (their held-out errors kept), the
--   share in which the proxy ranks first: how stable the winner is.
SET VARIABLE min_pos = coalesce(getvariable('min_pos'), 0);        -- first position counted
SET VARIABLE max_pos = coalesce(getvariable('max_pos'), 1000000);  -- last position counted
SET VARIABLE n_boot = coalesce(getvariable('n_boot'), 1000);       -- resamples of the cells
SET VARIABLE seed = coalesce(getvariable('seed'), 0);              -- seed of the resampling

WITH cells AS (
    SELECT t.sae_id,
        2 - sum(t.ce_patched) / sum(t.ce_orig) AS ce_rec, avg(t.kl_patched) AS kl,
        sum(t.sse) / (count(*) * any_value(s.d_model)) AS mse,
        avg(t.cos) AS cos, avg(t.relerr) AS relerr, avg(t.fo_patched) AS fo, avg(t.swd_patched) AS swd,
        sum(t.swd_patched) / sum(0.5 * t.sse * t.iso_sens) AS alignment
    FROM tokens AS t JOIN saes AS s USING (sae_id)
    WHERE t.pos BETWEEN getvariable('min_pos') AND getvariable('max_pos')
    GROUP BY t.sae_id
),
r2 AS (SELECT sae_id, 1 - r2 AS fvu FROM sae_stats(getvariable('min_pos'), getvariable('max_pos'), 0, 0, 0) WHERE b = -1),
chosen AS (  -- the cells every proxy is compared on
    SELECT c.*, r2.fvu FROM cells AS c JOIN r2 USING (sae_id)
    WHERE c.fo IS NOT NULL OR NOT EXISTS (SELECT 1 FROM cells WHERE fo IS NOT NULL)
),
long AS (
    SELECT sae_id, target, y, proxy, x FROM (
        UNPIVOT (SELECT sae_id, ce_rec, kl, fvu, mse, cos, relerr, fo, swd, alignment FROM chosen)
        ON ce_rec, kl INTO NAME target VALUE y
    )
    UNPIVOT (x FOR proxy IN (fvu, mse, cos, relerr, fo, swd, alignment))
    WHERE x IS NOT NULL AND y IS NOT NULL AND NOT isnan(x) AND NOT isnan(y)
),
fit AS (
    SELECT *,
        count(*) OVER w AS n, avg(x) OVER w AS mx, avg(y) OVER w AS my,
        regr_slope(y, x) OVER w AS slope, regr_intercept(y, x) OVER w AS intercept,
        regr_sxx(y, x) OVER w AS sxx, regr_syy(y, x) OVER w AS syy  -- (dependent, independent), as the standard
    FROM long
    WINDOW w AS (PARTITION BY target, proxy)
),
loo AS (
    SELECT target, proxy, sae_id, n, syy, corr(x, y) OVER (PARTITION BY target, proxy) AS corr,
        ((y - intercept - slope * x) / (1 - 1.0 / n - (x - mx) * (x - mx) / sxx)) AS loo_err
    FROM fit WHERE n >= 3 AND sxx > 0
),
scores AS (
    SELECT target, proxy, any_value(n) AS n_cells, any_value(corr) AS corr,
        sqrt(avg(loo_err * loo_err)) AS loo_rmse, 1 - sum(loo_err * loo_err) / any_value(syy) AS loo_r2,
        list(loo_err * loo_err ORDER BY sae_id) AS l_sq
    FROM loo GROUP BY target, proxy
),
resampled AS (
    SELECT s.target, s.proxy, b.b, list_dot_product(b.w, s.l_sq) AS press
    FROM scores AS s, boot_counts((SELECT max(n_cells) FROM scores), getvariable('n_boot'), getvariable('seed')) AS b
    WHERE s.n_cells = (SELECT max(n_cells) FROM scores)
),
firsts AS (
    SELECT target, proxy, count(*) FILTER (WHERE rk = 1) / any_value(nb) AS share_first
    FROM (SELECT *, rank() OVER (PARTITION BY target, b ORDER BY press) AS rk,
                 count(DISTINCT b) OVER (PARTITION BY target) AS nb FROM resampled)
    GROUP BY target, proxy
)
SELECT s.target, rank() OVER (PARTITION BY s.target ORDER BY s.loo_rmse) AS rank, s.proxy, s.n_cells,
    s.loo_rmse, s.loo_r2, s.corr, f.share_first
FROM scores AS s LEFT JOIN firsts AS f USING (target, proxy)
ORDER BY s.target, rank, s.proxy;
