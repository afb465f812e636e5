//! Which broker the tests talk to, from the environment, so that one suite runs against the
//! machine's RabbitMQ and against a RabbitMQ 4 in a container (`.ci/run` does both):
//!
//! | variable | what | default |
//! |---|---|---|
//! | `AMQP_URL` | the broker | `amqp://guest:guest@127.0.0.1:5672/%2f` |
//! | `GEMMQ_MANAGEMENT_URL` | its management API | `http://<AMQP host>:15672`, the AMQP account |
//! | `GEMMQ_TEST_RABBITMQCTL` | a command that runs rabbitmqctl on it | `rabbitmqctl` |
//!
//! e.g. `GEMMQ_TEST_RABBITMQCTL="docker exec gemmq-ci-rabbitmq4 rabbitmqctl"`.

use gemmq::config::DEFAULT_AMQP_URL;
use gemmq::management::Management;

pub fn amqp_url() -> String {
    std::env::var("AMQP_URL").unwrap_or_else(|_| DEFAULT_AMQP_URL.into())
}

pub fn management_url() -> Option<String> {
    std::env::var("GEMMQ_MANAGEMENT_URL").ok()
}

/// The test broker's management API.
pub fn management() -> Management {
    Management::new(&amqp_url(), management_url().as_deref())
        .expect("AMQP_URL and GEMMQ_MANAGEMENT_URL are valid")
}

/// The test broker's AMQP URL with another account (host, port and vhost kept).
pub fn amqp_url_as(user: &str, pass: &str) -> String {
    let url = amqp_url();
    let (scheme, rest) = url.split_once("://").expect("AMQP_URL has a scheme");
    let host = rest.rsplit_once('@').map_or(rest, |(_, host)| host);
    format!("{scheme}://{user}:{pass}@{host}")
}

/// Runs rabbitmqctl against the test broker; `None` if the command cannot be started.
pub fn rabbitmqctl(args: &[&str]) -> Option<std::process::Output> {
    let command = std::env::var("GEMMQ_TEST_RABBITMQCTL").unwrap_or_else(|_| "rabbitmqctl".into());
    let mut words = command.split_whitespace();
    let program = words
        .next()
        .expect("GEMMQ_TEST_RABBITMQCTL names a command");
    std::process::Command::new(program)
        .args(words)
        .args(args)
        .output()
        .ok()
}

/// Runs rabbitmqctl against the test broker and says whether it succeeded.
pub fn rabbitmqctl_ok(args: &[&str]) -> bool {
    rabbitmqctl(args).is_some_and(|o| o.status.success())
}
