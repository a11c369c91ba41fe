//! Row → event: the JSON body, the `Idempotency-Key`, and the reasons a row cannot be sent.
//!
//! Pure given a row: no I/O. The body is serialised once per row, so every retry of that row
//! sends the same bytes under the same key.

use serde::Serialize;
use serde_json::Value;
use tokio_postgres::types::Type;
use tokio_postgres::{Column, Row};

use crate::config::MappingConfig;
use crate::currency::{to_major_units, MinorUnitsError};
use crate::value::{exact_number, is_supported, Cell, Conversion};

/// Namespace of the UUIDv5 idempotency keys, fixed for ever: changing it would make every
/// re-send after an upgrade look new to the API.
const IDEMPOTENCY_NAMESPACE: uuid::Uuid = uuid::uuid!("8a3f6c1e-52b7-4e0f-9d51-7c2a4b9e0f31");

/// Name of the column the fetch query adds: the row key as PostgreSQL's own text.
pub const KEY_COLUMN: &str = "__resonance_key";

/// What an event carries besides the row: brand, event type, mapping name.
#[derive(Debug, Clone)]
pub struct EventContext {
    pub brand_id: String,
    pub event_type: String,
    pub mapping: String,
}

/// Where each needed column sits in the fetched rows, found once from the prepared statement.
#[derive(Debug, Clone)]
pub struct RowShape {
    key: usize,
    email: usize,
    email_fallback: Option<usize>,
    metadata: Vec<(String, usize)>,
    minor_units: Option<MinorUnits>,
    conversion: Conversion,
}

/// The columns of an `amount_minor_units` conversion.
#[derive(Debug, Clone, Copy)]
struct MinorUnits {
    amount: usize,
    currency: usize,
}

/// A row ready to send.
#[derive(Debug, Clone)]
pub struct OutgoingEvent {
    /// The row key as PostgreSQL prints it.
    pub key: String,
    pub idempotency_key: String,
    /// The exact request body.
    pub body: bytes::Bytes,
    /// The email for logs, masked.
    pub masked_email: String,
}

/// A row that will not be sent, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unsendable {
    pub key: String,
    /// A short machine-readable reason: `missing_email`, `invalid_<field>`, `unknown_currency`.
    pub reason: String,
    pub detail: String,
}

#[derive(Serialize)]
struct Body<'a> {
    #[serde(rename = "brandId")]
    brand_id: &'a str,
    #[serde(rename = "eventType")]
    event_type: &'a str,
    #[serde(rename = "userEmail")]
    user_email: &'a str,
    metadata: Fields<'a>,
}

/// The metadata object, written in the mapping's field order without building a map per row.
struct Fields<'a>(Vec<(&'a str, Value)>);

impl Serialize for Fields<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = serializer.serialize_map(Some(self.0.len()))?;
        for (field, value) in &self.0 {
            map.serialize_entry(field, value)?;
        }
        map.end()
    }
}

/// One entry per field name, at the place it first appears; a later column with the same name
/// wins (as a JSON object keeps only one value per name).
fn unique_fields(pairs: Vec<(String, usize)>) -> Vec<(String, usize)> {
    let mut fields: Vec<(String, usize)> = Vec::with_capacity(pairs.len());
    for (field, index) in pairs {
        match fields.iter_mut().find(|(name, _)| *name == field) {
            Some(slot) => slot.1 = index,
            None => fields.push((field, index)),
        }
    }
    fields
}

/// The stable `Idempotency-Key` of a row: the same for every attempt, run and instance.
pub fn idempotency_key(brand_id: &str, mapping: &str, key: &str) -> String {
    let name = format!("{brand_id}\u{1f}{mapping}\u{1f}{key}");
    uuid::Uuid::new_v5(&IDEMPOTENCY_NAMESPACE, name.as_bytes()).to_string()
}

/// `ana.lopez@example.com` → `a***@example.com`, for logs above debug level.
pub fn mask_email(email: &str) -> String {
    match email.rsplit_once('@') {
        Some((local, domain)) => {
            let first: String = local.chars().take(1).collect();
            format!("{first}***@{domain}")
        }
        None => "***".to_string(),
    }
}

/// Problems with a mapping's columns, found before any row is read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShapeProblems(pub Vec<String>);

impl RowShape {
    /// Locates the columns a mapping names among those of its fetch query (whose first column is
    /// [`KEY_COLUMN`]), and refuses unknown names and unsupported types.
    pub fn locate(columns: &[Column], config: &MappingConfig) -> Result<RowShape, ShapeProblems> {
        let (key, email) = (config.key.as_str(), config.email.as_str());
        let (email_fallback, metadata) =
            (config.email_fallback.as_deref(), config.metadata.as_deref());
        let mut problems = Vec::new();
        let names: Vec<&str> = columns.iter().map(Column::name).collect();
        let mut find = |what: &str, column: &str| -> usize {
            match names.iter().skip(1).position(|n| *n == column) {
                Some(i) => i + 1,
                None => {
                    problems.push(format!(
                        "the query returns no column '{column}' for {what} (it returns: {})",
                        names[1..].join(", ")
                    ));
                    0
                }
            }
        };
        let key_index = find("the key", key);
        let email_index = find("the email", email);
        let fallback_index = email_fallback.map(|c| find("email_fallback", c));
        let metadata_indices: Vec<(String, usize)> = match metadata {
            Some(pairs) => pairs
                .iter()
                .map(|(field, column)| (field.clone(), find(&format!("metadata.{field}"), column)))
                .collect(),
            None => columns
                .iter()
                .enumerate()
                .skip(1)
                .filter(|(i, c)| {
                    *i != email_index && Some(*i) != fallback_index && !c.name().is_empty()
                })
                .map(|(i, c)| (c.name().to_string(), i))
                .collect(),
        };
        let metadata_indices = unique_fields(metadata_indices);
        let minor_units = match (&config.amount_minor_units, &config.currency) {
            (Some(amount), Some(currency)) => Some(MinorUnits {
                amount: find("amount_minor_units", amount),
                currency: find("currency", currency),
            }),
            _ => None,
        };
        if let Some(units) = minor_units.filter(|u| u.amount > 0 && u.currency > 0) {
            check_minor_units(columns, units, &metadata_indices, &mut problems);
        }
        let used = std::iter::once(email_index)
            .chain(fallback_index)
            .chain(metadata_indices.iter().map(|(_, i)| *i));
        for index in used.filter(|i| *i > 0) {
            let column = &columns[index];
            if !is_supported(column.type_()) {
                problems.push(format!(
                    "column '{}' has type {}, which cannot be sent; cast it in the query (for \
                     example {}::text)",
                    column.name(),
                    column.type_().name(),
                    column.name()
                ));
            }
        }
        for index in std::iter::once(email_index)
            .chain(fallback_index)
            .filter(|i| *i > 0)
        {
            if !is_text(columns[index].type_()) {
                problems.push(format!(
                    "the email column '{}' has type {}; it must be text",
                    columns[index].name(),
                    columns[index].type_().name()
                ));
            }
        }
        if key_index > 0 && !is_key_type(columns[key_index].type_()) {
            problems.push(format!(
                "the key column '{}' has type {}; a key must be an integer, text or uuid",
                columns[key_index].name(),
                columns[key_index].type_().name()
            ));
        }
        if !problems.is_empty() {
            return Err(ShapeProblems(problems));
        }
        Ok(RowShape {
            key: key_index,
            email: email_index,
            email_fallback: fallback_index,
            metadata: metadata_indices,
            minor_units,
            conversion: Conversion {
                timestamp_zone: config.timestamp_zone,
            },
        })
    }

    /// The column index of the key in the mapping's own query (0-based, without the added key).
    pub fn key_index(&self) -> usize {
        self.key - 1
    }

    /// Builds the event for one fetched row, or says why it cannot be sent.
    pub fn event(&self, context: &EventContext, row: &Row) -> Result<OutgoingEvent, Unsendable> {
        let key: String = row.try_get(0).map_err(|e| Unsendable {
            key: String::new(),
            reason: "invalid_key".to_string(),
            detail: e.to_string(),
        })?;
        let reject = |reason: String, detail: String| Unsendable {
            key: key.clone(),
            reason,
            detail,
        };
        let email = self
            .email_at(row, self.email)
            .or_else(|| self.email_fallback.and_then(|i| self.email_at(row, i)))
            .ok_or_else(|| {
                reject(
                    "missing_email".to_string(),
                    "the email column is NULL or blank".to_string(),
                )
            })?;
        let mut metadata = Vec::with_capacity(self.metadata.len());
        for (field, index) in &self.metadata {
            let cell: Cell = row
                .try_get(*index)
                .map_err(|e| reject(format!("invalid_{field}"), e.to_string()))?;
            let mut value = cell
                .to_json(&self.conversion)
                .map_err(|e| reject(format!("invalid_{field}"), format!("{field}: {e}")))?;
            if let Some(units) = self.minor_units.filter(|u| u.amount == *index) {
                value = self
                    .major_units(row, units, field, value)
                    .map_err(|(reason, detail)| reject(reason, detail))?;
            }
            metadata.push((field.as_str(), value));
        }
        let body = Body {
            brand_id: &context.brand_id,
            event_type: &context.event_type,
            user_email: &email,
            metadata: Fields(metadata),
        };
        let body = serde_json::to_vec(&body)
            .map_err(|e| reject("invalid_row".to_string(), e.to_string()))?;
        Ok(OutgoingEvent {
            idempotency_key: idempotency_key(&context.brand_id, &context.mapping, &key),
            masked_email: mask_email(&email),
            key,
            body: body.into(),
        })
    }

    /// An amount in minor units as major units of the row's currency; `(reason, detail)` when
    /// the currency is unknown or the amount is not whole.
    fn major_units(
        &self,
        row: &Row,
        units: MinorUnits,
        field: &str,
        amount: Value,
    ) -> Result<Value, (String, String)> {
        let invalid = |detail: String| (format!("invalid_{field}"), format!("{field}: {detail}"));
        let minor = match amount {
            Value::Null => return Ok(Value::Null),
            Value::Number(number) => number.to_string(),
            other => return Err(invalid(format!("{other} is not an amount in minor units"))),
        };
        let currency = row
            .try_get::<_, Cell>(units.currency)
            .ok()
            .and_then(|cell| cell.to_json(&self.conversion).ok());
        let Some(Value::String(currency)) = currency else {
            return Err((
                "unknown_currency".to_string(),
                format!("{field}: the currency column is NULL, so the amount cannot be placed"),
            ));
        };
        match to_major_units(&minor, &currency) {
            Ok(text) => exact_number(&text).map_err(|e| invalid(e.to_string())),
            Err(e @ MinorUnitsError::UnknownCurrency(_)) => {
                Err(("unknown_currency".to_string(), format!("{field}: {e}")))
            }
            Err(e @ MinorUnitsError::NotWhole(_)) => Err(invalid(e.to_string())),
        }
    }

    fn email_at(&self, row: &Row, index: usize) -> Option<String> {
        let email: Option<String> = row.try_get(index).ok()?;
        email.filter(|e| !e.trim().is_empty())
    }
}

/// The amount must be an integer or numeric column that is sent; the currency a text or enum.
fn check_minor_units(
    columns: &[Column],
    units: MinorUnits,
    metadata: &[(String, usize)],
    problems: &mut Vec<String>,
) {
    let (amount, currency) = (&columns[units.amount], &columns[units.currency]);
    let base = |ty: &Type| match ty.kind() {
        tokio_postgres::types::Kind::Domain(inner) => inner.clone(),
        _ => ty.clone(),
    };
    let amount_type = base(amount.type_());
    if ![Type::INT2, Type::INT4, Type::INT8, Type::NUMERIC].contains(&amount_type) {
        problems.push(format!(
            "amount_minor_units: column '{}' has type {}; minor units must be an integer or \
             numeric column",
            amount.name(),
            amount.type_().name()
        ));
    }
    let currency_type = base(currency.type_());
    let is_enum = matches!(currency_type.kind(), tokio_postgres::types::Kind::Enum(_));
    if !is_text(&currency_type) && !is_enum {
        problems.push(format!(
            "currency: column '{}' has type {}; it must hold ISO 4217 codes as text",
            currency.name(),
            currency.type_().name()
        ));
    }
    if !metadata.iter().any(|(_, index)| *index == units.amount) {
        problems.push(format!(
            "amount_minor_units: column '{}' is not sent; add it to [mapping.metadata]",
            amount.name()
        ));
    }
}

fn is_text(ty: &Type) -> bool {
    [Type::TEXT, Type::VARCHAR, Type::BPCHAR, Type::NAME].contains(ty) || ty.name() == "citext"
}

/// Whether a column can identify rows: any integer, text or uuid type.
pub fn is_key_type(ty: &Type) -> bool {
    [
        Type::INT2,
        Type::INT4,
        Type::INT8,
        Type::TEXT,
        Type::VARCHAR,
        Type::BPCHAR,
        Type::UUID,
    ]
    .contains(ty)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idempotency_key_is_stable_and_distinct() {
        let a = idempotency_key("brand_1", "orders", "1001");
        assert_eq!(a, idempotency_key("brand_1", "orders", "1001"));
        assert_ne!(a, idempotency_key("brand_1", "orders", "1002"));
        assert_ne!(a, idempotency_key("brand_1", "signups", "1001"));
        assert_ne!(a, idempotency_key("brand_2", "orders", "1001"));
        // The separator keeps ("a", "bc") and ("ab", "c") apart.
        assert_ne!(
            idempotency_key("b", "a", "bc"),
            idempotency_key("b", "ab", "c")
        );
        assert_eq!(a.len(), 36);
    }

    #[test]
    fn a_repeated_field_name_keeps_its_first_place_and_its_last_column() {
        let pairs = vec![
            ("total".to_string(), 2),
            ("id".to_string(), 3),
            ("total".to_string(), 5),
        ];
        assert_eq!(
            unique_fields(pairs),
            vec![("total".to_string(), 5), ("id".to_string(), 3)]
        );
        let body = serde_json::to_string(&Fields(vec![
            ("b", Value::from(1)),
            ("a", Value::from("x")),
        ]))
        .unwrap();
        assert_eq!(body, r#"{"b":1,"a":"x"}"#);
    }

    #[test]
    fn emails_are_masked_for_logs() {
        assert_eq!(mask_email("ana.lopez@example.com"), "a***@example.com");
        assert_eq!(mask_email("dån@example.com"), "d***@example.com");
        assert_eq!(mask_email("用户@例子.广告"), "用***@例子.广告");
        assert_eq!(mask_email("not-an-email"), "***");
    }
}
