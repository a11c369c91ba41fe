//! Integer minor units to major units, with each currency's own ISO 4217 exponent.
//!
//! `1999 USD` is `19.99`, `1999 JPY` is `1999`, `1999 KWD` is `1.999`. A code that is not in the
//! table has no exponent, and a row with it is rejected: the decimal point is never guessed.
//! Pure text arithmetic: no floating point anywhere.

/// Currencies whose minor unit is not a hundredth (ISO 4217, amendment 179 and earlier).
const EXPONENT_0: &[&str] = &[
    "BIF", "CLP", "DJF", "GNF", "ISK", "JPY", "KMF", "KRW", "PYG", "RWF", "UGX", "UYI", "VND",
    "VUV", "XAF", "XOF", "XPF",
];
const EXPONENT_3: &[&str] = &["BHD", "IQD", "JOD", "KWD", "LYD", "OMR", "TND"];
const EXPONENT_4: &[&str] = &["CLF", "UYW"];

/// Every other active code (and a few recently withdrawn ones that old rows still carry) has
/// two decimals. Codes without a minor unit (XAU, XDR, XXX, ...) are deliberately absent.
const EXPONENT_2: &[&str] = &[
    "AED", "AFN", "ALL", "AMD", "ANG", "AOA", "ARS", "AUD", "AWG", "AZN", "BAM", "BBD", "BDT",
    "BGN", "BMD", "BND", "BOB", "BOV", "BRL", "BSD", "BTN", "BWP", "BYN", "BZD", "CAD", "CDF",
    "CHE", "CHF", "CHW", "CNY", "COP", "COU", "CRC", "CUC", "CUP", "CVE", "CZK", "DKK", "DOP",
    "DZD", "EGP", "ERN", "ETB", "EUR", "FJD", "FKP", "GBP", "GEL", "GHS", "GIP", "GMD", "GTQ",
    "GYD", "HKD", "HNL", "HRK", "HTG", "HUF", "IDR", "ILS", "INR", "IRR", "JMD", "KES", "KGS",
    "KHR", "KPW", "KYD", "KZT", "LAK", "LBP", "LKR", "LRD", "LSL", "MAD", "MDL", "MGA", "MKD",
    "MMK", "MNT", "MOP", "MRU", "MUR", "MVR", "MWK", "MXN", "MXV", "MYR", "MZN", "NAD", "NGN",
    "NIO", "NOK", "NPR", "NZD", "PAB", "PEN", "PGK", "PHP", "PKR", "PLN", "QAR", "RON", "RSD",
    "RUB", "SAR", "SBD", "SCR", "SDG", "SEK", "SGD", "SHP", "SLE", "SLL", "SOS", "SRD", "SSP",
    "STN", "SVC", "SYP", "SZL", "THB", "TJS", "TMT", "TOP", "TRY", "TTD", "TWD", "TZS", "UAH",
    "USD", "USN", "UYU", "UZS", "VED", "VES", "WST", "XCD", "XCG", "YER", "ZAR", "ZMW", "ZWG",
    "ZWL",
];

/// The number of decimals of a currency's minor unit, for a code like `"USD"` (letter case and
/// surrounding blanks, such as `char(3)` padding, are ignored); `None` for an unknown code.
pub fn exponent(code: &str) -> Option<u32> {
    let code = code.trim().to_ascii_uppercase();
    [
        (EXPONENT_0, 0),
        (EXPONENT_2, 2),
        (EXPONENT_3, 3),
        (EXPONENT_4, 4),
    ]
    .iter()
    .find(|(codes, _)| codes.contains(&code.as_str()))
    .map(|(_, exponent)| *exponent)
}

/// Why an amount in minor units cannot be converted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MinorUnitsError {
    /// Not an ISO 4217 code with a minor unit.
    #[error("'{0}' is not an ISO 4217 currency code with a minor unit")]
    UnknownCurrency(String),
    /// The amount is not a whole number of minor units.
    #[error("{0} is not a whole number of minor units")]
    NotWhole(String),
}

/// Turns a whole number of minor units (as exact decimal text: `"-1999"`, or `"1999.00"` from
/// a numeric column with a scale) into major units of `currency`, as exact decimal text.
pub fn to_major_units(minor: &str, currency: &str) -> Result<String, MinorUnitsError> {
    let exponent = exponent(currency)
        .ok_or_else(|| MinorUnitsError::UnknownCurrency(currency.trim().to_string()))?;
    let not_whole = || MinorUnitsError::NotWhole(minor.to_string());
    let (sign, unsigned) = match minor.strip_prefix('-') {
        Some(rest) => ("-", rest),
        None => ("", minor),
    };
    let (digits, fraction) = unsigned.split_once('.').unwrap_or((unsigned, ""));
    if digits.is_empty()
        || !digits.bytes().all(|b| b.is_ascii_digit())
        || !fraction.bytes().all(|b| b == b'0')
    {
        return Err(not_whole());
    }
    let digits = digits.trim_start_matches('0');
    let exponent = exponent as usize;
    let padded = format!("{digits:0>width$}", width = exponent + 1);
    let (units, cents) = padded.split_at(padded.len() - exponent);
    let sign = if padded.bytes().all(|b| b == b'0') {
        ""
    } else {
        sign
    };
    Ok(match cents {
        "" => format!("{sign}{units}"),
        _ => format!("{sign}{units}.{cents}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_currency_has_its_own_exponent() {
        assert_eq!(to_major_units("1999", "USD").unwrap(), "19.99");
        assert_eq!(to_major_units("1999", "JPY").unwrap(), "1999");
        assert_eq!(to_major_units("1999", "KWD").unwrap(), "1.999");
        assert_eq!(to_major_units("1999", "CLF").unwrap(), "0.1999");
        assert_eq!(to_major_units("1999", "EUR").unwrap(), "19.99");
    }

    #[test]
    fn small_negative_and_zero_amounts_keep_their_places() {
        assert_eq!(to_major_units("5", "USD").unwrap(), "0.05");
        assert_eq!(to_major_units("-5", "USD").unwrap(), "-0.05");
        assert_eq!(to_major_units("-1", "BHD").unwrap(), "-0.001");
        assert_eq!(to_major_units("0", "USD").unwrap(), "0.00");
        assert_eq!(to_major_units("-0", "USD").unwrap(), "0.00");
        assert_eq!(to_major_units("0", "JPY").unwrap(), "0");
        assert_eq!(to_major_units("000120", "USD").unwrap(), "1.20");
    }

    #[test]
    fn every_digit_of_a_large_amount_is_kept() {
        assert_eq!(
            to_major_units("9223372036854775807", "USD").unwrap(),
            "92233720368547758.07"
        );
        assert_eq!(
            to_major_units("123456789012345678901234567890", "KWD").unwrap(),
            "123456789012345678901234567.890"
        );
    }

    #[test]
    fn numeric_columns_with_a_zero_fraction_are_whole() {
        assert_eq!(to_major_units("1999.00", "USD").unwrap(), "19.99");
        assert_eq!(
            to_major_units("1999.50", "USD"),
            Err(MinorUnitsError::NotWhole("1999.50".to_string()))
        );
        assert!(to_major_units("", "USD").is_err());
        assert!(to_major_units("1e3", "USD").is_err());
        assert!(to_major_units("-", "USD").is_err());
    }

    #[test]
    fn unknown_currencies_are_refused_not_guessed() {
        for code in ["XYZ", "", "US", "USDD", "XAU", "XXX", "€"] {
            assert!(
                matches!(
                    to_major_units("100", code),
                    Err(MinorUnitsError::UnknownCurrency(_))
                ),
                "{code}"
            );
        }
        // char(3) padding and letter case are not a different currency.
        assert_eq!(to_major_units("100", " usd ").unwrap(), "1.00");
    }

    #[test]
    fn the_table_has_no_code_twice() {
        let mut all: Vec<&str> = [EXPONENT_0, EXPONENT_2, EXPONENT_3, EXPONENT_4].concat();
        let count = all.len();
        all.sort_unstable();
        all.dedup();
        assert_eq!(all.len(), count);
        assert!(all
            .iter()
            .all(|c| c.len() == 3 && c.bytes().all(|b| b.is_ascii_uppercase())));
    }
}
