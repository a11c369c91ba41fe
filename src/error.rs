//! Errors at the database boundary, described for a human and classified for the loops.

/// A database failure: the server refused a statement, or could not be reached.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    /// A statement failed or the connection broke.
    #[error("{}", DbError::describe(.0))]
    Postgres(#[from] tokio_postgres::Error),
    /// No connection could be had from the pool.
    #[error("cannot get a database connection: {0}")]
    Pool(String),
    /// Anything else, already described.
    #[error("{0}")]
    Other(String),
}

impl From<deadpool_postgres::PoolError> for DbError {
    fn from(error: deadpool_postgres::PoolError) -> Self {
        match error {
            deadpool_postgres::PoolError::Backend(e) => DbError::Postgres(e),
            other => DbError::Pool(describe_pool_error(&other)),
        }
    }
}

fn describe_pool_error(error: &deadpool_postgres::PoolError) -> String {
    use deadpool_postgres::PoolError;
    match error {
        PoolError::Timeout(_) => "timed out waiting for a connection".to_string(),
        PoolError::Backend(e) => DbError::describe(e),
        PoolError::Closed => "the pool is closed".to_string(),
        PoolError::NoRuntimeSpecified => "no runtime for the pool timeouts".to_string(),
        PoolError::PostCreateHook(e) => format!("connection set-up failed: {e}"),
    }
}

impl DbError {
    /// Whether the database could not be reached (down, restarting, connections ended or
    /// exhausted), as opposed to the server refusing the statement itself. An outage is waited
    /// out by the polling loop; it says nothing about the mapping's SQL.
    pub fn is_unavailable(&self) -> bool {
        match self {
            DbError::Pool(_) => true,
            DbError::Postgres(error) => match error.as_db_error() {
                // 08: connection exception, 53: insufficient resources, 57: operator
                // intervention (shutdown, restart, pg_terminate_backend).
                Some(db) => ["08", "53", "57"].contains(&&db.code().code()[..2]),
                None => true,
            },
            DbError::Other(_) => false,
        }
    }

    /// The server could not serialize the transaction (40001) or found a deadlock (40P01): a
    /// clash with another session, not a fault of the statement.
    pub fn is_serialization_failure(&self) -> bool {
        match self {
            DbError::Postgres(error) => error
                .as_db_error()
                .is_some_and(|db| db.code().code().starts_with("40")),
            _ => false,
        }
    }

    /// A one-line description of a driver error: the server's message with its detail and hint
    /// where there is one, else the connection problem with its cause.
    pub fn describe(error: &tokio_postgres::Error) -> String {
        if let Some(db) = error.as_db_error() {
            let mut text = db.message().to_string();
            if let Some(detail) = db.detail() {
                text.push_str(&format!(" ({detail})"));
            }
            if let Some(hint) = db.hint() {
                text.push_str(&format!("; hint: {hint}"));
            }
            return text;
        }
        with_causes(error)
    }
}

/// An error's message followed by those of its causes that it does not already contain.
pub fn with_causes(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(&format!(": {cause_text}"));
        }
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_connection_is_an_outage_a_refused_statement_is_not() {
        assert!(DbError::Pool("timed out waiting for a connection".into()).is_unavailable());
        assert!(!DbError::Other("key '1.5' does not fit mark_synced's $1".into()).is_unavailable());
    }
}
