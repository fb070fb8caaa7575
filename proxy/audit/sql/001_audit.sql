-- casf-proxy durable audit trail (PostgreSQL), migration 001.
--
-- Applied by `casf-proxy audit migrate -c FILE` (PG_DSN names the database;
-- run it as the schema owner, not as the proxy's writer login). Every
-- statement is idempotent: running the file again changes nothing.
--
-- The record and its hash contract are described in docs/audit.md. Columns
-- hold the record's fields exactly as they were hashed: `ts` is the record's
-- own RFC 3339 text, JSON values use the `json` type (it keeps the text as
-- written; `jsonb` would re-encode it) and fields that are not part of the
-- fixed set live in `extra`. `chain_id` and `ts` compare byte-wise
-- (COLLATE "C"), so ordering and time windows do not depend on the locale.

CREATE TABLE IF NOT EXISTS audit_events (
  chain_id     text    COLLATE "C" NOT NULL,
  seq          bigint  NOT NULL CHECK (seq >= 1),
  event_id     text,
  ts           text    COLLATE "C",
  kind         text,
  request_id   text,
  trace_id     text,
  actor        text,
  role         text,
  tenant       text,
  tool         text,
  effect       text,
  method       text,
  route        text,
  decision     text,
  status       integer,
  reason_codes json,
  policy_hash  text,
  body_sha256  text,
  attrs        json,
  prev_hash    text    NOT NULL,
  hash         text    NOT NULL,
  extra        json    NOT NULL DEFAULT '{}',
  -- one position per chain: the last line of defence against a forked chain
  CONSTRAINT audit_events_chain_seq UNIQUE (chain_id, seq)
);

CREATE INDEX IF NOT EXISTS audit_events_ts ON audit_events (ts);
CREATE INDEX IF NOT EXISTS audit_events_request ON audit_events (request_id);

-- Append-only: UPDATE, DELETE and TRUNCATE are rejected for every role,
-- the owner included (only a superuser or the owner can drop this trigger,
-- and `audit verify` detects whatever is changed after that).
CREATE OR REPLACE FUNCTION casf_audit_reject_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
  RAISE EXCEPTION 'audit_events is append-only: % is not allowed', TG_OP
    USING ERRCODE = 'insufficient_privilege';
END;
$$;

DROP TRIGGER IF EXISTS audit_events_append_only ON audit_events;
CREATE TRIGGER audit_events_append_only
  BEFORE UPDATE OR DELETE ON audit_events
  FOR EACH STATEMENT EXECUTE FUNCTION casf_audit_reject_change();

DROP TRIGGER IF EXISTS audit_events_no_truncate ON audit_events;
CREATE TRIGGER audit_events_no_truncate
  BEFORE TRUNCATE ON audit_events
  FOR EACH STATEMENT EXECUTE FUNCTION casf_audit_reject_change();

REVOKE ALL ON audit_events FROM PUBLIC;

-- Roles (NOLOGIN groups; grant them to the logins you create):
--   casf_audit_writer  the proxy:          INSERT and SELECT only
--   casf_audit_reader  verify and digest:  SELECT only
-- e.g.  CREATE ROLE casf_proxy LOGIN PASSWORD '...' IN ROLE casf_audit_writer;
-- Creating roles needs CREATEROLE; without it the roles are skipped with a
-- notice and the operator creates them (docs/audit.md, "PostgreSQL roles").
DO $$
BEGIN
  IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'casf_audit_writer') THEN
    CREATE ROLE casf_audit_writer NOLOGIN;
  END IF;
  IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'casf_audit_reader') THEN
    CREATE ROLE casf_audit_reader NOLOGIN;
  END IF;
EXCEPTION WHEN insufficient_privilege THEN
  RAISE NOTICE 'casf: no CREATEROLE privilege; create casf_audit_writer and casf_audit_reader yourself';
END;
$$;

DO $$
BEGIN
  IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'casf_audit_writer') THEN
    REVOKE ALL ON audit_events FROM casf_audit_writer;
    GRANT SELECT, INSERT ON audit_events TO casf_audit_writer;
  END IF;
  IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'casf_audit_reader') THEN
    REVOKE ALL ON audit_events FROM casf_audit_reader;
    GRANT SELECT ON audit_events TO casf_audit_reader;
  END IF;
END;
$$;
