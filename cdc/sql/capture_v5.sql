-- capture v5: a cheaper inline-mode trigger. Requires capture_v4.sql. Frozen: a later
-- change ships as capture_v6.sql. Measured against v2's inline trigger in BENCHMARKS.md
-- ("Change capture overhead").
--
-- What changed, and why it is safe:
-- 1. Inline capture is a row-level trigger, one function per tenant,
--    <tenant>.imgmig_capture_products_row(), written by imgmig.install_capture_function()
--    with the tenant's tables composed in (format %I), like v3's deferred function. v2's
--    three statement-level triggers filled two transition tables on every statement and
--    joined them back; a row trigger gets OLD and NEW directly, and its UPDATE trigger
--    has a WHEN clause, so a write that leaves images alone does not fire it at all.
-- 2. The events are the same as v2's, and an update's 'before' follows the tenant's log
--    like v3's deferred function: kept until the log is complete, then dropped (the
--    payload stays under the 2 kB TOAST threshold). The backfill rewrites the function
--    when it finishes, as it does the deferred one.
-- 3. The projection applies the three edits a legacy app makes, when it can prove them,
--    with one targeted statement each, instead of the diff (imgmig.project), which plans
--    a full join of the product's rows with its mapped array on every write:
--      append     NEW is OLD plus one element at the end: insert that element's row,
--                 mapped by imgmig.images_to_rows (the one mapping), at order n_old;
--      drop last  NEW is OLD without its last element: delete the row at that order
--                 with that url;
--      reorder    NEW is OLD with 2 to 8 elements moved and no other change, each moved
--                 element's url unique in NEW: move those rows' "order".
--    Each applies only when NEW is clean (imgmig.images_clean: objects with urls, orders
--    0..n-1 in place, no label flag set) and the appended element carries no is_label
--    key (which would relabel the others, see the diff's 'says'). Each statement also
--    checks that the product's rows are what OLD projects to where it matters (the row
--    count, and the order and url of every row it touches) and must change exactly the
--    rows it expects; otherwise, or for any other edit, the trigger runs the diff, which
--    projects NEW whatever the table held. Unchanged elements keep their rows, ids and
--    table-only metadata, as with the diff. tests/test_capture_v5.py plays generated edit
--    sequences through this trigger and through v2's: after every write both leave the
--    same rows, surviving row ids and events, and the diff finds nothing left to do.
--    What the short cuts do not do: repair drift the table already had in rows they do
--    not touch (the diff would, as a side effect). Drift is what verify and reconcile
--    are for; capture never causes it.
-- 4. A failure still never fails the legacy write: the same two tries as v2 (the second
--    logs 'images.capture_failed' with the error through v2's change_events).

CREATE OR REPLACE FUNCTION imgmig.install_capture_function(p_tenant text,
                                                          p_before boolean DEFAULT true)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $install$
BEGIN
  -- Queued with install_log_function (same key): the backfill rewrites both.
  PERFORM pg_advisory_xact_lock(hashtext('imgmig.install_log_function'), hashtext(p_tenant));
  EXECUTE format($f$
CREATE OR REPLACE FUNCTION %1$I.imgmig_capture_products_row()
RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $body$
DECLARE
  v_syncing text := coalesce(current_setting('imgmig.syncing', true), '');
  v_source text;
  v_op text := CASE TG_OP WHEN 'UPDATE' THEN 'updated' WHEN 'INSERT' THEN 'inserted'
                          ELSE 'deleted' END;
  v_clean boolean;
  v_done boolean;
  v_err text;
  v_ignored text;
  n_old integer;
  n_new integer;
  v_n integer;
  v_changed integer[];
  v_from integer[];
  v_to integer[];
  v_urls text[];
  v_found boolean;
  i integer;
  j integer;
BEGIN
  IF v_syncing = 'capture' THEN
    RETURN NULL;
  END IF;
  v_source := CASE WHEN current_setting('imgmig.source', true)
                          IN ('legacy', 'service', 'backfill', 'reconcile')
                     THEN current_setting('imgmig.source', true)
                   WHEN v_syncing = 'reverse' THEN 'service'
                   ELSE 'legacy' END;  -- imgmig.current_source(), in place: hot path
  FOR v_try IN 1..2 LOOP
    BEGIN
      IF v_err IS NOT NULL THEN  -- second try: log the change and the error, no projection
        INSERT INTO %1$I.image_events (aggregateid, type, payload, tenant, source)
        SELECT CASE WHEN TG_OP = 'DELETE' THEN OLD.id ELSE NEW.id END::text, x.type,
               x.payload, %2$L, v_source
          FROM imgmig.change_events(v_op,
                                    CASE WHEN TG_OP <> 'INSERT' THEN OLD.images END,
                                    CASE WHEN TG_OP <> 'DELETE' THEN NEW.images END,
                                    v_err) x;
        EXIT;
      END IF;
      IF TG_OP = 'DELETE' THEN  -- the rows go by cascade
        INSERT INTO %1$I.image_events (aggregateid, type, payload, tenant, source)
        VALUES (OLD.id::text, 'images.deleted',
                jsonb_build_object('op', 'deleted', 'before', OLD.images, 'after', NULL),
                %2$L, v_source);
        EXIT;
      END IF;
      v_clean := imgmig.images_clean(NEW.images);
      INSERT INTO %1$I.image_events (aggregateid, type, payload, tenant, source)
      VALUES (NEW.id::text, 'images.' || v_op,
              CASE WHEN TG_OP = 'UPDATE'
                     THEN jsonb_build_object('op', 'updated', %3$s'after', NEW.images)
                   ELSE jsonb_build_object('op', 'inserted', 'before', NULL, 'after', NEW.images)
              END,
              %2$L, v_source);
      IF NOT v_clean THEN
        INSERT INTO %1$I.image_events (aggregateid, type, payload, tenant, source)
        SELECT NEW.id::text, 'images.malformed',
               jsonb_build_object('problems', to_jsonb(pr.p), 'original', NEW.images),
               %2$L, v_source
          FROM (SELECT imgmig.images_problems(NEW.images) AS p) pr
         WHERE pr.p IS NOT NULL;
      END IF;
      IF v_syncing = 'reverse' THEN  -- under the reverse sync the rows are the truth
        EXIT;
      END IF;
      v_done := false;
      IF TG_OP = 'UPDATE' AND v_clean AND jsonb_typeof(OLD.images) = 'array' THEN
        v_ignored := set_config('imgmig.syncing', 'capture', true);
        n_old := jsonb_array_length(OLD.images);
        n_new := jsonb_array_length(NEW.images);
        <<edit>>
        BEGIN
          IF n_new = n_old + 1 THEN  -- append
            IF (NEW.images -> n_old) ? 'is_label' OR (NEW.images - n_old) <> OLD.images THEN
              EXIT edit;
            END IF;
            INSERT INTO %1$I.product_images (product_id, url, "order", is_label, alt_text,
                                             tags, mime_type, file_size, width, height,
                                             created_at, extra)
            SELECT NEW.id, m.url, n_old, false, m.alt_text, coalesce(m.tags, '{}'),
                   m.mime_type, m.file_size, m.width, m.height, coalesce(m.created_at, now()),
                   m.extra
              FROM imgmig.images_to_rows(jsonb_build_array(NEW.images -> n_old)) m
             WHERE (SELECT count(*) FROM %1$I.product_images r
                     WHERE r.product_id = NEW.id) = n_old;
            GET DIAGNOSTICS v_n = ROW_COUNT;
            v_done := v_n = 1;
          ELSIF n_new = n_old - 1 THEN  -- drop the last
            IF (OLD.images - n_new) <> NEW.images THEN
              EXIT edit;
            END IF;
            DELETE FROM %1$I.product_images r
             WHERE r.product_id = NEW.id AND r."order" = n_new
               AND r.url = OLD.images -> n_new ->> 'url'
               AND (SELECT count(*) FROM %1$I.product_images x
                     WHERE x.product_id = NEW.id) = n_old;
            GET DIAGNOSTICS v_n = ROW_COUNT;
            v_done := v_n = 1;
          ELSIF n_new = n_old THEN  -- reorder
            v_changed := '{}';
            FOR i IN 0 .. n_new - 1 LOOP
              IF (NEW.images -> i) <> (OLD.images -> i) THEN
                v_changed := v_changed || i;
                IF cardinality(v_changed) > 8 THEN
                  EXIT edit;
                END IF;
              END IF;
            END LOOP;
            IF cardinality(v_changed) < 2 THEN
              EXIT edit;
            END IF;
            v_from := '{}';
            v_to := '{}';
            v_urls := '{}';
            FOREACH i IN ARRAY v_changed LOOP
              IF jsonb_array_length(jsonb_path_query_array(NEW.images, '$[*] ? (@.url == $u)',
                                      jsonb_build_object('u', NEW.images -> i -> 'url'))) <> 1
              THEN
                EXIT edit;
              END IF;
              v_found := false;
              FOREACH j IN ARRAY v_changed LOOP
                IF j <> i AND (OLD.images -> j) - 'order' = (NEW.images -> i) - 'order' THEN
                  v_from := v_from || j;
                  v_to := v_to || i;
                  v_urls := v_urls || (NEW.images -> i ->> 'url');
                  v_found := true;
                  EXIT;
                END IF;
              END LOOP;
              IF NOT v_found THEN
                EXIT edit;
              END IF;
            END LOOP;
            UPDATE %1$I.product_images r SET "order" = m.t, updated_at = now()
              FROM unnest(v_from, v_to, v_urls) AS m(f, t, u)
             WHERE r.product_id = NEW.id AND r."order" = m.f AND r.url = m.u;
            GET DIAGNOSTICS v_n = ROW_COUNT;
            v_done := v_n = cardinality(v_changed);
          END IF;
        END edit;
        v_ignored := set_config('imgmig.syncing', v_syncing, true);
      END IF;
      IF NOT v_done THEN  -- anything else, or a short cut that did not hold: the diff
        v_ignored := imgmig.project(%2$L, ARRAY[NEW.id], ARRAY[NEW.images]);
      END IF;
      EXIT;
    EXCEPTION WHEN OTHERS THEN
      IF v_try = 2 THEN
        RAISE WARNING 'imgmig: capture on %%.products failed, write kept: %%', %2$L, v_err;
      END IF;
      GET STACKED DIAGNOSTICS v_err = MESSAGE_TEXT;
    END;
  END LOOP;
  RETURN NULL;
END
$body$
$f$, p_tenant, p_tenant,
     CASE WHEN p_before THEN $e$'before', OLD.images, $e$ ELSE '' END);
END
$install$;
