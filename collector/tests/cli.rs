//! The collector binary as a user meets it.

use std::process::{Command, Output};

fn collector(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_gemmq-collector"))
        .args(args)
        .env_remove("AMQP_URL")
        .output()
        .expect("the binary runs")
}

#[test]
fn help_documents_the_exit_statuses() {
    let o = collector(&["--help"]);
    assert!(o.status.success());
    let help = String::from_utf8_lossy(&o.stdout);
    for needle in [
        "--job-id",
        "--out",
        "Exit status",
        "3 incomplete",
        "GEMMQ_IDLE_TIMEOUT",
    ] {
        assert!(
            help.contains(needle),
            "--help should mention {needle}:\n{help}"
        );
    }
}

#[test]
fn a_job_id_that_cannot_name_a_queue_is_refused() {
    let o = collector(&["--job-id", "no spaces please"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("job-id"));
}
