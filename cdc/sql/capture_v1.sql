-- capture v1: the event log, the diff projection, the capture and reverse triggers, the
-- deferred projector and replay. Shared by every tenant: trigger functions find their
-- tenant in TG_TABLE_SCHEMA. Frozen: a later change ships as capture_v2.sql.
--
-- Tenant tables are reached by pointing search_path at 'pg_catalog, <tenant>, pg_temp'
-- (composed with %I) for the duration of the function: pg_catalog stays first, so a
-- tenant object can never shadow a built-in, and the statements stay static, so their
-- plans are cached per trigger (PL/pgSQL compiles a trigger function once per trigger).
-- The function-level SET clause restores the pinned path on exit.
--
-- Recursion guard: imgmig.syncing (transaction-local) is 'capture' while the capture
-- projection writes product_images and 'reverse' while the reverse sync writes
-- products.images; each direction skips its work when the other one is writing.
-- Requires mapping_v1.sql.

CREATE TABLE IF NOT EXISTS imgmig.projector_checkpoint (
  tenant text PRIMARY KEY,
  last_xmin bigint NOT NULL DEFAULT 0,  -- every event of a transaction older than this is applied
  last_seq bigint NOT NULL DEFAULT 0,   -- highest event seq applied so far
  projected_at timestamptz NOT NULL DEFAULT now()
);

CREATE OR REPLACE FUNCTION imgmig.reject_event_change()
RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
  RAISE EXCEPTION 'imgmig: %.image_events is append-only (% refused)', TG_TABLE_SCHEMA, TG_OP
    USING ERRCODE = 'insufficient_privilege';
END
$$;

-- The tenant's event log: Debezium outbox columns, then tenant, source, txid, at, seq.
CREATE OR REPLACE FUNCTION imgmig.install_event_log(p_tenant text)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
  EXECUTE format($ddl$
    CREATE TABLE IF NOT EXISTS %I.image_events (
      seq bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
      id uuid NOT NULL DEFAULT gen_random_uuid(),
      aggregatetype text NOT NULL DEFAULT 'product',
      aggregateid text NOT NULL,
      type text NOT NULL,
      payload jsonb NOT NULL,
      tenant text NOT NULL,
      source text NOT NULL CHECK (source IN ('legacy', 'service', 'backfill', 'reconcile')),
      txid bigint NOT NULL DEFAULT (pg_current_xact_id()::text::bigint),
      at timestamptz NOT NULL DEFAULT now()
    )$ddl$, p_tenant);
  EXECUTE format('CREATE INDEX IF NOT EXISTS image_events_txid_idx ON %I.image_events (txid)',
                 p_tenant);
  EXECUTE format('CREATE OR REPLACE TRIGGER image_events_append_only '
                 'BEFORE UPDATE OR DELETE ON %I.image_events '
                 'FOR EACH ROW EXECUTE FUNCTION imgmig.reject_event_change()', p_tenant);
  EXECUTE format('CREATE OR REPLACE TRIGGER image_events_no_truncate '
                 'BEFORE TRUNCATE ON %I.image_events '
                 'FOR EACH STATEMENT EXECUTE FUNCTION imgmig.reject_event_change()', p_tenant);
END
$$;

-- Who is writing: the transaction-local imgmig.source, else 'service' for the reverse
-- sync, else 'legacy' (an old app instance knows nothing about imgmig).
CREATE OR REPLACE FUNCTION imgmig.current_source()
RETURNS text
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
  RETURN CASE
    WHEN current_setting('imgmig.source', true) IN ('legacy', 'service', 'backfill', 'reconcile')
      THEN current_setting('imgmig.source', true)
    WHEN current_setting('imgmig.syncing', true) = 'reverse' THEN 'service'
    ELSE 'legacy'
  END;
END
$$;

-- The events of one change: the change itself; when the new value is not clean, an
-- 'images.malformed' event keeping the original value and the problem codes; when the
-- projection failed, an 'images.capture_failed' event with the error.
CREATE OR REPLACE FUNCTION imgmig.change_events(p_op text, p_before jsonb, p_after jsonb,
                                                p_error text DEFAULT NULL)
RETURNS TABLE (type text, payload jsonb)
LANGUAGE sql STABLE
-- No SET clause on purpose, like the mapping's building blocks (see mapping_v1.sql):
-- inlined into the capture trigger's cached plan instead of called row by row.
AS $$
  SELECT 'images.' || p_op, jsonb_build_object('op', p_op, 'before', p_before, 'after', p_after)
  UNION ALL
  SELECT 'images.malformed', jsonb_build_object('problems', to_jsonb(pr.p), 'original', p_after)
    FROM (SELECT imgmig.images_problems(p_after) AS p WHERE p_op <> 'deleted') pr
   WHERE pr.p IS NOT NULL
  UNION ALL
  SELECT 'images.capture_failed', jsonb_build_object('error', p_error, 'original', p_after)
   WHERE p_error IS NOT NULL
$$;

-- One planned change of the diff projection: a row to delete (has_el false), a row to
-- update (row_id and changed), or an element to insert (row_id NULL).
DO $$
BEGIN
  IF to_regtype('imgmig.image_change') IS NULL THEN
    CREATE TYPE imgmig.image_change AS (
      pid bigint, row_id bigint, has_el boolean, unlabel boolean,
      url text, "order" integer, is_label boolean, alt_text text, tags text[],
      mime_type text, file_size bigint, width integer, height integer,
      created_at timestamptz, extra jsonb);
  END IF;
END
$$;

-- Diff projection: make each product's rows equal the mapping of its images. Rows are
-- matched to elements by (url, rank among equal urls); matched rows keep their id and
-- every table-only value the element does not state. When any element of a product
-- states is_label, the elements decide the label for the whole product.
-- 1. plan: one statement maps the arrays, matches the rows and keeps only real changes;
-- 2. apply, each step only when the plan has work for it, in an order that never shows
--    the one-label index two labels: delete unmatched rows, update rows losing the
--    label, update the other changed rows, insert new elements (of existing products).
-- A reorder is thus two small statements; unchanged products cost one.
CREATE OR REPLACE FUNCTION imgmig.project(p_tenant text, p_ids bigint[], p_images jsonb[])
RETURNS integer
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
SET plan_cache_mode = force_generic_plan
AS $$
DECLARE
  v_prev text := coalesce(current_setting('imgmig.syncing', true), '');
  v_plan imgmig.image_change[];
  v_done integer := 0;
  v_n integer;
BEGIN
  PERFORM set_config('search_path', format('pg_catalog, %I, pg_temp', p_tenant), true);
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
           ROW(coalesce(e.pid, c.product_id), c.id, e.url IS NOT NULL, false,
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
  )
  SELECT array_agg(CASE WHEN p.row_id IS NOT NULL AND (p.ch).has_el
                         AND p.old_label AND NOT (p.ch).is_label
                        THEN ROW((p.ch).pid, (p.ch).row_id, true, true, (p.ch).url,
                                 (p.ch)."order", false, (p.ch).alt_text, (p.ch).tags,
                                 (p.ch).mime_type, (p.ch).file_size, (p.ch).width,
                                 (p.ch).height, (p.ch).created_at,
                                 (p.ch).extra)::imgmig.image_change
                        ELSE p.ch END)
    INTO v_plan
    FROM pair p
   WHERE NOT (p.ch).has_el OR p.row_id IS NULL
      OR p.old IS DISTINCT FROM ((p.ch)."order", (p.ch).is_label, (p.ch).alt_text, (p.ch).tags,
                                 (p.ch).mime_type, (p.ch).file_size, (p.ch).width,
                                 (p.ch).height, (p.ch).created_at, (p.ch).extra);
  IF v_plan IS NULL THEN
    RETURN 0;
  END IF;
  PERFORM set_config('imgmig.syncing', 'capture', true);
  IF EXISTS (SELECT 1 FROM unnest(v_plan) c WHERE NOT c.has_el) THEN
    DELETE FROM product_images r USING unnest(v_plan) c
     WHERE NOT c.has_el AND r.id = c.row_id;
    GET DIAGNOSTICS v_n = ROW_COUNT; v_done := v_done + v_n;
  END IF;
  IF EXISTS (SELECT 1 FROM unnest(v_plan) c WHERE c.unlabel) THEN
    UPDATE product_images r
       SET "order" = c."order", is_label = false, alt_text = c.alt_text, tags = c.tags,
           mime_type = c.mime_type, file_size = c.file_size, width = c.width,
           height = c.height, created_at = c.created_at, extra = c.extra,
           label_strategy = 'explicit', label_confidence = 1, updated_at = now()
      FROM unnest(v_plan) c
     WHERE c.unlabel AND r.id = c.row_id;
    GET DIAGNOSTICS v_n = ROW_COUNT; v_done := v_done + v_n;
  END IF;
  IF EXISTS (SELECT 1 FROM unnest(v_plan) c WHERE c.has_el AND NOT c.unlabel
                                               AND c.row_id IS NOT NULL) THEN
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
  IF EXISTS (SELECT 1 FROM unnest(v_plan) c WHERE c.row_id IS NULL) THEN
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
  PERFORM set_config('imgmig.syncing', v_prev, true);
  RETURN v_done;
END
$$;

-- Rows -> JSONB arrays for a set of products, through the canonical mapping.
CREATE OR REPLACE FUNCTION imgmig.rows_images(p_tenant text, p_ids bigint[])
RETURNS TABLE (product_id bigint, images jsonb)
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
  RETURN QUERY EXECUTE format($q$
    SELECT i.pid, coalesce(
             (SELECT jsonb_agg(imgmig.row_to_element(r.url, r."order", r.is_label, r.alt_text,
                                                     r.tags, r.mime_type, r.file_size, r.width,
                                                     r.height, r.created_at, r.extra)
                               ORDER BY r."order", r.id)
                FROM %I.product_images r WHERE r.product_id = i.pid), '[]')
      FROM unnest($1) AS i(pid)$q$, p_tenant) USING p_ids;
END
$$;

-- The rows-side twin of imgmig.images_hash(jsonb), for verify.
CREATE OR REPLACE FUNCTION imgmig.rows_hash(p_tenant text, p_product_id bigint)
RETURNS text
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
  RETURN (SELECT imgmig.images_hash(r.images)
            FROM imgmig.rows_images(p_tenant, ARRAY[p_product_id]) r);
END
$$;

-- Capture, on products: AFTER INSERT / UPDATE / DELETE, FOR EACH STATEMENT with transition
-- tables, so a 10,000-row UPDATE is one set-based pass. (PostgreSQL forbids a column list,
-- UPDATE OF images, on a trigger with transition tables; the first statement filters
-- unchanged images, so other writes cost one small join.)
-- Bad input never fails the legacy write:
-- 1. append the events and project, in one exception block (one subtransaction);
-- 2. on any error, append the events again without projecting, each with an
--    'images.capture_failed' event naming the error (a reconcile repairs the rows);
-- 3. if even that fails, warn and let the write through.
-- Transition tables are only visible in the trigger function itself, hence the inline SQL.
CREATE OR REPLACE FUNCTION imgmig.capture_products()
RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
SET plan_cache_mode = force_generic_plan
AS $$
DECLARE
  v_tenant text := TG_TABLE_SCHEMA;
  v_syncing text := coalesce(current_setting('imgmig.syncing', true), '');
  v_source text := imgmig.current_source();
  v_ids bigint[];
  v_images jsonb[];
  v_err text;
BEGIN
  IF v_syncing = 'capture' THEN
    RETURN NULL;
  END IF;
  PERFORM set_config('search_path', format('pg_catalog, %I, pg_temp', v_tenant), true);
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
      -- already the truth; in deferred mode the projector applies the events.
      IF v_err IS NULL AND v_ids IS NOT NULL AND v_syncing <> 'reverse'
         AND coalesce((SELECT s.projection FROM imgmig.tenant_state s WHERE s.tenant = v_tenant),
                      'inline') = 'inline' THEN
        PERFORM imgmig.project(v_tenant, v_ids, v_images);
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

-- Capture in deferred mode, on products: FOR EACH ROW, UPDATE OF images WHEN the value
-- really changed, so any other write costs nothing. It only appends the event (plus an
-- 'images.malformed' one when the value is not clean); imgmig.project_pending applies it.
-- Row-level because one small INSERT per changed row is the cheapest possible trigger:
-- no transition tables, no projection, and no subtransaction that writes (the problem
-- check, the only content-dependent step, runs in an exception block of its own).
CREATE OR REPLACE FUNCTION imgmig.log_products_row()
RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
  v_op text;
  v_before jsonb;
  v_after jsonb;
  v_id bigint;
  v_problems text[];
  v_source text;
  v_check boolean;
BEGIN
  IF current_setting('imgmig.syncing', true) = 'capture' THEN
    RETURN NULL;
  END IF;
  IF TG_OP = 'DELETE' THEN
    v_id := OLD.id; v_before := OLD.images;
  ELSE
    v_id := NEW.id; v_after := NEW.images;
    IF TG_OP = 'UPDATE' THEN v_before := OLD.images; END IF;
  END IF;
  v_op := CASE TG_OP WHEN 'INSERT' THEN 'inserted' WHEN 'UPDATE' THEN 'updated'
                     ELSE 'deleted' END;
  v_source := CASE WHEN current_setting('imgmig.source', true)
                          IN ('legacy', 'service', 'backfill', 'reconcile')
                     THEN current_setting('imgmig.source', true)
                     WHEN current_setting('imgmig.syncing', true) = 'reverse' THEN 'service'
                     ELSE 'legacy' END;  -- imgmig.current_source(), inlined: hot path
  PERFORM set_config('search_path', format('pg_catalog, %I, pg_temp', TG_TABLE_SCHEMA), true);
  INSERT INTO image_events (aggregateid, type, payload, tenant, source)
  VALUES (v_id::text, 'images.' || v_op,
          jsonb_build_object('op', v_op, 'before', v_before, 'after', v_after),
          TG_TABLE_SCHEMA, v_source);
  -- The clean legacy shape (objects with a url, orders 0..n-1 in place) skips the check.
  -- (CASE fixes the evaluation order: jsonb_array_length would raise on a non-array.)
  v_check := TG_OP <> 'DELETE'
     AND CASE WHEN jsonb_typeof(v_after) IS DISTINCT FROM 'array' THEN true
              WHEN jsonb_path_exists(v_after, '$[*] ? (@.type() != "object" || !exists(@.url)
                                                       || @.url.type() != "string"
                                                       || @.url == "" || @.is_label == true)')
                THEN true
              ELSE jsonb_path_query_array(v_after, '$[*].order')
                   <> to_jsonb(ARRAY(SELECT generate_series(0, jsonb_array_length(v_after) - 1)))
         END;
  IF v_check
  THEN
    BEGIN
      v_problems := imgmig.images_problems(v_after);
    EXCEPTION WHEN OTHERS THEN
      v_problems := ARRAY['unchecked: ' || SQLERRM];
    END;
    IF v_problems IS NOT NULL THEN
      INSERT INTO image_events (aggregateid, type, payload, tenant, source)
      VALUES (v_id::text, 'images.malformed',
              jsonb_build_object('problems', to_jsonb(v_problems), 'original', v_after),
              TG_TABLE_SCHEMA, v_source);
    END IF;
  END IF;
  RETURN NULL;
END
$$;

-- Reverse sync, on product_images in stage 'table': every statement rewrites the
-- products.images of the products it touched through the canonical mapping, so old app
-- instances and an instant rollback to a JSONB stage see every change. The capture
-- trigger logs that products write as a 'service' event and does not project it back.
CREATE OR REPLACE FUNCTION imgmig.reverse_images()
RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
  v_tenant text := TG_TABLE_SCHEMA;
  v_prev text := coalesce(current_setting('imgmig.syncing', true), '');
  v_ids bigint[];
BEGIN
  IF v_prev IN ('capture', 'reverse') THEN
    RETURN NULL;
  END IF;
  PERFORM set_config('search_path', format('pg_catalog, %I, pg_temp', v_tenant), true);
  IF TG_OP = 'INSERT' THEN
    SELECT array_agg(DISTINCT n.product_id) INTO v_ids FROM new_rows n;
  ELSIF TG_OP = 'UPDATE' THEN
    SELECT array_agg(DISTINCT x.product_id) INTO v_ids
      FROM (SELECT n.product_id FROM new_rows n UNION SELECT o.product_id FROM old_rows o) x;
  ELSE
    SELECT array_agg(DISTINCT o.product_id) INTO v_ids FROM old_rows o;
  END IF;
  IF v_ids IS NULL THEN
    RETURN NULL;
  END IF;
  -- Lock the products first, in id order, and only then read the rows in a new statement
  -- (a new snapshot under READ COMMITTED): a concurrent table write to the same product
  -- has committed by then, so its change is in the array we write and is not lost.
  PERFORM 1 FROM products p WHERE p.id = ANY (v_ids) ORDER BY p.id FOR NO KEY UPDATE;
  PERFORM set_config('imgmig.syncing', 'reverse', true);
  UPDATE products p SET images = r.images
    FROM imgmig.rows_images(v_tenant, v_ids) r
   WHERE p.id = r.product_id AND p.images IS DISTINCT FROM r.images;
  PERFORM set_config('imgmig.syncing', v_prev, true);
  RETURN NULL;
END
$$;

-- The latest change event of each product among p_events (a query over image_events),
-- projected. Used by the deferred projector and by replay.
CREATE OR REPLACE FUNCTION imgmig.project_latest(p_tenant text, p_min_txid bigint)
RETURNS TABLE (products integer, max_seq bigint)
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
  v_ids bigint[];
  v_images jsonb[];
BEGIN
  EXECUTE format($q$
    SELECT array_agg(l.pid), array_agg(l.after), max(l.seq)
      FROM (SELECT DISTINCT ON (e.aggregateid) e.aggregateid::bigint AS pid,
                   e.payload -> 'after' AS after, e.seq
              FROM %I.image_events e
             WHERE e.txid >= $1
               AND e.type IN ('images.inserted', 'images.updated', 'images.deleted',
                              'images.snapshot')
             ORDER BY e.aggregateid, e.seq DESC) l$q$, p_tenant)
    INTO v_ids, v_images, max_seq USING p_min_txid;
  products := coalesce(cardinality(v_ids), 0);
  IF v_ids IS NOT NULL THEN
    PERFORM imgmig.project(p_tenant, v_ids, v_images);
  END IF;
  RETURN NEXT;
END
$$;

-- Deferred projector, one run for one tenant. Events are ordered per product by seq (the
-- products row lock serialises writers). The checkpoint is a transaction-id horizon:
-- 1. take xmin of the current snapshot: every transaction below it has finished;
-- 2. apply the latest event of each product among events with txid >= last checkpoint
--    (events of transactions still open at the last run are applied again: harmless,
--    the projection is idempotent);
-- 3. store xmin as the new checkpoint. No committed event is ever skipped.
CREATE OR REPLACE FUNCTION imgmig.project_pending(p_tenant text)
RETURNS integer
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
  v_xmin bigint := pg_snapshot_xmin(pg_current_snapshot())::text::bigint;
  v_from bigint;
  v_done record;
BEGIN
  PERFORM pg_advisory_xact_lock(hashtext('imgmig.project'), hashtext(p_tenant));
  SELECT c.last_xmin INTO v_from FROM imgmig.projector_checkpoint c WHERE c.tenant = p_tenant;
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

-- Events the projector has not applied yet, and the age of the oldest.
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
                              WHERE c.tenant = $1), 0)$q$, p_tenant) USING p_tenant;
END
$$;

-- Replay: rebuild the tenant's product_images from its event log alone.
CREATE OR REPLACE FUNCTION imgmig.replay(p_tenant text)
RETURNS integer
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
  v_prev text := coalesce(current_setting('imgmig.syncing', true), '');
  v_done record;
BEGIN
  PERFORM pg_advisory_xact_lock(hashtext('imgmig.project'), hashtext(p_tenant));
  PERFORM set_config('imgmig.syncing', 'capture', true);  -- the reverse sync stays quiet
  EXECUTE format('DELETE FROM %I.product_images', p_tenant);
  SELECT * INTO v_done FROM imgmig.project_latest(p_tenant, 0);
  PERFORM set_config('imgmig.syncing', v_prev, true);
  RETURN v_done.products;
END
$$;

-- Record and project the current images of some products as 'images.snapshot' events
-- (for the backfill and the reconciler: the event log stays a complete replay source).
CREATE OR REPLACE FUNCTION imgmig.snapshot(p_tenant text, p_ids bigint[], p_source text)
RETURNS integer
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
  v_ids bigint[];
  v_images jsonb[];
BEGIN
  EXECUTE format($q$
    WITH cur AS (SELECT p.id, p.images FROM %1$I.products p WHERE p.id = ANY ($1)),
    ev AS (
      INSERT INTO %1$I.image_events (aggregateid, type, payload, tenant, source)
      SELECT cur.id::text, 'images.snapshot',
             jsonb_build_object('op', 'snapshot', 'before', NULL, 'after', cur.images), $2, $3
        FROM cur)
    SELECT array_agg(cur.id), array_agg(cur.images) FROM cur$q$, p_tenant)
    INTO v_ids, v_images USING p_ids, p_tenant, p_source;
  IF v_ids IS NULL THEN
    RETURN 0;
  END IF;
  RETURN imgmig.project(p_tenant, v_ids, v_images);
END
$$;
