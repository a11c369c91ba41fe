//! Arrays of any supported element type, of any number of dimensions, as nested JSON arrays.
//!
//! Decoded here rather than through `Vec<T>: FromSql`, which refuses arrays of more than one
//! dimension; a `{{1,2},{3,4}}` becomes `[[1,2],[3,4]]` and a NULL element becomes `null`.

use serde_json::Value;
use tokio_postgres::types::Type;

use super::{convert, CellError, Conversion};

/// PostgreSQL's limit on dimensions (`MAXDIM`).
const MAX_DIMENSIONS: usize = 6;

/// Converts an array whose elements have type `element`.
pub(super) fn convert_array(
    element: &Type,
    raw: &[u8],
    how: &Conversion,
) -> Result<Value, CellError> {
    let malformed = |detail: &str| CellError::Malformed {
        ty: format!("{}[]", element.name()),
        detail: detail.to_string(),
    };
    let mut reader = Reader { raw };
    let dimensions = reader.int().ok_or_else(|| malformed("truncated header"))?;
    let _has_nulls = reader.int().ok_or_else(|| malformed("truncated header"))?;
    let _element_oid = reader.int().ok_or_else(|| malformed("truncated header"))?;
    let dimensions = usize::try_from(dimensions)
        .ok()
        .filter(|d| *d <= MAX_DIMENSIONS)
        .ok_or_else(|| malformed("bad number of dimensions"))?;
    let mut lengths = Vec::with_capacity(dimensions);
    for _ in 0..dimensions {
        let length = reader
            .int()
            .ok_or_else(|| malformed("truncated dimensions"))?;
        let _lower_bound = reader
            .int()
            .ok_or_else(|| malformed("truncated dimensions"))?;
        lengths.push(usize::try_from(length).map_err(|_| malformed("negative length"))?);
    }
    if lengths.is_empty() {
        return Ok(Value::Array(Vec::new()));
    }
    // Every element takes at least its 4-byte length: this bounds the work before it starts.
    let total = lengths
        .iter()
        .try_fold(1usize, |total, length| total.checked_mul(*length))
        .filter(|total| *total <= reader.raw.len() / 4)
        .ok_or_else(|| malformed("more elements than bytes"))?;
    let mut elements = Vec::with_capacity(total);
    for _ in 0..total {
        let length = reader.int().ok_or_else(|| malformed("truncated element"))?;
        let value = match length {
            -1 => Value::Null,
            length => {
                let length = usize::try_from(length).map_err(|_| malformed("bad length"))?;
                let bytes = reader.take(length).ok_or_else(|| malformed("truncated"))?;
                convert(element, bytes, how)?
            }
        };
        elements.push(value);
    }
    if !reader.raw.is_empty() {
        return Err(malformed("bytes after the last element"));
    }
    Ok(nest(&lengths, &mut elements.into_iter()))
}

/// Groups the elements (in row-major order) into one nested array per dimension.
fn nest(lengths: &[usize], elements: &mut impl Iterator<Item = Value>) -> Value {
    match lengths {
        [] | [_] => Value::Array(
            elements
                .take(lengths.first().copied().unwrap_or(0))
                .collect(),
        ),
        [length, inner @ ..] => Value::Array((0..*length).map(|_| nest(inner, elements)).collect()),
    }
}

struct Reader<'a> {
    raw: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, length: usize) -> Option<&'a [u8]> {
        if self.raw.len() < length {
            return None;
        }
        let (head, rest) = self.raw.split_at(length);
        self.raw = rest;
        Some(head)
    }

    fn int(&mut self) -> Option<i32> {
        let bytes = self.take(4)?;
        Some(i32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]))
    }
}
