//! String rules of the reference evaluation: answer extraction, normalisation, exact match and
//! SQuAD F1, and how Python prints the values pandas parsed.

use regex::Regex;
use std::collections::HashMap;
use std::sync::LazyLock;

/// Whether Python's `str.isspace()` holds: Unicode White_Space plus the ASCII separators
/// U+001C..U+001F, which Python's `str.split()` also splits on.
fn py_space(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// Python's `str.strip()`.
pub fn py_strip(s: &str) -> &str {
    s.trim_matches(py_space)
}

/// Python's `str.split()` (runs of whitespace, no empty pieces).
fn py_split(s: &str) -> impl Iterator<Item = &str> {
    s.split(py_space).filter(|w| !w.is_empty())
}

fn is_ascii_punctuation(c: char) -> bool {
    c.is_ascii_punctuation()
}

/// The `exact_match` of HF `evaluate` with `ignore_case` and `ignore_punctuation`, as GSM and
/// BBH score: lower-cased, ASCII punctuation deleted, then compared whole (whitespace kept).
pub fn exact_match(prediction: &str, gold: &str) -> bool {
    let norm = |s: &str| -> String {
        // numpy's unicode arrays drop trailing NULs, and lower case one code point to one
        // (Unicode's simple mapping: "İ" → "i", where Python's str.lower gives "i̇").
        s.trim_end_matches('\0')
            .chars()
            .map(|c| c.to_lowercase().next().unwrap_or(c))
            .filter(|&c| !is_ascii_punctuation(c))
            .collect()
    };
    norm(prediction) == norm(gold)
}

/// SQuAD v1.1's `normalize_answer`: lower, drop ASCII punctuation, drop the articles a/an/the
/// (whole words), collapse whitespace.
pub fn squad_normalize(s: &str) -> String {
    static ARTICLES: LazyLock<Regex> = LazyLock::new(|| Regex::new(r"\b(a|an|the)\b").unwrap());
    let s: String = s
        .to_lowercase()
        .chars()
        .filter(|&c| !is_ascii_punctuation(c))
        .collect();
    let s = ARTICLES.replace_all(&s, " ");
    py_split(&s).collect::<Vec<_>>().join(" ")
}

/// SQuAD exact match of one prediction against one gold answer.
pub fn squad_exact(prediction: &str, gold: &str) -> bool {
    squad_normalize(prediction) == squad_normalize(gold)
}

/// SQuAD token F1 of one prediction against one gold answer.
pub fn squad_f1(prediction: &str, gold: &str) -> f64 {
    let (p, g) = (squad_normalize(prediction), squad_normalize(gold));
    let (p, g): (Vec<&str>, Vec<&str>) = (
        p.split(' ').filter(|w| !w.is_empty()).collect(),
        g.split(' ').filter(|w| !w.is_empty()).collect(),
    );
    let mut counts: HashMap<&str, usize> = HashMap::new();
    for w in &g {
        *counts.entry(w).or_default() += 1;
    }
    let mut same = 0;
    for w in &p {
        if let Some(n) = counts.get_mut(w).filter(|n| **n > 0) {
            *n -= 1;
            same += 1;
        }
    }
    if same == 0 {
        return 0.0;
    }
    let precision = same as f64 / p.len() as f64;
    let recall = same as f64 / g.len() as f64;
    2.0 * precision * recall / (precision + recall)
}

/// `re.sub(r"(\d),(\d)", r"\1\2", s)`: a comma between two digits goes (left to right, not
/// overlapping: "1,2,3" → "12,3").
pub fn drop_digit_commas(s: &str) -> String {
    static COMMA: LazyLock<Regex> = LazyLock::new(|| Regex::new(r"(\d),(\d)").unwrap());
    COMMA.replace_all(s, "${1}${2}").into_owned()
}

/// GSM's prediction: the last number in the output (commas between digits removed), or the
/// whole output when it has none.
pub fn gsm_prediction(output: &str) -> String {
    static NUMBER: LazyLock<Regex> = LazyLock::new(|| Regex::new(r"[-+]?\d*\.\d+|\d+").unwrap());
    let output = drop_digit_commas(output);
    match NUMBER.find_iter(&output).last() {
        Some(m) => m.as_str().to_string(),
        None => output,
    }
}

/// BBH's prediction: what follows the first "the answer is" up to the next period, stripped;
/// the stripped output when there is none.
pub fn bbh_prediction(output: &str) -> String {
    static ANSWER: LazyLock<Regex> =
        LazyLock::new(|| Regex::new(r"[t|T]he answer is (.*?)\.").unwrap());
    match ANSWER.captures(output) {
        Some(c) => py_strip(&c[1]).to_string(),
        None => py_strip(output).to_string(),
    }
}

/// How Python's `str()` prints a float: the shortest repr that reads back, with ".0" on whole
/// numbers and exponent notation below 1e-4 or from 1e16.
pub fn py_float(v: f64) -> String {
    if v.is_nan() {
        return "nan".into();
    }
    if v.is_infinite() {
        return if v > 0.0 { "inf" } else { "-inf" }.into();
    }
    if v == 0.0 {
        return if v.is_sign_negative() { "-0.0" } else { "0.0" }.into();
    }
    let exp = v.abs().log10().floor() as i32;
    // Rust's `{:e}` is also the shortest round-trip digits: "1.5e-5".
    let sci = format!("{v:e}");
    let (mantissa, e) = sci.split_once('e').expect("an exponent");
    let e: i32 = e.parse().expect("an integer exponent");
    if !(-4..16).contains(&exp) || !(-4..16).contains(&e) {
        let sign = if e < 0 { '-' } else { '+' };
        return format!("{mantissa}e{sign}{:02}", e.abs());
    }
    let plain = format!("{v}");
    if plain.contains('.') {
        plain
    } else {
        format!("{plain}.0")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_prints_floats_so() {
        for (v, want) in [
            (3.0, "3.0"),
            (0.5, "0.5"),
            (1000.0, "1000.0"),
            (1e-5, "1e-05"),
            (1e16, "1e+16"),
            (1.5e16, "1.5e+16"),
            (0.0001, "0.0001"),
            (123456789012345.6, "123456789012345.6"),
            (-2.25, "-2.25"),
            (0.1 + 0.2, "0.30000000000000004"),
        ] {
            assert_eq!(py_float(v), want);
        }
    }
}
