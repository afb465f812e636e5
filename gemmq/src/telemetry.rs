//! Logging: `tracing` to stderr, filtered by `RUST_LOG` (default `info`).

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

/// Installs the subscriber once; later calls (tests running several programs) are no-ops.
pub fn init() {
    // lapin logs every channel the broker closes at ERROR, including the ones gemmq closes on
    // purpose (a passive declare of a queue that is gone); gemmq logs what matters itself. Say
    // `lapin=...` in RUST_LOG to see its logs anyway.
    let wanted = std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into());
    let quiet = if wanted.contains("lapin") {
        String::new()
    } else {
        ",lapin=off,amq_protocol=off".into()
    };
    let filter = EnvFilter::try_new(format!("{wanted}{quiet}"))
        .unwrap_or_else(|_| EnvFilter::new("info,lapin=off,amq_protocol=off"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        .try_init();
}

/// Whether a person is watching (progress bars) rather than a log collector.
pub fn stderr_is_terminal() -> bool {
    std::io::stderr().is_terminal()
}
