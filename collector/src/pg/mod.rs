//! PostgreSQL as the collector speaks it: `Target` (a URL's hosts, TLS and TCP liveness;
//! every connection of the collector goes through it), the binary COPY format of result
//! rows (`copy`), and the vocabulary of its errors: which SQLSTATEs are worth retrying
//! ([`classify`]), a demoted primary ([`is_read_only`]) and an error described with its
//! SQLSTATE ([`describe`]). Nothing here knows the store or the protocol.

pub mod copy;
pub mod tls;

use tokio_postgres::error::SqlState;

pub use tls::Target;

/// What a database error means for the data that caused it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// Worth retrying as it is: the connection, serialization, deadlock, locks, shutdown,
    /// resources, and the schema (an operator fixes it; the data waits).
    Transient,
    /// SQLSTATE class 22 (data exception) or 23 (integrity constraint): the same data
    /// fails the same way every time.
    Permanent,
}

impl ErrorClass {
    pub fn name(self) -> &'static str {
        match self {
            ErrorClass::Transient => "transient",
            ErrorClass::Permanent => "permanent",
        }
    }
}

pub fn classify(e: &tokio_postgres::Error) -> ErrorClass {
    match e.code().map(SqlState::code) {
        Some(code) if code.starts_with("22") || code.starts_with("23") => ErrorClass::Permanent,
        _ => ErrorClass::Transient,
    }
}

/// SQLSTATE 25006 (read_only_sql_transaction): the server is, or has become, a standby.
pub fn is_read_only(e: &tokio_postgres::Error) -> bool {
    e.code() == Some(&SqlState::READ_ONLY_SQL_TRANSACTION)
}

/// The error with its SQLSTATE, message, detail and where, or the chain of causes of a
/// connection error. `tokio_postgres::Error` alone displays as the bare "db error".
pub fn describe(e: &tokio_postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        let mut text = format!("SQLSTATE {}: {}", db.code().code(), db.message());
        if let Some(detail) = db.detail() {
            text.push_str(&format!(" ({detail})"));
        }
        match (db.table(), db.column()) {
            (Some(t), Some(c)) => text.push_str(&format!(" [{t}.{c}]")),
            (Some(t), None) => text.push_str(&format!(" [{t}]")),
            _ => {}
        }
        return text;
    }
    let mut text = e.to_string();
    let mut cause = std::error::Error::source(e);
    while let Some(c) = cause {
        text.push_str(": ");
        text.push_str(&c.to_string());
        cause = c.source();
    }
    text
}
