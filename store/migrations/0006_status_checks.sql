-- cairn's schema, version 6: the status checks compare, rather than look up a list.
--
-- SQLite codes `status IN ('a', 'b', 'c', ...)` (more than two values) as a lookup in a table it
-- builds and drops again every time the check runs: for every row a step's commit writes to
-- `tasks`, `attempts` or `ops`: about 7% of a `noop` step's time on a chain. The same check
-- written as `status = 'a' OR status = 'b' OR ...` is a few comparisons.
--
-- The check accepts exactly the rows it accepted before and the rows on disk do not change, so
-- the tables' text is edited in place (SQLite's documented way to change a CHECK constraint
-- without copying a table: `writable_schema`, then a new `schema_version`, which cairn sets right
-- after this script so that every connection reads the schema again).
PRAGMA writable_schema = ON;
UPDATE sqlite_schema SET sql = replace(sql, 'CHECK (status IN
                   (''queued'',''running'',''waiting'',''succeeded'',''failed'',''canceling'',''canceled'',''interrupted''))',
    'CHECK (status = ''queued'' OR status = ''running'' OR status = ''waiting'' OR status = ''succeeded'' OR status = ''failed'' OR status = ''canceling'' OR status = ''canceled'' OR status = ''interrupted'')')
WHERE type = 'table' AND name = 'ops';
UPDATE sqlite_schema SET sql = replace(sql, 'CHECK (status IN
                  (''pending'',''running'',''waiting'',''succeeded'',''failed'',''skipped'',''canceled''))',
    'CHECK (status = ''pending'' OR status = ''running'' OR status = ''waiting'' OR status = ''succeeded'' OR status = ''failed'' OR status = ''skipped'' OR status = ''canceled'')')
WHERE type = 'table' AND name = 'tasks';
UPDATE sqlite_schema SET sql = replace(sql, 'CHECK (status IN (''running'',''succeeded'',''failed'',''interrupted'',''canceled''))',
    'CHECK (status = ''running'' OR status = ''succeeded'' OR status = ''failed'' OR status = ''interrupted'' OR status = ''canceled'')')
WHERE type = 'table' AND name = 'attempts';
PRAGMA writable_schema = OFF;
