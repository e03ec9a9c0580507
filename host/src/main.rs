//! The `kiln` binary: parses the command line, sets up logging, runs the command.

use clap::Parser;

/// mimalloc rather than glibc's malloc: the request path allocates and frees a few hundred
/// small objects per request (BENCHMARKS.md, "Instructions per request").
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    quiet_library_backtraces();
    let cli = kiln_host::cli::Cli::parse();
    let logs = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("KILN_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr);
    match cli.log_format {
        kiln_host::cli::LogFormat::Text => logs.init(),
        // One object per line, the event's fields beside time, level and target.
        kiln_host::cli::LogFormat::Json => logs.json().flatten_event(true).init(),
    }
    let output = cli.output;
    match kiln_host::cli::run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) if e.is::<kiln_host::cli::Printed>() => std::process::ExitCode::FAILURE,
        // With --output json, scripts read the error (and its code) where they read answers.
        Err(e) if output == kiln_host::cli::Output::Json => {
            println!("{}", kiln_host::cli::ApiFailure::json_of(&e));
            std::process::ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// `RUST_BACKTRACE=1` makes every `wasmtime::Error` capture a backtrace: slow on error paths
/// a guest can trigger at will, and noise in messages. Panics keep their backtraces; library
/// errors only get one when `RUST_LIB_BACKTRACE` asks for it explicitly.
fn quiet_library_backtraces() {
    if std::env::var_os("RUST_LIB_BACKTRACE").is_none() {
        // SAFETY: called first thing in `main`, before any other thread exists.
        #[allow(unsafe_code)]
        unsafe {
            std::env::set_var("RUST_LIB_BACKTRACE", "0");
        }
    }
}
