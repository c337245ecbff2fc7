//! A one-pass validating JSON scanner for publish objects: it checks the
//! whole input against RFC 8259 (with `serde_json`'s limits: nesting at most
//! 127 deep, numbers that fit an `f64`, no lone surrogates, UTF-8 strings)
//! and hands the caller the top-level object's members — strings decoded,
//! every value's byte span in the input — without building a document tree.
//!
//! The publish path uses it to read `user`/`users`/`event`/`priority`/`id`
//! and to copy `data` verbatim by its span, so an event's data is never
//! parsed into a tree and written back out. A differential fuzz target and a
//! property test hold it to `serde_json`: both accept and reject the same
//! inputs and yield the same values.
//!
//! It touches nothing but the bytes it is given.

use std::borrow::Cow;
use std::ops::Range;

/// `serde_json`'s recursion limit: the 128th nested container is refused.
const MAX_DEPTH: usize = 127;

/// A number written without an exponent and at most this long (sign and
/// point included) is below 1e300, so finite: it is accepted unparsed.
const MAX_PLAIN_DIGITS: usize = 300;

/// Why an input is not JSON (or not an object at the top).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScanError {
    pub at: usize,
    pub what: &'static str,
}

impl std::fmt::Display for ScanError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} at byte {}", self.what, self.at)
    }
}

/// One value of the top-level object.
#[derive(Debug, Clone, PartialEq)]
pub enum Value<'a> {
    String(Cow<'a, str>),
    /// An array whose elements are all strings (decoded), in order.
    Strings(Vec<Cow<'a, str>>),
    /// Anything else: an object, a mixed array, a number, a literal.
    Other,
}

/// A member of the top-level object: its value and the value's byte span.
#[derive(Debug, Clone, PartialEq)]
pub struct Member<'a> {
    pub key: Cow<'a, str>,
    pub value: Value<'a>,
    pub span: Range<usize>,
}

/// Validates `input` as one JSON text and, when its top level is an object,
/// hands `visit` each member in order (so a caller that wants a few keys
/// keeps them where it likes, with no list allocated); whether the top
/// level is an object. On an error some members may have been visited.
pub fn scan_with<'a>(input: &'a [u8], visit: impl FnMut(Member<'a>)) -> Result<bool, ScanError> {
    let mut s = Scanner::new(input)?;
    s.ws();
    let object = s.peek() == Some(b'{');
    if object {
        s.top_object(visit)?;
    } else {
        s.value()?;
    }
    s.ws();
    if s.i != input.len() {
        return Err(s.err("trailing characters"));
    }
    Ok(object)
}

/// Rewrites one valid JSON value (`text`, as [`scan_with`] validated it) without
/// the object members, at any depth, whose (decoded) key `drop` selects;
/// whitespace is dropped, everything else is copied as written (numbers and
/// string escapes unchanged). Used for `--redact-keys`.
pub fn without_keys(text: &[u8], drop: &dyn Fn(&str) -> bool) -> Result<Vec<u8>, ScanError> {
    let mut s = Scanner::new(text)?;
    let mut out = Vec::with_capacity(text.len());
    s.ws();
    s.copy_value(&mut out, drop)?;
    s.ws();
    if s.i != text.len() {
        return Err(s.err("trailing characters"));
    }
    Ok(out)
}

/// How many leading bytes of `b` hold no quote, backslash or control
/// character: string bytes that need no closer look. The count may stop
/// short of the first such byte (near the end of `b`), never past it, so
/// a byte loop finishes from there. (The load generator reads event frames
/// with it too.)
#[inline]
pub fn plain_prefix(b: &[u8]) -> usize {
    #[cfg(target_arch = "x86_64")]
    {
        let mut i = 0;
        while let Some(chunk) = b.get(i..i + 16) {
            match special_in_16(chunk) {
                0 => i += 16,
                mask => return i + mask.trailing_zeros() as usize,
            }
        }
        i + plain_words(&b[i..])
    }
    #[cfg(not(target_arch = "x86_64"))]
    plain_words(b)
}

/// A bit per byte of `chunk` (16 bytes) that is a quote, a backslash or a
/// control character: SSE2, part of every x86-64, so no feature check.
#[cfg(target_arch = "x86_64")]
#[inline]
fn special_in_16(chunk: &[u8]) -> u32 {
    use std::arch::x86_64::*;
    debug_assert_eq!(chunk.len(), 16);
    // SAFETY: `chunk` is 16 readable bytes and an unaligned load needs
    // nothing more; the rest are SSE2 instructions, which every x86-64 has.
    unsafe {
        let v = _mm_loadu_si128(chunk.as_ptr().cast());
        let quote = _mm_cmpeq_epi8(v, _mm_set1_epi8(b'"' as i8));
        let backslash = _mm_cmpeq_epi8(v, _mm_set1_epi8(b'\\' as i8));
        // Unsigned `v <= 0x1f`: the minimum with 0x1f is `v` itself.
        let control = _mm_cmpeq_epi8(_mm_min_epu8(v, _mm_set1_epi8(0x1f)), v);
        _mm_movemask_epi8(_mm_or_si128(_mm_or_si128(quote, backslash), control)) as u32
    }
}

/// [`plain_prefix`] eight bytes at a time (SWAR): whole words only, stopping
/// at the first word that may hold a special byte.
#[inline]
fn plain_words(b: &[u8]) -> usize {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    // A byte of `x` is zero (or, with `n`, below `n` <= 128): the classic
    // SWAR tests; a false positive only hands the bytes to the byte loop.
    let zero = |x: u64| x.wrapping_sub(ONES) & !x & HIGH;
    let mut i = 0;
    while let Some(chunk) = b.get(i..i + 8) {
        let mut word = [0u8; 8];
        word.copy_from_slice(chunk);
        let w = u64::from_le_bytes(word);
        let special = zero(w ^ (ONES * u64::from(b'"')))
            | zero(w ^ (ONES * u64::from(b'\\')))
            | (w.wrapping_sub(ONES * 0x20) & !w & HIGH);
        if special != 0 {
            break;
        }
        i += 8;
    }
    i
}

/// Its small steps (a peek, a string, a colon, a number) are
/// `#[inline(always)]`: a publish object is a few dozen tokens of a few
/// bytes each, and the calls' own cost was most of the scan (inlined, the
/// generator's object scans in ~17% less time).
struct Scanner<'a> {
    b: &'a [u8],
    /// The same input as text: it is checked to be UTF-8 once, up front, so
    /// strings are sliced from it rather than each checked again. (Outside
    /// strings the grammar allows only ASCII, so this refuses exactly what
    /// `serde_json` refuses for encoding.)
    t: &'a str,
    i: usize,
    depth: usize,
}

impl<'a> Scanner<'a> {
    /// The check is simdutf8's (32 bytes a step where the CPU has AVX2;
    /// std's took ~250 instructions of a 290-byte publish object); only a
    /// refused input is checked again, by std, to say where it goes wrong.
    fn new(input: &'a [u8]) -> Result<Self, ScanError> {
        match simdutf8::basic::from_utf8(input) {
            Ok(t) => Ok(Scanner { b: input, t, i: 0, depth: 0 }),
            Err(_) => {
                let at = std::str::from_utf8(input).err().map_or(0, |e| e.valid_up_to());
                Err(ScanError { at, what: "invalid UTF-8" })
            }
        }
    }

    /// `t[from..to]`; both ends sit next to ASCII bytes, so on char boundaries.
    #[inline(always)]
    fn text(&self, from: usize, to: usize) -> Result<&'a str, ScanError> {
        self.t.get(from..to).ok_or_else(|| self.err("invalid UTF-8"))
    }

    fn err(&self, what: &'static str) -> ScanError {
        ScanError { at: self.i, what }
    }

    #[inline(always)]
    fn peek(&self) -> Option<u8> {
        self.b.get(self.i).copied()
    }

    #[inline(always)]
    fn ws(&mut self) {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.peek() {
            self.i += 1;
        }
    }

    #[inline(always)]
    fn expect(&mut self, c: u8, what: &'static str) -> Result<(), ScanError> {
        if self.peek() == Some(c) {
            self.i += 1;
            Ok(())
        } else {
            Err(self.err(what))
        }
    }

    #[inline(always)]
    fn enter(&mut self) -> Result<(), ScanError> {
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            return Err(self.err("nesting too deep"));
        }
        Ok(())
    }

    /// The top-level object, each member handed to `visit`.
    fn top_object(&mut self, mut visit: impl FnMut(Member<'a>)) -> Result<(), ScanError> {
        self.container(b'}', |s| {
            let (key, _) = s.key()?;
            let start = s.i;
            let value = s.top_value()?;
            visit(Member { key, value, span: start..s.i });
            Ok(())
        })
    }

    /// A container whose opening byte is next: `item` reads each element (for
    /// an object, its key and value); commas, whitespace, the closing byte
    /// and the nesting depth are handled here.
    fn container(
        &mut self,
        close: u8,
        mut item: impl FnMut(&mut Self) -> Result<(), ScanError>,
    ) -> Result<(), ScanError> {
        self.enter()?;
        self.i += 1;
        self.ws();
        if self.peek() != Some(close) {
            loop {
                self.ws();
                item(self)?;
                self.ws();
                match self.peek() {
                    Some(b',') => self.i += 1,
                    Some(c) if c == close => break,
                    _ if close == b'}' => return Err(self.err("expected ',' or '}'")),
                    _ => return Err(self.err("expected ',' or ']'")),
                }
            }
        }
        self.i += 1;
        self.depth -= 1;
        Ok(())
    }

    /// An object member's key and the `:` after it: the decoded key and its
    /// bytes as written (quotes included).
    #[inline(always)]
    fn key(&mut self) -> Result<(Cow<'a, str>, &'a [u8]), ScanError> {
        if self.peek() != Some(b'"') {
            return Err(self.err("expected a key"));
        }
        let start = self.i;
        let key = self.string()?;
        let written = &self.b[start..self.i];
        self.colon()?;
        Ok((key, written))
    }

    /// The `:` after a key, with the whitespace around it.
    #[inline(always)]
    fn colon(&mut self) -> Result<(), ScanError> {
        self.ws();
        self.expect(b':', "expected ':'")?;
        self.ws();
        Ok(())
    }

    /// A member's value: strings and arrays of strings are decoded.
    #[inline(always)]
    fn top_value(&mut self) -> Result<Value<'a>, ScanError> {
        match self.peek() {
            Some(b'"') => Ok(Value::String(self.string()?)),
            Some(b'[') => self.top_array(),
            _ => {
                self.value()?;
                Ok(Value::Other)
            }
        }
    }

    /// An array directly under the top object: its strings, if all are.
    fn top_array(&mut self) -> Result<Value<'a>, ScanError> {
        let mut strings = Some(Vec::new());
        self.container(b']', |s| {
            if s.peek() == Some(b'"') {
                let text = s.string()?;
                if let Some(list) = strings.as_mut() {
                    list.push(text);
                }
                Ok(())
            } else {
                strings = None;
                s.value()
            }
        })?;
        Ok(strings.map_or(Value::Other, Value::Strings))
    }

    /// Any value, validated and copied to `out` (see [`without_keys`]).
    fn copy_value(&mut self, out: &mut Vec<u8>, drop: &dyn Fn(&str) -> bool) -> Result<(), ScanError> {
        let mut first = true;
        match self.peek() {
            Some(b'{') => {
                out.push(b'{');
                self.container(b'}', |s| {
                    let (key, written) = s.key()?;
                    if drop(&key) {
                        return s.value();
                    }
                    if !std::mem::replace(&mut first, false) {
                        out.push(b',');
                    }
                    out.extend_from_slice(written);
                    out.push(b':');
                    s.copy_value(out, drop)
                })?;
                out.push(b'}');
            }
            Some(b'[') => {
                out.push(b'[');
                self.container(b']', |s| {
                    if !std::mem::replace(&mut first, false) {
                        out.push(b',');
                    }
                    s.copy_value(out, drop)
                })?;
                out.push(b']');
            }
            _ => {
                let start = self.i;
                self.value()?;
                out.extend_from_slice(&self.b[start..self.i]);
            }
        }
        Ok(())
    }

    /// Any value, validated and skipped.
    fn value(&mut self) -> Result<(), ScanError> {
        match self.peek() {
            Some(b'{') => self.object(),
            Some(b'[') => self.array(),
            Some(b'"') => self.skip_string(),
            Some(b't') => self.literal(b"true"),
            Some(b'f') => self.literal(b"false"),
            Some(b'n') => self.literal(b"null"),
            Some(b'-' | b'0'..=b'9') => self.number(),
            Some(_) => Err(self.err("expected a value")),
            None => Err(self.err("unexpected end of input")),
        }
    }

    fn object(&mut self) -> Result<(), ScanError> {
        self.container(b'}', |s| {
            if s.peek() != Some(b'"') {
                return Err(s.err("expected a key"));
            }
            s.skip_string()?;
            s.colon()?;
            s.value()
        })
    }

    fn array(&mut self) -> Result<(), ScanError> {
        self.container(b']', Self::value)
    }

    #[inline(always)]
    fn literal(&mut self, word: &'static [u8]) -> Result<(), ScanError> {
        if self.b[self.i..].starts_with(word) {
            self.i += word.len();
            Ok(())
        } else {
            Err(self.err("invalid literal"))
        }
    }

    /// A number; refused when it does not fit an `f64` (as `serde_json` does).
    #[inline(always)]
    fn number(&mut self) -> Result<(), ScanError> {
        let start = self.i;
        if self.peek() == Some(b'-') {
            self.i += 1;
        }
        match self.peek() {
            Some(b'0') => self.i += 1,
            Some(b'1'..=b'9') => self.digits(),
            _ => return Err(self.err("invalid number")),
        }
        if self.peek() == Some(b'.') {
            self.i += 1;
            if !matches!(self.peek(), Some(b'0'..=b'9')) {
                return Err(self.err("invalid number"));
            }
            self.digits();
        }
        if let Some(b'e' | b'E') = self.peek() {
            self.i += 1;
            if let Some(b'+' | b'-') = self.peek() {
                self.i += 1;
            }
            if !matches!(self.peek(), Some(b'0'..=b'9')) {
                return Err(self.err("invalid number"));
            }
            self.digits();
            return self.finite(start);
        }
        // Without an exponent a number under 1e308 is finite whatever its
        // digits (an integer too large for u64/i64 becomes an f64, as in
        // `serde_json`); only a longer one needs parsing.
        if self.i - start > MAX_PLAIN_DIGITS {
            return self.finite(start);
        }
        Ok(())
    }

    /// Refuses the number `b[start..i]` when it does not fit an `f64`.
    fn finite(&self, start: usize) -> Result<(), ScanError> {
        let text = std::str::from_utf8(&self.b[start..self.i]).map_err(|_| self.err("invalid number"))?;
        if text.parse::<f64>().is_ok_and(f64::is_finite) {
            Ok(())
        } else {
            Err(ScanError { at: start, what: "number out of range" })
        }
    }

    #[inline(always)]
    fn digits(&mut self) {
        while let Some(b'0'..=b'9') = self.peek() {
            self.i += 1;
        }
    }

    /// A string; borrowed when it holds no escape, else decoded.
    #[inline(always)]
    fn string(&mut self) -> Result<Cow<'a, str>, ScanError> {
        self.i += 1; // opening quote
        let start = self.i;
        self.plain_run()?;
        if self.peek() == Some(b'"') {
            let text = self.text(start, self.i)?;
            self.i += 1;
            return Ok(Cow::Borrowed(text));
        }
        // Escapes: decode from here on, copying the plain runs between them.
        let mut out = String::from(self.text(start, self.i)?);
        loop {
            match self.peek() {
                Some(b'"') => {
                    self.i += 1;
                    return Ok(Cow::Owned(out));
                }
                Some(b'\\') => {
                    self.i += 1;
                    out.push(self.escape()?);
                }
                _ => {
                    let from = self.i;
                    self.plain_run()?;
                    out.push_str(self.text(from, self.i)?);
                }
            }
        }
    }

    /// A string, validated as [`Self::string`] does but not decoded (a
    /// value nobody reads: a key or string below the top object).
    #[inline(always)]
    fn skip_string(&mut self) -> Result<(), ScanError> {
        self.i += 1; // opening quote
        loop {
            self.plain_run()?;
            // `plain_run` stops only at a quote or a backslash.
            if self.peek() == Some(b'"') {
                self.i += 1;
                return Ok(());
            }
            self.i += 1;
            self.escape()?;
        }
    }

    /// The character an escape stands for; `i` is just past its backslash.
    fn escape(&mut self) -> Result<char, ScanError> {
        let c = self.peek().ok_or_else(|| self.err("unterminated escape"))?;
        self.i += 1;
        Ok(match c {
            b'"' => '"',
            b'\\' => '\\',
            b'/' => '/',
            b'b' => '\u{8}',
            b'f' => '\u{c}',
            b'n' => '\n',
            b'r' => '\r',
            b't' => '\t',
            b'u' => self.unicode_escape()?,
            _ => return Err(self.err("invalid escape")),
        })
    }

    /// Moves past string bytes up to the next quote or backslash; refuses a
    /// control character or the end of input on the way.
    #[inline(always)]
    fn plain_run(&mut self) -> Result<(), ScanError> {
        self.skip_plain();
        // Usually the vector scan stopped right at the closing quote.
        match self.peek() {
            Some(b'"' | b'\\') => Ok(()),
            _ => self.plain_tail(),
        }
    }

    /// [`Self::plain_run`] byte by byte, where the vector scan stopped short.
    #[inline(never)]
    fn plain_tail(&mut self) -> Result<(), ScanError> {
        loop {
            match self.peek() {
                Some(b'"' | b'\\') => return Ok(()),
                Some(0..=0x1f) => return Err(self.err("control character in a string")),
                Some(_) => self.i += 1,
                None => return Err(self.err("unterminated string")),
            }
        }
    }

    /// Skips string bytes a vector (or a word) at a time while none of them
    /// is a quote, a backslash or a control character (the byte loop
    /// handles the rest).
    #[inline(always)]
    fn skip_plain(&mut self) {
        self.i += plain_prefix(&self.b[self.i..]);
    }

    fn hex4(&mut self) -> Result<u16, ScanError> {
        let digits = self.b.get(self.i..self.i + 4).ok_or_else(|| self.err("unterminated escape"))?;
        let mut n: u16 = 0;
        for &d in digits {
            let v = match d {
                b'0'..=b'9' => d - b'0',
                b'a'..=b'f' => d - b'a' + 10,
                b'A'..=b'F' => d - b'A' + 10,
                _ => return Err(self.err("invalid \\u escape")),
            };
            n = n * 16 + u16::from(v);
        }
        self.i += 4;
        Ok(n)
    }

    /// After `\u`: one code point, joining a surrogate pair; a lone
    /// surrogate is refused (as `serde_json` does).
    fn unicode_escape(&mut self) -> Result<char, ScanError> {
        let first = self.hex4()?;
        let code = match first {
            0xD800..=0xDBFF => {
                if !self.b[self.i..].starts_with(b"\\u") {
                    return Err(self.err("lone leading surrogate"));
                }
                self.i += 2;
                let second = self.hex4()?;
                if !(0xDC00..=0xDFFF).contains(&second) {
                    return Err(self.err("lone leading surrogate"));
                }
                0x10000 + ((u32::from(first) - 0xD800) << 10) + (u32::from(second) - 0xDC00)
            }
            0xDC00..=0xDFFF => return Err(self.err("lone trailing surrogate")),
            c => u32::from(c),
        };
        char::from_u32(code).ok_or_else(|| self.err("invalid code point"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `plain_prefix` never passes a special byte, and stops exactly at the
    /// first one whenever 16 bytes from a vector's start are left
    /// (x86-64) — checked at every offset and length around the vector
    /// and word sizes, for each kind of special byte and for bytes >= 0x80.
    #[test]
    fn plain_prefix_stops_at_or_before_the_first_special_byte() {
        let special = |c: u8| c == b'"' || c == b'\\' || c < 0x20;
        for stop in [b'"', b'\\', 0x00, 0x1f, b'\n'] {
            for len in 0..48 {
                for at in 0..=len {
                    let mut b: Vec<u8> = (0..len).map(|k| [b'x', 0x20, 0x7f, 0x80, 0xff][k % 5]).collect();
                    if at < len {
                        b[at] = stop;
                    }
                    let first = b.iter().position(|&c| special(c)).unwrap_or(len);
                    let n = plain_prefix(&b);
                    assert!(n <= first, "{n} passes the special byte at {first} in {b:?}");
                    if cfg!(target_arch = "x86_64") && first < len / 16 * 16 {
                        assert_eq!(n, first, "{b:?}");
                    }
                }
            }
        }
    }

    /// The top-level object's members; a repeated key keeps its last value
    /// (as `serde_json::Value` does).
    struct Object<'a> {
        members: Vec<Member<'a>>,
    }

    impl<'a> Object<'a> {
        fn get(&self, key: &str) -> Option<&Member<'a>> {
            self.members.iter().rev().find(|m| m.key == key)
        }
    }

    enum Top<'a> {
        Object(Object<'a>),
        NotAnObject,
    }

    /// [`scan_with`], its members collected.
    fn scan(input: &[u8]) -> Result<Top<'_>, ScanError> {
        let mut members = Vec::new();
        let object = scan_with(input, |m| members.push(m))?;
        Ok(if object { Top::Object(Object { members }) } else { Top::NotAnObject })
    }

    fn object(raw: &str) -> Object<'_> {
        match scan(raw.as_bytes()) {
            Ok(Top::Object(o)) => o,
            Ok(Top::NotAnObject) => panic!("not an object: {raw}"),
            Err(e) => panic!("{raw}: {e}"),
        }
    }

    #[test]
    fn members_come_back_decoded_with_their_spans() {
        let raw = r#" {"user":"a\u00e9","users":["x","y"],"data":{"k":[1,2.5e3,-0]},"n":null,"user":"b"} "#;
        let o = object(raw);
        assert_eq!(o.get("user").unwrap().value, Value::String("b".into()), "the last duplicate wins");
        assert_eq!(o.get("users").unwrap().value, Value::Strings(vec!["x".into(), "y".into()]));
        let data = o.get("data").unwrap();
        assert_eq!(&raw[data.span.clone()], r#"{"k":[1,2.5e3,-0]}"#);
        assert_eq!(o.get("n").unwrap().value, Value::Other);
        assert_eq!(object(r#"{"a":"\ud83d\ude00"}"#).get("a").unwrap().value, Value::String("😀".into()));
    }

    #[test]
    fn without_keys_drops_members_at_any_depth_and_keeps_the_rest_as_written() {
        let text = br#" { "a" : 1.50 , "Secret":{"x":1}, "b":[{"secret":2,"c":"\u00e9"}, 1e5 ], "s\u0065cret": 3 } "#;
        let out = without_keys(text, &|k| k.eq_ignore_ascii_case("secret")).unwrap();
        assert_eq!(std::str::from_utf8(&out).unwrap(), r#"{"a":1.50,"b":[{"c":"\u00e9"},1e5]}"#);
        assert_eq!(without_keys(b"[]", &|_| true).unwrap(), b"[]");
        assert_eq!(without_keys(br#"{"k":1}"#, &|_| true).unwrap(), b"{}");
    }

    #[test]
    fn refuses_what_serde_json_refuses() {
        let deep_ok = format!("{}{}", "[".repeat(127), "]".repeat(127));
        let deep_bad = format!("{}{}", "[".repeat(128), "]".repeat(128));
        assert!(serde_json::from_str::<serde_json::Value>(&deep_ok).is_ok());
        assert!(serde_json::from_str::<serde_json::Value>(&deep_bad).is_err());
        assert!(scan(deep_ok.as_bytes()).is_ok());
        assert!(scan(deep_bad.as_bytes()).is_err());
        for bad in [
            "",
            "{",
            "{\"a\":}",
            "{\"a\":1,}",
            "[1,]",
            "01",
            "1.",
            "-",
            "1e",
            "\"\\ud800\"",
            "\"\\udc00x\"",
            "\"a\u{1}\"",
            "{} x",
            "tru",
            "1e400",
            "-1e400",
            "\"\\x\"",
            "{\"a\" 1}",
            "nul",
        ] {
            assert!(serde_json::from_str::<serde_json::Value>(bad).is_err(), "serde accepts {bad:?}");
            assert!(scan(bad.as_bytes()).is_err(), "scan accepts {bad:?}");
        }
        for good in ["1e-400", "18446744073709551616", "-9223372036854775809", "0", "-0.0e+0", "[]", "{}"] {
            assert!(serde_json::from_str::<serde_json::Value>(good).is_ok(), "serde refuses {good:?}");
            assert!(scan(good.as_bytes()).is_ok(), "scan refuses {good:?}");
        }
        assert!(scan(b"\"\xff\"").is_err(), "invalid UTF-8 in a string");
        // The refusal says where the input stops being UTF-8.
        let bad = b"{\"user\":\"caf\xc3\xa9\",\"x\":\"\xe2\x82\"}";
        let err = scan(bad).err().map(|e| (e.at, e.what));
        assert_eq!(err, Some((21, "invalid UTF-8")));
    }

    /// Below the top object strings are skipped undecoded and plain numbers
    /// accepted unparsed: both must still refuse exactly what serde refuses.
    #[test]
    fn nested_values_are_held_to_the_same_rules() {
        let long = |digits: usize| format!("1{}", "0".repeat(digits - 1));
        let cases = [
            r#"{"d":{"k":"\ud800"}}"#.to_string(),
            r#"{"d":{"\udc00":1}}"#.to_string(),
            r#"{"d":["\ud83d\ude00","\u00e9\n\t\/"]}"#.to_string(),
            r#"{"d":{"k":"\q"}}"#.to_string(),
            r#"{"d":{"k":"a\"}}"#.to_string(),
            "{\"d\":[\"\u{1f}\"]}".to_string(),
            r#"{"d":[1e400,2]}"#.to_string(),
            r#"{"d":[-1E+308]}"#.to_string(),
            format!(r#"{{"d":[{}]}}"#, long(300)),
            format!(r#"{{"d":[{}]}}"#, long(308)),
            format!(r#"{{"d":[{}]}}"#, long(309)),
            format!(r#"{{"d":[{}]}}"#, long(310)),
            format!(r#"{{"d":[{}]}}"#, long(400)),
            format!(r#"{{"d":[-{}.5]}}"#, long(309)),
            format!(r#"{{"d":[0.{}]}}"#, long(400)),
            r#"{"d":[18446744073709551616,-9223372036854775809]}"#.to_string(),
        ];
        for raw in cases {
            let serde_ok = serde_json::from_str::<serde_json::Value>(&raw).is_ok();
            assert_eq!(scan(raw.as_bytes()).is_ok(), serde_ok, "{raw}");
        }
    }
}
