//! Bad input never panics, and decoded numbers are PostgreSQL's own: property tests over the
//! config parser and the column conversion, and random decimals checked against the server.

use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::{Config as ProptestConfig, TestRunner};
use resonance_sync::config::{self, Overrides};
use resonance_sync::value::{self, Cell, Conversion};
use tokio_postgres::types::{ToSql, Type};

use crate::harness::*;

fn cases(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// Strings that look like values of every kind the config takes, and some that do not.
fn text_value() -> impl Strategy<Value = String> {
    prop_oneof![
        "[0-9]{1,25}(ns|ms|s|m|h|d|w|y|)",
        "(postgres|postgresql|http|https)://[a-z@:/.?=&%0-9_-]{0,40}",
        "[A-Za-z_/$*(). =-]{0,30}",
        any::<String>(),
    ]
}

/// Any TOML value, nested a little.
fn toml_value() -> impl Strategy<Value = toml::Value> {
    let leaf = prop_oneof![
        text_value().prop_map(toml::Value::String),
        any::<i64>().prop_map(toml::Value::Integer),
        any::<bool>().prop_map(toml::Value::Boolean),
        any::<f64>().prop_map(toml::Value::Float),
    ];
    leaf.prop_recursive(2, 8, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(toml::Value::Array),
            prop::collection::btree_map("[a-z_]{1,12}", inner, 0..4)
                .prop_map(|m| toml::Value::Table(m.into_iter().collect())),
        ]
    })
}

/// The keys of a section, less those that would make the parser read a random file.
fn keys_of(known: &'static [&'static str]) -> Vec<&'static str> {
    known
        .iter()
        .copied()
        .filter(|k| *k != "api_key_file")
        .collect()
}

/// A table holding a random subset of `keys`, each with a random value.
fn section(keys: Vec<&'static str>) -> impl Strategy<Value = toml::Table> {
    prop::collection::vec(prop::option::of(toml_value()), keys.len()).prop_map(move |values| {
        keys.iter()
            .zip(values)
            .filter_map(|(key, value)| value.map(|v| (key.to_string(), v)))
            .collect()
    })
}

/// A config with the real structure and random values.
fn structured_config() -> impl Strategy<Value = String> {
    (
        section(keys_of(config::DATABASE_KEYS)),
        section(keys_of(config::RESONANCE_KEYS)),
        prop::collection::vec(section(keys_of(config::MAPPING_KEYS)), 0..3),
    )
        .prop_map(|(database, resonance, mappings)| {
            let mut table = toml::Table::new();
            table.insert("database".into(), toml::Value::Table(database));
            table.insert("resonance".into(), toml::Value::Table(resonance));
            let mappings = mappings.into_iter().map(toml::Value::Table).collect();
            table.insert("mapping".into(), toml::Value::Array(mappings));
            toml::to_string(&table).unwrap_or_default()
        })
}

proptest! {
    #![proptest_config(cases(300))]

    #[test]
    fn the_config_parser_never_panics_on_any_text(text in any::<String>()) {
        let _ = config::parse(&text, &Overrides::default());
    }

    #[test]
    fn the_config_parser_never_panics_on_any_values_in_the_real_structure(
        text in structured_config()
    ) {
        let result = config::parse(&text, &Overrides::default());
        // Problems, when there are any, are each named.
        if let Err(problems) = result {
            prop_assert!(!problems.is_empty());
            prop_assert!(problems.iter().all(|p| !p.trim().is_empty()));
        }
    }

    #[test]
    fn numeric_decoding_never_panics_on_any_bytes(bytes in prop::collection::vec(any::<u8>(), 0..64)) {
        let _ = value::decode_numeric(&bytes);
    }

    #[test]
    fn numeric_decoding_never_panics_on_any_well_framed_digits(
        weight in any::<i16>(),
        sign in prop_oneof![Just(0u16), Just(0x4000), Just(0xC000), Just(0xD000), Just(0xF000), any::<u16>()],
        dscale in 0u16..2000,
        digits in prop::collection::vec(any::<u16>(), 0..8),
    ) {
        let raw = numeric_bytes(weight, sign, dscale, &digits);
        let _ = value::decode_numeric(&raw);
    }

    #[test]
    fn no_column_type_panics_on_any_bytes(
        index in 0usize..types().len(),
        array in any::<bool>(),
        bytes in prop::collection::vec(any::<u8>(), 0..48),
    ) {
        let scalar = &types()[index];
        let ty = if array { array_of(scalar) } else { scalar.clone() };
        let zone = Conversion { timestamp_zone: "Europe/Berlin".parse().unwrap() };
        let _ = value::convert(&ty, &bytes, &zone);
    }
}

/// Every supported scalar type, and `money`, which is converted when it arrives uncast.
fn types() -> Vec<Type> {
    let mut types = value::SCALARS.to_vec();
    types.push(Type::MONEY);
    types
}

fn array_of(ty: &Type) -> Type {
    match *ty {
        Type::BOOL => Type::BOOL_ARRAY,
        Type::INT2 => Type::INT2_ARRAY,
        Type::INT4 => Type::INT4_ARRAY,
        Type::INT8 => Type::INT8_ARRAY,
        Type::NUMERIC => Type::NUMERIC_ARRAY,
        Type::FLOAT8 => Type::FLOAT8_ARRAY,
        Type::BPCHAR => Type::BPCHAR_ARRAY,
        Type::JSONB => Type::JSONB_ARRAY,
        Type::DATE => Type::DATE_ARRAY,
        Type::TIMESTAMP => Type::TIMESTAMP_ARRAY,
        _ => Type::TEXT_ARRAY,
    }
}

fn numeric_bytes(weight: i16, sign: u16, dscale: u16, digits: &[u16]) -> Vec<u8> {
    let mut raw = Vec::new();
    raw.extend_from_slice(&(digits.len() as u16).to_be_bytes());
    raw.extend_from_slice(&weight.to_be_bytes());
    raw.extend_from_slice(&sign.to_be_bytes());
    raw.extend_from_slice(&dscale.to_be_bytes());
    for d in digits {
        raw.extend_from_slice(&d.to_be_bytes());
    }
    raw
}

/// `count` values drawn from `strategy` (no shrinking: a mismatch prints the value itself).
fn sample<S: Strategy>(strategy: S, count: usize) -> Vec<S::Value> {
    let mut runner = TestRunner::new(cases(1));
    (0..count)
        .map(|_| strategy.new_tree(&mut runner).expect("generate").current())
        .collect()
}

/// Decimal text of any size and scale, signs and leading zeros included.
fn decimal_text() -> impl Strategy<Value = String> {
    ("-?", "[0-9]{1,40}", prop::option::of("[0-9]{0,40}")).prop_map(|(sign, units, fraction)| {
        match fraction {
            Some(fraction) => format!("{sign}{units}.{fraction}"),
            None => format!("{sign}{units}"),
        }
    })
}

/// Reads the first column of every row as this program does, compared with the second column,
/// PostgreSQL's own text of the same value.
async fn assert_decoded_like_postgresql(rows: &[tokio_postgres::Row], inputs: &[String]) {
    assert_eq!(rows.len(), inputs.len());
    for (row, input) in rows.iter().zip(inputs) {
        let cell: Cell = row.get(0);
        let ours = cell
            .to_json(&Conversion::default())
            .expect("a number")
            .to_string();
        let theirs: String = row.get(1);
        assert_eq!(ours, theirs, "input {input}");
    }
}

#[tokio::test]
async fn random_decimals_decode_to_exactly_the_text_postgresql_prints() {
    let db = TestDb::new().await;
    let inputs = sample(decimal_text(), 400);
    let rows = db
        .client
        .query(
            "SELECT v::numeric, v::numeric::text FROM unnest($1::text[]) WITH ORDINALITY AS t(v, i) ORDER BY i",
            &[&inputs],
        )
        .await
        .expect("numeric round trip");
    assert_decoded_like_postgresql(&rows, &inputs).await;
}

/// A NUMERIC in PostgreSQL's binary form, bound as a parameter as it is.
#[derive(Debug)]
struct RawNumeric(Vec<u8>);

impl ToSql for RawNumeric {
    fn to_sql(
        &self,
        _: &Type,
        out: &mut bytes::BytesMut,
    ) -> Result<tokio_postgres::types::IsNull, Box<dyn std::error::Error + Sync + Send>> {
        out.extend_from_slice(&self.0);
        Ok(tokio_postgres::types::IsNull::No)
    }

    fn accepts(ty: &Type) -> bool {
        *ty == Type::NUMERIC
    }

    tokio_postgres::types::to_sql_checked!();
}

#[tokio::test]
async fn random_digit_groups_decode_to_exactly_the_text_postgresql_prints() {
    let db = TestDb::new().await;
    let groups = (
        -6i16..6,
        prop_oneof![Just(0u16), Just(0x4000)],
        0u16..30,
        prop::collection::vec(0u16..10_000, 0..7),
    );
    let statement = db
        .client
        .prepare_typed("SELECT $1::numeric, $1::numeric::text", &[Type::NUMERIC])
        .await
        .expect("prepare");
    for (weight, sign, dscale, digits) in sample(groups, 300) {
        let raw = RawNumeric(numeric_bytes(weight, sign, dscale, &digits));
        let described = format!("{raw:?} (weight {weight}, dscale {dscale}, digits {digits:?})");
        let rows = db
            .client
            .query(&statement, &[&raw])
            .await
            .expect("round trip");
        assert_decoded_like_postgresql(&rows, &[described]).await;
    }
}
