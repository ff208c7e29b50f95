//! Python's text, as transformers and bitsandbytes write it from Python: `repr(float)`, `json.dumps` (with
//! `ensure_ascii`, `indent=2`, `sort_keys`), and torch's dtype names. What makes config.json and the quant-state JSON
//! byte-identical to theirs.

use qlora_runtime::DType;
use serde_json::Value;
use std::fmt::Write as _;

/// `repr(float)` as Python (and so `json.dumps`) writes it: the shortest digits that round-trip, positional when the
/// decimal exponent is in [−4, 16), else `d.ddde±XX` with at least two exponent digits; integral values keep `.0`;
/// non-finite values as `json.dumps` spells them (`NaN`, `Infinity`).
pub fn py_float(v: f64) -> String {
    if v.is_nan() {
        return "NaN".into();
    }
    if v.is_infinite() {
        return if v > 0.0 { "Infinity" } else { "-Infinity" }.into();
    }
    // Rust's `{:e}` gives the same shortest round-trip digits as Python's repr, as `d.ddd e x`.
    let sci = format!("{:e}", v.abs());
    let (mantissa, exp) = sci.split_once('e').expect("{:e} always writes an exponent");
    let exp: i32 = exp.parse().expect("{:e} writes an integer exponent");
    let digits: String = mantissa.chars().filter(|c| *c != '.').collect();
    let sign = if v.is_sign_negative() { "-" } else { "" };
    if !(-4..16).contains(&exp) {
        let (first, rest) = digits.split_at(1);
        let frac = if rest.is_empty() { String::new() } else { format!(".{rest}") };
        let esign = if exp < 0 { '-' } else { '+' };
        return format!("{sign}{first}{frac}e{esign}{:02}", exp.abs());
    }
    if exp < 0 {
        return format!("{sign}0.{}{digits}", "0".repeat((-exp - 1) as usize));
    }
    let int_len = exp as usize + 1;
    if digits.len() <= int_len {
        format!("{sign}{digits}{}.0", "0".repeat(int_len - digits.len()))
    } else {
        format!("{sign}{}.{}", &digits[..int_len], &digits[int_len..])
    }
}

/// A JSON string as `json.dumps` writes it (`ensure_ascii=True`): `"` and `\` escaped, the usual short escapes, every
/// other character outside printable ASCII as `\uXXXX` (UTF-16 units, lower-case hex).
pub(super) fn py_str(s: &str, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            ' '..='~' => out.push(c),
            _ => {
                for unit in c.encode_utf16(&mut [0u16; 2]) {
                    let _ = write!(out, "\\u{unit:04x}");
                }
            }
        }
    }
    out.push('"');
}

/// `json.dumps(v, indent=2, sort_keys=True)` (how transformers writes config.json, before its trailing newline).
/// Integers stay integers and floats keep Python's repr, so a config written by Python comes back unchanged.
pub fn py_json_pretty(v: &Value) -> String {
    fn dump(v: &Value, depth: usize, out: &mut String) {
        let pad = |out: &mut String, d: usize| out.extend(std::iter::repeat_n(' ', 2 * d));
        match v {
            Value::Null => out.push_str("null"),
            Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
            Value::Number(n) => match (n.as_i64(), n.as_u64(), n.as_f64()) {
                (Some(i), _, _) => out.push_str(&i.to_string()),
                (_, Some(u), _) => out.push_str(&u.to_string()),
                (_, _, f) => out.push_str(&py_float(f.unwrap_or(f64::NAN))),
            },
            Value::String(s) => py_str(s, out),
            Value::Array(items) if items.is_empty() => out.push_str("[]"),
            Value::Object(map) if map.is_empty() => out.push_str("{}"),
            Value::Array(items) => {
                out.push_str("[\n");
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push_str(",\n");
                    }
                    pad(out, depth + 1);
                    dump(item, depth + 1, out);
                }
                out.push('\n');
                pad(out, depth);
                out.push(']');
            }
            Value::Object(map) => {
                // sort_keys: Python orders str keys by code point, which is UTF-8 byte order.
                let mut keys: Vec<&String> = map.keys().collect();
                keys.sort();
                out.push_str("{\n");
                for (i, key) in keys.into_iter().enumerate() {
                    if i > 0 {
                        out.push_str(",\n");
                    }
                    pad(out, depth + 1);
                    py_str(key, out);
                    out.push_str(": ");
                    dump(&map[key], depth + 1, out);
                }
                out.push('\n');
                pad(out, depth);
                out.push('}');
            }
        }
    }
    let mut out = String::new();
    dump(v, 0, &mut out);
    out
}

/// torch's name of a dtype as bnb writes it (`str(torch.float32).strip("torch.")`).
pub(super) fn torch_dtype_name(d: DType) -> &'static str {
    match d {
        DType::F64 => "float64",
        DType::F32 => "float32",
        DType::BF16 => "bfloat16",
        DType::F16 => "float16",
        DType::I32 => "int32",
        DType::U8 => "uint8",
    }
}
