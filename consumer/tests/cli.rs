//! The consumer binary as a user meets it.

use std::process::{Command, Output};

fn consumer(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_gemmq-consumer"))
        .args(args)
        .env_remove("AMQP_URL")
        .output()
        .expect("the binary runs")
}

#[test]
fn help_explains_the_queue_size_as_the_prefetch() {
    let o = consumer(&["--help"]);
    assert!(o.status.success());
    let help = String::from_utf8_lossy(&o.stdout);
    for needle in [
        "--queue-size",
        "prefetch",
        "GEMMQ_FAILURE_RATE",
        "1s..3s",
        "--max-attempts",
    ] {
        assert!(
            help.contains(needle),
            "--help should mention {needle}:\n{help}"
        );
    }
}

#[test]
fn out_of_range_settings_exit_with_code_2_and_say_why() {
    for (args, says) in [
        (&["--failure-rate", "1.5"][..], "failure-rate"),
        (&["--queue-size", "0"][..], "queue-size"),
        (
            &["--queue-size", "2", "--concurrency", "3"][..],
            "concurrency",
        ),
        (&["--delay", "3s..1s"][..], "start is after its end"),
    ] {
        let o = consumer(args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(says), "{args:?}: {err}");
    }
}
