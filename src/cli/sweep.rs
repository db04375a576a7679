//! `prolora sweep`: a grid of runs, here or as a Slurm job array.

use super::choices;
use anyhow::{bail, Result};
use clap::{Args, Subcommand};
use std::path::PathBuf;

#[derive(Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct SweepArgs {
    #[command(subcommand)]
    pub action: Option<SweepAction>,
    /// The base config of every point.
    #[arg(long, required = true)]
    pub config: Option<PathBuf>,
    /// A swept key and its values, e.g. `--grid optim.lr=1e-4,2e-4 --grid seed=1,2,3`; the
    /// points are the cartesian product.
    #[arg(long = "grid", value_name = "KEY=V1,V2,…", required = true)]
    pub grid: Vec<crate::sweep::Axis>,
    /// A key fixed for every point (as `train --set`).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub overrides: Vec<String>,
    /// The sweep directory (sweep.json, runs/<point>/, logs).
    #[arg(long, required = true)]
    pub out: Option<PathBuf>,
    /// Where the points run.
    #[arg(long, default_value = "local", value_parser = choices::<Backend>(Backend::NAMES))]
    pub backend: Backend,
    /// Local backend: points at a time (default: one per GPU, one on a CPU machine).
    #[arg(long, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    pub jobs: Option<usize>,
    /// Slurm backend: sbatch options for every task, e.g. "--partition=gpu --gres=gpu:1 --time=24:00:00".
    #[arg(long, default_value = "", allow_hyphen_values = true)]
    pub slurm_args: String,
    /// Print the points (and the Slurm script) without running or submitting anything.
    #[arg(long)]
    pub dry_run: bool,
    /// Evaluate each point once it has trained: benchmarks (mmlu,gsm,… or all), results in
    /// RUN/eval/<benchmark>.json and in `prolora collect`'s table.
    #[arg(long, value_name = "BENCHMARKS")]
    pub evaluate: Option<String>,
    /// With --evaluate: open-instruct's evaluation data layout.
    #[arg(long, requires = "evaluate")]
    pub eval_data_dir: Option<PathBuf>,
    /// With --evaluate humaneval: run the model's code (sandboxed python3).
    #[arg(long, requires = "evaluate")]
    pub allow_code_execution: bool,
}

crate::choice::named_enum! {
/// Where the points of a sweep run.
pub enum Backend {
    /// On this machine.
    Local = "local",
    /// As a Slurm job array (sbatch).
    Slurm = "slurm",
}
}

#[derive(Subcommand)]
pub enum SweepAction {
    /// Per point: pending, running, interrupted, failed or finished, the step and last loss.
    Status {
        /// The sweep directory.
        dir: PathBuf,
        /// One JSON array on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Run one point to its end (start, resume or skip): what each array task runs.
    #[command(hide = true)]
    Task {
        dir: PathBuf,
        /// The point; default $SLURM_ARRAY_TASK_ID.
        #[arg(long)]
        index: Option<usize>,
        /// No progress lines (array scripts of older sweeps, which a requeue reruns, pass it).
        #[arg(long)]
        quiet: bool,
    },
}

pub(super) fn run(args: SweepArgs) -> Result<()> {
    use crate::sweep::{local, slurm, status, Sweep};
    match args.action {
        Some(SweepAction::Status { dir, json }) => {
            let sweep = Sweep::read(&dir)?;
            let statuses = status::of(&dir, &sweep);
            if json {
                crate::to_stdout!("{}", status::json(&statuses));
            } else {
                crate::console::write_out(format_args!("{}", status::table(&statuses)));
                if let Some(job) = &sweep.slurm_job {
                    match slurm::queue(job) {
                        Some(lines) if lines.is_empty() => {
                            crate::to_stdout!("slurm job {job}: no task queued or running")
                        }
                        Some(lines) => crate::to_stdout!("slurm job {job}:\n{}", lines.join("\n")),
                        None => crate::to_stdout!("slurm job {job} (squeue not available here)"),
                    }
                }
            }
            return Ok(());
        }
        Some(SweepAction::Task { dir, index, quiet }) => {
            let index = match index {
                Some(i) => i,
                None => std::env::var("SLURM_ARRAY_TASK_ID")
                    .ok()
                    .and_then(|v| v.parse().ok())
                    .ok_or_else(|| {
                        anyhow::anyhow!(
                            "sweep task: pass --index (or run it as a Slurm array task)"
                        )
                    })?,
            };
            return crate::sweep::run_task(&dir, index, !quiet);
        }
        None => {}
    }
    let (config, out) = (
        args.config.expect("clap requires --config"),
        args.out.expect("clap requires --out"),
    );
    let slurm_args = slurm::split_args(&args.slurm_args)?;
    if args.backend == Backend::Local && !slurm_args.is_empty() {
        bail!("--slurm-args applies to --backend slurm only");
    }
    let mut plan = Sweep::plan(&config, &args.overrides, args.grid, &out)?;
    if let Some(benchmarks) = &args.evaluate {
        plan.evaluate = Some(crate::sweep::Evaluation::new(
            benchmarks,
            args.eval_data_dir.clone(),
            args.allow_code_execution,
        )?);
    }
    if args.dry_run {
        for p in &plan.points {
            crate::to_stdout!(
                "{}\t{}\t{}",
                p.index,
                p.overrides.join(" "),
                p.run_dir.display()
            );
        }
        if args.backend == Backend::Slurm {
            let exe = std::env::current_exe()?;
            crate::console::write_out(format_args!(
                "{}",
                slurm::array_script(&plan, &std::path::absolute(&out)?, &exe, &slurm_args)?
            ));
        }
        return Ok(());
    }
    let _owner = crate::sweep::own(&out)?;
    let mut sweep = plan.open(&out)?;
    let dir = std::path::absolute(&out)?;
    match args.backend {
        Backend::Local => {
            let gpus = crate::device::gpu_count();
            let jobs = args.jobs.unwrap_or(gpus.max(1));
            local::run(&dir, &sweep, jobs, gpus)?;
            crate::to_stderr!(
                "sweep done: `prolora collect {}` for the table",
                dir.display()
            );
        }
        Backend::Slurm => {
            if args.jobs.is_some() {
                bail!("--jobs applies to --backend local only (Slurm runs the tasks as it schedules them)");
            }
            if let Some(job) = &sweep.slurm_job {
                if slurm::queue(job).is_some_and(|lines| !lines.is_empty()) {
                    crate::to_stderr!("{}: job {job} is still queued or running; `prolora sweep status {}` follows it", dir.display(), dir.display());
                    return Ok(());
                }
            }
            let job = slurm::submit(&sweep, &dir, &slurm_args)?;
            sweep.slurm_job = Some(job.clone());
            sweep.write(&dir)?;
            crate::to_stdout!("{job}");
            crate::to_stderr!(
                "submitted job {job}: {} array tasks; `prolora sweep status {}` follows them",
                sweep.points.len(),
                dir.display()
            );
        }
    }
    Ok(())
}
