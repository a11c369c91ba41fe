//! Column values to JSON, exactly: the digits PostgreSQL holds are the digits sent.
//!
//! [`Cell`] borrows any column in PostgreSQL's binary format; [`Cell::to_json`] turns it into a
//! JSON value, or into the reason it cannot be sent (`NaN`, an infinite date, an unsupported
//! type). It never goes through `f64` for NUMERIC and never panics on what the server sends.
//! The full table of conversions is in docs/TYPES.md.

use std::error::Error;

use base64::Engine as _;
use chrono::{DateTime, NaiveDate, NaiveDateTime, NaiveTime, Offset as _, TimeZone, Utc};
use chrono_tz::Tz;
use serde_json::{Number, Value};
use tokio_postgres::types::{FromSql, Kind, Type};

/// Why a column's value cannot go into an event.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CellError {
    /// NUMERIC `NaN` or `±Infinity`, an infinite date, or a float that is not finite: no JSON
    /// value says what it means.
    #[error("{0} is not a value that can be sent")]
    NotFinite(String),
    /// A value the server sent that does not decode as its type says.
    #[error("malformed {ty} value: {detail}")]
    Malformed { ty: String, detail: String },
    /// A type this program does not convert; `check` refuses it before any row is read.
    #[error("unsupported column type {0}")]
    Unsupported(String),
}

/// Settings that change how a value reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Conversion {
    /// The zone a `timestamp without time zone` is a wall-clock time in.
    pub timestamp_zone: Tz,
}

impl Default for Conversion {
    fn default() -> Self {
        Conversion {
            timestamp_zone: Tz::UTC,
        }
    }
}

/// One column of one row as the server sent it; [`Cell::to_json`] converts it.
#[derive(Debug, Clone)]
pub struct Cell<'a> {
    ty: Type,
    raw: Option<&'a [u8]>,
}

impl Cell<'_> {
    /// The JSON value of this column, or why there is none.
    pub fn to_json(&self, how: &Conversion) -> Result<Value, CellError> {
        match self.raw {
            Some(raw) => convert(&self.ty, raw, how),
            None => Ok(Value::Null),
        }
    }
}

/// Whether a column of this type can be converted. Used by `check` and at start-up, so that an
/// unsupported column is refused with its name and type before any row is read. `money` is
/// not: the fetch query casts it with [`server_cast`] first.
pub fn is_supported(ty: &Type) -> bool {
    match ty.kind() {
        Kind::Enum(_) => true,
        Kind::Array(inner) => is_supported(inner),
        Kind::Domain(inner) => is_supported(inner),
        _ => SCALARS.contains(ty) || ty.name() == "citext",
    }
}

/// The cast PostgreSQL must apply to a column before it is read, if any.
///
/// `money` is a count of the smallest unit whose scale is the session's `lc_monetary` (JPY 0,
/// USD 2, KWD 3): only the server that holds that setting can place the decimal point, so the
/// fetch query reads `amount::numeric`, which is exact, in the very session that reads the row.
pub fn server_cast(ty: &Type) -> Option<&'static str> {
    match ty.kind() {
        Kind::Domain(inner) => server_cast(inner),
        Kind::Array(inner) => server_cast(inner).map(|_| "numeric[]"),
        _ if *ty == Type::MONEY => Some("numeric"),
        _ => None,
    }
}

/// The scalar types converted here (arrays and domains of them too; `money` only through the
/// `::numeric` cast the fetch query adds).
pub const SCALARS: &[Type] = &[
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
];

mod array;
mod numeric;

pub use numeric::decode_numeric;
use numeric::exact_number_from_numeric;

type DecodeResult<T> = Result<T, Box<dyn Error + Sync + Send>>;

impl<'a> FromSql<'a> for Cell<'a> {
    fn from_sql(ty: &Type, raw: &'a [u8]) -> DecodeResult<Self> {
        Ok(Cell {
            ty: ty.clone(),
            raw: Some(raw),
        })
    }

    fn from_sql_null(ty: &Type) -> DecodeResult<Self> {
        Ok(Cell {
            ty: ty.clone(),
            raw: None,
        })
    }

    fn accepts(_: &Type) -> bool {
        // Every type is accepted here so that a bad column becomes a per-row reason, never a
        // driver error; `is_supported` is what refuses types up front.
        true
    }
}

/// Converts one non-NULL value of type `ty`.
pub fn convert(ty: &Type, raw: &[u8], how: &Conversion) -> Result<Value, CellError> {
    let malformed = |detail: Box<dyn Error + Sync + Send>| CellError::Malformed {
        ty: ty.name().to_string(),
        detail: detail.to_string(),
    };
    match ty.kind() {
        Kind::Enum(_) => return text(raw).map_err(malformed),
        Kind::Array(inner) => return array::convert_array(inner, raw, how),
        Kind::Domain(inner) => return convert(inner, raw, how),
        _ => {}
    }
    let value = match *ty {
        Type::BOOL => Value::Bool(bool::from_sql(ty, raw).map_err(malformed)?),
        Type::INT2 => Value::from(i16::from_sql(ty, raw).map_err(malformed)?),
        Type::INT4 => Value::from(i32::from_sql(ty, raw).map_err(malformed)?),
        Type::INT8 => Value::from(i64::from_sql(ty, raw).map_err(malformed)?),
        Type::OID => Value::from(u32::from_sql(ty, raw).map_err(malformed)?),
        Type::FLOAT4 => float(f32::from_sql(ty, raw).map_err(malformed)?)?,
        Type::FLOAT8 => float(f64::from_sql(ty, raw).map_err(malformed)?)?,
        Type::NUMERIC => exact_number_from_numeric(raw)?,
        Type::BPCHAR => Value::String(
            std::str::from_utf8(raw)
                .map_err(|e| malformed(e.into()))?
                .trim_end_matches(' ')
                .to_string(),
        ),
        Type::CHAR => internal_char(raw),
        Type::TEXT | Type::VARCHAR | Type::NAME => text(raw).map_err(malformed)?,
        Type::UUID => Value::String(
            uuid::Uuid::from_sql(ty, raw)
                .map_err(malformed)?
                .to_string(),
        ),
        Type::JSON => serde_json::from_slice(raw).map_err(|e| malformed(e.into()))?,
        Type::JSONB => match raw.split_first() {
            Some((1, json)) => serde_json::from_slice(json).map_err(|e| malformed(e.into()))?,
            _ => return Err(malformed("unknown jsonb version".into())),
        },
        Type::DATE => date(i32::from_sql(&Type::INT4, raw).map_err(malformed)?)?,
        Type::TIME => time(i64::from_sql(&Type::INT8, raw).map_err(malformed)?)?,
        Type::TIMESTAMP => {
            let micros = i64::from_sql(&Type::INT8, raw).map_err(malformed)?;
            instant(wall_clock(micros)?, how.timestamp_zone)?
        }
        Type::TIMESTAMPTZ => {
            let micros = i64::from_sql(&Type::INT8, raw).map_err(malformed)?;
            rfc3339(wall_clock(micros)?.and_utc())
        }
        Type::BYTEA => Value::String(base64::engine::general_purpose::STANDARD.encode(raw)),
        _ if ty.name() == "citext" => text(raw).map_err(malformed)?,
        _ => return Err(CellError::Unsupported(ty.name().to_string())),
    };
    Ok(value)
}

fn text(raw: &[u8]) -> DecodeResult<Value> {
    Ok(Value::String(std::str::from_utf8(raw)?.to_string()))
}

/// The one-byte `"char"` type, printed as PostgreSQL prints it (`\ooo` above ASCII).
fn internal_char(raw: &[u8]) -> Value {
    Value::String(match raw.first() {
        None | Some(0) => String::new(),
        Some(byte) if byte.is_ascii() => char::from(*byte).to_string(),
        Some(byte) => format!("\\{byte:03o}"),
    })
}

/// A float in its shortest round-trip form (serde_json formats `f32` as an `f32`, so `real`
/// 0.1 stays 0.1 rather than becoming 0.10000000149011612).
fn float<F: serde::Serialize + Copy + Into<f64>>(value: F) -> Result<Value, CellError> {
    if !value.into().is_finite() {
        return Err(CellError::NotFinite(value.into().to_string()));
    }
    serde_json::to_value(value).map_err(|e| CellError::Malformed {
        ty: "float".to_string(),
        detail: e.to_string(),
    })
}

/// PostgreSQL's epoch for dates and timestamps.
const EPOCH: NaiveDate = match NaiveDate::from_ymd_opt(2000, 1, 1) {
    Some(date) => date,
    None => panic!("2000-01-01 is a date"),
};

fn epoch() -> NaiveDateTime {
    EPOCH.and_time(NaiveTime::MIN)
}

fn out_of_range(what: &str) -> CellError {
    CellError::Malformed {
        ty: what.to_string(),
        detail: "outside the range of dates that can be sent".to_string(),
    }
}

fn date(days: i32) -> Result<Value, CellError> {
    match days {
        i32::MAX => Err(CellError::NotFinite("infinity".to_string())),
        i32::MIN => Err(CellError::NotFinite("-infinity".to_string())),
        _ => epoch()
            .date()
            .checked_add_signed(chrono::Duration::days(days.into()))
            .map(|d| Value::String(d.format("%Y-%m-%d").to_string()))
            .ok_or_else(|| out_of_range("date")),
    }
}

/// `HH:MM:SS[.ffffff]` with trailing zeros of the fraction dropped, as PostgreSQL prints it;
/// `24:00:00` is a valid time.
fn time(micros: i64) -> Result<Value, CellError> {
    if !(0..=86_400_000_000).contains(&micros) {
        return Err(out_of_range("time"));
    }
    let seconds = micros / 1_000_000;
    let fraction = micros % 1_000_000;
    let mut text = format!(
        "{:02}:{:02}:{:02}",
        seconds / 3600,
        seconds / 60 % 60,
        seconds % 60
    );
    if fraction > 0 {
        text.push_str(format!(".{fraction:06}").trim_end_matches('0'));
    }
    Ok(Value::String(text))
}

/// A timestamp's wall-clock value; the infinities are not instants.
fn wall_clock(micros: i64) -> Result<NaiveDateTime, CellError> {
    match micros {
        i64::MAX => Err(CellError::NotFinite("infinity".to_string())),
        i64::MIN => Err(CellError::NotFinite("-infinity".to_string())),
        _ => epoch()
            .checked_add_signed(chrono::Duration::microseconds(micros))
            .ok_or_else(|| out_of_range("timestamp")),
    }
}

/// A wall-clock time in `zone` as an instant, resolved as PostgreSQL resolves
/// `timestamp AT TIME ZONE zone`: a time that occurs twice (clocks going back) is the later
/// one, in standard time; a time skipped by clocks going forward uses the offset in force just
/// before the jump.
pub fn instant(local: NaiveDateTime, zone: Tz) -> Result<Value, CellError> {
    use chrono::offset::LocalResult;
    let resolved = match zone.from_local_datetime(&local) {
        LocalResult::Single(at) => Some(at.with_timezone(&Utc)),
        LocalResult::Ambiguous(_, later) => Some(later.with_timezone(&Utc)),
        LocalResult::None => (1..=48).find_map(|minutes_back| {
            let before = local - chrono::Duration::minutes(30 * minutes_back);
            let offset = zone.from_local_datetime(&before).latest()?.offset().fix();
            local.checked_sub_offset(offset).map(|utc| utc.and_utc())
        }),
    };
    resolved
        .map(rfc3339)
        .ok_or_else(|| out_of_range("timestamp"))
}

fn rfc3339(value: DateTime<Utc>) -> Value {
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

#[cfg(test)]
#[path = "value_tests.rs"]
mod tests;
