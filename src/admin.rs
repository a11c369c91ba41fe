//! Operator commands on the daemon's state: `dead-letters list|retry|purge` and `status`.
//! They read and change only the `resonance_sync` schema, never the CRM's tables.

use std::borrow::Cow;

use deadpool_postgres::GenericClient;
use tokio_postgres::types::ToSql;

use crate::app::{connect, problem_lines, AppError};
use crate::cli::{DeadLetterCommand, Selection};
use crate::config::Config;
use crate::error::DbError;
use crate::output::printable;
use crate::sink::truncate;
use crate::source::Source;

/// Runs a `dead-letters` subcommand.
pub async fn dead_letters(config: &Config, command: DeadLetterCommand) -> Result<(), AppError> {
    let named = match &command {
        DeadLetterCommand::List { mapping, .. } => mapping.as_deref(),
        DeadLetterCommand::Retry(selection) | DeadLetterCommand::Purge(selection) => {
            selection.mapping.as_deref()
        }
    };
    let pool = crate::db::pool(&config.database).map_err(|e| AppError::Config(e.to_string()))?;
    let mut client = pool.get().await.map_err(DbError::from)?;
    crate::store::ensure_schema(&mut client).await?;
    if let Some(name) = named {
        // A mapping renamed or removed from the config still has its dead letters listed:
        // they can be reached by its old name.
        if let Err(unknown) = crate::app::known_mapping(config, name) {
            if !has_letters(&client, name).await? {
                return Err(unknown);
            }
            tracing::warn!(
                mapping = name,
                "the config has no mapping of this name; acting on the dead letters it left"
            );
        }
    }
    match command {
        DeadLetterCommand::List { mapping, purged } => {
            list(&client, mapping.as_deref(), purged).await
        }
        DeadLetterCommand::Retry(selection) => {
            let sql = "DELETE FROM resonance_sync.deliveries WHERE dead_at IS NOT NULL AND ";
            let count = apply(&client, sql, &selection, true).await?;
            no_such_key(&selection, count, "")?;
            crate::say!(
                "{count} dead letter(s) put back in line; the next run or backfill sends them"
            );
            Ok(())
        }
        DeadLetterCommand::Purge(selection) => {
            let sql = "UPDATE resonance_sync.deliveries SET purged_at = now() \
                       WHERE dead_at IS NOT NULL AND purged_at IS NULL AND ";
            let count = apply(&client, sql, &selection, false).await?;
            no_such_key(&selection, count, " that is not purged yet")?;
            crate::say!("{count} dead letter(s) purged; their rows stay unsynced and are not sent unless retried with --key");
            Ok(())
        }
    }
}

/// Whether the daemon's state holds dead letters of `mapping`.
async fn has_letters(client: &impl GenericClient, mapping: &str) -> Result<bool, AppError> {
    let row = client
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM resonance_sync.deliveries \
                             WHERE mapping = $1 AND dead_at IS NOT NULL)",
            &[&mapping],
        )
        .await
        .map_err(DbError::from)?;
    Ok(row.get(0))
}

async fn list(
    client: &impl GenericClient,
    mapping: Option<&str>,
    purged: bool,
) -> Result<(), AppError> {
    let rows = client
        .query(
            "SELECT mapping, row_key, attempts, last_status, reason, coalesce(last_error, ''),
                    to_char(dead_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"'),
                    purged_at IS NOT NULL
               FROM resonance_sync.deliveries
              WHERE dead_at IS NOT NULL AND ($1::text IS NULL OR mapping = $1)
                AND ($2 OR purged_at IS NULL)
              ORDER BY mapping, dead_at, row_key",
            &[&mapping, &purged],
        )
        .await
        .map_err(DbError::from)?;
    if rows.is_empty() {
        crate::say!("no dead letters");
        return Ok(());
    }
    crate::say!(
        "{:<16} {:<20} {:>8} {:>6}  {:<20} {:<20} detail",
        "MAPPING",
        "KEY",
        "ATTEMPTS",
        "STATUS",
        "REASON",
        "WHEN"
    );
    for row in &rows {
        let status: Option<i32> = row.get(3);
        let reason: Option<String> = row.get(4);
        let error: String = row.get(5);
        let purged_mark = if row.get::<_, bool>(7) {
            " (purged)"
        } else {
            ""
        };
        crate::say!(
            "{:<16} {:<20} {:>8} {:>6}  {:<20} {:<20} {}{purged_mark}",
            row.get::<_, String>(0),
            shown_key(row.get(1)),
            row.get::<_, i32>(2),
            status.map(|s| s.to_string()).unwrap_or_else(|| "-".into()),
            reason.unwrap_or_default(),
            row.get::<_, String>(6),
            truncate(&printable(&error), 120),
        );
    }
    crate::say!("{} dead letter(s)", rows.len());
    Ok(())
}

/// A key as `dead-letters list` shows it: quoted (and escaped) when blanks or control
/// characters would hide where it ends, so that it can be copied into `--key`.
fn shown_key(key: &str) -> Cow<'_, str> {
    if key.is_empty()
        || key.starts_with('"')
        || key.chars().any(|c| c.is_whitespace() || c.is_control())
    {
        Cow::Owned(format!("{key:?}"))
    } else {
        Cow::Borrowed(key)
    }
}

/// A `--key` that reached no dead letter is most likely mistyped: say so rather than report
/// "0 put back" as a success. (`--all` and `--mapping` on nothing are fine.)
fn no_such_key(selection: &Selection, count: u64, which: &str) -> Result<(), AppError> {
    match &selection.key {
        Some(key) if count == 0 && !selection.all && selection.mapping.is_none() => {
            Err(AppError::NoSuchDeadLetter(format!(
                "no dead letter{which} has the key '{key}'; `dead-letters list` shows them \
                 (`--purged` also the purged ones)"
            )))
        }
        _ => Ok(()),
    }
}

/// Runs `sql` (which ends in `AND `) for the selection; `--key` also reaches purged letters when
/// `include_purged` is set, the others only unpurged ones.
async fn apply(
    client: &impl GenericClient,
    sql: &str,
    selection: &Selection,
    include_purged: bool,
) -> Result<u64, AppError> {
    let (condition, value): (&str, Option<&String>) = if selection.all {
        ("purged_at IS NULL", None)
    } else if let Some(mapping) = &selection.mapping {
        ("purged_at IS NULL AND mapping = $1", Some(mapping))
    } else if let Some(key) = &selection.key {
        (
            if include_purged {
                "row_key = $1"
            } else {
                "purged_at IS NULL AND row_key = $1"
            },
            Some(key),
        )
    } else {
        return Err(AppError::Config(
            "say which: --all, --mapping M or --key K".into(),
        ));
    };
    let statement = format!("{sql}{condition}");
    let params: Vec<&(dyn ToSql + Sync)> =
        value.iter().map(|v| *v as &(dyn ToSql + Sync)).collect();
    Ok(client
        .execute(&statement, &params)
        .await
        .map_err(DbError::from)?)
}

/// `status`: one block per mapping.
///
/// The oldest unsynced row's age is that of the oldest row still retrying, from its first failed
/// attempt: the daemon cannot know when a CRM row was created unless the mapping's query says,
/// and rows that have not failed are normally sent within one poll interval.
pub async fn status(config: &Config) -> Result<(), AppError> {
    let (_pool, client) = connect(config, None).await?;
    // A mapping whose SQL no longer works (a renamed table) is named; the others are shown.
    let mut broken = Vec::new();
    let mut failed = None;
    for mapping in &config.mappings {
        let source = match Source::prepare(&client, mapping).await {
            Ok(source) => source,
            Err(found) => {
                let lines = problem_lines(std::slice::from_ref(&found));
                crate::say!(
                    "mapping '{}'\n  cannot be read: {}",
                    mapping.name,
                    lines.join("; ")
                );
                broken.extend(lines);
                continue;
            }
        };
        crate::say!("mapping '{}'", mapping.name);
        if let Err(error) = mapping_status(&client, &source).await {
            crate::say!("  cannot be read: {error}");
            failed.get_or_insert(error);
        }
    }
    if broken.is_empty() {
        failed.map_or(Ok(()), Err)
    } else {
        Err(AppError::Config(format!(
            "the mappings cannot be used:\n  - {}",
            broken.join("\n  - ")
        )))
    }
}

/// One mapping's block of `status`.
async fn mapping_status(client: &impl GenericClient, source: &Source) -> Result<(), AppError> {
    let name = &source.config.name;
    let backlog = source.backlog(client).await?;
    let state = client
        .query_one(
            "SELECT count(*) FILTER (WHERE dead_at IS NULL AND attempts > 0),
                    count(*) FILTER (WHERE dead_at IS NOT NULL AND purged_at IS NULL),
                    count(*) FILTER (WHERE lease_until > now()),
                    extract(epoch FROM now() - min(first_attempt_at) FILTER (WHERE dead_at IS NULL))::bigint,
                    to_char(min(next_attempt_at) FILTER (WHERE dead_at IS NULL AND attempts > 0)
                            AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"'),
                    extract(epoch FROM min(next_attempt_at) FILTER (WHERE dead_at IS NULL AND attempts > 0) - now())::bigint
               FROM resonance_sync.deliveries WHERE mapping = $1",
            &[name],
        )
        .await
        .map_err(DbError::from)?;
    let success = client
        .query_opt(
            "SELECT to_char(last_success_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"'),
                    extract(epoch FROM now() - last_success_at)::bigint, delivered_total
               FROM resonance_sync.mapping_state WHERE mapping = $1",
            &[name],
        )
        .await
        .map_err(DbError::from)?;
    let retrying: i64 = state.get(0);
    let oldest = match state.get::<_, Option<i64>>(3) {
        Some(age) => format!(
            "{} (since the first failed attempt of the oldest row retrying)",
            humantime::format_duration(std::time::Duration::from_secs(age.max(0) as u64))
        ),
        None if backlog > 0 => "none failing; the rest wait for their next poll".into(),
        None => "-".into(),
    };
    let next_retry = match (
        state.get::<_, Option<String>>(4),
        state.get::<_, Option<i64>>(5),
    ) {
        (Some(at), Some(wait)) if wait > 0 => format!(
            "{at} (in {}; `backfill` tries them now)",
            humantime::format_duration(std::time::Duration::from_secs(wait as u64))
        ),
        (Some(at), Some(_)) => format!("{at} (due now)"),
        _ => "-".into(),
    };
    let last_success = success.map_or("never".to_string(), |row| {
        format!(
            "{} ({}; {} delivered in all)",
            row.get::<_, String>(0),
            ago(row.get(1)),
            row.get::<_, i64>(2)
        )
    });
    crate::say!("  backlog (unsynced, not dead-lettered): {backlog}");
    crate::say!("  retrying:                              {retrying}");
    crate::say!("  next retry due:                        {next_retry}");
    crate::say!(
        "  claimed now:                           {}",
        state.get::<_, i64>(2)
    );
    crate::say!(
        "  dead letters:                          {}",
        state.get::<_, i64>(1)
    );
    crate::say!("  oldest unsynced row's age:             {oldest}");
    crate::say!("  last success:                          {last_success}");
    Ok(())
}

/// `3m 20s ago`, in whole seconds.
fn ago(seconds: i64) -> String {
    let seconds = std::time::Duration::from_secs(seconds.max(0) as u64);
    format!("{} ago", humantime::format_duration(seconds))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_listed_key_is_quoted_only_when_its_ends_would_not_show() {
        assert_eq!(shown_key("ORD-1"), "ORD-1");
        assert_eq!(shown_key("k 2 "), "\"k 2 \"");
        assert_eq!(shown_key(""), "\"\"");
        assert_eq!(shown_key("k1\nforged"), "\"k1\\nforged\"");
        assert_eq!(
            shown_key("\"dq\""),
            "\"\\\"dq\\\"\"",
            "a key that is quoted itself"
        );
    }
}
