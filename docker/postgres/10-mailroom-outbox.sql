-- Runs once, when the PostgreSQL volume is first initialised (/docker-entrypoint-initdb.d):
-- the official image has already created the Airflow metadata database (POSTGRES_DB) as
-- POSTGRES_USER. Mailroom's outbox gets a database of its own, owned by the same user, so it can
-- be backed up, restored and retained separately from Airflow's metadata.
CREATE DATABASE mailroom_outbox;
