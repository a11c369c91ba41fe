//! What the commands print on stdout, without `println!`'s panic when stdout fails. A reader
//! that goes away early (`status | head -1`) is not an error: the rest of the output is dropped
//! and the command ends as it would have. Any other failure (a full disk) is reported by
//! `main` once the command is done, with exit code 74 unless the command failed on its own.

use std::borrow::Cow;
use std::io::{ErrorKind, Write};
use std::sync::OnceLock;

/// Exit code when stdout could not be written (`EX_IOERR` of sysexits.h).
pub const EXIT_OUTPUT: u8 = 74;

static FAILURE: OnceLock<String> = OnceLock::new();

/// Prints a line on stdout, like `println!`, without panicking when stdout fails.
#[macro_export]
macro_rules! say {
    ($($arg:tt)*) => {
        $crate::output::line(format_args!($($arg)*))
    };
}

/// Writes one line and flushes it (see [`say!`]).
pub fn line(text: std::fmt::Arguments<'_>) {
    let mut out = std::io::stdout().lock();
    if let Err(error) = writeln!(out, "{text}").and_then(|()| out.flush()) {
        if error.kind() != ErrorKind::BrokenPipe {
            let _ = FAILURE.set(error.to_string());
        }
    }
}

/// Why stdout could not be written, if it could not (a closed pipe excepted).
pub fn failure() -> Option<&'static str> {
    FAILURE.get().map(String::as_str)
}

/// `text` with its control characters escaped (`\n`, `\u{0}`, `\u{1b}`), for text that comes
/// from outside (a row's key, an API's answer) and goes into a log line, a terminal or the
/// database: a newline there would forge a log line, an escape sequence would drive the
/// terminal, and PostgreSQL refuses a NUL in text.
pub fn printable(text: &str) -> Cow<'_, str> {
    if !text.chars().any(char::is_control) {
        return Cow::Borrowed(text);
    }
    let mut escaped = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if c.is_control() {
            escaped.extend(c.escape_default());
        } else {
            escaped.push(c);
        }
    }
    Cow::Owned(escaped)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_escaped_and_the_rest_is_kept() {
        assert!(matches!(printable("plain é ✓"), Cow::Borrowed("plain é ✓")));
        assert_eq!(
            printable("bad\0row\n2026-12-04 ERROR forged\u{1b}[31m\t\r"),
            "bad\\u{0}row\\n2026-12-04 ERROR forged\\u{1b}[31m\\t\\r"
        );
    }
}
