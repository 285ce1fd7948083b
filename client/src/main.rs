//! `featurestore`: the operator CLI of the feature store (see `featurestore --help`).

use std::process::ExitCode;

use clap::Parser;
use featurestore_client::cli::{self, Args, EXIT_FAILURE};

/// mimalloc rather than the system allocator: request handling allocates many small
/// short-lived objects, which glibc's allocator serves markedly slower.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let args = Args::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the async runtime: {error}");
            return ExitCode::from(EXIT_FAILURE);
        }
    };
    let mut stdout = std::io::stdout().lock();
    match runtime.block_on(cli::run(args, &mut stdout)) {
        Ok(code) => ExitCode::from(code),
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::from(EXIT_FAILURE)
        }
    }
}
