-- mapping v3: v2's canonical mapping with a short cut for the legacy shape. Frozen: a
-- later change ships as mapping_v4.sql. Requires mapping_v1.sql and mapping_v2.sql.
--
-- images_to_rows returns the same rows as v2 for every input; tests/test_mapping_v3.py
-- checks it against v2's functions (installed side by side from the frozen files) on
-- generated arrays and on the boundaries below. What changed, and why it is safe:
--
-- Most arrays a legacy app writes have one shape: every element an object with exactly
-- the keys url, order (its array position) and created_at, written as
-- YYYY-MM-DDTHH:MI:SS.ffffffZ. v2 runs such an array through its whole pipeline: per
-- element eleven typed CASEs and two regular expressions (the order one evaluated three
-- times: in two window sorts and the output), two window sorts per array, the extra
-- check; about 10 us per element on PostgreSQL 15, 909 of a backfill batch's 1,946 ms.
-- For that shape the pipeline's answer is known without it:
--   url        the element's string url (every element has one: the count equals the
--              array's length, and el keeps only elements with a non-empty string url);
--   "order"    pos - 1: the orders are 0..n-1 in place, so v2's sort key is the position
--              (an order written 1.0 fails v2's integer pattern and falls back to the
--              position too);
--   is_label, alt_text, tags, mime_type, file_size, width, height: NULL (no such key);
--   created_at the text cast to timestamptz. The checks (fixed punctuation, 20 ASCII
--              digits, year 1000-9999, month 01-12, day 01-28, hour 00-23, minute and
--              second 00-59, six fraction digits) admit exactly strings v2's pattern
--              admits and whose day every month has, so the cast cannot raise and equals
--              v2's; days 29-31 take v2's path with its calendar check;
--   extra      '{}': no other key, and to_char gives back the very text (UTC, six
--              fraction digits), which is v2's own short cut for extra.
-- A missing key makes a check NULL, which bool_and would skip: each element's verdict is
-- coalesced to false (the property test found this). The shape is decided once per
-- array (CTE shape, read through one-time InitPlans, so the other branch does not run at
-- all); the comparisons are COLLATE "C" (byte order: the same answer for digits in every
-- collation, and no strcoll). The element's created_at text is extracted once, in el: an
-- inlined SQL function substitutes its argument at every reference, which is why an
-- earlier regex-free attempt came out slower.
-- Measured (PostgreSQL 15, the whole function over 20,000 products of
-- bench/capture_bench.py's database, 196,706 elements, best of 5): v2 1,846 ms, v3
-- 1,306 ms. BENCHMARKS.md has the backfill with it (1,000,000 products: 81.6 and 100.6 s
-- in two runs, 105.7 s with v2 between them, on a noisy service).

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
  ), shape AS (  -- the legacy shape, once per array (see the header)
    SELECT count(*) = jsonb_array_length(CASE WHEN jsonb_typeof(p_images) = 'array'
                                               THEN p_images ELSE '[]' END)
           AND coalesce(bool_and(coalesce(
                 (el.v - '{url,order,created_at}'::text[]) = '{}'
                 AND (el.v -> 'order') = to_jsonb(el.pos - 1)
                 AND el.ca COLLATE "C" LIKE '____-__-__T__:__:__.______Z'
                 AND translate(el.ca, '0123456789', '') = '--T::.Z'
                 AND el.ca COLLATE "C" >= '1'
                 AND substr(el.ca, 6, 2) COLLATE "C" BETWEEN '01' AND '12'
                 AND substr(el.ca, 9, 2) COLLATE "C" BETWEEN '01' AND '28'
                 AND substr(el.ca, 12, 2) COLLATE "C" <= '23'
                 AND substr(el.ca, 15, 2) COLLATE "C" <= '59'
                 AND substr(el.ca, 18, 2) COLLATE "C" <= '59',
               false)), true) AS legacy
      FROM el
  ), general AS (  -- every other array: v1's steps, unchanged
    SELECT el.v, el.pos FROM el WHERE NOT (SELECT s.legacy FROM shape s)
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
      FROM general el
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
  UNION ALL
  SELECT el.v ->> 'url', (el.pos - 1)::int, NULL::boolean, NULL::text, NULL::text[], NULL::text,
         NULL::bigint, NULL::integer, NULL::integer, el.ca::timestamptz, '{}'::jsonb
    FROM el WHERE (SELECT s.legacy FROM shape s)
   ORDER BY 2
$$;
