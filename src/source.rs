//! The CRM's side: the mapping's own SQL, wrapped to find, fetch and mark rows.
//!
//! A mapping's `query` is used as a subquery three ways: to list candidate keys (skipping rows
//! that are claimed, waiting for a retry or dead-lettered), to fetch the full rows of the keys
//! this instance claimed, and, through `mark_synced`, to set the sync flag. Nothing here ever
//! marks a row: [`Source::mark_synced`] is called only with keys that received a 2xx.

use std::time::SystemTime;

use deadpool_postgres::{GenericClient, Pool};
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::Row;

use crate::config::MappingConfig;
use crate::error::DbError;
use crate::mapping::{is_key_type, RowShape, ShapeProblems, KEY_COLUMN};
use crate::store::SCHEMA;
use crate::value::server_cast;

/// A mapping whose SQL has been checked against the database.
#[derive(Debug, Clone)]
pub struct Source {
    pub config: MappingConfig,
    pub shape: RowShape,
    candidates_sql: String,
    fetch_sql: String,
    count_sql: String,
    key_type: Type,
    mark_param: Type,
}

/// Why a mapping cannot be used, each problem named.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MappingProblems {
    pub mapping: String,
    pub problems: Vec<String>,
}

impl std::fmt::Display for MappingProblems {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, problem) in self.problems.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "mapping '{}': {problem}", self.mapping)?;
        }
        Ok(())
    }
}

/// Quotes an identifier for SQL.
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// The user's query made fit to be a subquery: no trailing `;`, and a newline so that a
/// trailing `-- comment` cannot swallow what follows.
pub(crate) fn subquery(query: &str) -> String {
    let trimmed = query.trim().trim_end_matches(';').trim_end();
    format!("({trimmed}\n)")
}

impl Source {
    /// Prepares every statement of a mapping, so that bad SQL, a missing column or an
    /// unsupported type is reported now, with the mapping's name.
    pub async fn prepare(
        client: &impl GenericClient,
        config: &MappingConfig,
    ) -> Result<Source, MappingProblems> {
        let fail = |problems: Vec<String>| MappingProblems {
            mapping: config.name.clone(),
            problems,
        };
        let query = subquery(&config.query);
        let key = quote_ident(&config.key);
        let plain = client
            .prepare(&config.query)
            .await
            .map_err(|e| fail(vec![format!("query: {}", DbError::describe(&e))]))?;
        let key_type = match plain.columns().iter().find(|c| c.name() == config.key) {
            Some(column) => column.type_().clone(),
            None => {
                let names: Vec<&str> = plain.columns().iter().map(|c| c.name()).collect();
                return Err(fail(vec![format!(
                    "the query returns no key column '{}' (it returns: {})",
                    config.key,
                    names.join(", ")
                )]));
            }
        };
        if crate::explain::caps_its_rows(client, &config.query)
            .await
            .unwrap_or(false)
        {
            return Err(fail(vec![
                "query: it ends in LIMIT (or OFFSET, FETCH FIRST): each poll would see only \
                 those rows, and once they are dead letters, no other row would ever be sent; \
                 remove it (the daemon reads at most batch_size rows per poll anyway)"
                    .to_string(),
            ]));
        }
        if !is_key_type(&key_type) {
            return Err(fail(vec![format!(
                "the key column '{}' has type {}; a key must be an integer, text or uuid",
                config.key,
                key_type.name()
            )]));
        }
        let candidates_sql = format!(
            "SELECT q.{key}::text FROM {query} AS q \
             WHERE q.{key} IS NOT NULL AND q.{key}::text <> ALL($4::text[]) AND NOT EXISTS ( \
               SELECT 1 FROM {SCHEMA}.deliveries d \
               WHERE d.mapping = $1 AND d.row_key = q.{key}::text \
                 AND (d.dead_at IS NOT NULL OR d.lease_until > now() \
                      OR (d.next_attempt_at > now() \
                          AND ($3::timestamptz IS NULL OR d.updated_at >= $3)))) \
             LIMIT $2"
        );
        let mut fetch_sql = format!(
            "SELECT q.{key}::text AS {KEY_COLUMN}, q.* FROM {query} AS q \
             WHERE q.{key} = ANY($1::text[]::{}[])",
            key_type.name()
        );
        let count_sql = format!(
            "SELECT count(*) FROM {query} AS q WHERE q.{key} IS NOT NULL AND NOT EXISTS ( \
               SELECT 1 FROM {SCHEMA}.deliveries d \
               WHERE d.mapping = $1 AND d.row_key = q.{key}::text AND d.dead_at IS NOT NULL)"
        );
        let mut problems = Vec::new();
        for (what, sql) in [("query", &candidates_sql), ("query", &count_sql)] {
            if let Err(e) = client.prepare(sql).await {
                problems.push(format!("{what}: {}", DbError::describe(&e)));
            }
        }
        let mut fetch = client.prepare(&fetch_sql).await;
        if let Ok(Some(cast_sql)) = fetch.as_ref().map(|s| with_server_casts(&fetch_sql, s)) {
            // Re-prepared with `money` read as numeric, by the session that reads the row.
            fetch_sql = cast_sql;
            fetch = client.prepare(&fetch_sql).await;
        }
        let shape = match &fetch {
            Ok(statement) => RowShape::locate(statement.columns(), config)
                .map_err(|ShapeProblems(found)| problems.extend(found))
                .ok(),
            Err(e) => {
                problems.push(format!("query: {}", DbError::describe(e)));
                None
            }
        };
        let mark_param = match client.prepare(&config.mark_synced).await {
            Ok(statement) => match statement.params() {
                [param] if KeyArray::supports(param) => match key_fits(&key_type, param) {
                    Ok(()) => Some(param.clone()),
                    Err(problem) => {
                        problems.push(format!("mark_synced: {problem}"));
                        None
                    }
                },
                [param] => {
                    problems.push(format!(
                        "mark_synced: $1 has type {}; it must be an array of the key's type \
                         (write WHERE {} = ANY($1))",
                        param.name(),
                        config.key
                    ));
                    None
                }
                params => {
                    problems.push(format!(
                        "mark_synced: must take exactly one parameter, $1 (it takes {})",
                        params.len()
                    ));
                    None
                }
            },
            Err(e) => {
                problems.push(format!("mark_synced: {}", DbError::describe(&e)));
                None
            }
        };
        match (shape, mark_param) {
            (Some(shape), Some(mark_param)) if problems.is_empty() => Ok(Source {
                config: config.clone(),
                shape,
                candidates_sql,
                fetch_sql,
                count_sql,
                key_type,
                mark_param,
            }),
            _ => Err(fail(problems)),
        }
    }

    /// The statement each poll runs to list candidates (`check` reads its plan).
    pub fn candidates_sql(&self) -> &str {
        &self.candidates_sql
    }

    /// The type of the mapping's key column.
    pub fn key_type(&self) -> &Type {
        &self.key_type
    }

    /// Keys of up to `limit` rows that are unsynced and free to claim. In backfill mode,
    /// `backfill_started` makes rows whose wait was set before the backfill began due now, and
    /// `excluded` are keys this backfill has given up on.
    pub async fn candidates(
        &self,
        client: &impl GenericClient,
        limit: usize,
        backfill_started: Option<SystemTime>,
        excluded: &[String],
    ) -> Result<Vec<String>, DbError> {
        let statement = client.prepare_cached(&self.candidates_sql).await?;
        let limit = limit as i64;
        let params: [&(dyn ToSql + Sync); 4] =
            [&self.config.name, &limit, &backfill_started, &excluded];
        let rows = client.query(&statement, &params).await?;
        Ok(rows.iter().map(|row| row.get(0)).collect())
    }

    /// The full rows of the given keys that the query still returns (a row synced meanwhile by
    /// another instance is not returned).
    pub async fn fetch(
        &self,
        client: &impl GenericClient,
        keys: &[String],
    ) -> Result<Vec<Row>, DbError> {
        let statement = client.prepare_cached(&self.fetch_sql).await?;
        Ok(client.query(&statement, &[&keys]).await?)
    }

    /// Rows still to deliver: unsynced and not dead-lettered.
    pub async fn backlog(&self, client: &impl GenericClient) -> Result<i64, DbError> {
        let statement = client.prepare_cached(&self.count_sql).await?;
        Ok(client
            .query_one(&statement, &[&self.config.name])
            .await?
            .get(0))
    }

    /// Reads the whole query once (`check`): rows without a key, which can be neither claimed
    /// nor marked and so are never sent, and keys returned for more than one row, which are never
    /// sent either (each becomes a `duplicate_key` dead letter). Every column of every row is
    /// computed (`count(q)` reads the whole row), so a query that fails on some row's value
    /// fails here.
    pub async fn key_census(&self, client: &impl GenericClient) -> Result<KeyCensus, DbError> {
        let sql = format!(
            "WITH r AS MATERIALIZED ( \
               SELECT q.{key}::text AS k, count(*) AS n, count(q) AS whole \
                 FROM {query} AS q GROUP BY 1) \
             SELECT (SELECT coalesce(sum(n), 0)::bigint FROM r WHERE k IS NULL), \
                    (SELECT count(*) FROM r WHERE k IS NOT NULL AND n > 1), \
                    ARRAY(SELECT k FROM r WHERE k IS NOT NULL AND n > 1 ORDER BY k LIMIT 3), \
                    (SELECT sum(whole) FROM r)",
            key = quote_ident(&self.config.key),
            query = subquery(&self.config.query),
        );
        let row = client.query_one(&sql, &[]).await?;
        Ok(KeyCensus {
            without_key: row.get(0),
            repeated: row.get(1),
            examples: row.get(2),
        })
    }

    /// What `mark_synced`, given `key` alone, does to the query's rows, tried in a transaction
    /// that is rolled back. Every count reads one snapshot, so rows that other instances mark
    /// meanwhile do not count.
    pub async fn trial_mark(
        &self,
        client: &mut deadpool_postgres::Client,
        key: &str,
    ) -> Result<TrialMark, DbError> {
        let transaction = client
            .build_transaction()
            .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
            .start()
            .await?;
        // The other keys' rows as a count and a sum of hashes: a mark that takes some of them
        // out of the query, or puts synced rows back in, changes one or the other.
        let census = format!(
            "SELECT count(*) FILTER (WHERE q.{0}::text IS DISTINCT FROM $1), \
                    coalesce(sum(hashtext(q.{0}::text)::bigint) \
                             FILTER (WHERE q.{0}::text IS DISTINCT FROM $1), 0)::bigint, \
                    count(*) FILTER (WHERE q.{0}::text = $1) \
               FROM {1} AS q",
            quote_ident(&self.config.key),
            subquery(&self.config.query)
        );
        let before = transaction.query_one(&census, &[&key]).await?;
        let updated = self.mark_synced(&transaction, &[key.to_string()]).await?;
        let after = transaction.query_one(&census, &[&key]).await?;
        transaction.rollback().await?;
        let others = |row: &tokio_postgres::Row| (row.get::<_, i64>(0), row.get::<_, i64>(1));
        Ok(TrialMark {
            others_changed: others(&before) != others(&after),
            others_taken: others(&before).0 - others(&after).0,
            left: after.get(2),
            updated,
        })
    }

    /// Runs the mapping's `mark_synced` for keys that each received a 2xx.
    pub async fn mark_synced(
        &self,
        client: &impl GenericClient,
        delivered: &[String],
    ) -> Result<u64, DbError> {
        let keys = KeyArray::parse(&self.mark_param, delivered)?;
        let statement = client.prepare_cached(&self.config.mark_synced).await?;
        Ok(client.execute(&statement, &[keys.as_param()]).await?)
    }
}

/// The fetch query with its columns listed and cast where [`server_cast`] says so (`money`
/// becomes exact `numeric` in the session's own `lc_monetary`); `None` when nothing needs it.
fn with_server_casts(fetch_sql: &str, statement: &tokio_postgres::Statement) -> Option<String> {
    let columns = &statement.columns()[1..];
    if !columns.iter().any(|c| server_cast(c.type_()).is_some()) {
        return None;
    }
    let list: Vec<String> = columns
        .iter()
        .map(|column| {
            let name = quote_ident(column.name());
            match server_cast(column.type_()) {
                Some(cast) => format!("q.{name}::{cast} AS {name}"),
                None => format!("q.{name}"),
            }
        })
        .collect();
    Some(fetch_sql.replacen(" q.* ", &format!(" {} ", list.join(", ")), 1))
}

/// What [`Source::key_census`] found in the query's rows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyCensus {
    /// Rows whose key is NULL.
    pub without_key: i64,
    /// Keys returned for more than one row.
    pub repeated: i64,
    /// The first few of those keys, in order.
    pub examples: Vec<String>,
}

/// What `mark_synced` did to the query's rows when given one key (see [`Source::trial_mark`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TrialMark {
    /// Whether the rows of other keys in the query changed (some left, or synced rows came
    /// back): they must not.
    pub others_changed: bool,
    /// How many fewer rows of other keys the query returns (negative when rows came back).
    pub others_taken: i64,
    /// Rows of the key itself still in the query: none is right.
    pub left: i64,
    /// Rows the statement reports it changed.
    pub updated: u64,
}

/// Whether every key of a column of type `key` can be bound to `mark_synced`'s `$1` of type
/// `param`. One that cannot would be sent and never marked: sent again and again.
fn key_fits(key: &Type, param: &Type) -> Result<(), String> {
    fn width(ty: &Type) -> Option<u8> {
        match *ty {
            Type::INT2 | Type::INT2_ARRAY => Some(2),
            Type::INT4 | Type::INT4_ARRAY => Some(4),
            Type::INT8 | Type::INT8_ARRAY => Some(8),
            _ => None,
        }
    }
    let fits = match (width(key), width(param)) {
        (Some(key_width), Some(param_width)) => key_width <= param_width,
        (None, Some(_)) => false,
        _ => *param != Type::UUID_ARRAY || *key == Type::UUID,
    };
    if fits {
        return Ok(());
    }
    Err(format!(
        "$1 is {} but the key column is {}: some keys could never be marked, and would be sent \
         again and again; compare the key's own column (WHERE <key column> = ANY($1)), or cast \
         ($1::{}[])",
        param.name().trim_start_matches('_').to_string() + "[]",
        key.name(),
        key.name()
    ))
}

/// Delivered keys typed for `mark_synced`'s `$1`.
#[derive(Debug)]
pub enum KeyArray {
    Int2(Vec<i16>),
    Int4(Vec<i32>),
    Int8(Vec<i64>),
    Text(Vec<String>),
    Uuid(Vec<uuid::Uuid>),
}

impl KeyArray {
    /// Whether `$1` of this type can be bound.
    pub fn supports(ty: &Type) -> bool {
        [
            Type::INT2_ARRAY,
            Type::INT4_ARRAY,
            Type::INT8_ARRAY,
            Type::TEXT_ARRAY,
            Type::VARCHAR_ARRAY,
            Type::BPCHAR_ARRAY,
            Type::UUID_ARRAY,
        ]
        .contains(ty)
    }

    /// Converts keys (as PostgreSQL printed them) to the parameter's type.
    pub fn parse(ty: &Type, keys: &[String]) -> Result<KeyArray, DbError> {
        fn all<T: std::str::FromStr>(keys: &[String]) -> Result<Vec<T>, DbError> {
            keys.iter()
                .map(|k| {
                    k.parse().map_err(|_| {
                        DbError::Other(format!("key '{k}' does not fit mark_synced's $1"))
                    })
                })
                .collect()
        }
        Ok(match *ty {
            Type::INT2_ARRAY => KeyArray::Int2(all(keys)?),
            Type::INT4_ARRAY => KeyArray::Int4(all(keys)?),
            Type::INT8_ARRAY => KeyArray::Int8(all(keys)?),
            Type::UUID_ARRAY => KeyArray::Uuid(all(keys)?),
            _ => KeyArray::Text(keys.to_vec()),
        })
    }

    fn as_param(&self) -> &(dyn ToSql + Sync) {
        match self {
            KeyArray::Int2(v) => v,
            KeyArray::Int4(v) => v,
            KeyArray::Int8(v) => v,
            KeyArray::Text(v) => v,
            KeyArray::Uuid(v) => v,
        }
    }
}

/// The pool every statement goes through.
pub type SourcePool = Pool;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_must_fit_mark_synced_s_parameter() {
        let fits = |key: &Type, param: &Type| key_fits(key, param).is_ok();
        assert!(fits(&Type::INT4, &Type::INT8_ARRAY));
        assert!(fits(&Type::INT8, &Type::INT8_ARRAY));
        assert!(
            fits(&Type::INT8, &Type::TEXT_ARRAY),
            "any key has a text form"
        );
        assert!(fits(&Type::UUID, &Type::UUID_ARRAY));
        assert!(fits(&Type::TEXT, &Type::VARCHAR_ARRAY));
        assert!(!fits(&Type::INT8, &Type::INT4_ARRAY), "a key above 2^31");
        assert!(
            !fits(&Type::TEXT, &Type::INT8_ARRAY),
            "'ORD-1' is no bigint"
        );
        assert!(!fits(&Type::TEXT, &Type::UUID_ARRAY));
        assert!(!fits(&Type::INT4, &Type::UUID_ARRAY));
        assert_eq!(
            key_fits(&Type::TEXT, &Type::INT8_ARRAY).unwrap_err(),
            "$1 is int8[] but the key column is text: some keys could never be marked, and would \
             be sent again and again; compare the key's own column (WHERE <key column> = \
             ANY($1)), or cast ($1::text[])"
        );
    }

    #[test]
    fn subquery_survives_semicolons_and_comments() {
        assert_eq!(subquery("SELECT 1;  "), "(SELECT 1\n)");
        assert_eq!(subquery("SELECT 1 -- note"), "(SELECT 1 -- note\n)");
    }

    #[test]
    fn identifiers_are_quoted() {
        assert_eq!(quote_ident("Order Id"), "\"Order Id\"");
        assert_eq!(quote_ident("we\"ird"), "\"we\"\"ird\"");
    }

    #[test]
    fn keys_are_typed_for_mark_synced() {
        let keys = vec!["9007199254740993".to_string()];
        assert!(matches!(
            KeyArray::parse(&Type::INT8_ARRAY, &keys).unwrap(),
            KeyArray::Int8(v) if v == vec![9_007_199_254_740_993]
        ));
        assert!(KeyArray::parse(&Type::INT4_ARRAY, &keys).is_err());
        assert!(matches!(
            KeyArray::parse(&Type::TEXT_ARRAY, &keys).unwrap(),
            KeyArray::Text(_)
        ));
    }
}
