-- mapping v4: v3's canonical mapping, with its general pipeline in a function of its own
-- and the legacy short cut admitting every day of the month and any one-element array.
-- Frozen: a later change ships as mapping_v5.sql. Requires mapping_v1.sql,
-- mapping_v2.sql and mapping_v3.sql.
--
-- images_to_rows returns the same rows as v2 (and v3) for every input; the tests in
-- tests/test_mapping_v3.py compare whatever images_to_rows is installed with v2's, side by
-- side, on generated arrays and on the boundaries of the short cut. What changed, and why:
--
-- 1. The general pipeline (v1's typed, ranked and final steps, unchanged) moved into
--    imgmig.images_to_rows_general, a PL/pgSQL function, which images_to_rows calls only
--    when the array is not of the legacy shape. In v3 both branches sat in one inlined
--    SQL body, and every call started the executor for both: the window sorts, the
--    SubPlans and their expressions were built even when a one-time filter skipped them.
--    That start-up, not the mapping itself, was most of a single call's price: one
--    legacy element cost 64-80 us per call against 6 us for the bare
--    jsonb_array_elements (PostgreSQL 15, a loop of 10,000 calls from PL/pgSQL with the
--    generic plan; with a custom plan each call costs 1.7 ms). Single calls are what the capture
--    trigger makes (an appended element, each product the diff maps). PL/pgSQL, because
--    it keeps its plan for the session; a SQL function that is not inlined is planned
--    again for every statement that calls it before PostgreSQL 18.
-- 2. The short cut's day check follows the month: 01-31, 01-30 in April, June,
--    September and November, 01-28 in February (29 February takes the general path, as
--    every day past 28 did in v3). In v3, days 29-31 took the general path; in the
--    benchmark seed (created_at at random over a year, each product's elements within
--    one day) that sent 8.7% of the products down it. The checks still admit only strings
--    v2's pattern admits and whose date exists, so the cast cannot raise and equals v2's.
-- 3. A one-element array takes the short cut whatever its element's order says. An
--    element's order only decides the sort (v2's extra never keeps the order key), and
--    one element sorts to 0 whatever it is. This is the capture trigger's append: v5
--    maps the appended element alone, as jsonb_build_array(NEW.images -> n_old), with
--    its order n_old, which sent every append down the general path.
--
-- Measured (bench/mapping_bench.py, PostgreSQL 15, medians of 5 rounds of 5,000 calls
-- from a PL/pgSQL loop, v3 -> v4, us per call): one legacy element 80 -> 32; the trigger's
-- appended element (order 5) 79 -> 36; five legacy elements 151 -> 56; an element with an
-- alt_text (the general path, now a PL/pgSQL call) 105 -> 137. Every product of a
-- 20,000-product tenant through a LATERAL call, as the backfill maps: 763 -> 638 ms.
-- BENCHMARKS.md has what it does to the capture and backfill benchmarks.

CREATE OR REPLACE FUNCTION imgmig.images_to_rows_general(p_images jsonb)
RETURNS TABLE (url text, "order" integer, is_label boolean, alt_text text, tags text[],
               mime_type text, file_size bigint, width integer, height integer,
               created_at timestamptz, extra jsonb)
LANGUAGE plpgsql STABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
ROWS 8
AS $fn$
#variable_conflict use_column
BEGIN
  RETURN QUERY
  WITH el AS (
    SELECT e.v, e.pos, e.v ->> 'created_at' AS ca
      FROM jsonb_array_elements(CASE WHEN jsonb_typeof(p_images) = 'array'
                                     THEN p_images ELSE '[]' END) WITH ORDINALITY AS e(v, pos)
     WHERE jsonb_typeof(e.v) = 'object'
       AND jsonb_typeof(e.v -> 'url') = 'string' AND (e.v ->> 'url') <> ''
  ), typed AS (
    SELECT el.pos, el.v, el.v ->> 'url' AS url,
           CASE WHEN jsonb_typeof(el.v -> 'order') = 'number'
                 AND (el.v ->> 'order') ~ '^-?[0-9]{1,9}$'
                THEN (el.v ->> 'order')::int END AS raw_order,
           CASE WHEN jsonb_typeof(el.v -> 'is_label') = 'boolean'
                THEN (el.v -> 'is_label')::boolean END AS is_label,
           CASE WHEN jsonb_typeof(el.v -> 'alt_text') = 'string'
                THEN el.v ->> 'alt_text' END AS alt_text,
           CASE WHEN jsonb_typeof(el.v -> 'tags') = 'array'
                 AND NOT jsonb_path_exists(el.v -> 'tags', '$[*] ? (@.type() != "string")')
                THEN ARRAY(SELECT jsonb_array_elements_text(el.v -> 'tags')) END AS tags,
           CASE WHEN jsonb_typeof(el.v -> 'mime_type') = 'string'
                THEN el.v ->> 'mime_type' END AS mime_type,
           CASE WHEN jsonb_typeof(el.v -> 'file_size') = 'number'
                 AND (el.v ->> 'file_size') ~ '^[0-9]{1,18}$'
                THEN (el.v ->> 'file_size')::bigint END AS file_size,
           CASE WHEN jsonb_typeof(el.v -> 'width') = 'number'
                 AND (el.v ->> 'width') ~ '^[1-9][0-9]{0,8}$'
                THEN (el.v ->> 'width')::int END AS width,
           CASE WHEN jsonb_typeof(el.v -> 'height') = 'number'
                 AND (el.v ->> 'height') ~ '^[1-9][0-9]{0,8}$'
                THEN (el.v ->> 'height')::int END AS height,
           imgmig.parse_created_at(el.v -> 'created_at') AS created_at
      FROM el
  ), ranked AS (
    SELECT t.*,
           (row_number() OVER (ORDER BY coalesce(t.raw_order, t.pos - 1), t.pos) - 1)::int AS ord,
           -- at most one label per product: the first labelled element in order wins
           row_number() OVER (PARTITION BY t.is_label
                              ORDER BY coalesce(t.raw_order, t.pos - 1), t.pos) AS label_rank
      FROM typed t
  ), final AS (
    SELECT r.*, CASE WHEN r.is_label AND r.label_rank > 1 THEN false
                     ELSE r.is_label END AS label
      FROM ranked r
  )
  SELECT m.url, m.ord, m.label, m.alt_text, m.tags, m.mime_type, m.file_size, m.width,
         m.height, m.created_at,
         CASE
           -- fast path, the legacy shape: url, order and a canonical created_at only
           WHEN (m.v - 'url' - 'order' - 'created_at') = '{}'
                AND (m.v ->> 'created_at')
                    = to_char(m.created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"')
             THEN '{}'::jsonb
           ELSE (SELECT coalesce(jsonb_object_agg(k.key, k.value), '{}')
                   FROM jsonb_each(m.v) AS k(key, value)
                  WHERE k.key <> 'order'
                    AND (imgmig.row_to_element(m.url, m.ord, m.label, m.alt_text, m.tags,
                                               m.mime_type, m.file_size, m.width, m.height,
                                               m.created_at, NULL) -> k.key)
                        IS DISTINCT FROM k.value)
                || CASE WHEN m.v ? 'created_at' THEN '{}'::jsonb
                        ELSE '{"$absent": ["created_at"]}'::jsonb END
         END
    FROM final m
   ORDER BY 2;
END
$fn$;

CREATE OR REPLACE FUNCTION imgmig.images_to_rows(p_images jsonb)
RETURNS TABLE (url text, "order" integer, is_label boolean, alt_text text, tags text[],
               mime_type text, file_size bigint, width integer, height integer,
               created_at timestamptz, extra jsonb)
LANGUAGE sql STABLE PARALLEL SAFE
ROWS 8
AS $$
  WITH el AS (
    SELECT e.v, e.pos, e.v ->> 'created_at' AS ca
      FROM jsonb_array_elements(CASE WHEN jsonb_typeof(p_images) = 'array'
                                     THEN p_images ELSE '[]' END) WITH ORDINALITY AS e(v, pos)
     WHERE jsonb_typeof(e.v) = 'object'
       AND jsonb_typeof(e.v -> 'url') = 'string' AND (e.v ->> 'url') <> ''
  ), shape AS (  -- the legacy shape, once per array (see mapping_v3.sql; days: the header)
    SELECT count(*) = jsonb_array_length(CASE WHEN jsonb_typeof(p_images) = 'array'
                                               THEN p_images ELSE '[]' END)
           -- orders 0..n-1 in place; one element sorts to 0 whatever its order says
           AND (count(*) = 1
                OR coalesce(bool_and(coalesce((el.v -> 'order') = to_jsonb(el.pos - 1),
                                              false)), true))
           AND coalesce(bool_and(coalesce(
                 (el.v - '{url,order,created_at}'::text[]) = '{}'
                 AND el.ca COLLATE "C" LIKE '____-__-__T__:__:__.______Z'
                 AND translate(el.ca, '0123456789', '') = '--T::.Z'
                 AND el.ca COLLATE "C" >= '1'
                 AND substr(el.ca, 6, 2) COLLATE "C" BETWEEN '01' AND '12'
                 AND substr(el.ca, 9, 2) COLLATE "C" BETWEEN '01' AND
                     (CASE substr(el.ca, 6, 2) WHEN '02' THEN '28' WHEN '04' THEN '30'
                        WHEN '06' THEN '30' WHEN '09' THEN '30' WHEN '11' THEN '30'
                        ELSE '31' END)
                 AND substr(el.ca, 12, 2) COLLATE "C" <= '23'
                 AND substr(el.ca, 15, 2) COLLATE "C" <= '59'
                 AND substr(el.ca, 18, 2) COLLATE "C" <= '59',
               false)), true) AS legacy
      FROM el
  )
  SELECT g.* FROM imgmig.images_to_rows_general(p_images) AS g  -- every other array
   WHERE NOT (SELECT s.legacy FROM shape s)
  UNION ALL
  SELECT el.v ->> 'url', (el.pos - 1)::int, NULL::boolean, NULL::text, NULL::text[], NULL::text,
         NULL::bigint, NULL::integer, NULL::integer, el.ca::timestamptz, '{}'::jsonb
    FROM el WHERE (SELECT s.legacy FROM shape s)
   ORDER BY 2
$$;
