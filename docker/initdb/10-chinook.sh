#!/bin/sh
# Loads the Chinook sample into the demo database and adds the one thing resonance-sync needs
# from a CRM: a sync flag, with a partial index for the poll. Run once by the postgres image,
# on an empty data volume.
set -eu
# The sample creates its own database first; everything after its \c line goes into ours.
sed '1,/^\\c chinook;/d' /chinook/chinook.sql |
    psql -v ON_ERROR_STOP=1 -q --username "$POSTGRES_USER" --dbname "$POSTGRES_DB"
psql -v ON_ERROR_STOP=1 -q --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" <<'SQL'
ALTER TABLE invoice ADD COLUMN synced_to_resonance boolean NOT NULL DEFAULT false;
CREATE INDEX invoice_unsynced ON invoice (invoice_id) WHERE NOT synced_to_resonance;
SQL
