use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = prolora::cli::Cli::parse();
    match prolora::cli::run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // One line: the outermost context first, then its causes.
            eprintln!("error: {}", format!("{e:#}"));
            std::process::ExitCode::FAILURE
        }
    }
}
