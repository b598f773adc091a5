//! JSON text as Python's `json.dumps(value, ensure_ascii=False)` writes it: vLLM's parsers
//! re-serialise parsed arguments that way, so `", "` / `": "` separators, non-ASCII kept,
//! floats in `repr` form (`1.0`, `1e+16`).

use serde_json::Value;

pub fn dumps(v: &Value) -> String {
    let mut out = String::new();
    write(v, &mut out);
    out
}

fn write(v: &Value, out: &mut String) {
    match v {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => match n.as_f64().filter(|_| n.is_f64()) {
            Some(f) => out.push_str(&float(f)),
            None => out.push_str(&n.to_string()),
        },
        Value::String(s) => string(s, out),
        Value::Array(items) => {
            out.push('[');
            for (i, x) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                write(x, out);
            }
            out.push(']');
        }
        Value::Object(m) => {
            out.push('{');
            for (i, (k, x)) in m.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                string(k, out);
                out.push_str(": ");
                write(x, out);
            }
            out.push('}');
        }
    }
}

/// One character of a JSON string body, escaped as Python's encoder does.
pub fn push_char(c: char, out: &mut String) {
    match c {
        '"' => out.push_str("\\\""),
        '\\' => out.push_str("\\\\"),
        '\n' => out.push_str("\\n"),
        '\r' => out.push_str("\\r"),
        '\t' => out.push_str("\\t"),
        '\u{8}' => out.push_str("\\b"),
        '\u{c}' => out.push_str("\\f"),
        c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
        c => out.push(c),
    }
}

pub fn string(s: &str, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        push_char(c, out);
    }
    out.push('"');
}

/// Python's `float.__repr__`: the shortest round-trip digits, positional for exponents
/// -4..16, else `d.ddde+XX`.
pub fn float(f: f64) -> String {
    if !f.is_finite() {
        // Python writes these (not JSON); serde_json never produces them from text.
        return if f.is_nan() {
            "NaN".into()
        } else if f > 0.0 {
            "Infinity".into()
        } else {
            "-Infinity".into()
        };
    }
    let sci = format!("{f:e}");
    let (mantissa, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    if (-4..16).contains(&exp) {
        let s = format!("{f}");
        if s.contains('.') {
            s
        } else {
            format!("{s}.0")
        }
    } else {
        let sign = if exp < 0 { '-' } else { '+' };
        format!("{mantissa}e{sign}{:02}", exp.abs())
    }
}

/// Python's `json.JSONDecoder().raw_decode` for text starting with `{` or `[`: the value
/// and where it ends; trailing text is allowed (serde_json's stream reader would refuse
/// `{...};`).
pub fn raw_decode(s: &str) -> Option<(Value, usize)> {
    let end = container_end(s)?;
    let v = serde_json::from_str(&s[..end]).ok()?;
    Some((v, end))
}

/// Where the object or array starting `s` closes (string-aware bracket matching).
pub fn container_end(s: &str) -> Option<usize> {
    let b = s.as_bytes();
    if !matches!(b.first(), Some(b'{' | b'[')) {
        return None;
    }
    let (mut depth, mut in_str, mut esc) = (0usize, false, false);
    for (i, &c) in b.iter().enumerate() {
        if in_str {
            if esc {
                esc = false;
            } else if c == b'\\' {
                esc = true;
            } else if c == b'"' {
                in_str = false;
            }
            continue;
        }
        match c {
            b'"' => in_str = true,
            b'{' | b'[' => depth += 1,
            b'}' | b']' => {
                depth -= 1;
                if depth == 0 {
                    return Some(i + 1);
                }
            }
            _ => {}
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn writes_as_python_json_dumps() {
        // Expected strings are Python 3.12's json.dumps(..., ensure_ascii=False).
        let v: Value =
            serde_json::from_str(r#"{"b": [1, 2.50, 1e2, -0.0, true, null], "a": "é\n\"\u0001"}"#)
                .unwrap();
        assert_eq!(
            dumps(&v),
            r#"{"b": [1, 2.5, 100.0, -0.0, true, null], "a": "é\n\"\u0001"}"#
        );
        assert_eq!(float(1e16), "1e+16");
        assert_eq!(float(1.5e-5), "1.5e-05");
        assert_eq!(float(0.0001), "0.0001");
        assert_eq!(float(123456789012345.6), "123456789012345.6");
        assert_eq!(float(1e100), "1e+100");
        assert_eq!(dumps(&json!({})), "{}");
        assert_eq!(dumps(&json!([])), "[]");
    }

    #[test]
    fn raw_decode_allows_trailing_text() {
        let (v, end) = raw_decode(r#"{"a": "}"}; {"b": 1}"#).unwrap();
        assert_eq!(v, json!({"a": "}"}));
        assert_eq!(end, 10);
        assert!(raw_decode(r#"{"a": "#).is_none());
        assert!(raw_decode("{oops}").is_none());
    }
}
