-- capture v2: a cheaper write path, same events and rows. Requires mapping_v1.sql and
-- capture_v1.sql; replaces some of their functions. Frozen: a later change ships as
-- capture_v3.sql. Measured against v1 in BENCHMARKS.md ("Change capture overhead").
--
-- What changed, and why it is safe:
-- 0. Fewer statements per write. In PL/pgSQL, PERFORM and IF EXISTS (SELECT ...) each
--    start and stop a full executor, about the cost of a small query; an assignment of a
--    plain expression (v := set_config(...)) takes the simple-expression fast path. The
--    projection computes in its plan statement which of its four steps have work,
--    instead of asking with four more queries. (perf on the inline benchmark: executor
--    start-up, CHECK-constraint expression set-up and memory contexts dominated.)
-- 1. Deferred mode's row trigger is one INSERT. The problem check moves to the deferred
--    projector (imgmig.record_malformed), which is the step that projects in that mode:
--    every change event still gets its 'images.malformed' event, written when the
--    projector runs instead of in the legacy transaction.
-- 2. The inline trigger no longer reads tenant_state to learn the projection mode: the
--    installed trigger *is* the mode (cdc.capture.triggers_for swaps them under the
--    same lock as the mode change), and the clean legacy shape skips images_problems.
-- 3. snapshot_batch() (the backfill batch; snapshot() for reconcile) inserts the rows of
--    products that have none yet in one INSERT ... SELECT through the mapping, diffs only
--    the others, and logs the malformed ones in the same statement; it runs with jit off (a batch statement is costed high enough to trigger
--    JIT compilation, which took longer than the statement itself).

-- True when the array is clean: objects with a non-empty string url, orders 0..n-1 in
-- place, no is_label true (arrays of more than 64 elements are never called clean, they
-- go through the full check). Inlinable: no SET clause, no sub-select. Never raises.
CREATE OR REPLACE FUNCTION imgmig.images_clean(p_images jsonb)
RETURNS boolean
LANGUAGE sql STABLE PARALLEL SAFE
AS $$
  SELECT CASE
    WHEN jsonb_typeof(p_images) IS DISTINCT FROM 'array' THEN false
    WHEN jsonb_path_exists(p_images, '$[*] ? (@.type() != "object" || !exists(@.url)
                                              || @.url.type() != "string" || @.url == ""
                                              || @.is_label == true)')
      THEN false
    ELSE jsonb_path_query_array(p_images, '$[*].order')
         = jsonb_path_query_array(
             '[0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21,
               22, 23, 24, 25, 26, 27, 28, 29, 30, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41,
               42, 43, 44, 45, 46, 47, 48, 49, 50, 51, 52, 53, 54, 55, 56, 57, 58, 59, 60, 61,
               62, 63]', '$[0 to $n]', jsonb_build_object('n', jsonb_array_length(p_images) - 1))
  END
$$;

-- v1's change_events, with the clean shape skipping the full problem check.
CREATE OR REPLACE FUNCTION imgmig.change_events(p_op text, p_before jsonb, p_after jsonb,
                                                p_error text DEFAULT NULL)
RETURNS TABLE (type text, payload jsonb)
LANGUAGE sql STABLE
AS $$
  SELECT 'images.' || p_op, jsonb_build_object('op', p_op, 'before', p_before, 'after', p_after)
  UNION ALL
  SELECT 'images.malformed', jsonb_build_object('problems', to_jsonb(pr.p), 'original', p_after)
    FROM (SELECT imgmig.images_problems(p_after) AS p
           WHERE p_op <> 'deleted' AND NOT imgmig.images_clean(p_after)) pr
   WHERE pr.p IS NOT NULL
  UNION ALL
  SELECT 'images.capture_failed', jsonb_build_object('error', p_error, 'original', p_after)
   WHERE p_error IS NOT NULL
$$;

-- Inline capture: v1's trigger without the tenant_state read, source computed in place.
CREATE OR REPLACE FUNCTION imgmig.capture_products()
RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
SET plan_cache_mode = force_generic_plan
AS $$
DECLARE
  v_tenant text := TG_TABLE_SCHEMA;
  v_syncing text := coalesce(current_setting('imgmig.syncing', true), '');
  v_source text;
  v_ids bigint[];
  v_images jsonb[];
  v_err text;
  v_ignored text;
BEGIN
  IF v_syncing = 'capture' THEN
    RETURN NULL;
  END IF;
  v_source := CASE WHEN current_setting('imgmig.source', true)
                          IN ('legacy', 'service', 'backfill', 'reconcile')
                     THEN current_setting('imgmig.source', true)
                   WHEN v_syncing = 'reverse' THEN 'service'
                   ELSE 'legacy' END;  -- imgmig.current_source(), in place: hot path
  v_ignored := set_config('search_path', format('pg_catalog, %I, pg_temp', v_tenant), true);
  FOR v_try IN 1..2 LOOP
    BEGIN
      IF TG_OP = 'UPDATE' THEN
        WITH ch AS (
          SELECT n.id, o.images AS before, n.images AS after
            FROM new_rows n JOIN old_rows o ON o.id = n.id
           WHERE n.images IS DISTINCT FROM o.images
        ), ev AS (
          INSERT INTO image_events (aggregateid, type, payload, tenant, source)
          SELECT ch.id::text, x.type, x.payload, v_tenant, v_source
            FROM ch CROSS JOIN LATERAL imgmig.change_events('updated', ch.before, ch.after, v_err) x
        )
        SELECT array_agg(ch.id), array_agg(ch.after) INTO v_ids, v_images FROM ch;
      ELSIF TG_OP = 'INSERT' THEN
        WITH ev AS (
          INSERT INTO image_events (aggregateid, type, payload, tenant, source)
          SELECT n.id::text, x.type, x.payload, v_tenant, v_source
            FROM new_rows n CROSS JOIN LATERAL imgmig.change_events('inserted', NULL, n.images, v_err) x
        )
        SELECT array_agg(n.id), array_agg(n.images) INTO v_ids, v_images FROM new_rows n;
      ELSE
        INSERT INTO image_events (aggregateid, type, payload, tenant, source)
        SELECT o.id::text, x.type, x.payload, v_tenant, v_source
          FROM old_rows o CROSS JOIN LATERAL imgmig.change_events('deleted', o.images, NULL, v_err) x;
      END IF;
      -- Deleted products lose their rows by cascade; under the reverse sync the rows are
      -- already the truth. (This trigger is only installed in inline mode.)
      IF v_err IS NULL AND v_ids IS NOT NULL AND v_syncing <> 'reverse' THEN
        v_ignored := imgmig.project(v_tenant, v_ids, v_images);
      END IF;
      EXIT;
    EXCEPTION WHEN OTHERS THEN
      IF v_try = 2 THEN
        RAISE WARNING 'imgmig: capture on %.products failed, write kept: %', v_tenant, v_err;
      END IF;
      GET STACKED DIAGNOSTICS v_err = MESSAGE_TEXT;
    END;
  END LOOP;
  RETURN NULL;
END
$$;

-- Deferred capture: one INSERT per changed row and nothing else. (OLD is NULL on INSERT
-- and NEW on DELETE, so one statement covers the three operations.)
CREATE OR REPLACE FUNCTION imgmig.log_products_row()
RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
  v_ignored text;
BEGIN
  IF current_setting('imgmig.syncing', true) = 'capture' THEN
    RETURN NULL;
  END IF;
  v_ignored := set_config('search_path', format('pg_catalog, %I, pg_temp', TG_TABLE_SCHEMA), true);
  INSERT INTO image_events (aggregateid, type, payload, tenant, source)
  VALUES (CASE WHEN TG_OP = 'DELETE' THEN OLD.id ELSE NEW.id END::text,
          CASE TG_OP WHEN 'INSERT' THEN 'images.inserted' WHEN 'UPDATE' THEN 'images.updated'
                     ELSE 'images.deleted' END,
          jsonb_build_object('op', CASE TG_OP WHEN 'INSERT' THEN 'inserted'
                                              WHEN 'UPDATE' THEN 'updated' ELSE 'deleted' END,
                             'before', OLD.images, 'after', NEW.images),
          TG_TABLE_SCHEMA,
          CASE WHEN current_setting('imgmig.source', true)
                      IN ('legacy', 'service', 'backfill', 'reconcile')
                 THEN current_setting('imgmig.source', true)
               WHEN current_setting('imgmig.syncing', true) = 'reverse' THEN 'service'
               ELSE 'legacy' END);
  RETURN NULL;
END
$$;

-- The problem check of deferred mode: an 'images.malformed' event (payload: problems,
-- original, and the seq of the change event it classifies) for every inserted/updated
-- event of transactions from p_min_txid on whose value is not clean and that has none
-- yet. A change already classified is one with a malformed event of the same product in
-- the same transaction (the inline trigger writes it there) or one naming its seq (this
-- function wrote it), so overlapping runs never record a problem twice.
CREATE OR REPLACE FUNCTION imgmig.record_malformed(p_tenant text, p_min_txid bigint)
RETURNS integer
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
SET jit = off
AS $$
DECLARE
  v_n integer;
BEGIN
  EXECUTE format($q$
    WITH win AS (
      SELECT e.seq, e.aggregateid, e.type, e.payload, e.source, e.txid
        FROM %1$I.image_events e WHERE e.txid >= $1
    ), done_tx AS (  -- classified by the inline trigger, in the writer's transaction
      SELECT DISTINCT w.aggregateid, w.txid FROM win w WHERE w.type = 'images.malformed'
    ), done_seq AS (  -- classified by an earlier run of this function
      SELECT (w.payload ->> 'event')::bigint AS seq
        FROM win w WHERE w.type = 'images.malformed' AND w.payload ? 'event'
    ), todo AS (
      SELECT c.seq, c.aggregateid, c.source, c.payload -> 'after' AS after,
             imgmig.images_problems(c.payload -> 'after') AS problems
        FROM win c
       WHERE c.type IN ('images.inserted', 'images.updated')
         AND NOT imgmig.images_clean(c.payload -> 'after')
         AND NOT EXISTS (SELECT 1 FROM done_tx d
                          WHERE d.aggregateid = c.aggregateid AND d.txid = c.txid)
         AND NOT EXISTS (SELECT 1 FROM done_seq d WHERE d.seq = c.seq)
    )
    INSERT INTO %1$I.image_events (aggregateid, type, payload, tenant, source)
    SELECT t.aggregateid, 'images.malformed',
           jsonb_build_object('problems', to_jsonb(t.problems), 'original', t.after,
                              'event', t.seq),
           $2, t.source
      FROM todo t WHERE t.problems IS NOT NULL ORDER BY t.seq$q$, p_tenant)
    USING p_min_txid, p_tenant;
  GET DIAGNOSTICS v_n = ROW_COUNT;
  RETURN v_n;
END
$$;

-- v1's deferred projector, which now also records the problems of what it applies.
CREATE OR REPLACE FUNCTION imgmig.project_pending(p_tenant text)
RETURNS integer
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
SET jit = off
AS $$
DECLARE
  v_xmin bigint := pg_snapshot_xmin(pg_current_snapshot())::text::bigint;
  v_from bigint;
  v_done record;
BEGIN
  PERFORM pg_advisory_xact_lock(hashtext('imgmig.project'), hashtext(p_tenant));
  SELECT c.last_xmin INTO v_from FROM imgmig.projector_checkpoint c WHERE c.tenant = p_tenant;
  PERFORM imgmig.record_malformed(p_tenant, coalesce(v_from, 0));
  SELECT * INTO v_done FROM imgmig.project_latest(p_tenant, coalesce(v_from, 0));
  INSERT INTO imgmig.projector_checkpoint AS c (tenant, last_xmin, last_seq, projected_at)
  VALUES (p_tenant, v_xmin, coalesce(v_done.max_seq, 0), now())
  ON CONFLICT (tenant) DO UPDATE
     SET last_xmin = greatest(c.last_xmin, excluded.last_xmin),
         last_seq = greatest(c.last_seq, excluded.last_seq),
         projected_at = excluded.projected_at;
  RETURN v_done.products;
END
$$;

-- Record and project the current images of some products as 'images.snapshot' events,
-- and (p_malformed) an 'images.malformed' event for each whose images are not clean: the
-- backfill's whole batch in one statement, where v1 needed a second pass for the problems.
-- Products without any row yet (most of them, on a first backfill) get their rows in one
-- INSERT ... SELECT through the mapping: that is what the diff would insert for them
-- (every element new; labels as the elements state them, none otherwise; tags '{}',
-- created_at now() when the element has none), without building and unpacking a plan.
-- The others go through the diff. The caller holds the products' row locks, so no
-- capture can add rows for them between the two statements.
CREATE OR REPLACE FUNCTION imgmig.snapshot_batch(p_tenant text, p_ids bigint[], p_source text,
                                                 p_malformed boolean)
RETURNS TABLE (changed integer, malformed integer)
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
SET jit = off
AS $$
DECLARE
  v_prev text := coalesce(current_setting('imgmig.syncing', true), '');
  v_ids bigint[];
  v_images jsonb[];
  v_ignored text;
BEGIN
  v_ignored := set_config('imgmig.syncing', 'capture', true);  -- the reverse sync stays quiet
  EXECUTE format($q$
    WITH cur AS (SELECT p.id, p.images FROM %1$I.products p WHERE p.id = ANY ($1)),
    ev AS (
      INSERT INTO %1$I.image_events (aggregateid, type, payload, tenant, source)
      SELECT cur.id::text, 'images.snapshot',
             jsonb_build_object('op', 'snapshot', 'before', NULL, 'after', cur.images), $2, $3
        FROM cur),
    bad AS (
      INSERT INTO %1$I.image_events (aggregateid, type, payload, tenant, source)
      SELECT cur.id::text, x.type, x.payload, $2, $3
        FROM cur CROSS JOIN LATERAL imgmig.change_events('snapshot', NULL, cur.images) x
       WHERE $4 AND x.type = 'images.malformed'
      RETURNING 1),
    fresh AS (
      INSERT INTO %1$I.product_images (product_id, url, "order", is_label, alt_text, tags,
                                       mime_type, file_size, width, height, created_at, extra,
                                       label_strategy, label_confidence)
      SELECT cur.id, m.url, m."order", coalesce(m.is_label, false), m.alt_text,
             coalesce(m.tags, '{}'), m.mime_type, m.file_size, m.width, m.height,
             coalesce(m.created_at, now()), m.extra,
             CASE WHEN m.is_label THEN 'explicit' END, CASE WHEN m.is_label THEN 1 END
        FROM cur CROSS JOIN LATERAL imgmig.images_to_rows(cur.images) AS m
       WHERE NOT EXISTS (SELECT 1 FROM %1$I.product_images r WHERE r.product_id = cur.id)
      RETURNING 1)
    SELECT array_agg(cur.id), array_agg(cur.images), (SELECT count(*) FROM fresh),
           (SELECT count(*) FROM bad)
      FROM cur
     WHERE EXISTS (SELECT 1 FROM %1$I.product_images r WHERE r.product_id = cur.id)$q$,
    p_tenant)
    INTO v_ids, v_images, changed, malformed USING p_ids, p_tenant, p_source, p_malformed;
  v_ignored := set_config('imgmig.syncing', v_prev, true);
  IF v_ids IS NOT NULL THEN
    changed := changed + imgmig.project(p_tenant, v_ids, v_images);
  END IF;
  RETURN NEXT;
END
$$;

-- v1's snapshot (reconcile's repair), through the batch function, problems not logged.
CREATE OR REPLACE FUNCTION imgmig.snapshot(p_tenant text, p_ids bigint[], p_source text)
RETURNS integer
LANGUAGE sql
SET search_path = pg_catalog, pg_temp
AS $$
  SELECT s.changed FROM imgmig.snapshot_batch(p_tenant, p_ids, p_source, false) AS s
$$;

-- v1's diff projection, same plan and steps, in fewer statements (see 0. above): the plan
-- statement also says which steps have work, and the settings are assignments.
CREATE OR REPLACE FUNCTION imgmig.project(p_tenant text, p_ids bigint[], p_images jsonb[])
RETURNS integer
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
SET plan_cache_mode = force_generic_plan
AS $$
DECLARE
  v_prev text := coalesce(current_setting('imgmig.syncing', true), '');
  v_plan imgmig.image_change[];
  v_del boolean;
  v_unlabel boolean;
  v_upd boolean;
  v_ins boolean;
  v_done integer := 0;
  v_n integer;
  v_ignored text;
BEGIN
  v_ignored := set_config('search_path', format('pg_catalog, %I, pg_temp', p_tenant), true);
  WITH src AS (
    SELECT s.pid, s.img FROM unnest(p_ids, p_images) AS s(pid, img)
  ), el AS (
    SELECT s.pid, m.*, row_number() OVER (PARTITION BY s.pid, m.url ORDER BY m."order") AS k
      FROM src s CROSS JOIN LATERAL imgmig.images_to_rows(s.img) AS m
  ), says AS (
    SELECT DISTINCT el.pid FROM el WHERE el.is_label IS NOT NULL
  ), cur AS (
    SELECT r.*, row_number() OVER (PARTITION BY r.product_id, r.url ORDER BY r."order", r.id) AS k
      FROM product_images r WHERE r.product_id = ANY (p_ids)
  ), pair AS (
    SELECT c.id AS row_id, c.is_label AS old_label,
           (c."order", c.is_label, c.alt_text, c.tags, c.mime_type, c.file_size, c.width,
            c.height, c.created_at, c.extra) AS old,
           ROW(coalesce(e.pid, c.product_id), c.id, e.url IS NOT NULL,
               c.id IS NOT NULL AND e.url IS NOT NULL AND c.is_label
                 AND NOT CASE WHEN e.is_label IS NOT NULL THEN e.is_label
                              WHEN e.pid IN (SELECT says.pid FROM says) THEN false
                              ELSE c.is_label END,
               e.url, e."order",
               CASE WHEN e.is_label IS NOT NULL THEN e.is_label
                    WHEN e.pid IN (SELECT says.pid FROM says) THEN false
                    ELSE coalesce(c.is_label, false) END,
               coalesce(e.alt_text, c.alt_text),
               coalesce(e.tags, c.tags, '{}'),
               coalesce(e.mime_type, c.mime_type),
               coalesce(e.file_size, c.file_size),
               coalesce(e.width, c.width),
               coalesce(e.height, c.height),
               coalesce(e.created_at, c.created_at, now()),
               e.extra)::imgmig.image_change AS ch
      FROM el e FULL JOIN cur c ON c.product_id = e.pid AND c.url = e.url AND c.k = e.k
  ), chg AS (
    SELECT p.ch FROM pair p
     WHERE NOT (p.ch).has_el OR p.row_id IS NULL
        OR p.old IS DISTINCT FROM ((p.ch)."order", (p.ch).is_label, (p.ch).alt_text,
                                   (p.ch).tags, (p.ch).mime_type, (p.ch).file_size,
                                   (p.ch).width, (p.ch).height, (p.ch).created_at,
                                   (p.ch).extra)
  )
  SELECT array_agg(c.ch), bool_or(NOT (c.ch).has_el), bool_or((c.ch).unlabel),
         bool_or((c.ch).has_el AND NOT (c.ch).unlabel AND (c.ch).row_id IS NOT NULL),
         bool_or((c.ch).row_id IS NULL)
    INTO v_plan, v_del, v_unlabel, v_upd, v_ins
    FROM chg c;
  IF v_plan IS NULL THEN
    RETURN 0;
  END IF;
  v_ignored := set_config('imgmig.syncing', 'capture', true);
  IF v_del THEN
    DELETE FROM product_images r USING unnest(v_plan) c
     WHERE NOT c.has_el AND r.id = c.row_id;
    GET DIAGNOSTICS v_n = ROW_COUNT; v_done := v_done + v_n;
  END IF;
  IF v_unlabel THEN
    UPDATE product_images r
       SET "order" = c."order", is_label = false, alt_text = c.alt_text, tags = c.tags,
           mime_type = c.mime_type, file_size = c.file_size, width = c.width,
           height = c.height, created_at = c.created_at, extra = c.extra,
           label_strategy = 'explicit', label_confidence = 1, updated_at = now()
      FROM unnest(v_plan) c
     WHERE c.unlabel AND r.id = c.row_id;
    GET DIAGNOSTICS v_n = ROW_COUNT; v_done := v_done + v_n;
  END IF;
  IF v_upd THEN
    UPDATE product_images r
       SET "order" = c."order", is_label = c.is_label, alt_text = c.alt_text, tags = c.tags,
           mime_type = c.mime_type, file_size = c.file_size, width = c.width,
           height = c.height, created_at = c.created_at, extra = c.extra,
           label_strategy = CASE WHEN c.is_label <> r.is_label THEN 'explicit'
                                 ELSE r.label_strategy END,
           label_confidence = CASE WHEN c.is_label <> r.is_label THEN 1
                                   ELSE r.label_confidence END,
           updated_at = now()
      FROM unnest(v_plan) c
     WHERE c.has_el AND NOT c.unlabel AND r.id = c.row_id;
    GET DIAGNOSTICS v_n = ROW_COUNT; v_done := v_done + v_n;
  END IF;
  IF v_ins THEN
    INSERT INTO product_images (product_id, url, "order", is_label, alt_text, tags, mime_type,
                                file_size, width, height, created_at, extra,
                                label_strategy, label_confidence)
    SELECT c.pid, c.url, c."order", c.is_label, c.alt_text, c.tags, c.mime_type, c.file_size,
           c.width, c.height, c.created_at, c.extra,
           CASE WHEN c.is_label THEN 'explicit' END, CASE WHEN c.is_label THEN 1 END
      FROM unnest(v_plan) c
     WHERE c.row_id IS NULL AND EXISTS (SELECT 1 FROM products x WHERE x.id = c.pid);
    GET DIAGNOSTICS v_n = ROW_COUNT; v_done := v_done + v_n;
  END IF;
  v_ignored := set_config('imgmig.syncing', v_prev, true);
  RETURN v_done;
END
$$;
