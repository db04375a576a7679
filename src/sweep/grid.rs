//! The grid: `--grid key=v1,v2` axes, their cartesian product, and a name per point.

use super::Point;
use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::path::Path;

/// One `--grid key=v1,v2,…`: a config key and the values it takes (as `--set` reads them).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Axis {
    pub key: String,
    pub values: Vec<String>,
}

impl fmt::Display for Axis {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}={}", self.key, self.values.join(","))
    }
}

impl std::str::FromStr for Axis {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        let Some((key, values)) = s.split_once('=') else {
            bail!("--grid {s}: expected key=value1,value2,… (e.g. --grid optim.lr=1e-4,2e-4)");
        };
        let key = key.trim().to_string();
        let values = split_top_level(values);
        if key.is_empty() || values.iter().any(|v| v.is_empty()) {
            bail!("--grid {s}: a key and non-empty values are needed (e.g. --grid seed=1,2,3)");
        }
        Ok(Axis { key, values })
    }
}

/// `a,[1,2],"x,y"` → `a`, `[1,2]`, `"x,y"`: commas inside brackets or quotes belong to a value.
fn split_top_level(s: &str) -> Vec<String> {
    let (mut out, mut current, mut depth, mut quote) = (Vec::new(), String::new(), 0i32, None);
    for c in s.chars() {
        match (c, quote) {
            ('"' | '\'', None) => quote = Some(c),
            (c, Some(q)) if c == q => quote = None,
            ('[' | '{', None) => depth += 1,
            (']' | '}', None) => depth -= 1,
            (',', None) if depth == 0 => {
                out.push(std::mem::take(&mut current).trim().to_string());
                continue;
            }
            _ => {}
        }
        current.push(c);
    }
    out.push(current.trim().to_string());
    out
}

/// Refuses a grid that cannot mean what it says.
pub fn check(grid: &[Axis], sets: &[String]) -> Result<()> {
    if grid.is_empty() {
        bail!("a sweep needs at least one --grid key=values");
    }
    for (i, axis) in grid.iter().enumerate() {
        if axis.key == "output_dir" {
            bail!(
                "--grid output_dir: the sweep gives every point its own run directory under --out"
            );
        }
        if grid[..i].iter().any(|a| a.key == axis.key) {
            bail!(
                "--grid {}: the key is given twice; put all its values in one --grid",
                axis.key
            );
        }
        for (k, v) in axis.values.iter().enumerate() {
            if axis.values[..k].contains(v) {
                bail!("--grid {}: the value {v} is listed twice", axis.key);
            }
        }
        if let Some(set) = sets
            .iter()
            .find(|s| s.split('=').next().map(str::trim) == Some(&axis.key))
        {
            bail!(
                "--grid {} conflicts with --set {set}: a key is either swept or fixed",
                axis.key
            );
        }
    }
    for set in sets {
        if set.split('=').next().map(str::trim) == Some("output_dir") {
            bail!("--set {set}: the sweep gives every point its own run directory under --out");
        }
    }
    Ok(())
}

/// The cartesian product of `grid`, the last axis varying fastest; each point's run directory
/// is named by its values (`optim.lr=1e-4,seed=1`).
pub fn points(grid: &[Axis], runs: &Path) -> Vec<Point> {
    let mut combos: Vec<Vec<String>> = vec![Vec::new()];
    for axis in grid {
        combos = combos
            .into_iter()
            .flat_map(|c| {
                axis.values.iter().map(move |v| {
                    let mut c = c.clone();
                    c.push(format!("{}={v}", axis.key));
                    c
                })
            })
            .collect();
    }
    let mut names: Vec<String> = Vec::new();
    combos
        .into_iter()
        .enumerate()
        .map(|(index, overrides)| {
            let mut name: String = overrides
                .join(",")
                .chars()
                .map(|c| {
                    if c.is_ascii_alphanumeric() || "._=,+-".contains(c) {
                        c
                    } else {
                        '_'
                    }
                })
                .collect();
            if names.contains(&name) {
                name = format!("{name}-{index}");
            }
            names.push(name.clone());
            Point {
                index,
                run_dir: runs.join(&name),
                name,
                overrides,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn axis(s: &str) -> Axis {
        s.parse().unwrap()
    }

    #[test]
    fn the_grid_is_the_cartesian_product_last_axis_fastest() {
        let grid = [axis("optim.lr=1e-4,2e-4"), axis("seed=1,2,3")];
        let points = points(&grid, Path::new("/s/runs"));
        let names: Vec<&str> = points.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "optim.lr=1e-4,seed=1",
                "optim.lr=1e-4,seed=2",
                "optim.lr=1e-4,seed=3",
                "optim.lr=2e-4,seed=1",
                "optim.lr=2e-4,seed=2",
                "optim.lr=2e-4,seed=3"
            ]
        );
        assert_eq!(points[4].overrides, ["optim.lr=2e-4", "seed=2"]);
        assert_eq!(points[4].run_dir, Path::new("/s/runs/optim.lr=2e-4,seed=2"));
        assert_eq!(points[4].index, 4);
    }

    #[test]
    fn values_keep_their_inner_commas() {
        let a = axis("optim.betas=[0.9,0.99],[0.9,0.999]");
        assert_eq!(a.values, ["[0.9,0.99]", "[0.9,0.999]"]);
        let a = axis("adapter.targets=[\"q_proj\",\"v_proj\"],\"x,y\"");
        assert_eq!(a.values, ["[\"q_proj\",\"v_proj\"]", "\"x,y\""]);
        let names: Vec<String> = points(&[a], Path::new("r"))
            .into_iter()
            .map(|p| p.name)
            .collect();
        assert_eq!(
            names,
            [
                "adapter.targets=__q_proj_,_v_proj__",
                "adapter.targets=_x,y_"
            ]
        );
    }

    #[test]
    fn a_grid_that_cannot_mean_what_it_says_is_refused() {
        let err = |grid: &[&str], sets: &[&str]| {
            let grid: Vec<Axis> = grid.iter().map(|g| axis(g)).collect();
            let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
            check(&grid, &sets).unwrap_err().to_string()
        };
        assert!(err(&["optim.lr=1,2"], &["optim.lr=3"]).contains("conflicts with --set optim.lr=3"));
        assert!(err(&["seed=1", "seed=2"], &[]).contains("given twice"));
        assert!(err(&["seed=1,1"], &[]).contains("listed twice"));
        assert!(err(&["output_dir=a,b"], &[]).contains("own run directory"));
        assert!(err(&[], &[]).contains("at least one --grid"));
        assert!("seed"
            .parse::<Axis>()
            .unwrap_err()
            .to_string()
            .contains("key=value1,value2"));
        assert!("seed=1,,2".parse::<Axis>().is_err());
    }
}
