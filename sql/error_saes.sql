-- error_saes: study 004 §5.2: are SAEs worse at learning NonlinearError than LinearError? SAEs trained on a
--   source SAE's error parts (`actstore darkmatter RUN --write-errors`, then `actstore train STORE --hooks
--   <sae_id>.linear_error,<sae_id>.nonlinear_error`), their final FVU side by side at matched k, width, budget and seed.
-- Reads: curves, saes.
-- final FVU = mean of the last `last_rows` logged batch FVUs (Σ‖e‖² / Σ‖y − mean y‖² on the batch, y the
--   part trained on), as 004 compares converged training FVU (0.59 nonlinear vs 0.54 linear in its case).
--   nonlinear_minus_linear > 0: the nonlinear part is harder to learn (004's finding).
SET VARIABLE last_rows = coalesce(getvariable('last_rows'), 5);  -- logged rows averaged into the final FVU

WITH parts AS (
    SELECT s.sae_id, s.k, s.expansion, s.train_tokens, s.seed,
        regexp_extract(s.hook, '^(.*)\.(sae_error|linear_error|nonlinear_error)$', 1) AS source_sae,
        regexp_extract(s.hook, '^(.*)\.(sae_error|linear_error|nonlinear_error)$', 2) AS part
    FROM saes AS s
    WHERE regexp_matches(s.hook, '\.(sae_error|linear_error|nonlinear_error)$')
),
final AS (
    SELECT sae_id, avg(fvu) AS fvu
    FROM (SELECT * FROM curves QUALIFY row_number() OVER (PARTITION BY sae_id ORDER BY step DESC) <= getvariable('last_rows'))
    GROUP BY sae_id
)
SELECT p.source_sae, src.hook, src.layer, p.k, p.expansion, p.train_tokens, p.seed,
    max(f.fvu) FILTER (WHERE p.part = 'sae_error') AS fvu_sae_error,
    max(f.fvu) FILTER (WHERE p.part = 'linear_error') AS fvu_linear_error,
    max(f.fvu) FILTER (WHERE p.part = 'nonlinear_error') AS fvu_nonlinear_error,
    max(f.fvu) FILTER (WHERE p.part = 'nonlinear_error') - max(f.fvu) FILTER (WHERE p.part = 'linear_error')
        AS nonlinear_minus_linear
FROM parts AS p
JOIN final AS f USING (sae_id)
LEFT JOIN saes AS src ON src.sae_id = p.source_sae
GROUP BY ALL
ORDER BY src.layer, p.source_sae, p.k, p.expansion, p.train_tokens, p.seed;
