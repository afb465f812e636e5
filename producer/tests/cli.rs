//! The producer binary as a user meets it: help, bad input, an unreachable broker.

use std::process::{Command, Output};

use gemmq::DType;
use gemmq::matrix::generate;

fn producer(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_gemmq-producer"))
        .args(args)
        .env_remove("AMQP_URL")
        .env("RUST_LOG", "info")
        .output()
        .expect("the binary runs")
}

/// A tiny job against the broker at `url`, giving up on it after 2 s.
fn tiny_job_at(url: &str) -> Output {
    producer(&[
        "--m",
        "8",
        "--k",
        "8",
        "--n",
        "8",
        "--tile",
        "4",
        "--amqp-url",
        url,
        "--connect-timeout",
        "2s",
    ])
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn help_explains_every_option_with_its_environment_variable() {
    let o = producer(&["--help"]);
    assert!(o.status.success());
    let help = String::from_utf8_lossy(&o.stdout);
    for needle in [
        "--tile",
        "GEMMQ_TILE",
        "AMQP_URL",
        "--save-inputs",
        "config/gemmq.toml",
        "--max-message-bytes",
    ] {
        assert!(
            help.contains(needle),
            "--help should mention {needle}:\n{help}"
        );
    }
}

#[test]
fn inputs_that_cannot_be_multiplied_are_refused_before_anything_is_published() {
    let dir = tempfile::tempdir().unwrap();
    let (a, _) = generate(4, 5, 6, DType::F64, 1);
    let (_, b) = generate(4, 7, 6, DType::F64, 1);
    a.write_npy(&dir.path().join("A.npy")).unwrap();
    b.write_npy(&dir.path().join("B.npy")).unwrap();
    let (a, b) = (dir.path().join("A.npy"), dir.path().join("B.npy"));
    // An unreachable broker proves nothing was attempted: the error comes first.
    let o = producer(&[
        "--a",
        a.to_str().unwrap(),
        "--b",
        b.to_str().unwrap(),
        "--amqp-url",
        "amqp://guest:guest@127.0.0.1:1/%2f",
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("A is 4x5 but B is 7x6"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn a_tile_too_large_for_a_message_names_the_largest_that_fits() {
    let o = producer(&["--m", "4096", "--k", "8", "--n", "4096", "--tile", "4096"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("use --tile 1447 or less"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn a_wrong_config_file_is_named_with_the_wrong_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, "[producer]\ntiles = 64\n").unwrap();
    let o = producer(&["--config", path.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("tiles"), "{}", stderr(&o));
}

#[test]
fn an_unreachable_broker_is_retried_then_reported_with_what_to_do() {
    let o = tiny_job_at("amqp://guest:guest@127.0.0.1:1/%2f");
    assert_eq!(o.status.code(), Some(1));
    let err = stderr(&o);
    assert!(
        err.contains("broker unreachable; retrying"),
        "each retry is logged:\n{err}"
    );
    assert!(
        err.contains("cannot reach RabbitMQ at amqp://guest:***@127.0.0.1:1"),
        "{err}"
    );
    assert!(err.contains("rabbitmq-server -detached"), "{err}");
}

#[test]
fn a_broker_that_takes_the_connection_but_never_answers_is_reported_not_waited_on_forever() {
    // A listener that accepts and says nothing: what RabbitMQ does when it is out of file
    // descriptors.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = silent.local_addr().unwrap().port();
    let held = std::thread::spawn(move || {
        let mut open = Vec::new();
        while let Ok((socket, _)) = silent.accept() {
            open.push(socket);
        }
    });
    let started = std::time::Instant::now();
    let o = tiny_job_at(&format!("amqp://guest:guest@127.0.0.1:{port}/%2f"));
    assert_eq!(o.status.code(), Some(1));
    let err = stderr(&o);
    assert!(
        err.contains("did not answer the AMQP handshake"),
        "the error says what happened:\n{err}"
    );
    assert!(
        started.elapsed() < std::time::Duration::from_secs(30),
        "gave up in {:?}",
        started.elapsed()
    );
    drop(held);
}

#[test]
fn nan_or_infinite_inputs_are_refused_as_the_documented_policy() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = generate(4, 5, 6, DType::F64, 1);
    let gemmq::matrix::Matrix::F64(mut bad) = b else {
        unreachable!()
    };
    bad[(2, 3)] = f64::INFINITY;
    a.write_npy(&dir.path().join("A.npy")).unwrap();
    gemmq::matrix::Matrix::F64(bad)
        .write_npy(&dir.path().join("B.npy"))
        .unwrap();
    let (a, b) = (dir.path().join("A.npy"), dir.path().join("B.npy"));
    let o = producer(&["--a", a.to_str().unwrap(), "--b", b.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("B holds NaN or infinite values"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn a_file_that_is_not_an_npy_matrix_is_named_in_the_error() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("A.npy");
    std::fs::write(&a, b"definitely not numpy").unwrap();
    let o = producer(&["--a", a.to_str().unwrap(), "--b", a.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("A.npy"), "{}", stderr(&o));
}
