//! The `mailnode` command: the CLI over the library. `anyhow` lives only here.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{CommandFactory, Parser, Subcommand};

use mailnode::config::{self, Config, LogFormat};
use mailnode::sysexits::{EX_CONFIG, EX_NOINPUT, EX_SOFTWARE, EX_TEMPFAIL, EX_USAGE};
use mailnode::{aliases, Node};

mod ctl;
mod manual;

/// `mailnode ctl`'s commands. Everything after the command is its own,
/// `--limit` included: ctl's options go before it.
#[derive(Subcommand)]
enum CtlCmd {
    /// The node's state: version, listeners, queue counts, restarts
    Status,
    /// The queue: a listing ([--limit N] [--after ID]), or
    /// show|flush|delete|hold|release|bounce ID (flush alone: every message)
    Queue {
        #[arg(num_args = 0.., trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// reload (the aliases file), or lookup ADDRESS (as RCPT would)
    Aliases {
        #[arg(num_args = 0.., trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// reload: read the certificate and key again
    Tls {
        #[arg(num_args = 0.., trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// New sessions get 421 4.3.2 until resume
    Pause,
    /// Take mail again after pause
    Resume,
}

impl CtlCmd {
    /// The command as the words ctl's parser reads.
    fn words(self) -> Vec<String> {
        let (head, rest) = match self {
            CtlCmd::Status => ("status", Vec::new()),
            CtlCmd::Queue { args } => ("queue", args),
            CtlCmd::Aliases { args } => ("aliases", args),
            CtlCmd::Tls { args } => ("tls", args),
            CtlCmd::Pause => ("pause", Vec::new()),
            CtlCmd::Resume => ("resume", Vec::new()),
        };
        std::iter::once(head.to_string()).chain(rest).collect()
    }
}

/// The config file used without `-c`, when it exists (the repository's).
pub(crate) const DEFAULT_CONFIG: &str = "config/mailnode.toml";

#[derive(Parser)]
#[command(
    name = "mailnode",
    version = mailnode::VERSION,
    about = "An SMTP mail node that pipes mail into programs"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(clap::Args)]
struct Files {
    /// Configuration file (default: config/mailnode.toml if it exists, else built-in defaults)
    #[arg(short = 'c', long = "config")]
    config: Option<PathBuf>,
    /// Alternate aliases file
    #[arg(short = 'a', long = "aliases")]
    aliases: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the mail node
    Serve {
        #[command(flatten)]
        files: Files,
        /// Address to accept SMTP on (repeatable); replaces [smtp] listen
        #[arg(long = "listen")]
        listen: Vec<SocketAddr>,
        /// Spool directory
        #[arg(long = "spool")]
        spool: Option<PathBuf>,
        /// Control socket path
        #[arg(long = "control")]
        control: Option<PathBuf>,
        /// Metrics address, or "off"
        #[arg(long = "metrics")]
        metrics: Option<String>,
    },
    /// Validate the configuration and the aliases, then exit
    Check {
        #[command(flatten)]
        files: Files,
    },
    /// One SMTP session on stdin/stdout (inetd, xinetd, systemd Accept=yes)
    Inetd {
        #[command(flatten)]
        files: Files,
    },
    /// One pass over the queue: deliver what is due, then exit
    Runq {
        #[command(flatten)]
        files: Files,
    },
    /// Talk to a running node through its control socket
    Ctl {
        /// Configuration file (for [control] socket)
        #[arg(short = 'c', long = "config")]
        config: Option<PathBuf>,
        /// Control socket path
        #[arg(long = "control")]
        control: Option<PathBuf>,
        /// Print the reply's data as JSON
        #[arg(long)]
        json: bool,
        #[command(subcommand)]
        command: CtlCmd,
    },
    /// Write the manual pages into DIR: mailnode(8), one page per
    /// subcommand, mailnode.toml(5) and mailnode-aliases(5)
    Man {
        /// Where to write them (created if missing)
        #[arg(default_value = ".")]
        dir: PathBuf,
    },
    /// Print the completion script of SHELL (bash, zsh or fish)
    Completions {
        #[arg(value_parser = ["bash", "zsh", "fish"])]
        shell: String,
    },
    /// Send the message on stdin to an SMTP server; exit with sysexits codes
    #[command(disable_help_flag = true)]
    Send {
        /// Name to greet the server with (default: this host's name)
        #[arg(short = 'h', value_name = "HELOHOST")]
        helo: Option<String>,
        /// Print help
        #[arg(long, action = clap::ArgAction::Help)]
        help: Option<bool>,
        /// Server as HOST or HOST:PORT (port 25 by default)
        target: String,
        /// Envelope sender; "" or "<>" for none
        sender: String,
        /// Envelope recipients
        #[arg(required = true)]
        recipients: Vec<String>,
    },
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { EX_USAGE } else { 0 });
        }
    };
    match cli.command {
        Cmd::Inetd { files } => {
            // stdout is the SMTP stream; under xinetd stderr is the same
            // socket, so problems are told to the client as a 421 there and
            // logs go to stderr only when it is somewhere else.
            let separate_stderr = !stdout_is_stderr();
            let refuse = |problems: Vec<String>| {
                println!("421 4.3.0 mailnode is not configured properly, try again later\r");
                if separate_stderr {
                    report(problems)
                } else {
                    ExitCode::from(EX_CONFIG)
                }
            };
            let (config, _) = match load(&files) {
                Ok(loaded) => loaded,
                Err(problems) => return refuse(problems),
            };
            if separate_stderr {
                init_logging(&config);
            }
            match mailnode::serve_stdio(config) {
                Ok(_) => ExitCode::SUCCESS,
                Err(e) => {
                    println!("421 4.3.0 mailnode cannot take mail now, try again later\r");
                    if separate_stderr {
                        eprintln!("mailnode: {e}");
                    }
                    ExitCode::from(exit_code_for(&e))
                }
            }
        }
        Cmd::Runq { files } => {
            let (config, _) = match load(&files) {
                Ok(loaded) => loaded,
                Err(problems) => return report(problems),
            };
            init_logging(&config);
            finish(mailnode::run_queue_once(config).map(|summary| {
                tracing::info!(attempted = summary.attempted, "queue run done");
            }))
        }
        Cmd::Ctl {
            config,
            control,
            json,
            command,
        } => ExitCode::from(ctl::run(config, control, json, &command.words())),
        Cmd::Man { dir } => match manual::write_pages(Cli::command(), &dir) {
            Ok(written) => {
                for page in written {
                    println!("{}", page.display());
                }
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("mailnode man: {e}");
                ExitCode::from(mailnode::sysexits::EX_CANTCREAT)
            }
        },
        Cmd::Completions { shell } => {
            manual::completions(Cli::command(), &shell);
            ExitCode::SUCCESS
        }
        Cmd::Send {
            helo,
            help: _,
            target,
            sender,
            recipients,
        } => ExitCode::from(send(helo, &target, &sender, &recipients)),
        Cmd::Check { files } => match load(&files).and_then(with_tls_checked) {
            Ok((_, warnings)) => {
                for w in warnings {
                    eprintln!("{w}");
                }
                ExitCode::SUCCESS
            }
            Err(problems) => report(problems),
        },
        Cmd::Serve {
            files,
            listen,
            spool,
            control,
            metrics,
        } => {
            let (mut config, warnings) = match load(&files).and_then(with_tls_checked) {
                Ok(loaded) => loaded,
                Err(problems) => return report(problems),
            };
            if !listen.is_empty() {
                config.smtp.listen = listen;
            }
            if let Some(spool) = spool {
                config.spool.path = spool;
            }
            if let Some(control) = control {
                config.control.socket = control;
            }
            if let Some(metrics) = metrics {
                config.metrics.listen = match metrics.as_str() {
                    "off" => None,
                    addr => match addr.parse() {
                        Ok(a) => Some(a),
                        Err(_) => {
                            eprintln!("--metrics: expected IP:PORT or \"off\", got {addr:?}");
                            return ExitCode::from(EX_USAGE);
                        }
                    },
                };
            }
            init_logging(&config);
            for w in warnings {
                tracing::warn!("{w}");
            }
            let config_file = config_file(&files);
            match serve(config, config_file) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    let said = mailnode::error_text(e.as_ref());
                    tracing::error!("{said}");
                    eprintln!("mailnode: {said}");
                    let code = if e.is::<SupervisorGaveUp>() {
                        EX_SOFTWARE
                    } else {
                        e.downcast_ref::<mailnode::StartError>()
                            .map_or(1, exit_code_for)
                    };
                    ExitCode::from(code)
                }
            }
        }
    }
}

/// The exit status of a run that ends: 0, EX_CONFIG for what an operator
/// fixes in a file, EX_TEMPFAIL when another queue runner holds the spool.
fn finish(result: Result<(), mailnode::StartError>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mailnode: {e}");
            ExitCode::from(exit_code_for(&e))
        }
    }
}

/// Listening sockets systemd passed (LISTEN_FDS, socket activation).
fn inherited_listeners() -> Vec<std::net::TcpListener> {
    use std::os::fd::{FromRawFd, OwnedFd};
    let Ok(fds) = sd_notify::listen_fds() else {
        return Vec::new();
    };
    fds.map(|fd| {
        // SAFETY: systemd hands these descriptors to this process alone,
        // open and listening; each is taken over exactly once here.
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        std::net::TcpListener::from(owned)
    })
    .collect()
}

/// The Supervisor's restart intensity was exceeded.
#[derive(Debug)]
struct SupervisorGaveUp(String);

impl std::fmt::Display for SupervisorGaveUp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "supervisor gave up: {}", self.0)
    }
}

impl std::error::Error for SupervisorGaveUp {}

fn exit_code_for(e: &mailnode::StartError) -> u8 {
    match e {
        mailnode::StartError::Aliases(_)
        | mailnode::StartError::DeliveryUser(_)
        | mailnode::StartError::Spawner(_)
        | mailnode::StartError::Tls(_)
        | mailnode::StartError::Auth(_) => EX_CONFIG,
        mailnode::StartError::Spool(mailnode::spool::SpoolError::Locked { .. }) => EX_TEMPFAIL,
        _ => 1,
    }
}

/// Whether stdout and stderr are the same file (or the same socket).
fn stdout_is_stderr() -> bool {
    use std::os::fd::AsFd;
    let out = nix::sys::stat::fstat(std::io::stdout().as_fd());
    let err = nix::sys::stat::fstat(std::io::stderr().as_fd());
    match (out, err) {
        (Ok(x), Ok(y)) => x.st_dev == y.st_dev && x.st_ino == y.st_ino,
        _ => false,
    }
}

fn report(problems: Vec<String>) -> ExitCode {
    for p in problems {
        eprintln!("{p}");
    }
    ExitCode::from(EX_CONFIG)
}

/// The config file in force: `-c`, else the default one when it exists;
/// `None`: the built-in defaults.
fn config_file(files: &Files) -> Option<PathBuf> {
    files.config.clone().or_else(|| {
        let default = Path::new(DEFAULT_CONFIG);
        default.exists().then(|| default.to_path_buf())
    })
}

/// The configuration and the aliases file, checked; or every problem as a
/// `FILE:LINE: message` line. Warnings come back with the config.
fn load(files: &Files) -> Result<(Config, Vec<String>), Vec<String>> {
    let config_path = config_file(files);
    let mut config = match &config_path {
        Some(path) => config::load(path)
            .map_err(|errors| errors.iter().map(ToString::to_string).collect::<Vec<_>>())?,
        None => Config::default(),
    };
    if let Some(aliases) = &files.aliases {
        config.aliases.path = aliases.clone();
    }
    match aliases::load(&config.aliases.path) {
        Ok(loaded) => {
            let mut warnings: Vec<String> =
                loaded.warnings.iter().map(ToString::to_string).collect();
            if config.relay.host.is_none() {
                for (line, alias, addresses) in loaded.table.forwarding() {
                    warnings.push(format!(
                        "{}:{line}: warning: alias '{alias}' forwards to {}, but no [relay] host is configured: mail to it will be refused (550)",
                        config.aliases.path.display(),
                        addresses.join(", ")
                    ));
                }
            }
            warnings.sort_by_key(|w| alias_line(w));
            Ok((config, warnings))
        }
        Err(aliases::LoadError::Invalid(errors)) => {
            Err(errors.iter().map(ToString::to_string).collect())
        }
        Err(e) => Err(vec![e.to_string()]),
    }
}

/// The line number of a `FILE:LINE: warning` (0 for another warning),
/// so the file's warnings come in line order.
fn alias_line(warning: &str) -> usize {
    warning
        .split(':')
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// `[tls]` and `[http]` as `serve` would load them: a key that does not
/// match its certificate is refused, one about to expire is worth a
/// warning; an unreadable `secret_file` or `ca_file` is refused.
fn with_tls_checked(
    (config, mut warnings): (Config, Vec<String>),
) -> Result<(Config, Vec<String>), Vec<String>> {
    let mut problems = Vec::new();
    if let Some(settings) = &config.tls {
        let now = std::time::SystemTime::now();
        match mailnode::tls::check(settings, now) {
            Ok(warning) => warnings.extend(warning),
            Err(e) => problems.push(e.to_string()),
        }
    }
    if let Err(e) = mailnode::check_http(&config.http) {
        problems.push(e.to_string());
    }
    if problems.is_empty() {
        Ok((config, warnings))
    } else {
        Err(problems)
    }
}

fn init_logging(config: &Config) {
    let filter = tracing_subscriber::EnvFilter::new(format!(
        "{},actix=warn,actix_rt=warn",
        config.log.level.as_str()
    ));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match config.log.format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

/// Descriptors a session may hold: its socket, its body file and, in inline
/// mode, a program's two pipes and pidfd.
const DESCRIPTORS_PER_SESSION: u64 = 5;
const DESCRIPTORS_SPARE: u64 = 256;

/// Raises the open-file limit (programs keep the original one) and warns if
/// `max_connections` still cannot be reached.
fn raise_open_file_limit(max_connections: usize) {
    let needed = (max_connections as u64) * DESCRIPTORS_PER_SESSION + DESCRIPTORS_SPARE;
    match mailnode::raise_open_file_limit() {
        Ok(limit) if limit >= needed => {}
        Ok(limit) => tracing::warn!(
            open_files = limit,
            needed,
            "the open-file limit is too low for [smtp] max_connections; raise LimitNOFILE"
        ),
        Err(e) => tracing::warn!("cannot raise the open-file limit: {e}"),
    }
}

/// Runs the node until SIGTERM or SIGINT; SIGHUP reloads the aliases, the
/// TLS certificate and `[http]`'s key and trusted roots.
fn serve(config: Config, config_file: Option<PathBuf>) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the signal runtime")?;
    // Handlers first: a SIGHUP right after start must not kill the node.
    let (mut term, mut int, mut hup) = runtime.block_on(async {
        Ok::<_, anyhow::Error>((
            signal(SignalKind::terminate()).context("SIGTERM handler")?,
            signal(SignalKind::interrupt()).context("SIGINT handler")?,
            signal(SignalKind::hangup()).context("SIGHUP handler")?,
        ))
    })?;
    raise_open_file_limit(config.smtp.max_connections);
    // Where everything is, for whoever reads the log of a first start.
    let (spool, control, aliases) = (
        config.spool.path.clone(),
        config.control.socket.clone(),
        config.aliases.path.clone(),
    );
    let node = Node::start_on(config, Default::default(), inherited_listeners())
        .context("cannot start")?;
    tracing::info!(
        config = %config_file.as_deref().map_or("(built-in defaults)".into(), |p| p.display().to_string()),
        aliases = %aliases.display(),
        spool = %spool.display(),
        control = %control.display(),
        metrics = %node.metrics_addr().map_or("off".into(), |a| format!("http://{a}/metrics")),
        "started"
    );
    for addr in node.local_addrs() {
        tracing::info!(%addr, "listening for SMTP");
    }
    for addr in node.tls_addrs() {
        tracing::info!(%addr, "listening for SMTP over TLS (implicit TLS)");
    }
    // systemd (Type=notify): ready once listening; fed while healthy.
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
    let watchdog = sd_notify::watchdog_enabled();
    let mut failure = node.failure();
    let failed = runtime.block_on(async {
        let mut feed =
            tokio::time::interval(watchdog.map_or(std::time::Duration::from_secs(3600), |d| d / 2));
        loop {
            tokio::select! {
                _ = term.recv() => return None,
                _ = int.recv() => return None,
                _ = hup.recv() => {
                    match node.reload_aliases().await {
                        Ok(n) => tracing::info!(aliases = n, "SIGHUP: aliases reloaded"),
                        // The resolver logged the FILE:LINE details already.
                        Err(e) => tracing::error!("SIGHUP: aliases not reloaded: {e}"),
                    }
                    match node.reload_tls() {
                        Ok(not_after) => tracing::info!(
                            not_after = %humantime::format_rfc3339_seconds(not_after),
                            "SIGHUP: TLS certificate reloaded"
                        ),
                        Err(mailnode::tls::TlsError::NotConfigured) => {}
                        Err(e) => tracing::error!(
                            "SIGHUP: TLS certificate not reloaded, the old one stays in force: {e}"
                        ),
                    }
                    match node.reload_http() {
                        Ok(true) => tracing::info!("SIGHUP: [http] key and trusted roots reloaded"),
                        Ok(false) => {}
                        Err(e) => tracing::error!(
                            "SIGHUP: [http] files not reloaded, the old key and roots stay in force: {e}"
                        ),
                    }
                }
                _ = feed.tick(), if watchdog.is_some() => {
                    if node.healthy().await {
                        let _ = sd_notify::notify(&[sd_notify::NotifyState::Watchdog]);
                    } else {
                        tracing::warn!("an actor is not answering; not feeding the watchdog");
                    }
                }
                changed = failure.changed() => {
                    let why = failure.borrow().clone();
                    match (changed, why) {
                        (Ok(()), Some(why)) => return Some(why),
                        (Ok(()), None) => {}
                        // The node is gone without saying why.
                        (Err(_), _) => return Some("the actor system stopped".to_string()),
                    }
                }
            }
        }
    });
    tracing::info!("shutting down");
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
    node.shutdown();
    match failed {
        Some(why) => Err(anyhow::Error::new(SupervisorGaveUp(why))),
        None => Ok(()),
    }
}

/// `mailnode send`: the seed's `smtp` talker, on the message on stdin.
fn send(helo: Option<String>, target: &str, sender: &str, recipients: &[String]) -> u8 {
    let print = |report: mailnode::send::Report| {
        for problem in &report.problems {
            eprintln!("mailnode send: {problem}");
        }
        report.exit
    };
    let sending = match mailnode::send::prepare(helo, target, sender, recipients) {
        Ok(sending) => sending,
        Err(usage) => return print(usage),
    };
    let mut message = Vec::new();
    if let Err(e) = std::io::Read::read_to_end(&mut std::io::stdin(), &mut message) {
        eprintln!("mailnode send: cannot read the message: {e}");
        return EX_NOINPUT;
    }
    print(sending.send(&message))
}
