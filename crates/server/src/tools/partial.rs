//! Reading JSON that is still being generated. `normalize` re-writes the part of a value
//! that is already certain in Python's `json.dumps` form, so argument fragments streamed
//! from it concatenate to the arguments the whole-output parse returns (vLLM streams the
//! common prefix of successive partial parses for the same reason: no closing quote or
//! brace may be sent before the model wrote it).

use super::pyjson;

/// Why reading stopped before the value ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// More text may complete it.
    Incomplete,
    /// No continuation can make it JSON.
    Invalid,
}

/// A value read from the start of a text.
pub struct Normalized {
    /// The certain prefix of the value's Python-style serialisation.
    pub out: String,
    /// Byte offset just past the value, when it is complete.
    pub end: Option<usize>,
    pub invalid: bool,
}

pub fn normalize(s: &str) -> Normalized {
    let mut r = Reader {
        s,
        pos: 0,
        out: String::new(),
    };
    r.ws();
    let res = r.value();
    let (end, invalid) = match res {
        Ok(()) => (Some(r.pos), false),
        Err(Stop::Incomplete) => (None, false),
        Err(Stop::Invalid) => (None, true),
    };
    Normalized {
        out: r.out,
        end,
        invalid,
    }
}

/// A JSON string starting `s` (at its opening quote): the decoded text and the offset past
/// the closing quote.
pub fn string_at(s: &str) -> Result<(String, usize), Stop> {
    let mut r = Reader {
        s,
        pos: 0,
        out: String::new(),
    };
    let text = r.string()?;
    Ok((text, r.pos))
}

pub struct Reader<'a> {
    pub s: &'a str,
    pub pos: usize,
    pub out: String,
}

impl Reader<'_> {
    fn peek(&self) -> Option<char> {
        self.s[self.pos..].chars().next()
    }

    pub fn ws(&mut self) {
        while let Some(c) = self
            .peek()
            .filter(|c| matches!(c, ' ' | '\t' | '\n' | '\r'))
        {
            self.pos += c.len_utf8();
        }
    }

    fn need(&self) -> Result<char, Stop> {
        self.peek().ok_or(Stop::Incomplete)
    }

    pub fn value(&mut self) -> Result<(), Stop> {
        match self.need()? {
            '{' => self.container('{', '}', true),
            '[' => self.container('[', ']', false),
            '"' => {
                self.out.push('"');
                self.string_into_out()
            }
            '-' | '0'..='9' => self.number(),
            't' => self.literal("true"),
            'f' => self.literal("false"),
            'n' => self.literal("null"),
            _ => Err(Stop::Invalid),
        }
    }

    fn container(&mut self, open: char, close: char, object: bool) -> Result<(), Stop> {
        self.pos += 1;
        self.out.push(open);
        self.ws();
        if self.need()? == close {
            self.pos += 1;
            self.out.push(close);
            return Ok(());
        }
        loop {
            if object {
                if self.need()? != '"' {
                    return Err(Stop::Invalid);
                }
                self.out.push('"');
                self.string_into_out()?;
                self.ws();
                if self.need()? != ':' {
                    return Err(Stop::Invalid);
                }
                self.pos += 1;
                self.out.push_str(": ");
                self.ws();
            }
            self.value()?;
            self.ws();
            match self.need()? {
                ',' => {
                    self.pos += 1;
                    self.out.push_str(", ");
                    self.ws();
                }
                c if c == close => {
                    self.pos += 1;
                    self.out.push(close);
                    return Ok(());
                }
                _ => return Err(Stop::Invalid),
            }
        }
    }

    /// A string body after the opening quote (already written), re-escaped into `out`.
    fn string_into_out(&mut self) -> Result<(), Stop> {
        self.pos += 1;
        loop {
            let (c, len) = self.string_char()?;
            self.pos += len;
            match c {
                None => {
                    self.out.push('"');
                    return Ok(());
                }
                Some(c) => pyjson::push_char(c, &mut self.out),
            }
        }
    }

    /// A whole string at `pos` (its opening quote), decoded.
    fn string(&mut self) -> Result<String, Stop> {
        if self.need()? != '"' {
            return Err(Stop::Invalid);
        }
        self.pos += 1;
        let mut text = String::new();
        loop {
            let (c, len) = self.string_char()?;
            self.pos += len;
            match c {
                None => return Ok(text),
                Some(c) => text.push(c),
            }
        }
    }

    /// The next character of a string body and its length in the text; `None` for the
    /// closing quote. An escape is read only when complete.
    fn string_char(&self) -> Result<(Option<char>, usize), Stop> {
        let rest = &self.s[self.pos..];
        let c = rest.chars().next().ok_or(Stop::Incomplete)?;
        match c {
            '"' => Ok((None, 1)),
            '\\' => {
                let e = rest[1..].chars().next().ok_or(Stop::Incomplete)?;
                let simple = match e {
                    '"' => Some('"'),
                    '\\' => Some('\\'),
                    '/' => Some('/'),
                    'b' => Some('\u{8}'),
                    'f' => Some('\u{c}'),
                    'n' => Some('\n'),
                    'r' => Some('\r'),
                    't' => Some('\t'),
                    'u' => None,
                    _ => return Err(Stop::Invalid),
                };
                if let Some(c) = simple {
                    return Ok((Some(c), 2));
                }
                let hi = hex4(&rest[2..])?;
                if (0xD800..0xDC00).contains(&hi) {
                    // A surrogate pair is one character: wait for its second half.
                    let tail = &rest[6..];
                    if tail.len() < 2 {
                        return if "\\u".starts_with(tail) {
                            Err(Stop::Incomplete)
                        } else {
                            Ok((Some('\u{fffd}'), 6))
                        };
                    }
                    if !tail.starts_with("\\u") {
                        return Ok((Some('\u{fffd}'), 6));
                    }
                    let lo = hex4(&tail[2..])?;
                    if (0xDC00..0xE000).contains(&lo) {
                        let c = 0x10000 + ((hi - 0xD800) << 10) + (lo - 0xDC00);
                        return Ok((char::from_u32(c), 12));
                    }
                    return Ok((Some('\u{fffd}'), 6));
                }
                Ok((Some(char::from_u32(hi).unwrap_or('\u{fffd}')), 6))
            }
            c if (c as u32) < 0x20 => Err(Stop::Invalid),
            c => Ok((Some(c), c.len_utf8())),
        }
    }

    fn number(&mut self) -> Result<(), Stop> {
        let rest = &self.s[self.pos..];
        let len = rest
            .find(|c: char| !matches!(c, '0'..='9' | '-' | '+' | '.' | 'e' | 'E'))
            .ok_or(Stop::Incomplete)?;
        let v: serde_json::Value = serde_json::from_str(&rest[..len]).map_err(|_| Stop::Invalid)?;
        self.out.push_str(&pyjson::dumps(&v));
        self.pos += len;
        Ok(())
    }

    fn literal(&mut self, word: &str) -> Result<(), Stop> {
        let rest = &self.s[self.pos..];
        if rest.starts_with(word) {
            self.pos += word.len();
            self.out.push_str(word);
            Ok(())
        } else if word.starts_with(rest) {
            Err(Stop::Incomplete)
        } else {
            Err(Stop::Invalid)
        }
    }
}

fn hex4(s: &str) -> Result<u32, Stop> {
    let digits: String = s.chars().take(4).collect();
    if !digits.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(Stop::Invalid);
    }
    if digits.len() < 4 {
        return Err(Stop::Incomplete);
    }
    u32::from_str_radix(&digits, 16).map_err(|_| Stop::Invalid)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_prefix_is_a_prefix_of_the_final_form() {
        let text =
            r#"{ "city" :"Par\u00e9s \"x\"\ud83d\ude00", "n": [1.50, -2e3, true, null], "o": {}}"#;
        let full = normalize(text);
        assert_eq!(full.end, Some(text.len()));
        let want = pyjson::dumps(&serde_json::from_str(text).unwrap());
        assert_eq!(full.out, want);
        for (i, _) in text.char_indices() {
            let p = normalize(&text[..i]);
            assert!(!p.invalid && p.end.is_none(), "{i}");
            assert!(want.starts_with(&p.out), "{i}: {}", p.out);
        }
        assert!(normalize("{'a': 1}").invalid);
        assert!(normalize(r#"{"a" 1}"#).invalid);
    }
}
