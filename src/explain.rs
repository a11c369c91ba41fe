//! Reads a mapping's query plan for `check`: does each poll read a large table whole, because no
//! index finds the unsynced rows? If so, it names the table and the partial index that fixes it.
//!
//! The candidate query is planned with sequential scans disabled, so that the plan shows whether
//! an index *could* serve it, whatever the planner prefers for today's backlog (for a backlog of
//! all rows a sequential scan is rightly cheaper; for the idle poll it is not). It only reads
//! plans, inside a transaction that is rolled back; it never changes the database.

use std::collections::BTreeSet;
use std::time::SystemTime;

use deadpool_postgres::GenericClient;
use serde_json::Value;
use tokio_postgres::types::ToSql;

use crate::error::DbError;
use crate::source::{quote_ident, subquery, Source};
use crate::store::SCHEMA;

/// A table with more rows than this, read whole on every poll, deserves an index.
pub const LARGE_TABLE_ROWS: f64 = 10_000.0;

/// A large table that each poll reads whole.
#[derive(Debug, Clone, PartialEq)]
pub struct FullScan {
    /// The table, schema-qualified and quoted where needed.
    pub table: String,
    /// The planner's estimate of its rows.
    pub rows: f64,
    /// A statement that lets the poll find unsynced rows by index.
    pub fix: String,
}

impl FullScan {
    /// What `check` prints.
    pub fn warning(&self) -> String {
        format!(
            "  warning: every poll reads all of {} (about {:.0} rows): no index finds its \
             unsynced rows.\n  This partial index lets each poll read only those rows:\n    {}",
            self.table, self.rows, self.fix
        )
    }
}

/// How one plan node reads a table.
#[derive(Debug, Clone, PartialEq, Eq)]
struct TableRead {
    schema: String,
    relation: String,
    alias: String,
    /// The index used, if any.
    index: Option<String>,
    /// An index condition limits what is read.
    bounded: bool,
    filter: Option<String>,
}

impl TableRead {
    fn same_table(&self, other: &TableRead) -> bool {
        (&self.schema, &self.relation) == (&other.schema, &other.relation)
    }
}

/// An identifier as PostgreSQL itself writes it: quoted only when it has to be, keywords such
/// as `order` included.
async fn ident(client: &impl GenericClient, name: &str) -> Result<String, DbError> {
    Ok(client
        .query_one("SELECT quote_ident($1)", &[&name])
        .await?
        .get(0))
}

async fn qualified(client: &impl GenericClient, read: &TableRead) -> Result<String, DbError> {
    let schema = ident(client, &read.schema).await?;
    Ok(format!("{schema}.{}", ident(client, &read.relation).await?))
}

/// The large tables that `source`'s poll reads whole, each with the index that fixes it.
pub async fn full_scans(
    client: &mut deadpool_postgres::Client,
    source: &Source,
) -> Result<Vec<FullScan>, DbError> {
    let transaction = client.transaction().await?;
    transaction
        .batch_execute("SET LOCAL enable_seqscan = off")
        .await?;
    let limit = source.config.batch_size as i64;
    let no_start: Option<SystemTime> = None;
    let no_keys: Vec<String> = Vec::new();
    let params: [&(dyn ToSql + Sync); 4] = [&source.config.name, &limit, &no_start, &no_keys];
    let plan = explain(&transaction, source.candidates_sql(), &params).await?;
    let mut reads = Vec::new();
    table_reads(&plan, &mut reads);
    let mut seen = BTreeSet::new();
    let mut found = Vec::new();
    for read in reads {
        if read.bounded {
            continue;
        }
        let table = qualified(&transaction, &read).await?;
        if let Some(index) = &read.index {
            let index = format!(
                "{}.{}",
                ident(&transaction, &read.schema).await?,
                quote_ident(index)
            );
            if is_partial(&transaction, &index).await? {
                continue;
            }
        }
        if !seen.insert(table.clone()) {
            continue;
        }
        let rows = estimated_rows(&transaction, &table).await?;
        if rows <= LARGE_TABLE_ROWS {
            continue;
        }
        let fix = suggest_index(&transaction, source, &read, &table).await?;
        found.push(FullScan { table, rows, fix });
    }
    Ok(found)
}

/// Whether the mapping's own query caps its rows (a `LIMIT` or `FETCH FIRST` at its top). Each
/// poll would see only those rows, and once they are dead letters, never any other: one bad row
/// would block the table.
pub async fn caps_its_rows(client: &impl GenericClient, query: &str) -> Result<bool, DbError> {
    let plan = explain(client, query, &[]).await?;
    Ok(top_is_limit(&plan))
}

/// The plan's top node, through row locks (`FOR UPDATE` above a `LIMIT`), is a Limit.
fn top_is_limit(plan: &Value) -> bool {
    let mut node = plan.pointer("/0/Plan");
    while let Some(current) = node {
        match current.get("Node Type").and_then(Value::as_str) {
            Some("Limit") => return true,
            Some("LockRows") => node = current.pointer("/Plans/0"),
            _ => return false,
        }
    }
    false
}

async fn explain(
    client: &impl GenericClient,
    sql: &str,
    params: &[&(dyn ToSql + Sync)],
) -> Result<Value, DbError> {
    let row = client
        .query_one(&format!("EXPLAIN (FORMAT JSON, VERBOSE) {sql}"), params)
        .await?;
    Ok(row.get(0))
}

/// Every table read in a plan (as returned by `EXPLAIN (FORMAT JSON, VERBOSE)`), except the
/// daemon's own.
fn table_reads(plan: &Value, out: &mut Vec<TableRead>) {
    match plan {
        Value::Array(items) => items.iter().for_each(|item| table_reads(item, out)),
        Value::Object(node) => {
            if let Some(inner) = node.get("Plan") {
                table_reads(inner, out);
                return;
            }
            if let Some(read) = table_read(plan) {
                if read.schema != SCHEMA && read.schema != "pg_catalog" {
                    out.push(read);
                }
            }
            if let Some(children) = node.get("Plans") {
                table_reads(children, out);
            }
        }
        _ => {}
    }
}

fn table_read(node: &Value) -> Option<TableRead> {
    let text = |key: &str| node.get(key).and_then(Value::as_str).map(str::to_string);
    let (index, bounded) = match text("Node Type")?.as_str() {
        "Seq Scan" => (None, false),
        "Index Scan" | "Index Only Scan" => (text("Index Name"), bounds(text("Index Cond"))),
        "Bitmap Heap Scan" => {
            let mut indexes = Vec::new();
            bitmap_indexes(node, &mut indexes);
            let bounded = indexes.iter().any(|(_, cond)| bounds(cond.clone()));
            (indexes.into_iter().next().map(|(name, _)| name), bounded)
        }
        _ => return None,
    };
    Some(TableRead {
        schema: text("Schema").unwrap_or_else(|| "public".to_string()),
        alias: text("Alias").or_else(|| text("Relation Name"))?,
        relation: text("Relation Name")?,
        index,
        bounded,
        filter: text("Filter"),
    })
}

/// The indexes (and their conditions) under a bitmap heap scan.
fn bitmap_indexes(node: &Value, out: &mut Vec<(String, Option<String>)>) {
    for child in node
        .get("Plans")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        if let Some(name) = child.get("Index Name").and_then(Value::as_str) {
            let cond = child.get("Index Cond").and_then(Value::as_str);
            out.push((name.to_string(), cond.map(str::to_string)));
        }
        bitmap_indexes(child, out);
    }
}

/// Whether an index condition limits the rows read. `key IS NOT NULL` (added by the daemon's
/// own wrapper) does not: it matches every row.
fn bounds(cond: Option<String>) -> bool {
    cond.is_some_and(|cond| {
        cond.split(" AND ")
            .any(|part| !part.contains("IS NOT NULL"))
    })
}

/// Whether the index (schema-qualified and quoted) has a `WHERE` clause.
async fn is_partial(client: &impl GenericClient, index: &str) -> Result<bool, DbError> {
    let row = client
        .query_opt(
            "SELECT indpred IS NOT NULL FROM pg_index WHERE indexrelid = to_regclass($1)",
            &[&index],
        )
        .await?;
    Ok(row.is_some_and(|row| row.get(0)))
}

/// The planner's idea of a table's size (from statistics, or from its pages if never analyzed).
async fn estimated_rows(client: &impl GenericClient, table: &str) -> Result<f64, DbError> {
    let plan = explain(client, &format!("SELECT 1 FROM {table}"), &[]).await?;
    Ok(plan
        .pointer("/0/Plan/Plan Rows")
        .and_then(Value::as_f64)
        .unwrap_or(0.0))
}

/// `CREATE INDEX ON table (key) WHERE <the query's own condition on that table>`, with
/// placeholders where the plan does not tell.
async fn suggest_index(
    client: &impl GenericClient,
    source: &Source,
    read: &TableRead,
    table: &str,
) -> Result<String, DbError> {
    let key = &source.config.key;
    let has_key = client
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = to_regclass($1) \
             AND attname = $2 AND attnum > 0 AND NOT attisdropped)",
            &[&table, key],
        )
        .await?
        .get::<_, bool>(0);
    let column = if has_key {
        ident(client, key).await?
    } else {
        "<a column>".to_string()
    };
    // The user's query alone: the candidate query's own conditions would show in its filter.
    let plain = format!(
        "SELECT * FROM {} AS q LIMIT {}",
        subquery(&source.config.query),
        source.config.batch_size
    );
    let mut reads = Vec::new();
    table_reads(&explain(client, &plain, &[]).await?, &mut reads);
    let predicate = match reads.iter().find(|other| other.same_table(read)) {
        Some(TableRead {
            filter: Some(filter),
            alias,
            ..
        }) => unqualified(filter, &ident(client, alias).await?),
        _ => "<the query's condition for unsynced rows>".to_string(),
    };
    Ok(format!(
        "CREATE INDEX ON {table} ({column}) WHERE {predicate};"
    ))
}

/// A plan's filter with the table alias (as the plan quotes it) taken off its columns
/// (`orders.synced` becomes `synced`).
fn unqualified(filter: &str, alias: &str) -> String {
    filter.replace(&format!("{alias}."), "")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_limit_at_the_top_of_the_plan_caps_the_rows() {
        let plan = |json: &str| serde_json::from_str::<Value>(json).unwrap();
        let limit = plan(r#"[{"Plan": {"Node Type": "Limit", "Plans": [{"Node Type": "Sort"}]}}]"#);
        let locked =
            plan(r#"[{"Plan": {"Node Type": "LockRows", "Plans": [{"Node Type": "Limit"}]}}]"#);
        let inner =
            plan(r#"[{"Plan": {"Node Type": "Hash Join", "Plans": [{"Node Type": "Limit"}]}}]"#);
        let scan = plan(r#"[{"Plan": {"Node Type": "Seq Scan"}}]"#);
        assert!(top_is_limit(&limit));
        assert!(top_is_limit(&locked));
        assert!(
            !top_is_limit(&inner),
            "a LIMIT inside a join caps a part, not the poll"
        );
        assert!(!top_is_limit(&scan));
    }
    use serde_json::json;

    fn reads(plan: Value) -> Vec<TableRead> {
        let mut out = Vec::new();
        table_reads(&plan, &mut out);
        out
    }

    #[test]
    fn finds_scans_at_any_depth_but_not_the_daemons_own() {
        let plan = json!([{ "Plan": {
            "Node Type": "Limit",
            "Plans": [{
                "Node Type": "Nested Loop",
                "Plans": [
                    { "Node Type": "Seq Scan", "Relation Name": "orders", "Schema": "public",
                      "Alias": "o", "Filter": "(NOT o.synced_to_resonance)" },
                    { "Node Type": "Index Only Scan", "Relation Name": "deliveries",
                      "Schema": "resonance_sync", "Alias": "d", "Index Name": "deliveries_pkey",
                      "Index Cond": "(d.mapping = $1)" }
                ]
            }]
        }}]);
        let found = reads(plan);
        assert_eq!(found.len(), 1);
        assert_eq!(
            (found[0].schema.as_str(), found[0].relation.as_str()),
            ("public", "orders")
        );
        assert_eq!(found[0].index, None);
        assert!(!found[0].bounded);
        assert_eq!(
            unqualified(found[0].filter.as_deref().unwrap(), &found[0].alias),
            "(NOT synced_to_resonance)"
        );
    }

    #[test]
    fn an_index_scan_is_bounded_only_by_a_real_condition() {
        let scan = |cond: Option<&str>| {
            let mut node = json!({ "Node Type": "Index Scan", "Relation Name": "orders",
                                   "Schema": "public", "Alias": "orders",
                                   "Index Name": "orders_pkey" });
            if let Some(cond) = cond {
                node["Index Cond"] = json!(cond);
            }
            reads(json!([{ "Plan": node }])).remove(0)
        };
        assert!(!scan(None).bounded);
        assert!(!scan(Some("(orders.id IS NOT NULL)")).bounded);
        assert!(scan(Some("(orders.customer_id = c.id)")).bounded);
        assert_eq!(scan(None).index.as_deref(), Some("orders_pkey"));
    }

    #[test]
    fn a_bitmap_scan_takes_its_index_from_below() {
        let plan = json!([{ "Plan": {
            "Node Type": "Bitmap Heap Scan", "Relation Name": "Orders", "Schema": "crm",
            "Alias": "o",
            "Plans": [{ "Node Type": "Bitmap Index Scan", "Index Name": "orders_unsynced" }]
        }}]);
        let found = reads(plan);
        assert_eq!(found[0].index.as_deref(), Some("orders_unsynced"));
        assert!(!found[0].bounded);
        assert_eq!(found[0].relation, "Orders");
        assert_eq!(found[0].schema, "crm");
    }

    #[test]
    fn quoted_aliases_are_taken_off_too() {
        assert_eq!(
            unqualified("(NOT \"Order\".synced)", "\"Order\""),
            "(NOT synced)"
        );
    }
}
