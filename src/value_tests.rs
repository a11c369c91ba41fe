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
        let cell = convert(&Type::NUMERIC, &numeric(0, sign, 0, &[]));
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
fn money_is_exact_cents() {
    assert_eq!(
        serde_json::to_string(&money(2_500_000)).unwrap(),
        "25000.00"
    );
    assert_eq!(serde_json::to_string(&money(-5)).unwrap(), "-0.05");
}
