-- width_scaling: FVU against SAE width at fixed sparsity, fitted as FVU(W) = c + a·W^(−m) (004 Fig. 1).
-- Reads: tokens, saes, positions (and darkmatter where the run has it).
-- A group is the SAEs sharing (model, hook, k, train_tokens): a width sweep at one sparsity; W = d_sae.
--   FVU = 1 − R² per SAE (Σsse / Σsst over positions min_pos…max_pos, SST centred on them as in `summary`),
--   averaged over the SAEs at each width first (seeds, and lr twins), so that each width is one point.
-- The fit is a grid over m (m_step, 2·m_step, …, m_max): at each m, c and a are the closed-form least-squares
--   intercept and slope of FVU on W^(−m); the m with the least SSE wins (ties: the smaller m). c is the FVU the
--   power law leaves at infinite width; a·W^(−m) is what more latents remove (004's absent features), and
--   absent_at_widest = FVU(widest W) − c. c and a are not constrained (c < 0: the sweep is far from its plateau).
--   r2 = 1 − SSE / Σ(FVU − mean FVU)² over the widths (NULL when all are equal). With 3 widths the 3 parameters
--   pass through every point (r2 = 1 whatever the data): 4 or more test the power law. m_at_edge: the best m is
--   the grid's first or last. A NaN FVU (a position window on records without `positions`) gives a NaN fit.
-- fvu_nonlinear_mean: 004's horizontal fit of the nonlinear error, the darkmatter table's fvu_nonlinear averaged
--   per width, then over the widths that have it (n_darkmatter SAEs); linear_floor = c − fvu_nonlinear_mean, the
--   linear error the power law leaves at infinite width. NULL when none of the group's SAEs has a darkmatter row
--   (`actstore darkmatter RUN`). The darkmatter table scores held-out sequences from its own min_pos.
-- Groups with fewer than 3 widths are left out; a run where no group has 3 widths is an error.
SET VARIABLE min_pos = coalesce(getvariable('min_pos'), 0);        -- first position counted
SET VARIABLE max_pos = coalesce(getvariable('max_pos'), 1000000);  -- last position counted
SET VARIABLE m_max = coalesce(getvariable('m_max'), 4);            -- the largest exponent m of the grid
SET VARIABLE m_step = coalesce(getvariable('m_step'), 0.01);       -- the grid's step: m = m_step, 2·m_step, …, m_max
SELECT CASE
    WHEN NOT (getvariable('m_step')::DOUBLE > 0 AND getvariable('m_max')::DOUBLE >= getvariable('m_step')::DOUBLE)
        THEN error('width_scaling needs 0 < m_step <= m_max, not m_step ' || getvariable('m_step')::DOUBLE::VARCHAR
                   || ' and m_max ' || getvariable('m_max')::DOUBLE::VARCHAR)
    WHEN getvariable('m_max')::DOUBLE / getvariable('m_step')::DOUBLE > 100000
        THEN error('m_max / m_step asks for more than 100000 exponents; raise m_step') END;
SELECT CASE WHEN coalesce(max(n_widths), 0) < 3 THEN error(
    'width_scaling needs SAEs of at least 3 widths (d_sae) at the same model, hook, k and train_tokens; this run''s most is '
    || coalesce(max(n_widths), 0)::VARCHAR || ': train a width sweep at one k and budget (--expansion 4,8,16)') END
FROM (SELECT count(DISTINCT d_sae) AS n_widths
      FROM saes
      WHERE sae_id IN (SELECT sae_id FROM tokens WHERE pos BETWEEN getvariable('min_pos') AND getvariable('max_pos'))
      GROUP BY model, hook, k, train_tokens);

WITH per_sae AS (  -- gid numbers the groups (dense_rank: a NULL k is one group, as in GROUP BY)
    SELECT s.sae_id, s.model, s.hook, s.layer, s.k, s.train_tokens, s.d_sae::DOUBLE AS w, 1 - t.r2 AS fvu,
        dense_rank() OVER (ORDER BY s.model, s.hook, s.k, s.train_tokens) AS gid
    FROM sae_stats(getvariable('min_pos'), getvariable('max_pos'), 0, 0, 0) AS t
    JOIN saes AS s USING (sae_id)
    WHERE t.b = -1 AND s.d_sae IS NOT NULL
),
points AS (  -- one point per width: its SAEs' FVU averaged, and their dark-matter nonlinear FVU
    SELECT p.gid, p.w, avg(p.fvu) AS fvu, count(*) AS n_saes,
        avg(d.fvu_nonlinear) AS fvu_nonlinear, count(d.fvu_nonlinear) AS n_darkmatter
    FROM per_sae AS p
    LEFT JOIN (SELECT sae_id, avg(fvu_nonlinear) AS fvu_nonlinear FROM darkmatter GROUP BY sae_id) AS d USING (sae_id)
    GROUP BY p.gid, p.w
),
groups AS (  -- the groups that can be fitted
    SELECT gid, count(*) AS n_widths, list(w::BIGINT ORDER BY w) AS widths, list(fvu ORDER BY w) AS fvus,
        sum(n_saes) AS n_saes, arg_max(fvu, w) AS fvu_widest, var_pop(fvu) * count(*) AS syy,
        NOT bool_or(fvu IS NULL OR isnan(fvu)) AS fits,  -- NaN FVU (a position window without `positions`): no fit
        avg(fvu_nonlinear) AS fvu_nonlinear_mean, sum(n_darkmatter) AS n_darkmatter
    FROM points
    GROUP BY gid
    HAVING count(*) >= 3
),
grid AS (
    SELECT i, i * getvariable('m_step')::DOUBLE AS m, max(i) OVER () AS n_grid
    FROM range(1, floor(getvariable('m_max')::DOUBLE / getvariable('m_step')::DOUBLE + 1e-9)::BIGINT + 1) AS r(i)
),
coef AS (  -- at each m: a = Σ(x − x̄)(y − ȳ) / Σ(x − x̄)², c = ȳ − a·x̄, for x = W^(−m), y = FVU
    SELECT p.gid, g.i, g.m, g.n_grid, regr_slope(p.fvu, pow(p.w, -g.m)) AS a, regr_intercept(p.fvu, pow(p.w, -g.m)) AS c
    FROM points AS p
    SEMI JOIN groups USING (gid)
    CROSS JOIN grid AS g
    GROUP BY p.gid, g.i, g.m, g.n_grid
),
scored AS (  -- the residuals summed directly (not Syy·(1 − r²), which cancels near a perfect fit)
    SELECT f.gid, f.i, f.m, f.n_grid, f.a, f.c, sum((p.fvu - f.c - f.a * pow(p.w, -f.m)) ** 2) AS sse
    FROM coef AS f
    JOIN points AS p USING (gid)
    GROUP BY f.gid, f.i, f.m, f.n_grid, f.a, f.c
),
best AS (
    SELECT * FROM scored
    QUALIFY row_number() OVER (PARTITION BY gid ORDER BY sse, i) = 1
),
keys AS (
    SELECT gid, any_value(model) AS model, any_value(hook) AS hook, min(layer) AS layer, any_value(k) AS k,
        any_value(train_tokens) AS train_tokens
    FROM per_sae
    GROUP BY gid
)
SELECT gk.model, gk.hook, gk.layer, gk.k, gk.train_tokens, g.n_widths, g.widths, g.fvus, g.n_saes,
    CASE WHEN g.fits THEN b.c ELSE 'NaN' END AS c,
    CASE WHEN g.fits THEN b.a ELSE 'NaN' END AS a,
    CASE WHEN g.fits THEN round(b.m, 10) ELSE 'NaN' END AS m,
    CASE WHEN g.fits THEN b.sse ELSE 'NaN' END AS sse,
    CASE WHEN g.fits THEN 1 - b.sse / nullif(g.syy, 0) ELSE 'NaN' END AS r2,
    CASE WHEN g.fits THEN b.i = 1 OR b.i = b.n_grid END AS m_at_edge,
    CASE WHEN g.fits THEN g.fvu_widest - b.c ELSE 'NaN' END AS absent_at_widest,
    g.fvu_nonlinear_mean,
    CASE WHEN g.fits THEN b.c ELSE 'NaN' END - g.fvu_nonlinear_mean AS linear_floor,
    g.n_darkmatter
FROM best AS b
JOIN groups AS g USING (gid)
JOIN keys AS gk USING (gid)
ORDER BY gk.model, gk.layer, gk.hook, gk.k, gk.train_tokens;
