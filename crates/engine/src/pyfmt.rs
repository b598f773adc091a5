//! Values in error messages as vLLM (Python) prints them, and the `(parameter=…, value=…)`
//! ending its `VLLMValidationError` gives a message: clients and dashboards that match vLLM's
//! error texts see the same text from tpuserve.

/// vLLM 0.32's `VLLMValidationError.__str__`: the message, then " (parameter=P)" or
/// " (parameter=P, value=V)" (`value` already in Python's `str` form).
pub fn vllm_suffix(param: &str, value: Option<&str>) -> String {
    match value {
        Some(v) => format!(" (parameter={param}, value={v})"),
        None => format!(" (parameter={param})"),
    }
}

/// A float as Python's `repr` prints it: `-1.0`, `0.5`, `1e-05`, `1e+16`, `inf`, `nan`.
/// Rust's `Debug` picks the same shortest digits and the same switch to an exponent (below
/// 1e-4, from 1e16); only the exponent is written differently (`1e-5`, `1e16`).
pub fn py_float(v: f64) -> String {
    if v.is_nan() {
        return "nan".into();
    }
    if v.is_infinite() {
        return if v > 0.0 { "inf" } else { "-inf" }.into();
    }
    let s = format!("{v:?}");
    match s.split_once('e') {
        Some((mantissa, exp)) => {
            let (sign, digits) = match exp.strip_prefix('-') {
                Some(d) => ('-', d),
                None => ('+', exp),
            };
            format!("{mantissa}e{sign}{digits:0>2}")
        }
        None => s,
    }
}

/// An `f32` request value as Python prints the number it came from (the request's JSON
/// number, which the engine holds as `f32`: its shortest digits are the ones sent).
pub fn py_f32(v: f32) -> String {
    if !v.is_finite() {
        return py_float(v as f64);
    }
    // The f32's own shortest digits, read back as the f64 the client sent.
    let shortest: f64 = format!("{v:?}").parse().unwrap_or(v as f64);
    py_float(shortest)
}

/// A list of integers as Python prints it: `[1, 2]`.
pub fn py_ints(v: &[i64]) -> String {
    let items: Vec<String> = v.iter().map(|i| i.to_string()).collect();
    format!("[{}]", items.join(", "))
}

/// A string as Python's `repr` prints it: single quotes unless the text holds a single quote
/// and no double quote; backslashes, the quote, and control characters escaped.
pub fn py_str(s: &str) -> String {
    let q = if s.contains('\'') && !s.contains('"') {
        '"'
    } else {
        '\''
    };
    let mut out = String::with_capacity(s.len() + 2);
    out.push(q);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c == q => {
                out.push('\\');
                out.push(c);
            }
            c if (c as u32) < 0x20 || c as u32 == 0x7f => {
                out.push_str(&format!("\\x{:02x}", c as u32));
            }
            c => out.push(c),
        }
    }
    out.push(q);
    out
}

/// A list of strings as Python prints it: `['abc', "it's"]`.
pub fn py_strs<S: AsRef<str>>(v: &[S]) -> String {
    let items: Vec<String> = v.iter().map(|s| py_str(s.as_ref())).collect();
    format!("[{}]", items.join(", "))
}

/// Python's `int(text)` for a JSON object key: surrounding whitespace ignored, an optional
/// sign, decimal digits with single underscores between them (`"5_000"`).
pub fn py_int(text: &str) -> Option<i64> {
    let t = text.trim();
    let digits = t.strip_prefix(['+', '-']).unwrap_or(t);
    if digits.is_empty()
        || digits.starts_with('_')
        || digits.ends_with('_')
        || digits.contains("__")
        || !digits.chars().all(|c| c.is_ascii_digit() || c == '_')
    {
        return None;
    }
    t.replace('_', "").parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn floats_print_as_python_repr() {
        for (v, want) in [
            (-1.0, "-1.0"),
            (0.0, "0.0"),
            (1.5, "1.5"),
            (0.1, "0.1"),
            (1e-4, "0.0001"),
            (1e-5, "1e-05"),
            (1.5e-7, "1.5e-07"),
            (1e15, "1000000000000000.0"),
            (1e16, "1e+16"),
            (1.2e17, "1.2e+17"),
            (3e38, "3e+38"),
            (f64::INFINITY, "inf"),
            (f64::NEG_INFINITY, "-inf"),
            (f64::NAN, "nan"),
        ] {
            assert_eq!(py_float(v), want, "{v}");
        }
        // An f32 prints the digits the client sent, not its binary expansion.
        assert_eq!(py_f32(0.1), "0.1");
        assert_eq!(py_f32(-2.5), "-2.5");
        assert_eq!(py_f32(1.1), "1.1");
    }

    #[test]
    fn lists_and_strings_print_as_python_repr() {
        assert_eq!(py_ints(&[99999]), "[99999]");
        assert_eq!(py_ints(&[-1, 5]), "[-1, 5]");
        assert_eq!(py_ints(&[]), "[]");
        assert_eq!(py_strs(&["abc"]), "['abc']");
        assert_eq!(py_strs(&["it's", "a\\b\n"]), r#"["it's", 'a\\b\n']"#);
        assert_eq!(py_str("both ' and \""), r#"'both \' and "'"#);
        assert_eq!(py_str("\u{1}é"), "'\\x01é'");
    }

    #[test]
    fn keys_parse_as_python_int() {
        assert_eq!(py_int("5"), Some(5));
        assert_eq!(py_int(" 7\n"), Some(7));
        assert_eq!(py_int("+3"), Some(3));
        assert_eq!(py_int("-3"), Some(-3));
        assert_eq!(py_int("5_000"), Some(5000));
        for bad in ["abc", "", " ", "1.0", "5__0", "_5", "5_", "0x10", "--1"] {
            assert_eq!(py_int(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn the_suffix_names_the_parameter_and_value() {
        assert_eq!(
            vllm_suffix("top_p", Some("0.0")),
            " (parameter=top_p, value=0.0)"
        );
        assert_eq!(vllm_suffix("prompt", None), " (parameter=prompt)");
    }
}
