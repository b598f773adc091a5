//! GBNF / EBNF grammars (llama.cpp's and xgrammar's `rule ::= ...` form, which vLLM users
//! send in `grammar`) rewritten as llguidance's Lark: `root` becomes `start`, character
//! classes become regexes, every rule one line. Lark grammars pass through untouched.

use std::fmt::Write;

/// Whether `text` is in the `::=` form.
pub fn is_gbnf(text: &str) -> bool {
    text.contains("::=")
}

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Name(String),
    Define,
    Str(String),
    Class(String),
    Any,
    Op(char),
    Repeat(String),
}

fn rule_name(name: &str) -> String {
    if name == "root" {
        "start".into()
    } else {
        format!("r_{}", name.replace(['-', '.'], "_").to_lowercase())
    }
}

/// Reads one escape after `\` in a string or class; returns the char.
fn escape(chars: &mut std::iter::Peekable<std::str::Chars>, line: usize) -> Result<char, String> {
    let hex =
        |chars: &mut std::iter::Peekable<std::str::Chars>, n: usize| -> Result<char, String> {
            let digits: String = (0..n).filter_map(|_| chars.next()).collect();
            u32::from_str_radix(&digits, 16)
                .ok()
                .filter(|_| digits.len() == n)
                .and_then(char::from_u32)
                .ok_or_else(|| format!("line {line}: bad escape `{digits}`"))
        };
    match chars.next() {
        Some('n') => Ok('\n'),
        Some('t') => Ok('\t'),
        Some('r') => Ok('\r'),
        Some('x') => hex(chars, 2),
        Some('u') => hex(chars, 4),
        Some('U') => hex(chars, 8),
        Some(c) => Ok(c),
        None => Err(format!("line {line}: the grammar ends inside an escape")),
    }
}

fn lex(src: &str) -> Result<Vec<(Tok, usize)>, String> {
    let mut out = Vec::new();
    let mut chars = src.chars().peekable();
    let mut line = 1;
    while let Some(c) = chars.next() {
        match c {
            '\n' => line += 1,
            c if c.is_whitespace() => {}
            '#' => {
                while chars.peek().is_some_and(|&c| c != '\n') {
                    chars.next();
                }
            }
            ':' => {
                if chars.next() != Some(':') || chars.next() != Some('=') {
                    return Err(format!("line {line}: expected `::=`"));
                }
                out.push((Tok::Define, line));
            }
            '"' | '\'' => {
                let mut s = String::new();
                loop {
                    match chars.next() {
                        Some(q) if q == c => break,
                        Some('\\') => s.push(escape(&mut chars, line)?),
                        Some('\n') | None => {
                            return Err(format!("line {line}: unterminated string"))
                        }
                        Some(x) => s.push(x),
                    }
                }
                out.push((Tok::Str(s), line));
            }
            '[' => {
                // Kept as regex syntax; only `/` (the Lark regex delimiter) needs escaping,
                // and GBNF's \uXXXX becomes the regex crate's \u{XXXX}.
                let mut s = String::from("[");
                loop {
                    match chars.next() {
                        Some(']') => break,
                        Some('\\') => {
                            let e = escape(&mut chars, line)?;
                            let _ = write!(s, "\\u{{{:x}}}", e as u32);
                        }
                        Some('/') => s.push_str("\\/"),
                        Some('\n') | None => {
                            return Err(format!("line {line}: unterminated character class"))
                        }
                        Some(x) => s.push(x),
                    }
                }
                s.push(']');
                out.push((Tok::Class(s), line));
            }
            '{' => {
                let mut s = String::new();
                loop {
                    match chars.next() {
                        Some('}') => break,
                        Some(x) if x.is_ascii_digit() || x == ',' || x == ' ' => s.push(x),
                        _ => return Err(format!("line {line}: bad repetition `{{{s}`")),
                    }
                }
                out.push((Tok::Repeat(s.replace(' ', "")), line));
            }
            '.' => out.push((Tok::Any, line)),
            '|' | '*' | '+' | '?' | '(' | ')' => out.push((Tok::Op(c), line)),
            c if c.is_alphanumeric() || c == '_' || c == '-' => {
                let mut s = String::from(c);
                while let Some(&n) = chars.peek() {
                    if n.is_alphanumeric() || n == '_' || n == '-' {
                        s.push(n);
                        chars.next();
                    } else {
                        break;
                    }
                }
                out.push((Tok::Name(s), line));
            }
            c => return Err(format!("line {line}: unexpected `{c}`")),
        }
    }
    Ok(out)
}

/// Rewrites a GBNF grammar as Lark; the error names the line.
pub fn to_lark(src: &str) -> Result<String, String> {
    let toks = lex(src)?;
    let mut out = String::new();
    let mut has_root = false;
    let mut i = 0;
    while i < toks.len() {
        let (Tok::Name(lhs), line) = &toks[i] else {
            return Err(format!("line {}: expected a rule name", toks[i].1));
        };
        if toks.get(i + 1).map(|t| &t.0) != Some(&Tok::Define) {
            return Err(format!("line {line}: expected `::=` after `{lhs}`"));
        }
        has_root |= lhs == "root";
        let _ = write!(out, "{}:", rule_name(lhs));
        i += 2;
        let start = i;
        // The body runs to the next `name ::=`.
        while i < toks.len()
            && !(matches!(toks[i].0, Tok::Name(_))
                && toks.get(i + 1).map(|t| &t.0) == Some(&Tok::Define))
        {
            match &toks[i].0 {
                Tok::Name(n) => {
                    let _ = write!(out, " {}", rule_name(n));
                }
                Tok::Str(s) => {
                    let _ = write!(out, " {}", serde_json::Value::from(s.as_str()));
                }
                Tok::Class(c) => {
                    let _ = write!(out, " /{c}/");
                }
                Tok::Any => out.push_str(" /(?s:.)/"),
                Tok::Op(c) => {
                    let _ = write!(out, " {c}");
                }
                Tok::Repeat(r) => {
                    let _ = write!(out, "{{{r}}}");
                }
                Tok::Define => return Err(format!("line {}: unexpected `::=`", toks[i].1)),
            }
            i += 1;
        }
        if i == start {
            return Err(format!("line {line}: rule `{lhs}` is empty"));
        }
        out.push('\n');
    }
    if !has_root {
        return Err("the grammar has no `root` rule".into());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rewrites_rules_classes_and_strings() {
        let g = "root ::= expr\nexpr ::= term ([-+] term)*  # sums\nterm ::= [0-9]+ | \"(\" expr \")\"\n";
        let lark = to_lark(g).unwrap();
        assert_eq!(
            lark,
            "start: r_expr\nr_expr: r_term ( /[-+]/ r_term ) *\nr_term: /[0-9]/ + | \"(\" r_expr \")\"\n"
        );
    }

    #[test]
    fn errors_name_the_line() {
        assert!(to_lark("root ::= \"a").unwrap_err().contains("line 1"));
        assert!(to_lark("a ::= \"x\"").unwrap_err().contains("root"));
        assert!(to_lark("root ::= \"x\"\n ::= y")
            .unwrap_err()
            .contains("line 2"));
    }
}
