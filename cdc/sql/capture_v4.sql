-- capture v4: the projector's lag counts change events only. Requires capture_v1.sql.
-- Frozen: a later change ships as capture_v5.sql. Installed by revision 0006_logical.
--
-- v1's projection_lag counted every event past the projector's checkpoint. The projector
-- writes 'images.malformed' events itself (record_malformed, capture v2) after the
-- changes it applies, and its checkpoint stops at the last change it applied: a deferred
-- or logical tenant that once received a malformed array showed those events as
-- pending for ever (tests/test_logical.py found it).

CREATE OR REPLACE FUNCTION imgmig.projection_lag(p_tenant text)
RETURNS TABLE (pending bigint, oldest timestamptz)
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
  RETURN QUERY EXECUTE format($q$
    SELECT count(*), min(e.at)
      FROM %I.image_events e
     WHERE e.seq > coalesce((SELECT c.last_seq FROM imgmig.projector_checkpoint c
                              WHERE c.tenant = $1), 0)
       AND e.type IN ('images.inserted', 'images.updated', 'images.deleted',
                      'images.snapshot')$q$, p_tenant) USING p_tenant;
END
$$;
