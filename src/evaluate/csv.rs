//! MMLU's CSV files as `pandas.read_csv(path, header=None)` reads them and `str()` prints the
//! cells: each column gets one inferred type, so an integer in a column with decimals prints as
//! "3.0", a missing value (`None`, `NA`, an empty field, …) as "nan", and a column of booleans
//! as "True"/"False".

use super::text::py_float;
use anyhow::{bail, Result};
use regex::Regex;
use std::path::Path;
use std::sync::LazyLock;

/// pandas' default missing-value strings (matched on the whole cell, quoted or not).
const NA: [&str; 19] = [
    "", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN",
    "<NA>", "N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null",
];

/// The fields of each record: RFC 4180 quoting (doubled quotes, newlines inside quotes),
/// blank lines skipped as pandas skips them.
fn records(text: &str, path: &Path) -> Result<Vec<Vec<String>>> {
    let mut rows = Vec::new();
    let (mut row, mut field) = (Vec::new(), String::new());
    let (mut quoted, mut was_quoted) = (false, false);
    let mut chars = text.chars().peekable();
    let mut line = 1;
    let end_row = |row: &mut Vec<String>,
                   field: &mut String,
                   rows: &mut Vec<Vec<String>>,
                   was_quoted: bool| {
        if !(row.is_empty() && field.is_empty() && !was_quoted) {
            row.push(std::mem::take(field));
            rows.push(std::mem::take(row));
        }
    };
    while let Some(c) = chars.next() {
        match (quoted, c) {
            (true, '"') if chars.peek() == Some(&'"') => {
                chars.next();
                field.push('"');
            }
            (true, '"') => quoted = false,
            (true, c) => {
                line += usize::from(c == '\n');
                field.push(c);
            }
            (false, '"') if field.is_empty() => (quoted, was_quoted) = (true, true),
            (false, ',') => {
                row.push(std::mem::take(&mut field));
                was_quoted = false;
            }
            (false, '\r') if chars.peek() == Some(&'\n') => {}
            (false, '\n') => {
                end_row(&mut row, &mut field, &mut rows, was_quoted);
                was_quoted = false;
                line += 1;
            }
            (false, c) => field.push(c),
        }
    }
    if quoted {
        bail!("{}:{line}: a quoted field is not closed", path.display());
    }
    end_row(&mut row, &mut field, &mut rows, was_quoted);
    Ok(rows)
}

/// The cells of a CSV file as pandas renders them, row by row.
pub fn read_rendered(path: &Path) -> Result<Vec<Vec<String>>> {
    let rows = records(&super::read(path)?, path)?;
    let width = rows.first().map_or(0, Vec::len);
    if let Some(n) = rows.iter().position(|r| r.len() != width) {
        bail!(
            "{}: record {} has {} fields, the first has {width}",
            path.display(),
            n + 1,
            rows[n].len()
        );
    }
    let mut out = vec![Vec::with_capacity(width); rows.len()];
    for c in 0..width {
        let column: Vec<&str> = rows.iter().map(|r| r[c].as_str()).collect();
        for (r, cell) in render_column(&column).into_iter().enumerate() {
            out[r].push(cell);
        }
    }
    Ok(out)
}

/// One column's cells as pandas' inferred dtype prints them.
fn render_column(cells: &[&str]) -> Vec<String> {
    static INT: LazyLock<Regex> = LazyLock::new(|| Regex::new(r"^[+-]?[0-9]+$").unwrap());
    static FLOAT: LazyLock<Regex> = LazyLock::new(|| {
        Regex::new(r"^[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?$").unwrap()
    });
    let na = |c: &str| NA.contains(&c);
    let present: Vec<&str> = cells.iter().copied().filter(|c| !na(c)).collect();
    let has_na = present.len() < cells.len();
    let bool_of = |c: &str| match c {
        "True" | "TRUE" | "true" => Some("True"),
        "False" | "FALSE" | "false" => Some("False"),
        _ => None,
    };
    let ints = present
        .iter()
        .all(|c| INT.is_match(c) && c.trim_start_matches(['+', '-']).len() < 19);
    let floats = present.iter().all(|c| FLOAT.is_match(c));
    cells
        .iter()
        .map(|&c| {
            if na(c) {
                "nan".to_string()
            } else if ints && !has_na {
                c.parse::<i64>()
                    .map_or_else(|_| c.to_string(), |v| v.to_string())
            } else if floats {
                c.parse::<f64>().map_or_else(|_| c.to_string(), py_float)
            } else if present.iter().all(|c| bool_of(c).is_some()) {
                bool_of(c).unwrap_or(c).to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_render_as_their_inferred_type() {
        // int, float (a decimal), float (a missing value), bool, text with a missing value;
        // the expected cells are what pandas 2.3.3 prints for this file.
        let text = "q1,3,1,7,TRUE,x\n\"q, \"\"2\"\"\",4,2.5,None,false,None\n\n\"q3\nline\",+5,0,8,True,y\n";
        let rows = records(text, Path::new("t.csv")).unwrap();
        assert_eq!(rows.len(), 3);
        assert_eq!(rows[1][0], "q, \"2\"");
        assert_eq!(rows[2][0], "q3\nline");
        let col = |c: usize| render_column(&rows.iter().map(|r| r[c].as_str()).collect::<Vec<_>>());
        assert_eq!(col(1), ["3", "4", "5"]);
        assert_eq!(col(2), ["1.0", "2.5", "0.0"]);
        assert_eq!(col(3), ["7.0", "nan", "8.0"]);
        assert_eq!(col(4), ["True", "False", "True"]);
        assert_eq!(col(5), ["x", "nan", "y"]);
    }
}
