#!/bin/sh
# Creates the `prefect` and `mlflow` roles, each owning its own database, the first time
# Postgres starts on an empty data directory (the postgres image runs this from
# /docker-entrypoint-initdb.d/; stack/native.py runs it against its own server). The
# passwords arrive as psql variables, so they are quoted by psql and never parsed as SQL.
set -eu
psql -v ON_ERROR_STOP=1 --username "${POSTGRES_USER:-postgres}" --dbname "${POSTGRES_DB:-postgres}" \
     -v prefect_password="$PREFECT_DB_PASSWORD" -v mlflow_password="$MLFLOW_DB_PASSWORD" <<'SQL'
CREATE ROLE prefect LOGIN PASSWORD :'prefect_password';
CREATE DATABASE prefect OWNER prefect;
CREATE ROLE mlflow LOGIN PASSWORD :'mlflow_password';
CREATE DATABASE mlflow OWNER mlflow;
SQL
