//! What the commands print on stdout, without `println!`'s panic when stdout fails. A reader
//! that goes away early (`status | head -1`) is not an error: the rest of the output is dropped
//! and the command ends as it would have. Any other failure (a full disk) is reported by
//! `main` once the command is done, with exit code 74 unless the command failed on its own.

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
