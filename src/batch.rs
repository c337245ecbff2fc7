//! Splits a batch body into its publish objects, without parsing them:
//! either a JSON array (top-level elements) or NDJSON (one object a line).
//!
//! Splitting first lets every item be size-checked "as received" and parsed
//! on its own, so one bad item gets its own error while the others proceed.
//! The array scanner tracks only nesting, strings and escapes.

use crate::protocol::InvalidInput;

/// Most items one batch (or one stream frame) may carry.
pub const MAX_ITEMS: usize = 1000;

/// Splits `body` into item slices (trimmed; blank NDJSON lines skipped).
pub fn split(body: &[u8]) -> Result<Vec<&[u8]>, InvalidInput> {
    let trimmed = body.trim_ascii();
    let items = if trimmed.first() == Some(&b'[') {
        split_array(trimmed)?
    } else {
        // Stops one past the cap: a body of a million lines is not collected
        // first. Newlines are found with memchr (SIMD), not byte by byte.
        let mut start = 0;
        memchr::memchr_iter(b'\n', trimmed)
            .chain(std::iter::once(trimmed.len()))
            .map(|end| std::mem::replace(&mut start, end + 1)..end)
            .map(|r| trimmed[r].trim_ascii())
            .filter(|l| !l.is_empty())
            .take(MAX_ITEMS + 1)
            .collect()
    };
    if items.len() > MAX_ITEMS {
        return Err(InvalidInput::new("too_many_items", format!("a batch holds at most {MAX_ITEMS} items")));
    }
    Ok(items)
}

fn split_array(body: &[u8]) -> Result<Vec<&[u8]>, InvalidInput> {
    let bad = || InvalidInput::new("invalid_json", "the batch is not a well-formed JSON array");
    let mut items = Vec::new();
    let mut depth = 0usize;
    let mut in_str = false;
    let mut escaped = false;
    let mut start = 1;
    let mut closed_at = None;
    for (i, &b) in body.iter().enumerate().skip(1) {
        if in_str {
            match (escaped, b) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_str = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_str = true,
            b'{' | b'[' => depth += 1,
            b'}' | b']' if depth > 0 => depth -= 1,
            b']' => {
                push_item(&mut items, &body[start..i], true)?;
                closed_at = Some(i);
                break;
            }
            b'}' => return Err(bad()),
            b',' if depth == 0 => {
                push_item(&mut items, &body[start..i], false)?;
                start = i + 1;
            }
            _ => {}
        }
        if items.len() > MAX_ITEMS {
            break;
        }
    }
    match closed_at {
        Some(end) if body[end + 1..].trim_ascii().is_empty() => Ok(items),
        _ if items.len() > MAX_ITEMS => Ok(items),
        _ => Err(bad()),
    }
}

fn push_item<'a>(items: &mut Vec<&'a [u8]>, raw: &'a [u8], last: bool) -> Result<(), InvalidInput> {
    let item = raw.trim_ascii();
    if item.is_empty() {
        // `[]` is an empty batch; `[a,,b]` or `[a,]` is malformed.
        if last && items.is_empty() {
            return Ok(());
        }
        return Err(InvalidInput::new("invalid_json", "empty element in the batch array"));
    }
    items.push(item);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_arrays_respecting_strings_and_nesting() {
        let body = br#" [ {"a":"x,]}"}, {"b":[1,2,{"c":"\"]"}]} ,{"d":1}] "#;
        let items = split(body).unwrap();
        assert_eq!(items.len(), 3);
        assert_eq!(items[0], br#"{"a":"x,]}"}"#);
        assert_eq!(items[2], br#"{"d":1}"#);
    }

    #[test]
    fn splits_ndjson() {
        let items = split(b"{\"a\":1}\n\n  {\"b\":2}\r\n{oops\n").unwrap();
        assert_eq!(items, vec![&b"{\"a\":1}"[..], b"{\"b\":2}", b"{oops"]);
    }

    #[test]
    fn rejects_malformed_arrays() {
        assert!(split(b"[{\"a\":1}").is_err());
        assert!(split(b"[{\"a\":1},]").is_err());
        assert!(split(b"[1,,2]").is_err());
        assert!(split(b"[1] trailing").is_err());
        assert!(split(b"[}").is_err());
        assert_eq!(split(b"[]").unwrap().len(), 0);
    }

    #[test]
    fn caps_item_count() {
        let body = format!("[{}]", vec!["{}"; MAX_ITEMS + 1].join(","));
        assert_eq!(split(body.as_bytes()).unwrap_err().code, "too_many_items");
        let nd = vec!["{}"; MAX_ITEMS].join("\n");
        assert_eq!(split(nd.as_bytes()).unwrap().len(), MAX_ITEMS);
    }
}
