//! The command line: `ollama-sidecar [run] [--upgrade]`, `ollama-sidecar check`,
//! `ollama-sidecar health`.

#[cfg(feature = "jemalloc")]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

use clap::{Args, Parser, Subcommand};
use ollama_sidecar::config::{self, ConfigArgs, LogFormat};
use ollama_sidecar::health_cmd;
use ollama_sidecar::upgrade;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

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

#[derive(Args, Clone)]
struct RunOpts {
    #[command(flatten)]
    config: ConfigArgs,
    /// Take the listening sockets over from the running sidecar (binary upgrade): wait on
    /// --upgrade-sock for them (up to 5 s; send the old process SIGQUIT), then serve.
    #[arg(long)]
    upgrade: bool,
    /// The Unix socket of the hand-over, for this process as the new one (--upgrade) and later
    /// as the old one (on SIGQUIT) [default: $RUNTIME_DIRECTORY/ollama-sidecar-upgrade.sock
    /// under systemd, else $TMPDIR or /tmp].
    #[arg(long, env = upgrade::ENV_UPGRADE_SOCK)]
    upgrade_sock: Option<PathBuf>,
}

impl RunOpts {
    fn upgrade(&self) -> upgrade::UpgradeOpts {
        upgrade::UpgradeOpts {
            take_over: self.upgrade,
            sock: self
                .upgrade_sock
                .clone()
                .unwrap_or_else(upgrade::default_sock),
        }
    }
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy (the default).
    Run(RunOpts),
    /// Validate a configuration and print the effective configuration.
    Check(CheckOpts),
    /// Ask a running sidecar whether it can serve (GET /readyz on its admin listener): exit 0
    /// when ready (200), 1 when it answered otherwise, 2 when unreachable or too slow.
    Health(HealthOpts),
}

#[derive(Args, Clone)]
struct HealthOpts {
    /// Ask this URL (http://host:port[/path], path /readyz by default) instead of the admin
    /// listener named by the configuration.
    #[arg(long, conflicts_with = "config")]
    url: Option<String>,
    /// The configuration whose `admin.listen` is asked (nothing else in it is read)
    /// [env: OLLAMA_SIDECAR_CONFIG] [default: conf/sidecar.yaml when it exists, else
    /// /etc/ollama-sidecar/sidecar.yaml]. OLLAMA_SIDECAR_ADMIN_LISTEN, when set, wins over the file.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// How long the whole exchange may take.
    #[arg(long, default_value = "2s", value_parser = config::parse_duration)]
    timeout: Duration,
}

fn health(opts: HealthOpts) -> ExitCode {
    let target = match &opts.url {
        Some(url) => health_cmd::Target::parse_url(url),
        None => {
            let path = opts
                .config
                .or_else(|| std::env::var_os(config::ENV_CONFIG).map(PathBuf::from))
                .unwrap_or_else(config::default_config_path);
            health_cmd::target_from_config(&path)
        }
    };
    let target = match target {
        Ok(t) => t,
        Err(e) => {
            eprintln!("ollama-sidecar health: {e}");
            return ExitCode::from(health_cmd::EXIT_UNREACHABLE);
        }
    };
    let outcome = health_cmd::check(&target, opts.timeout);
    match &outcome {
        health_cmd::Outcome::Answered { status, body } => println!("{target}: {status} {body}"),
        health_cmd::Outcome::Unreachable(why) => {
            eprintln!("ollama-sidecar health: {target}: unreachable: {why}")
        }
    }
    ExitCode::from(outcome.exit_code())
}

#[derive(Args, Clone)]
struct CheckOpts {
    #[command(flatten)]
    run: ConfigArgs,
    /// Validate without reading secrets (`key_env`, `key_file`, `admin.token_env`): only their
    /// form is checked, e.g. in CI where production keys are absent.
    #[arg(long)]
    no_secrets: bool,
}

/// Pingora logs its own lifecycle at info (and misnames our shutdown); its warnings still show.
const QUIET_PINGORA: &str = "pingora_core=warn,pingora_proxy=warn,pingora_load_balancing=warn";

/// The log filter for `level` (`log.level`); `RUST_LOG`, when set and valid, wins.
fn log_filter(level: &str) -> tracing_subscriber::EnvFilter {
    let directives = |base: &str| {
        if base.contains("pingora") {
            base.to_string()
        } else {
            format!("{base},{QUIET_PINGORA}")
        }
    };
    std::env::var("RUST_LOG")
        .ok()
        .filter(|v| !v.is_empty())
        .and_then(|v| tracing_subscriber::EnvFilter::try_new(directives(&v)).ok())
        .or_else(|| tracing_subscriber::EnvFilter::try_new(directives(level)).ok())
        .unwrap_or_else(|| tracing_subscriber::EnvFilter::new("info"))
}

/// Installs the log subscriber; a reload may change its filter (`log.level`).
fn init_logging(level: &str, format: LogFormat) {
    let builder = tracing_subscriber::fmt()
        .with_env_filter(log_filter(level))
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    macro_rules! reloadable {
        ($builder:expr) => {{
            let builder = $builder.with_filter_reloading();
            let handle = builder.reload_handle();
            ollama_sidecar::reload::set_log_level(Box::new(move |level: &str| {
                handle.reload(log_filter(level)).map_err(|e| e.to_string())
            }));
            builder.try_init()
        }};
    }
    let _ = match format {
        LogFormat::Json => reloadable!(builder.json().flatten_event(true)),
        LogFormat::Text => reloadable!(builder),
    };
}

fn main() -> ExitCode {
    // Before anything can replace the file (a SIGUSR2 upgrade starts what is then at this path).
    upgrade::remember_executable();
    let cli = Cli::parse();
    let (command, opts, secrets, upgrade) = match cli.command {
        Some(Command::Run(o)) => ("run", o.config.clone(), config::Secrets::Read, o.upgrade()),
        Some(Command::Check(o)) if o.no_secrets => {
            ("check", o.run, config::Secrets::Skip, cli.run.upgrade())
        }
        Some(Command::Check(o)) => ("check", o.run, config::Secrets::Read, cli.run.upgrade()),
        Some(Command::Health(o)) => return health(o),
        None => (
            "run",
            cli.run.config.clone(),
            config::Secrets::Read,
            cli.run.upgrade(),
        ),
    };
    let config = match opts.load(secrets) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("ollama-sidecar: invalid configuration: {e}");
            return ExitCode::from(2);
        }
    };
    if command == "check" {
        let unread = match secrets {
            config::Secrets::Skip => " (secrets not read)",
            config::Secrets::Read => "",
        };
        println!(
            "# {}: valid{unread}; effective configuration:",
            config.source
        );
        print!("{}", config::effective_yaml(&config));
        return ExitCode::SUCCESS;
    }
    init_logging(&config.log.level, config.log.format);
    match ollama_sidecar::server::run(config, upgrade) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ollama-sidecar: {e}");
            ExitCode::from(1)
        }
    }
}
