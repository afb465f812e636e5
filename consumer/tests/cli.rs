//! The consumer binary as a user meets it.

use std::process::{Command, Output};
use std::time::{Duration, Instant};

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
        (&["--modelled-gflops", "0"][..], "modelled-gflops"),
        (&["--modelled-gflops", "NaN"][..], "modelled-gflops"),
    ] {
        let o = consumer(args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(says), "{args:?}: {err}");
    }
}

/// `docker compose down` after the broker has gone: the worker is retrying its connection and
/// must stop on SIGTERM now, not when the connect timeout runs out (Docker would kill it first).
#[test]
fn sigterm_stops_a_worker_that_is_waiting_for_the_broker() {
    // A port nothing listens on: every connection is refused and retried with backoff.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let mut child = Command::new(env!("CARGO_BIN_EXE_gemmq-consumer"))
        .env(
            "AMQP_URL",
            format!("amqp://guest:guest@127.0.0.1:{port}/%2f"),
        )
        .env("GEMMQ_CONNECT_TIMEOUT", "10m")
        .env("RUST_LOG", "info")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("the binary runs");
    // Long enough for several refused tries (the first backoff is 200 ms).
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        child.try_wait().expect("the child can be polled").is_none(),
        "the worker keeps retrying an unreachable broker"
    );
    let signalled = Instant::now();
    let sent = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill runs");
    assert!(sent.success());
    let status = loop {
        if let Some(status) = child.try_wait().expect("the child can be polled") {
            break status;
        }
        if signalled.elapsed() > Duration::from_secs(10) {
            let _ = child.kill();
            panic!("the worker was still running 10 s after SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let took = signalled.elapsed();
    let mut err = String::new();
    use std::io::Read;
    let _ = child.stderr.take().map(|mut e| e.read_to_string(&mut err));
    assert_eq!(status.code(), Some(0), "a clean stop:\n{err}");
    assert!(
        took < Duration::from_secs(2),
        "stopped {took:?} after SIGTERM:\n{err}"
    );
    assert!(
        err.contains("broker unreachable; retrying") && err.contains("worker stopped"),
        "the log says it was retrying, then that it stopped:\n{err}"
    );
}

/// Settings are layered flag > environment > config file > default, as `--help` says.
#[test]
fn a_flag_beats_the_environment_which_beats_the_config_file() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("gemmq.toml");
    std::fs::write(&file, "[consumer]\nqueue-size = 0\n").unwrap();
    // A port nothing listens on: settings that pass end in "cannot reach RabbitMQ" (exit 1).
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .unwrap()
        .port();
    let run = |args: &[&str], env: &[(&str, &str)]| {
        let o = Command::new(env!("CARGO_BIN_EXE_gemmq-consumer"))
            .args(["--config", file.to_str().unwrap()])
            .args(args)
            .env(
                "AMQP_URL",
                format!("amqp://guest:guest@127.0.0.1:{port}/%2f"),
            )
            .env("GEMMQ_CONNECT_TIMEOUT", "1s")
            .env_remove("GEMMQ_QUEUE_SIZE")
            .envs(env.iter().copied())
            .output()
            .expect("the binary runs");
        (
            o.status.code(),
            String::from_utf8_lossy(&o.stderr).to_string(),
        )
    };

    let (code, err) = run(&[], &[]);
    assert_eq!(code, Some(2), "the file's queue-size 0 is refused:\n{err}");
    assert!(err.contains("queue-size"), "{err}");

    let (code, err) = run(&[], &[("GEMMQ_QUEUE_SIZE", "3")]);
    assert_eq!(
        code,
        Some(1),
        "the environment's 3 beats the file's 0:\n{err}"
    );
    assert!(err.contains("cannot reach RabbitMQ"), "{err}");

    let (code, err) = run(&["--queue-size", "0"], &[("GEMMQ_QUEUE_SIZE", "3")]);
    assert_eq!(
        code,
        Some(2),
        "the flag's 0 beats the environment's 3:\n{err}"
    );
    assert!(err.contains("queue-size"), "{err}");
}
