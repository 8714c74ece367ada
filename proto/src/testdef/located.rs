//! Errors located in their file: `file:line:col: reason`, from a TOML parser's span or a
//! checker's (span, reason), for the agent's config, fleet tests files, pushed and ad-hoc
//! tests.

use std::ops::Range;

/// What a checker blames: the span of the offending value (when it has one) and why.
pub type Blame = (Option<Range<usize>>, String);

/// A configuration error, located in its file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: cannot read: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}:{line}:{col}: {reason}")]
    Invalid {
        path: String,
        line: usize,
        col: usize,
        reason: String,
    },
    #[error("{path}: {reason}")]
    Unlocated { path: String, reason: String },
}

/// Deserializes `text`, locating a syntax or type error in it.
pub fn from_toml<T: serde::de::DeserializeOwned>(
    text: &str,
    origin: &str,
) -> Result<T, ConfigError> {
    toml::from_str(text).map_err(|e| {
        locate(
            text,
            origin,
            e.span(),
            e.message().trim().replace('\n', " "),
        )
    })
}

/// Turns a checker's (span, reason) into an error located in `text`.
pub fn locate(text: &str, origin: &str, span: Option<Range<usize>>, reason: String) -> ConfigError {
    match span {
        Some(span) => {
            let (line, col) = line_col(text, span.start);
            ConfigError::Invalid {
                path: origin.to_string(),
                line,
                col,
                reason,
            }
        }
        None => ConfigError::Unlocated {
            path: origin.to_string(),
            reason,
        },
    }
}

/// 1-based line and column (in characters) of a byte offset.
pub fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let mut offset = offset.min(text.len());
    // A span inside a multi-byte char would panic the slice below.
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let col = text[line_start..offset].chars().count() + 1;
    (line, col)
}
