//! Column values to JSON, exactly: the digits PostgreSQL holds are the digits sent.
//!
//! [`Cell`] reads any column in PostgreSQL's binary format and turns it into a JSON value, or
//! into the reason it cannot be sent (`NaN`, an infinite timestamp, an unsupported type). It
//! never goes through `f64` for NUMERIC and never panics on what the server sends.

use std::error::Error;

use base64::Engine as _;
use chrono::{DateTime, NaiveDate, NaiveDateTime, NaiveTime, Utc};
use serde_json::{Number, Value};
use tokio_postgres::types::{FromSql, Kind, Type};

/// Why a column's value cannot go into an event.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CellError {
    /// NUMERIC `NaN` or `±Infinity`, or a float that is not finite: no JSON number holds it.
    #[error("{0} is not a number that can be sent")]
    NotFinite(String),
    /// A value the server sent that does not decode as its type says.
    #[error("malformed {ty} value: {detail}")]
    Malformed { ty: String, detail: String },
    /// A type this program does not convert; `check` refuses it before any row is read.
    #[error("unsupported column type {0}")]
    Unsupported(String),
}

/// One column of one row, converted.
#[derive(Debug, Clone, PartialEq)]
pub struct Cell(pub Result<Value, CellError>);

/// Whether a column of this type can be converted. Used by `check` and at start-up, so that an
/// unsupported column is refused with its name and type before any row is read.
pub fn is_supported(ty: &Type) -> bool {
    match ty.kind() {
        Kind::Enum(_) => true,
        Kind::Array(inner) => !matches!(inner.kind(), Kind::Array(_)) && is_supported(inner),
        Kind::Domain(inner) => is_supported(inner),
        _ => SCALARS.contains(ty) || ty.name() == "citext",
    }
}

const SCALARS: &[Type] = &[
    Type::BOOL,
    Type::INT2,
    Type::INT4,
    Type::INT8,
    Type::OID,
    Type::NUMERIC,
    Type::FLOAT4,
    Type::FLOAT8,
    Type::TEXT,
    Type::VARCHAR,
    Type::BPCHAR,
    Type::NAME,
    Type::CHAR,
    Type::UUID,
    Type::JSON,
    Type::JSONB,
    Type::DATE,
    Type::TIME,
    Type::TIMESTAMP,
    Type::TIMESTAMPTZ,
    Type::BYTEA,
    Type::MONEY,
];

type DecodeResult<T> = Result<T, Box<dyn Error + Sync + Send>>;

impl<'a> FromSql<'a> for Cell {
    fn from_sql(ty: &Type, raw: &'a [u8]) -> DecodeResult<Self> {
        Ok(Cell(convert(ty, raw)))
    }

    fn from_sql_null(_: &Type) -> DecodeResult<Self> {
        Ok(Cell(Ok(Value::Null)))
    }

    fn accepts(_: &Type) -> bool {
        // Every type is accepted here so that a bad column becomes a per-row reason, never a
        // driver error; `is_supported` is what refuses types up front.
        true
    }
}

fn convert(ty: &Type, raw: &[u8]) -> Result<Value, CellError> {
    let malformed = |detail: Box<dyn Error + Sync + Send>| CellError::Malformed {
        ty: ty.name().to_string(),
        detail: detail.to_string(),
    };
    match ty.kind() {
        Kind::Enum(_) => return text(raw).map_err(malformed),
        Kind::Array(_) => return array(ty, raw),
        Kind::Domain(inner) => return convert(inner, raw),
        _ => {}
    }
    let value = match *ty {
        Type::BOOL => Value::Bool(bool::from_sql(ty, raw).map_err(malformed)?),
        Type::INT2 => Value::from(i16::from_sql(ty, raw).map_err(malformed)?),
        Type::INT4 => Value::from(i32::from_sql(ty, raw).map_err(malformed)?),
        Type::INT8 => Value::from(i64::from_sql(ty, raw).map_err(malformed)?),
        Type::OID => Value::from(u32::from_sql(ty, raw).map_err(malformed)?),
        Type::FLOAT4 => float(f64::from(f32::from_sql(ty, raw).map_err(malformed)?))?,
        Type::FLOAT8 => float(f64::from_sql(ty, raw).map_err(malformed)?)?,
        Type::NUMERIC => exact_number_from_numeric(raw)?,
        Type::MONEY => money(i64::from_sql(ty, raw).map_err(malformed)?),
        Type::BPCHAR => Value::String(
            String::from_sql(ty, raw)
                .map_err(malformed)?
                .trim_end_matches(' ')
                .to_string(),
        ),
        Type::CHAR => {
            Value::String(char::from(i8::from_sql(ty, raw).map_err(malformed)? as u8).to_string())
        }
        Type::TEXT | Type::VARCHAR | Type::NAME => text(raw).map_err(malformed)?,
        Type::UUID => Value::String(
            uuid::Uuid::from_sql(ty, raw)
                .map_err(malformed)?
                .to_string(),
        ),
        Type::JSON | Type::JSONB => Value::from_sql(ty, raw).map_err(malformed)?,
        Type::DATE => date(NaiveDate::from_sql(ty, raw).map_err(malformed)?),
        Type::TIME => Value::String(
            NaiveTime::from_sql(ty, raw)
                .map_err(malformed)?
                .format("%H:%M:%S%.f")
                .to_string(),
        ),
        Type::TIMESTAMP => timestamp(
            NaiveDateTime::from_sql(ty, raw)
                .map_err(malformed)?
                .and_utc(),
        ),
        Type::TIMESTAMPTZ => timestamp(DateTime::<Utc>::from_sql(ty, raw).map_err(malformed)?),
        Type::BYTEA => Value::String(base64::engine::general_purpose::STANDARD.encode(raw)),
        _ if ty.name() == "citext" => text(raw).map_err(malformed)?,
        _ => return Err(CellError::Unsupported(ty.name().to_string())),
    };
    Ok(value)
}

fn text(raw: &[u8]) -> DecodeResult<Value> {
    Ok(Value::String(std::str::from_utf8(raw)?.to_string()))
}

fn array(ty: &Type, raw: &[u8]) -> Result<Value, CellError> {
    let cells = Vec::<Cell>::from_sql(ty, raw).map_err(|e| CellError::Malformed {
        ty: ty.name().to_string(),
        detail: e.to_string(),
    })?;
    cells
        .into_iter()
        .map(|cell| cell.0)
        .collect::<Result<Vec<_>, _>>()
        .map(Value::Array)
}

fn float(value: f64) -> Result<Value, CellError> {
    Number::from_f64(value)
        .map(Value::Number)
        .ok_or_else(|| CellError::NotFinite(value.to_string()))
}

/// `money` is a 64-bit count of the smallest unit; two fractional digits in every locale that
/// PostgreSQL ships with a currency of cents. Sent as an exact decimal.
fn money(cents: i64) -> Value {
    let sign = if cents < 0 { "-" } else { "" };
    let magnitude = cents.unsigned_abs();
    let text = format!("{sign}{}.{:02}", magnitude / 100, magnitude % 100);
    exact_number(&text).unwrap_or(Value::Null)
}

fn date(value: NaiveDate) -> Value {
    Value::String(value.format("%Y-%m-%d").to_string())
}

fn timestamp(value: DateTime<Utc>) -> Value {
    Value::String(value.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true))
}

/// A JSON number carrying exactly the given decimal text (serde_json's `arbitrary_precision`
/// keeps the digits as written: `49.90` stays `49.90`).
pub fn exact_number(text: &str) -> Result<Value, CellError> {
    match serde_json::from_str::<Number>(text) {
        Ok(number) => Ok(Value::Number(number)),
        Err(_) => Err(CellError::NotFinite(text.to_string())),
    }
}

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

fn exact_number_from_numeric(raw: &[u8]) -> Result<Value, CellError> {
    match decode_numeric(raw) {
        Ok(text) => exact_number(&text),
        Err(e) if e.is::<NotFinite>() => Err(CellError::NotFinite(e.to_string())),
        Err(e) => Err(CellError::Malformed {
            ty: "numeric".to_string(),
            detail: e.to_string(),
        }),
    }
}

#[cfg(test)]
#[path = "value_tests.rs"]
mod tests;
