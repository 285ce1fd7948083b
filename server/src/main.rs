//! `featurestore-server`: runs the feature store. With no arguments it serves on
//! 127.0.0.1:50051 with its data in `./featurestore-data` and the embedded registry.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use featurestore_server::config::{Config, Durability};
use tokio_util::sync::CancellationToken;

/// mimalloc rather than the system allocator: request handling allocates many small
/// short-lived objects, which glibc's allocator serves markedly slower.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The feature store's gRPC server. Settings come from the config file, then environment
/// variables, then flags, each overriding the one before.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// TOML configuration file (see config/featurestore.toml for every setting).
    #[arg(long, env = "FEATURESTORE_CONFIG")]
    config: Option<PathBuf>,
    /// Address to listen on, e.g. 127.0.0.1:50051.
    #[arg(long, env = "FEATURESTORE_LISTEN_ADDRESS")]
    listen_address: Option<SocketAddr>,
    /// Address of the Prometheus metrics endpoint, e.g. 127.0.0.1:9464.
    #[arg(long, env = "FEATURESTORE_METRICS_LISTEN_ADDRESS")]
    metrics_listen_address: Option<SocketAddr>,
    /// Directory of the RocksDB database.
    #[arg(long, env = "FEATURESTORE_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Feature registry file (TOML); the embedded default registry when absent.
    #[arg(long, env = "FEATURESTORE_REGISTRY")]
    registry: Option<PathBuf>,
    /// Policy bundle file (TOML); the embedded default bundle when absent.
    #[arg(long, env = "FEATURESTORE_POLICY_BUNDLE")]
    policy_bundle: Option<PathBuf>,
    /// Before starting, restore this backup (a directory written by `featurestore backup`)
    /// into the data directory, which must not exist yet.
    #[arg(long)]
    restore_from: Option<PathBuf>,
    /// Whether writes are synced to disk before they are acknowledged.
    #[arg(long, env = "FEATURESTORE_DURABILITY", value_parser = parse_durability)]
    durability: Option<Durability>,
    /// Serve without authentication: every caller may do everything. For a development
    /// machine only (the same as `auth.mode = "disabled"` in the config file).
    #[arg(long)]
    auth_disabled: bool,
    /// Log format: `text` for people, `json` (one object per line, with the request id
    /// and span fields) for log pipelines. RUST_LOG sets what is logged.
    #[arg(long, env = "FEATURESTORE_LOG_FORMAT", default_value = "text")]
    log_format: featurestore_server::logging::LogFormat,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Print a new random bearer token and the config lines of a principal holding it
    /// (only the token's SHA-256 goes into the config).
    NewToken {
        /// The principal's name.
        #[arg(long, default_value = "new-principal")]
        name: String,
    },
    /// Print the SHA-256 of a bearer token read from standard input, for token_sha256.
    HashToken,
}

/// Runs a subcommand that prints something and exits.
fn run_command(command: Command) -> anyhow::Result<()> {
    use featurestore_server::service::auth::{hash_token, new_token};
    match command {
        Command::NewToken { name } => {
            let token = new_token()?;
            println!(
                "# The token, for the client only (FEATURESTORE_TOKEN or --token); keep it secret:"
            );
            println!("# {token}");
            println!("[[auth.principals]]");
            println!("name = {name:?}");
            println!("token_sha256 = [\"{}\"]", hash_token(&token));
            println!("# Grant roles, e.g.:");
            println!("# read_surfaces = [\"instagram_reels\"]");
            println!("# write_sources = [\"engagement\"]");
            println!("# privacy = true");
            println!("# admin = true");
        }
        Command::HashToken => {
            let mut token = String::new();
            std::io::stdin()
                .read_line(&mut token)
                .context("cannot read the token from standard input")?;
            let token = token.trim();
            anyhow::ensure!(!token.is_empty(), "no token on standard input");
            println!("{}", hash_token(token));
        }
    }
    Ok(())
}

fn parse_durability(text: &str) -> Result<Durability, String> {
    match text {
        "sync" => Ok(Durability::Sync),
        "buffered" => Ok(Durability::Buffered),
        other => Err(format!(
            "{other:?} is not a durability mode; use sync or buffered"
        )),
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    featurestore_server::logging::init(args.log_format);
    if let Some(command) = args.command {
        return run_command(command);
    }
    let mut config = match &args.config {
        Some(path) => Config::from_toml_file(path)?,
        None => Config::default(),
    };
    if let Some(address) = args.listen_address {
        config.listen_address = address;
    }
    if let Some(address) = args.metrics_listen_address {
        config.observability.metrics_listen_address = address;
    }
    if let Some(data_dir) = args.data_dir {
        config.data_dir = data_dir;
    }
    if let Some(registry) = args.registry {
        config.registry_path = Some(registry);
    }
    if let Some(bundle) = args.policy_bundle {
        config.policy_bundle_path = Some(bundle);
    }
    if let Some(durability) = args.durability {
        config.durability = durability;
    }
    if args.auth_disabled {
        config.auth.mode = featurestore_server::config::AuthMode::Disabled;
    }

    if let Some(backup) = &args.restore_from {
        featurestore_server::restore_backup(backup, &config.data_dir)?;
        tracing::info!(backup = %backup.display(), data_dir = %config.data_dir.display(), "backup restored");
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("featurestore")
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async move {
        let listeners = featurestore_server::Listeners::bind(&config).await?;
        let shutdown = CancellationToken::new();
        tokio::spawn(cancel_on_signal(shutdown.clone()));
        featurestore_server::run(listeners, config, shutdown).await
    })
}

/// Cancels `shutdown` on Ctrl-C or SIGTERM.
async fn cancel_on_signal(shutdown: CancellationToken) {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(error) => {
                tracing::warn!(%error, "cannot listen for SIGTERM; only Ctrl-C stops the server");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = interrupt => tracing::info!("interrupted"),
        () = terminate => tracing::info!("terminated"),
    }
    shutdown.cancel();
}
