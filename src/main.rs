//! The command line: `ollama-sidecar [run]`, `ollama-sidecar check`.

use clap::{Args, Parser, Subcommand};
use ollama_sidecar::config::{self, LogFormat, Overrides};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "ollama-sidecar",
    version,
    about = "A reverse proxy that makes one Ollama GPU box safe to share",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: RunOpts,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy (the default).
    Run(RunOpts),
    /// Validate a configuration and print the effective configuration.
    Check(RunOpts),
}

#[derive(Args, Clone)]
struct RunOpts {
    /// The configuration file.
    #[arg(long, short, env = config::ENV_CONFIG, default_value = config::DEFAULT_CONFIG_PATH)]
    config: PathBuf,
    /// Override `listen` (also OLLAMA_SIDECAR_LISTEN).
    #[arg(long)]
    listen: Option<String>,
    /// Override `admin.listen` (also OLLAMA_SIDECAR_ADMIN_LISTEN).
    #[arg(long)]
    admin_listen: Option<String>,
}

impl RunOpts {
    fn overrides(&self) -> Overrides {
        Overrides::from_env().merge(Overrides {
            listen: self.listen.clone(),
            admin_listen: self.admin_listen.clone(),
        })
    }
}

/// Pingora logs its own lifecycle at info (and misnames our shutdown); its warnings still show.
const QUIET_PINGORA: &str = "pingora_core=warn,pingora_proxy=warn,pingora_load_balancing=warn";

fn init_logging(level: &str, format: LogFormat) {
    let directives = |base: &str| {
        if base.contains("pingora") {
            base.to_string()
        } else {
            format!("{base},{QUIET_PINGORA}")
        }
    };
    let filter = std::env::var("RUST_LOG")
        .ok()
        .filter(|v| !v.is_empty())
        .and_then(|v| tracing_subscriber::EnvFilter::try_new(directives(&v)).ok())
        .or_else(|| tracing_subscriber::EnvFilter::try_new(directives(level)).ok())
        .unwrap_or_else(|| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
        LogFormat::Text => builder.try_init(),
    };
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let (command, opts) = match cli.command {
        Some(Command::Run(o)) => ("run", o),
        Some(Command::Check(o)) => ("check", o),
        None => ("run", cli.run),
    };
    let config = match config::load(&opts.config, &opts.overrides()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("ollama-sidecar: invalid configuration: {e}");
            return ExitCode::from(2);
        }
    };
    if command == "check" {
        println!("# {}: valid; effective configuration:", config.source);
        print!("{}", config::effective_yaml(&config));
        return ExitCode::SUCCESS;
    }
    init_logging(&config.log.level, config.log.format);
    match ollama_sidecar::server::run(config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ollama-sidecar: {e}");
            ExitCode::from(1)
        }
    }
}
