use super::*;

/// Encodes a NUMERIC the way PostgreSQL sends it.
fn numeric(weight: i16, sign: u16, dscale: u16, digits: &[u16]) -> Vec<u8> {
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

fn json(ty: &Type, raw: &[u8]) -> Result<Value, CellError> {
    convert(ty, raw, &Conversion::default())
}

fn text_of(ty: &Type, raw: &[u8]) -> String {
    serde_json::to_string(&json(ty, raw).unwrap()).unwrap()
}

#[test]
fn numeric_keeps_trailing_zeros_of_its_scale() {
    // 49.90 = 49 | 9000, weight 0, dscale 2
    assert_eq!(
        decode_numeric(&numeric(0, 0, 2, &[49, 9000])).unwrap(),
        "49.90"
    );
    assert_eq!(decode_numeric(&numeric(-1, 0, 2, &[1000])).unwrap(), "0.10");
    assert_eq!(decode_numeric(&numeric(0, 0, 0, &[])).unwrap(), "0");
    assert_eq!(decode_numeric(&numeric(0, 0, 2, &[])).unwrap(), "0.00");
}

#[test]
fn numeric_keeps_every_digit() {
    // 12345678901234567.89 = 1 | 2345 | 6789 | 0123 | 4567 . 8900
    let raw = numeric(4, 0, 2, &[1, 2345, 6789, 123, 4567, 8900]);
    assert_eq!(decode_numeric(&raw).unwrap(), "12345678901234567.89");
    // 0.12345678901234567890123456789012 (32 fractional digits)
    let raw = numeric(-1, 0, 32, &[1234, 5678, 9012, 3456, 7890, 1234, 5678, 9012]);
    assert_eq!(
        decode_numeric(&raw).unwrap(),
        "0.12345678901234567890123456789012"
    );
}

#[test]
fn numeric_negative_and_large_weights() {
    assert_eq!(
        decode_numeric(&numeric(0, 0x4000, 1, &[5, 5000])).unwrap(),
        "-5.5"
    );
    // 10000000 = 1000 | 0000 with weight 1, trailing zero groups omitted by the server.
    assert_eq!(
        decode_numeric(&numeric(1, 0, 0, &[1000])).unwrap(),
        "10000000"
    );
    // 0.0001 = weight -1, digits [1]
    assert_eq!(decode_numeric(&numeric(-1, 0, 4, &[1])).unwrap(), "0.0001");
    // 0.00000001 = weight -2
    assert_eq!(
        decode_numeric(&numeric(-2, 0, 8, &[1])).unwrap(),
        "0.00000001"
    );
}

#[test]
fn numeric_nan_and_infinity_are_not_numbers() {
    for sign in [0xC000, 0xD000, 0xF000] {
        let cell = json(&Type::NUMERIC, &numeric(0, sign, 0, &[]));
        assert!(matches!(cell, Err(CellError::NotFinite(_))), "{cell:?}");
    }
}

#[test]
fn malformed_numeric_is_an_error_not_a_panic() {
    assert!(decode_numeric(&[0, 1]).is_err());
    assert!(decode_numeric(&numeric(0, 0, 0, &[10000])).is_err());
    let mut raw = numeric(0, 0, 0, &[1, 2]);
    raw.truncate(raw.len() - 1);
    assert!(decode_numeric(&raw).is_err());
}

#[test]
fn exact_numbers_serialise_with_their_digits() {
    let value = exact_number("49.90").unwrap();
    assert_eq!(serde_json::to_string(&value).unwrap(), "49.90");
    let value = exact_number("9007199254740993").unwrap();
    assert_eq!(serde_json::to_string(&value).unwrap(), "9007199254740993");
}

#[test]
fn floats_take_their_shortest_round_trip_form() {
    assert_eq!(text_of(&Type::FLOAT4, &0.1f32.to_be_bytes()), "0.1");
    assert_eq!(text_of(&Type::FLOAT8, &0.1f64.to_be_bytes()), "0.1");
    assert_eq!(
        text_of(&Type::FLOAT8, &(1.0f64 / 3.0).to_be_bytes()),
        "0.3333333333333333"
    );
    for bad in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
        let result = json(&Type::FLOAT8, &bad.to_be_bytes());
        assert!(matches!(result, Err(CellError::NotFinite(_))), "{bad}");
    }
}

#[test]
fn dates_and_times_use_iso_forms_and_refuse_infinity() {
    // 2024-02-29 is 8825 days after 2000-01-01.
    assert_eq!(
        text_of(&Type::DATE, &8825i32.to_be_bytes()),
        "\"2024-02-29\""
    );
    assert_eq!(
        text_of(&Type::DATE, &(-1i32).to_be_bytes()),
        "\"1999-12-31\""
    );
    for infinite in [i32::MAX, i32::MIN] {
        let result = json(&Type::DATE, &infinite.to_be_bytes());
        assert!(matches!(result, Err(CellError::NotFinite(_))));
    }
    let micros: i64 = (13 * 3600 + 5 * 60 + 9) * 1_000_000 + 500_000;
    assert_eq!(
        text_of(&Type::TIME, &micros.to_be_bytes()),
        "\"13:05:09.5\""
    );
    let midnight: i64 = 86_400_000_000;
    assert_eq!(
        text_of(&Type::TIME, &midnight.to_be_bytes()),
        "\"24:00:00\""
    );
    for infinite in [i64::MAX, i64::MIN] {
        let result = json(&Type::TIMESTAMPTZ, &infinite.to_be_bytes());
        assert!(matches!(result, Err(CellError::NotFinite(_))));
    }
    let micros: i64 = 1_000_000 * 86_400 + 123_000;
    assert_eq!(
        text_of(&Type::TIMESTAMPTZ, &micros.to_be_bytes()),
        "\"2000-01-02T00:00:00.123Z\""
    );
}

fn local(text: &str) -> NaiveDateTime {
    NaiveDateTime::parse_from_str(text, "%Y-%m-%d %H:%M:%S").unwrap()
}

#[test]
fn timestamps_without_zone_are_read_in_the_configured_zone() {
    let berlin: Tz = "Europe/Berlin".parse().unwrap();
    let at = |text: &str, zone| instant(local(text), zone).unwrap();
    assert_eq!(at("2024-07-01 12:00:00", Tz::UTC), "2024-07-01T12:00:00Z");
    assert_eq!(at("2024-07-01 12:00:00", berlin), "2024-07-01T10:00:00Z");
    assert_eq!(at("2024-01-15 12:00:00", berlin), "2024-01-15T11:00:00Z");
    // Clocks going back: 02:30 happens twice; PostgreSQL takes the later (standard time).
    assert_eq!(at("2024-10-27 02:30:00", berlin), "2024-10-27T01:30:00Z");
    // Clocks going forward: 02:30 never happens; the offset before the jump (+01) applies.
    assert_eq!(at("2024-03-31 02:30:00", berlin), "2024-03-31T01:30:00Z");
}

#[test]
fn text_types_and_bytes() {
    assert_eq!(text_of(&Type::BPCHAR, b"USD  "), "\"USD\"");
    assert_eq!(text_of(&Type::TEXT, "dån ".as_bytes()), "\"dån \"");
    assert_eq!(text_of(&Type::CHAR, b"a"), "\"a\"");
    assert_eq!(text_of(&Type::BYTEA, &[0, 255, 16]), "\"AP8Q\"");
    assert!(matches!(
        json(&Type::TEXT, &[0xff]),
        Err(CellError::Malformed { .. })
    ));
}

#[test]
fn json_is_embedded_with_exact_numbers() {
    let raw = br#"{"a": 1.10, "b": [12345678901234567890], "c": "x"}"#;
    assert_eq!(
        text_of(&Type::JSON, raw),
        r#"{"a":1.10,"b":[12345678901234567890],"c":"x"}"#
    );
    let mut jsonb = vec![1u8];
    jsonb.extend_from_slice(br#"{"n": 0.1}"#);
    assert_eq!(text_of(&Type::JSONB, &jsonb), r#"{"n":0.1}"#);
    assert!(json(&Type::JSONB, b"\x02{}").is_err());
}

/// Encodes a one-dimensional int4 array, `None` for NULL elements, with `dims` dimensions.
fn int4_array(dims: &[i32], elements: &[Option<i32>]) -> Vec<u8> {
    let mut raw = Vec::new();
    raw.extend_from_slice(&(dims.len() as i32).to_be_bytes());
    raw.extend_from_slice(&1i32.to_be_bytes());
    raw.extend_from_slice(&Type::INT4.oid().to_be_bytes());
    for d in dims {
        raw.extend_from_slice(&d.to_be_bytes());
        raw.extend_from_slice(&1i32.to_be_bytes());
    }
    for e in elements {
        match e {
            Some(v) => {
                raw.extend_from_slice(&4i32.to_be_bytes());
                raw.extend_from_slice(&v.to_be_bytes());
            }
            None => raw.extend_from_slice(&(-1i32).to_be_bytes()),
        }
    }
    raw
}

#[test]
fn arrays_nest_by_dimension_and_keep_nulls() {
    let ty = Type::INT4_ARRAY;
    assert_eq!(text_of(&ty, &int4_array(&[], &[])), "[]");
    assert_eq!(
        text_of(&ty, &int4_array(&[3], &[Some(1), None, Some(3)])),
        "[1,null,3]"
    );
    let values: Vec<Option<i32>> = (1..=6).map(Some).collect();
    assert_eq!(
        text_of(&ty, &int4_array(&[2, 3], &values)),
        "[[1,2,3],[4,5,6]]"
    );
    // More elements declared than bytes: an error, not an allocation of 2^31 slots.
    assert!(json(&ty, &int4_array(&[i32::MAX], &[Some(1)])).is_err());
    assert!(json(&ty, &int4_array(&[65536, 65536], &[Some(1)])).is_err());
    let mut trailing = int4_array(&[1], &[Some(1)]);
    trailing.push(0);
    assert!(json(&ty, &trailing).is_err());
}

#[test]
fn money_is_cast_by_the_server_and_refused_otherwise() {
    assert_eq!(server_cast(&Type::MONEY), Some("numeric"));
    assert_eq!(server_cast(&Type::MONEY_ARRAY), Some("numeric[]"));
    assert_eq!(server_cast(&Type::NUMERIC), None);
    assert!(!is_supported(&Type::MONEY));
    assert!(is_supported(&Type::NUMERIC_ARRAY));
    assert!(!is_supported(&Type::POINT));
    assert!(!is_supported(&Type::INTERVAL));
    assert!(matches!(
        json(&Type::MONEY, &100i64.to_be_bytes()),
        Err(CellError::Unsupported(_))
    ));
}

#[test]
fn nulls_are_null() {
    let cell = Cell {
        ty: Type::NUMERIC,
        raw: None,
    };
    assert_eq!(cell.to_json(&Conversion::default()), Ok(Value::Null));
}
