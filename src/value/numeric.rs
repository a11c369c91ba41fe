//! NUMERIC's binary form to its exact decimal text, as `numeric_out` prints it.

use std::error::Error;

use serde_json::Value;

use super::{exact_number, CellError, DecodeResult};

/// Decodes PostgreSQL's binary NUMERIC into its exact decimal text, with exactly `dscale`
/// fractional digits, as `numeric_out` prints it.
///
/// Written here rather than taken from a decimal crate: `rust_decimal` holds at most 28
/// fractional digits and reads `NaN` as 0, and NUMERIC holds up to 16,383 of them.
pub fn decode_numeric(raw: &[u8]) -> DecodeResult<String> {
    const POSITIVE: u16 = 0x0000;
    const NEGATIVE: u16 = 0x4000;
    const NAN: u16 = 0xC000;
    const PLUS_INFINITY: u16 = 0xD000;
    const MINUS_INFINITY: u16 = 0xF000;
    if raw.len() < 8 {
        return Err("numeric shorter than its header".into());
    }
    let word = |i: usize| u16::from_be_bytes([raw[i], raw[i + 1]]);
    let ndigits = word(0) as usize;
    let weight = word(2) as i16 as i64;
    let sign = word(4);
    let dscale = word(6) as i64;
    let sign_text = match sign {
        POSITIVE => "",
        NEGATIVE => "-",
        NAN => return Err(NotFinite("NaN").into()),
        PLUS_INFINITY => return Err(NotFinite("Infinity").into()),
        MINUS_INFINITY => return Err(NotFinite("-Infinity").into()),
        other => return Err(format!("unknown numeric sign 0x{other:04x}").into()),
    };
    if raw.len() != 8 + 2 * ndigits {
        return Err("numeric length does not match its digit count".into());
    }
    let digits: Vec<u16> = (0..ndigits).map(|i| word(8 + 2 * i)).collect();
    if digits.iter().any(|d| *d > 9999) {
        return Err("numeric digit group above 9999".into());
    }
    let group = |exponent: i64| -> u16 {
        // The digit at index i has the exponent (weight - i), in base 10000.
        let index = weight - exponent;
        if index < 0 || index >= ndigits as i64 {
            0
        } else {
            digits[index as usize]
        }
    };
    let mut out = String::from(sign_text);
    if weight < 0 {
        out.push('0');
    } else {
        out.push_str(&group(weight).to_string());
        for exponent in (0..weight).rev() {
            out.push_str(&format!("{:04}", group(exponent)));
        }
    }
    if dscale > 0 {
        let mut fraction = String::new();
        let mut exponent = -1;
        while (fraction.len() as i64) < dscale {
            fraction.push_str(&format!("{:04}", group(exponent)));
            exponent -= 1;
        }
        fraction.truncate(dscale as usize);
        out.push('.');
        out.push_str(&fraction);
    }
    Ok(out)
}

/// The marker error for a NUMERIC that is `NaN` or infinite.
#[derive(Debug)]
struct NotFinite(&'static str);

impl std::fmt::Display for NotFinite {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl Error for NotFinite {}

pub(super) fn exact_number_from_numeric(raw: &[u8]) -> Result<Value, CellError> {
    match decode_numeric(raw) {
        Ok(text) => exact_number(&text),
        Err(e) if e.is::<NotFinite>() => Err(CellError::NotFinite(e.to_string())),
        Err(e) => Err(CellError::Malformed {
            ty: "numeric".to_string(),
            detail: e.to_string(),
        }),
    }
}
