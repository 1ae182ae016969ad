-- capture v3: a cheaper deferred-mode trigger. Requires capture_v2.sql. Frozen: a later
-- change ships as capture_v4.sql. Measured against v2 in BENCHMARKS.md ("Change capture
-- overhead").
--
-- What changed, and why it is safe:
-- 1. The deferred log trigger is one function per tenant, <tenant>.imgmig_log_products_row(),
--    written by imgmig.install_log_function() with the tenant's table composed in (format
--    %I). v2's shared function pointed search_path at the tenant on every write (its SET
--    clause plus set_config). The per-tenant function needs neither: every name in it is
--    schema-qualified (tables by composition; functions, types and operators under
--    pg_catalog, OPERATOR(pg_catalog.=) included), so no lookup in it consults search_path
--    at all, which is what pinning search_path guarantees. Being per tenant, its body can
--    change (2.) with CREATE OR REPLACE FUNCTION, which takes no lock on products.
--    (Measured alone, dropping the search_path switch hardly moved the benchmark: 0.67x
--    for v2, 0.67-0.69x for this function with 'before', 0.74x without; --ab in
--    bench/capture_bench.py.)
-- 2. Once the tenant's log is complete, an 'images.updated' event of deferred mode carries
--    'after' only, not 'before'. A whole-array payload is about 1.6 kB; both copies
--    (3.3 kB) cross the 2 kB TOAST threshold and are compressed on every write. The
--    projector and replay read 'after' only, and an update's 'before' is then the 'after'
--    of the product's previous event. "Complete" (p_before false) means the backfill has
--    logged an 'images.snapshot' of every product and capture has been on ever since
--    (cdc.checkpoint.log_complete); until then 'before' is the only copy of a product's
--    images before its first captured change, so it stays. The backfill rewrites the
--    function when it finishes (CREATE OR REPLACE FUNCTION: no lock on the table).
--    Inserts carry 'after' and deletes 'before', as in v2. Inline mode is unchanged.

CREATE OR REPLACE FUNCTION imgmig.install_log_function(p_tenant text,
                                                      p_before boolean DEFAULT true)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $install$
BEGIN
  -- Two concurrent CREATE OR REPLACE of one function can fail with "tuple concurrently
  -- updated" (the backfill finishing while a stage change reinstalls the triggers): queue.
  PERFORM pg_advisory_xact_lock(hashtext('imgmig.install_log_function'), hashtext(p_tenant));
  EXECUTE format($f$
CREATE OR REPLACE FUNCTION %1$I.imgmig_log_products_row()
RETURNS trigger
LANGUAGE plpgsql
AS $body$
BEGIN
  IF pg_catalog.current_setting('imgmig.syncing', true) OPERATOR(pg_catalog.=) 'capture' THEN
    RETURN NULL;
  END IF;
  INSERT INTO %1$I.image_events (aggregateid, type, payload, tenant, source)
  VALUES (
    CASE WHEN TG_OP OPERATOR(pg_catalog.=) 'DELETE' THEN OLD.id ELSE NEW.id END::pg_catalog.text,
    CASE WHEN TG_OP OPERATOR(pg_catalog.=) 'UPDATE' THEN 'images.updated'
         WHEN TG_OP OPERATOR(pg_catalog.=) 'INSERT' THEN 'images.inserted'
         ELSE 'images.deleted' END,
    CASE WHEN TG_OP OPERATOR(pg_catalog.=) 'UPDATE'
           THEN pg_catalog.jsonb_build_object('op', 'updated', %3$s'after', NEW.images)
         WHEN TG_OP OPERATOR(pg_catalog.=) 'INSERT'
           THEN pg_catalog.jsonb_build_object('op', 'inserted', 'before', NULL, 'after', NEW.images)
         ELSE pg_catalog.jsonb_build_object('op', 'deleted', 'before', OLD.images, 'after', NULL)
    END,
    %2$L,
    CASE WHEN pg_catalog.current_setting('imgmig.source', true) OPERATOR(pg_catalog.=)
                ANY ('{legacy,service,backfill,reconcile}'::pg_catalog.text[])
           THEN pg_catalog.current_setting('imgmig.source', true)
         WHEN pg_catalog.current_setting('imgmig.syncing', true) OPERATOR(pg_catalog.=) 'reverse'
           THEN 'service'
         ELSE 'legacy' END);
  RETURN NULL;
END
$body$
$f$, p_tenant, p_tenant,
     CASE WHEN p_before THEN $e$'before', OLD.images, $e$ ELSE '' END);
END
$install$;
