use clap::Parser;

/// Training allocates and frees many activation-sized buffers per step. glibc returns large
/// ones to the kernel at once (mmap/munmap), and faulting the pages back in cost about 45 % of
/// a CPU step in profiles; keeping freed memory in the heap removes that. The trim threshold
/// stays modest (128 MiB) so the heap does not hoard: it kept a 7B step under 5 GiB.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn keep_freed_memory() {
    // SAFETY: mallopt only adjusts allocator thresholds; called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20); // glibc's maximum
        libc::mallopt(libc::M_TRIM_THRESHOLD, 128 << 20);
        libc::mallopt(libc::M_TOP_PAD, 16 << 20);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn keep_freed_memory() {}

/// candle runs elementwise ops on a pool of its own whose idle workers spin for about a
/// millisecond, and GEMMs on rayon's. On few cores the spinning worker holds the core that the
/// next GEMM's second half needs, and the half runs late, after the first: profiles showed the
/// step's big GEMMs on one thread. Parking it sooner (unless the user set the knob) and driving
/// the work from inside rayon's pool (so a GEMM's first half runs on this thread, not after a
/// hand-off) took a 2-thread step from 0.36 to about 0.31 s.
///
/// candle also asks for its thread count at every CPU matmul, and without `RAYON_NUM_THREADS`
/// that parses /proc/cpuinfo (num_cpus' physical cores): 130 reads of it per decoded token of
/// a 30-layer model, a tenth of the decoding time in profiles. The count is settled once here,
/// as candle would choose it.
fn configure_threads() -> rayon::ThreadPool {
    if std::env::var_os("CANDLE_BARRIER_POOL_SPIN_LIMIT").is_none() {
        std::env::set_var("CANDLE_BARRIER_POOL_SPIN_LIMIT", "100");
    }
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let threads = candle_core::utils::get_num_threads();
        std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
    }
    rayon::ThreadPoolBuilder::new()
        .build()
        .expect("a thread pool")
}

/// The command line, or the exit for `--help`, `--version` and usage errors. A usage error (a
/// bad flag value, an unknown or missing argument) is one `error:` line, like every other error.
fn parse_args() -> Result<prolora::cli::Cli, std::process::ExitCode> {
    use clap::error::ErrorKind;
    match prolora::cli::Cli::try_parse() {
        Ok(cli) => Ok(cli),
        Err(e)
            if !matches!(
                e.kind(),
                ErrorKind::DisplayHelp
                    | ErrorKind::DisplayVersion
                    | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
            ) =>
        {
            let text = e.render().to_string();
            let line: Vec<&str> = text
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with("For more information"))
                .collect();
            prolora::to_stderr!("{}", line.join(" "));
            Err(std::process::ExitCode::from(2))
        }
        Err(e) => e.exit(),
    }
}

fn main() -> std::process::ExitCode {
    keep_freed_memory();
    let pool = configure_threads();
    let cli = match parse_args() {
        Ok(cli) => cli,
        Err(code) => return code,
    };
    match pool.install(|| prolora::cli::run(cli)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => match e.downcast_ref::<prolora::signals::Interrupted>() {
            // Not a failure: the run stopped where it was asked to, as a signal's exit code says.
            Some(stop) => {
                prolora::to_stderr!("{stop}");
                std::process::ExitCode::from((128 + stop.signal) as u8)
            }
            None => {
                // One line: the outermost context first, then its causes.
                prolora::to_stderr!("error: {e:#}");
                std::process::ExitCode::FAILURE
            }
        },
    }
}
