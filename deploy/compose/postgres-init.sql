-- Runs once, when the compose PostgreSQL volume is first initialised.
-- The group roles are also created by `casf-proxy audit migrate` (001_audit.sql,
-- which grants them their privileges); they are created here first so that the
-- proxy's login can be made a member before the migration runs.
-- DEV VALUE: the password matches PG_DSN in compose.yaml.
CREATE ROLE casf_audit_writer NOLOGIN;
CREATE ROLE casf_audit_reader NOLOGIN;
CREATE ROLE casf_proxy LOGIN PASSWORD 'dev-only-password-CHANGE-ME' IN ROLE casf_audit_writer;
