//! The Slurm backend: one job array, one task per point, each running `prolora sweep task`,
//! which starts, resumes or skips its point, so a requeue or a pre-emption reruns the same
//! command. `exec` makes prolora the batch step itself, so the signals Slurm sends (SIGTERM on
//! requeue and pre-emption, SIGUSR1 from `--signal` before the time limit) reach it and it
//! checkpoints before it is killed.

use super::Sweep;
use anyhow::{bail, Context, Result};
use std::path::Path;
use std::process::Command;

/// Seconds before the time limit at which Slurm sends SIGUSR1: time to finish a step and write
/// a checkpoint of a 7B run.
const WARNING_SECONDS: u32 = 300;

/// The array script for `sweep` in `dir`, running `exe`, with the user's `slurm_args`.
pub fn array_script(
    sweep: &Sweep,
    dir: &Path,
    exe: &Path,
    slurm_args: &[String],
) -> Result<String> {
    let dir_text = plain("--out", &dir.display().to_string())?;
    let workdir = plain(
        "the working directory",
        &sweep.workdir.display().to_string(),
    )?;
    let exe = plain("the prolora binary", &exe.display().to_string())?;
    for arg in slurm_args {
        plain("--slurm-args", arg)?;
    }
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "sweep".into());
    let mut s = String::from("#!/bin/bash\n");
    s.push_str("# Written by `prolora sweep --backend slurm`; one array task per grid point.\n");
    let mut directive = |d: String| s.push_str(&format!("#SBATCH {d}\n"));
    directive(format!("--job-name=prolora-{name}"));
    directive(format!(
        "--array=0-{}",
        sweep.points.len().saturating_sub(1)
    ));
    directive("--requeue".into());
    directive("--open-mode=append".into());
    directive(format!("--signal=B:USR1@{WARNING_SECONDS}"));
    directive(format!("--output={dir_text}/slurm/%A_%a.out"));
    directive(format!("--chdir={workdir}"));
    for arg in slurm_args {
        directive(arg.clone());
    }
    s.push_str(&format!(
        "exec {} sweep task {} --index \"$SLURM_ARRAY_TASK_ID\"\n",
        shell_quote(&exe),
        shell_quote(&dir_text)
    ));
    Ok(s)
}

/// `value` as it is, refused when it holds a control character: a newline would end its
/// `#SBATCH` or `exec` line and start a shell line of its own, which no quoting of a directive
/// prevents.
fn plain(what: &str, value: &str) -> Result<String> {
    if value.chars().any(char::is_control) {
        bail!("{what} {value:?}: holds a control character (a newline?), which a Slurm script cannot carry; pick a name without one");
    }
    Ok(value.to_string())
}

fn shell_quote(s: &str) -> String {
    if s.bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"/._-=,+".contains(&b))
    {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

/// `--slurm-args "--partition=gpu --gres=gpu:1"` as separate arguments (quotes group words).
pub fn split_args(s: &str) -> Result<Vec<String>> {
    let (mut out, mut word, mut quote, mut any) = (Vec::new(), String::new(), None, false);
    for c in s.chars() {
        match (c, quote) {
            ('"' | '\'', None) => {
                quote = Some(c);
                any = true;
            }
            (c, Some(q)) if c == q => quote = None,
            (c, None) if c.is_whitespace() => {
                if any {
                    out.push(std::mem::take(&mut word));
                    any = false;
                }
            }
            (c, _) => {
                word.push(c);
                any = true;
            }
        }
    }
    if quote.is_some() {
        bail!("--slurm-args {s:?}: a quote is not closed");
    }
    if any {
        out.push(word);
    }
    for arg in &out {
        if arg.starts_with("--array") || arg.starts_with("--output") || arg.starts_with("--chdir") {
            bail!("--slurm-args {arg}: the sweep sets this itself (one task per point, logs under --out)");
        }
        if !arg.starts_with('-') {
            bail!("--slurm-args {arg}: not an sbatch option (e.g. --partition=gpu --gres=gpu:1 --time=24:00:00)");
        }
    }
    Ok(out)
}

/// Writes the array script into `dir/slurm/` and submits it; returns the job id.
pub fn submit(sweep: &Sweep, dir: &Path, slurm_args: &[String]) -> Result<String> {
    let exe = std::env::current_exe().context("cannot find the prolora binary")?;
    let slurm_dir = dir.join("slurm");
    std::fs::create_dir_all(&slurm_dir)
        .with_context(|| format!("cannot create {}", slurm_dir.display()))?;
    let script = slurm_dir.join("array.sh");
    crate::atomic::write(
        &script,
        array_script(sweep, dir, &exe, slurm_args)?.as_bytes(),
    )?;
    let out = Command::new("sbatch")
        .arg("--parsable")
        .arg(&script)
        .output()
        .context("cannot run sbatch: is this a Slurm login node (sbatch on PATH)? Or use --backend local")?;
    if !out.status.success() {
        bail!(
            "sbatch refused {}: {}",
            script.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let id = text.trim().split(';').next().unwrap_or("").to_string();
    if id.is_empty() {
        bail!("sbatch printed no job id for {}", script.display());
    }
    Ok(id)
}

/// `squeue`'s lines for `job` (state of each task still queued or running), or None where
/// squeue is not available.
pub fn queue(job: &str) -> Option<Vec<String>> {
    let out = Command::new("squeue")
        .args(["-h", "-r", "-j", job, "-o", "%i %T %M %R"])
        .output()
        .ok()?;
    out.status.success().then(|| {
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_string)
            .collect()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sweep::{grid, Axis};

    #[test]
    fn the_array_script_is_exactly_this() {
        let grid: Vec<Axis> = vec![
            "optim.lr=1e-4,2e-4".parse().unwrap(),
            "seed=1,2".parse().unwrap(),
        ];
        let dir = Path::new("/scratch/sweeps/superni");
        let sweep = Sweep {
            config: "/home/me/configs/superni.toml".into(),
            config_sha256: String::new(),
            workdir: "/home/me".into(),
            sets: vec![],
            points: grid::points(&grid, &dir.join("runs")),
            grid,
            slurm_job: None,
            evaluate: None,
        };
        let args = split_args("--partition=gpu --gres=gpu:1 '--time=24:00:00'").unwrap();
        let script =
            array_script(&sweep, dir, Path::new("/opt/prolora/bin/prolora"), &args).unwrap();
        assert_eq!(
            script,
            "#!/bin/bash\n\
             # Written by `prolora sweep --backend slurm`; one array task per grid point.\n\
             #SBATCH --job-name=prolora-superni\n\
             #SBATCH --array=0-3\n\
             #SBATCH --requeue\n\
             #SBATCH --open-mode=append\n\
             #SBATCH --signal=B:USR1@300\n\
             #SBATCH --output=/scratch/sweeps/superni/slurm/%A_%a.out\n\
             #SBATCH --chdir=/home/me\n\
             #SBATCH --partition=gpu\n\
             #SBATCH --gres=gpu:1\n\
             #SBATCH --time=24:00:00\n\
             exec /opt/prolora/bin/prolora sweep task /scratch/sweeps/superni --index \"$SLURM_ARRAY_TASK_ID\"\n"
        );
    }

    #[test]
    fn a_newline_in_a_path_never_reaches_the_script() {
        let sweep = Sweep {
            config: "/c.toml".into(),
            config_sha256: String::new(),
            workdir: "/home/me".into(),
            sets: vec![],
            points: vec![],
            grid: vec![],
            slurm_job: None,
            evaluate: None,
        };
        let exe = Path::new("/bin/prolora");
        let dir = Path::new("/s/x\ntouch pwned");
        let err = array_script(&sweep, dir, exe, &[]).unwrap_err().to_string();
        assert!(
            err.starts_with("--out ") && err.contains("control character"),
            "{err}"
        );
        let args = ["--comment=a\nrm -rf ~".to_string()];
        let err = array_script(&sweep, Path::new("/s/x"), exe, &args).unwrap_err();
        assert!(err.to_string().starts_with("--slurm-args"), "{err}");
    }

    #[test]
    fn slurm_args_the_sweep_owns_are_refused() {
        assert!(split_args("--array=0-9")
            .unwrap_err()
            .to_string()
            .contains("sets this itself"));
        assert!(split_args("gpu")
            .unwrap_err()
            .to_string()
            .contains("not an sbatch option"));
        assert!(split_args("'--x").is_err());
        assert_eq!(split_args("  ").unwrap(), Vec::<String>::new());
    }
}
