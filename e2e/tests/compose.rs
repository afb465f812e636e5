//! Static checks of the Docker deployment: docker-compose.yml, the Dockerfile, .env.example and
//! .dockerignore, checked without Docker: every setting the compose file passes against the
//! environment variables the programs really read (their `env = "..."` declarations), and what
//! a real run could not show (ports on 127.0.0.1 only, no guest). `compose_up.rs` runs it for
//! real.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_yaml_ng::Value;

const PROGRAMS: [&str; 3] = ["producer", "consumer", "collector"];

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn read(rel: &str) -> String {
    let path = root().join(rel);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

fn compose_text() -> String {
    read("docker-compose.yml")
}

/// docker-compose.yml with its `<<` merge keys applied, as Compose sees it.
fn compose() -> Value {
    let mut v: Value =
        serde_yaml_ng::from_str(&compose_text()).expect("docker-compose.yml is valid YAML");
    v.apply_merge()
        .expect("the merge keys of docker-compose.yml apply");
    v
}

fn service<'a>(c: &'a Value, name: &str) -> &'a Value {
    c.get("services")
        .and_then(|s| s.get(name))
        .unwrap_or_else(|| panic!("docker-compose.yml has no service {name:?}"))
}

fn string(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        Value::Bool(b) => b.to_string(),
        other => panic!("expected a scalar, found {other:?}"),
    }
}

/// A service's `environment`, map or list form; a key without a value maps to `None` (Compose
/// passes it through from the shell or .env when it is set there).
fn environment(svc: &Value) -> BTreeMap<String, Option<String>> {
    match svc.get("environment") {
        None => BTreeMap::new(),
        Some(Value::Mapping(m)) => m
            .iter()
            .map(|(k, v)| {
                let v = if v.is_null() { None } else { Some(string(v)) };
                (string(k), v)
            })
            .collect(),
        Some(Value::Sequence(items)) => items
            .iter()
            .map(|item| {
                let item = string(item);
                match item.split_once('=') {
                    Some((k, v)) => (k.to_string(), Some(v.to_string())),
                    None => (item, None),
                }
            })
            .collect(),
        Some(other) => panic!("environment should be a map or a list, found {other:?}"),
    }
}

/// `(source, target, read_only)` of a service's volumes, short or long syntax.
fn volumes(svc: &Value) -> Vec<(String, String, bool)> {
    let Some(Value::Sequence(items)) = svc.get("volumes") else {
        return Vec::new();
    };
    items
        .iter()
        .map(|v| match v {
            Value::String(s) => {
                let parts: Vec<&str> = s.split(':').collect();
                match parts.as_slice() {
                    [src, dst] => (src.to_string(), dst.to_string(), false),
                    [src, dst, mode] => (
                        src.to_string(),
                        dst.to_string(),
                        mode.split(',').any(|m| m == "ro"),
                    ),
                    _ => panic!("unexpected volume {s:?}"),
                }
            }
            Value::Mapping(_) => (
                v.get("source").map(string).unwrap_or_default(),
                v.get("target").map(string).expect("a volume has a target"),
                v.get("read_only").and_then(Value::as_bool).unwrap_or(false),
            ),
            other => panic!("unexpected volume {other:?}"),
        })
        .collect()
}

/// Words of a `command` or `entrypoint`, list or string form.
fn words(v: &Value) -> Vec<String> {
    match v {
        Value::String(s) => s.split_whitespace().map(str::to_string).collect(),
        Value::Sequence(items) => items.iter().map(string).collect(),
        other => panic!("command/entrypoint should be a string or a list, found {other:?}"),
    }
}

/// The `${NAME...}` references in a Compose string: (name, what follows the name up to `}`).
fn interpolations(text: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(at) = rest.find("${") {
        let after = &rest[at + 2..];
        let end = after.find('}').expect("an interpolation is closed by }");
        let inner = &after[..end];
        let name_len = inner
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(inner.len());
        out.push((inner[..name_len].to_string(), inner[name_len..].to_string()));
        rest = &after[end + 1..];
    }
    out
}

/// A Compose string as it is with none of its variables set: `${NAME:-default}` becomes
/// `default` (the other forms are left as they are).
fn with_defaults(text: &str) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(at) = rest.find("${") {
        out.push_str(&rest[..at]);
        let after = &rest[at + 2..];
        let end = after.find('}').expect("an interpolation is closed by }");
        match after[..end].split_once(":-") {
            Some((_, default)) => out.push_str(default),
            None => out.push_str(&rest[at..at + 2 + end + 1]),
        }
        rest = &after[end + 1..];
    }
    out + rest
}

/// Every `GEMMQ_*` name and `AMQP_URL` in a text.
fn variable_names(text: &str) -> BTreeSet<String> {
    let bytes = text.as_bytes();
    let mut names = BTreeSet::new();
    for prefix in ["GEMMQ_", "AMQP_URL"] {
        let mut from = 0;
        while let Some(i) = text[from..].find(prefix) {
            let start = from + i;
            let word_char = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
            let mut end = start + prefix.len();
            while end < bytes.len() && word_char(bytes[end]) {
                end += 1;
            }
            // `GEMMQ_*` in prose names no variable.
            if (start == 0 || !word_char(bytes[start - 1])) && &text[start..end] != "GEMMQ_" {
                names.insert(text[start..end].to_string());
            }
            from = end;
        }
    }
    names
}

/// The environment variables each program reads: the `env = "NAME"` of its clap options, by
/// simple text scanning of its crate's sources (`gemmq/src` is shared by all three programs).
fn program_variables() -> BTreeMap<&'static str, BTreeSet<String>> {
    fn scan(dir: &Path, into: &mut BTreeSet<String>) {
        for entry in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
            let path = entry.expect("a directory entry").path();
            if path.is_dir() {
                scan(&path, into);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let text = std::fs::read_to_string(&path).expect("a source file");
                let mut rest = text.as_str();
                while let Some(i) = rest.find("env = \"") {
                    // clap's `env = "..."`, not `target_env = "gnu"` in a cfg.
                    let own_word = !rest[..i].ends_with(|c: char| c.is_alphanumeric() || c == '_');
                    let after = &rest[i + 7..];
                    let end = after.find('"').expect("a closing quote");
                    if own_word {
                        into.insert(after[..end].to_string());
                    }
                    rest = &after[end..];
                }
            }
        }
    }
    let mut shared = BTreeSet::new();
    scan(&root().join("gemmq/src"), &mut shared);
    assert!(
        shared.contains("AMQP_URL") && shared.contains("GEMMQ_CONFIG"),
        "the scan of gemmq/src should find AMQP_URL and GEMMQ_CONFIG, found {shared:?}"
    );
    PROGRAMS
        .iter()
        .map(|&p| {
            let mut vars = shared.clone();
            scan(&root().join(p).join("src"), &mut vars);
            (p, vars)
        })
        .collect()
}

/// The Dockerfile as instructions: continuation lines joined, comments dropped.
fn dockerfile() -> Vec<(String, String)> {
    let text = read("Dockerfile");
    let mut out = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with('#') || (trimmed.is_empty() && current.is_empty()) {
            continue;
        }
        if let Some(head) = trimmed.strip_suffix('\\') {
            current.push_str(head);
            current.push(' ');
            continue;
        }
        current.push_str(trimmed);
        let (op, args) = current
            .split_once(char::is_whitespace)
            .unwrap_or((&current, ""));
        out.push((op.to_ascii_uppercase(), args.trim().to_string()));
        current.clear();
    }
    out
}

/// `FROM` images with the `ARG` defaults declared before the first stage substituted.
fn base_images(instructions: &[(String, String)]) -> Vec<String> {
    let mut args = BTreeMap::new();
    let mut images = Vec::new();
    for (op, rest) in instructions {
        match op.as_str() {
            "ARG" if images.is_empty() => {
                if let Some((k, v)) = rest.split_once('=') {
                    args.insert(k.to_string(), v.trim_matches('"').to_string());
                }
            }
            "FROM" => {
                let mut image = rest
                    .split_whitespace()
                    .find(|w| !w.starts_with("--"))
                    .expect("FROM names an image")
                    .to_string();
                for (k, v) in &args {
                    image = image.replace(&format!("${{{k}}}"), v);
                }
                images.push(image);
            }
            _ => {}
        }
    }
    images
}

/// The programs the final image has: files copied from a build stage into a directory on PATH.
fn binaries_in_image(instructions: &[(String, String)]) -> BTreeSet<String> {
    let mut bins = BTreeSet::new();
    for (op, rest) in instructions {
        if op != "COPY" || !rest.contains("--from=") {
            continue;
        }
        let paths: Vec<&str> = rest
            .split_whitespace()
            .filter(|w| !w.starts_with("--"))
            .collect();
        let Some((dest, sources)) = paths.split_last() else {
            continue;
        };
        if dest.trim_end_matches('/').ends_with("/bin") {
            for src in sources {
                bins.insert(src.rsplit('/').next().unwrap().to_string());
            }
        }
    }
    bins
}

#[test]
fn the_deployment_has_the_broker_the_three_programs_and_an_optional_prometheus() {
    let c = compose();
    let names: BTreeSet<String> = c
        .get("services")
        .and_then(Value::as_mapping)
        .expect("docker-compose.yml has services")
        .keys()
        .map(string)
        .collect();
    let want: BTreeSet<String> = [
        "rabbitmq",
        "producer",
        "consumer",
        "collector",
        "prometheus",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    assert_eq!(names, want);
}

#[test]
fn consumers_scale_with_no_per_instance_settings() {
    let c = compose();
    let consumer = service(&c, "consumer");
    for key in ["container_name", "ports", "hostname"] {
        assert!(
            consumer.get(key).is_none(),
            "the consumer service must not set {key}: `--scale consumer=N` needs every replica to be alike and each to have its own host name"
        );
    }
    assert!(
        !environment(consumer).contains_key("GEMMQ_WORKER_ID"),
        "GEMMQ_WORKER_ID would give every replica the same worker id; the program's default, <host>-<pid>, is unique per container"
    );
    // A consumer's worker id is its host name (the container id) and pid.
    let broker_rs = read("gemmq/src/broker.rs");
    assert!(
        broker_rs.contains("gethostname") && broker_rs.contains("std::process::id()"),
        "the default worker id should be <hostname>-<pid>"
    );
}

#[test]
fn the_programs_start_once_the_broker_is_healthy() {
    let c = compose();
    for p in PROGRAMS {
        let cond = service(&c, p)
            .get("depends_on")
            .and_then(|d| d.get("rabbitmq"))
            .and_then(|r| r.get("condition"))
            .map(string);
        assert_eq!(
            cond.as_deref(),
            Some("service_healthy"),
            "{p} should depend on rabbitmq with condition service_healthy"
        );
    }
    let test = service(&c, "rabbitmq")
        .get("healthcheck")
        .and_then(|h| h.get("test"))
        .map(words)
        .expect("rabbitmq has a healthcheck test");
    let test = test.join(" ");
    assert!(
        test.contains("rabbitmq-diagnostics") && test.contains("ping"),
        "the healthcheck should be `rabbitmq-diagnostics -q ping`, is {test:?}"
    );
    assert_ne!(
        service(&c, "rabbitmq")
            .get("healthcheck")
            .and_then(|h| h.get("disable"))
            .and_then(Value::as_bool),
        Some(true)
    );
}

#[test]
fn ports_are_published_on_localhost_only() {
    let c = compose();
    let mut published = 0;
    for (name, svc) in c.get("services").and_then(Value::as_mapping).unwrap() {
        let Some(Value::Sequence(ports)) = svc.get("ports") else {
            continue;
        };
        for port in ports {
            let host_ip = match port {
                Value::Mapping(_) => port.get("host_ip").map(string).unwrap_or_default(),
                other => {
                    let s = with_defaults(&string(other));
                    // host_ip:published:target; anything shorter binds every interface.
                    let parts: Vec<&str> = s.split(':').collect();
                    if parts.len() == 3 {
                        parts[0].to_string()
                    } else {
                        String::new()
                    }
                }
            };
            assert_eq!(
                host_ip,
                "127.0.0.1",
                "service {} publishes {port:?} beyond 127.0.0.1",
                string(name)
            );
            published += 1;
        }
    }
    // AMQP (for programs run outside compose), the management UI, and Prometheus's UI (the
    // `metrics` profile).
    assert_eq!(published, 3);
    let ports: Vec<String> = service(&c, "rabbitmq")
        .get("ports")
        .and_then(Value::as_sequence)
        .unwrap()
        .iter()
        .map(|p| with_defaults(&string(p)))
        .collect();
    assert!(ports.iter().any(|p| p.ends_with(":5672")), "{ports:?}");
    assert!(ports.iter().any(|p| p.ends_with(":15672")), "{ports:?}");
    let prometheus = service(&c, "prometheus");
    assert_eq!(
        prometheus.get("profiles").map(words),
        Some(vec!["metrics".to_string()]),
        "Prometheus starts only with --profile metrics"
    );
}

#[test]
fn credentials_come_from_the_environment_and_are_never_guest() {
    for file in ["docker-compose.yml", ".env.example"] {
        assert!(
            !read(file).to_ascii_lowercase().contains("guest"),
            "{file} mentions guest: guest must never be used over the network"
        );
    }
    let text = compose_text();
    let refs = interpolations(&text);
    for var in ["RABBITMQ_USER", "RABBITMQ_PASS"] {
        let uses: Vec<&String> = refs
            .iter()
            .filter(|(n, _)| n == var)
            .map(|(_, r)| r)
            .collect();
        assert!(!uses.is_empty(), "docker-compose.yml should use ${{{var}}}");
        for rest in uses {
            assert!(
                rest.starts_with(":?") && rest.contains(".env"),
                "${{{var}{rest}}} should fail clearly when unset, e.g. ${{{var}:?set {var} in .env}}"
            );
        }
    }
    let c = compose();
    let broker = environment(service(&c, "rabbitmq"));
    for (key, var) in [
        ("RABBITMQ_DEFAULT_USER", "RABBITMQ_USER"),
        ("RABBITMQ_DEFAULT_PASS", "RABBITMQ_PASS"),
    ] {
        let value = broker[key].clone().unwrap_or_default();
        assert!(
            value.starts_with(&format!("${{{var}:?")) && value.ends_with('}'),
            "{key} should be exactly ${{{var}:?...}}, is {value:?}"
        );
    }
    for p in PROGRAMS {
        let url = environment(service(&c, p))["AMQP_URL"]
            .clone()
            .unwrap_or_else(|| panic!("{p} should set AMQP_URL"));
        // amqp://${RABBITMQ_USER...}:${RABBITMQ_PASS...}@rabbitmq:5672/%2f
        let interpolation = |s: &str, var: &str| -> Option<usize> {
            s.starts_with(&format!("${{{var}"))
                .then(|| s.find('}').map(|i| i + 1))
                .flatten()
        };
        let creds = url.strip_prefix("amqp://").unwrap_or_default();
        let user = interpolation(creds, "RABBITMQ_USER")
            .unwrap_or_else(|| panic!("{p}'s AMQP_URL user should be ${{RABBITMQ_USER}}: {url}"));
        let host = creds[user..]
            .strip_prefix(':')
            .and_then(|rest| interpolation(rest, "RABBITMQ_PASS").map(|n| &rest[n..]))
            .unwrap_or_else(|| {
                panic!("{p}'s AMQP_URL password should be ${{RABBITMQ_PASS}}: {url}")
            });
        assert_eq!(host, "@rabbitmq:5672/%2f", "{p}'s AMQP_URL host: {url}");
    }
    // .env.example sets both, to something else than guest; .env itself is never committed.
    let example = read(".env.example");
    for var in ["RABBITMQ_USER", "RABBITMQ_PASS"] {
        let value = example
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{var}=")))
            .unwrap_or_else(|| panic!(".env.example should set {var}"));
        assert!(!value.trim().is_empty(), ".env.example leaves {var} empty");
    }
    assert!(
        read(".gitignore").lines().any(|l| l.trim() == ".env"),
        ".gitignore should keep .env (the password) out of git"
    );
}

#[test]
fn every_interpolated_variable_has_a_value() {
    let example = read(".env.example");
    let in_example = |name: &str| {
        example
            .lines()
            .any(|l| l.trim_start().starts_with(&format!("{name}=")))
    };
    for (name, rest) in interpolations(&compose_text()) {
        let has_default = rest.starts_with(":-") || rest.starts_with('-');
        let required = rest.starts_with(":?") || rest.starts_with('?');
        assert!(
            has_default || required || in_example(&name),
            "${{{name}{rest}}} has no default, no error message and is not in .env.example"
        );
        if required {
            assert!(
                in_example(&name),
                "{name} is required but .env.example does not set it"
            );
        }
    }
}

#[test]
fn the_broker_image_is_a_pinned_4x_management_tag() {
    let c = compose();
    let image = with_defaults(&string(
        service(&c, "rabbitmq")
            .get("image")
            .expect("rabbitmq has an image"),
    ));
    let tag = image
        .split('@')
        .next()
        .unwrap()
        .strip_prefix("rabbitmq:")
        .unwrap_or_else(|| panic!("{image} is not the official rabbitmq image"));
    let version = tag
        .strip_suffix("-management")
        .unwrap_or_else(|| panic!("{image} is not a -management tag"));
    let parts: Vec<&str> = version.split('.').collect();
    assert!(
        parts.len() == 3 && parts.iter().all(|p| p.parse::<u32>().is_ok()) && parts[0] == "4",
        "{image} should pin a full 4.x.y version"
    );
    assert!(
        service(&c, "rabbitmq").get("build").is_none(),
        "the broker is the official image, not built here"
    );
}

#[test]
fn every_command_names_a_binary_the_image_has() {
    let instructions = dockerfile();
    let bins = binaries_in_image(&instructions);
    let want: BTreeSet<String> = PROGRAMS.iter().map(|p| format!("gemmq-{p}")).collect();
    assert_eq!(
        bins, want,
        "the Dockerfile should copy the three programs onto PATH"
    );
    let build = instructions
        .iter()
        .filter(|(op, rest)| op == "RUN" && rest.contains("cargo build"))
        .map(|(_, rest)| rest.clone())
        .collect::<Vec<_>>()
        .join(" ");
    for b in &bins {
        assert!(
            build.contains(&format!("--bin {b}")),
            "the Dockerfile copies {b} but its cargo build does not build it: {build}"
        );
    }

    let c = compose();
    let mut images = BTreeSet::new();
    for p in PROGRAMS {
        let svc = service(&c, p);
        let mut cmd = svc.get("entrypoint").map(words).unwrap_or_default();
        cmd.extend(svc.get("command").map(words).unwrap_or_default());
        let program = cmd
            .first()
            .unwrap_or_else(|| panic!("{p} should say which program it runs"));
        assert_eq!(program, &format!("gemmq-{p}"), "{p} runs {cmd:?}");
        assert!(
            bins.contains(program),
            "{p} runs {program}, which the image lacks"
        );
        // Built here, from this directory's Dockerfile, as one image.
        let context = svc
            .get("build")
            .map(|b| b.get("context").map(string).unwrap_or_else(|| string(b)))
            .unwrap_or_else(|| panic!("{p} should be built from the Dockerfile"));
        assert_eq!(context, ".", "{p}'s build context");
        if let Some(df) = svc.get("build").and_then(|b| b.get("dockerfile")) {
            assert_eq!(string(df), "Dockerfile");
        }
        images.insert(svc.get("image").map(string));
    }
    assert_eq!(
        images.len(),
        1,
        "the three programs should share one image: {images:?}"
    );
}

#[test]
fn every_variable_in_the_compose_file_is_one_the_programs_read() {
    let vars = program_variables();
    let all: BTreeSet<&String> = vars.values().flatten().collect();
    let named = variable_names(&compose_text());
    assert!(named.contains("AMQP_URL") && named.contains("GEMMQ_JOB_ID"));
    for name in &named {
        assert!(
            all.contains(name),
            "docker-compose.yml names {name}, which no program reads (they read {all:?})"
        );
    }
    // ... and each service passes exactly the variables of its own program.
    let c = compose();
    for p in PROGRAMS {
        let env = environment(service(&c, p));
        for name in env
            .keys()
            .filter(|n| n.starts_with("GEMMQ_") || *n == "AMQP_URL")
        {
            assert!(
                vars[p].contains(name),
                "the {p} service sets {name}, which gemmq-{p} does not read"
            );
        }
    }
}

#[test]
fn every_setting_can_be_overridden_from_the_environment() {
    let c = compose();
    for (p, vars) in program_variables() {
        let env = environment(service(&c, p));
        for name in vars {
            // Unique per replica: the program's default is used.
            if p == "consumer" && name == "GEMMQ_WORKER_ID" {
                continue;
            }
            assert!(
                env.contains_key(&name),
                "gemmq-{p} reads {name} but the {p} service does not pass it; add `{name}:` (no value: \
                 passed through from the shell or .env when set) to its environment in docker-compose.yml"
            );
        }
        // Settings left to the config file are passed through, never forced to a value here,
        // so config/demo.toml (GEMMQ_CONFIG) still decides them. Those forced are about the
        // container, not the job: the job both sides name, where C goes, the stop grace, and
        // the metrics address (the container's own network, for the `metrics` profile).
        for (name, value) in &env {
            if let Some(v) = value
                && name.starts_with("GEMMQ_")
            {
                assert!(
                    matches!(
                        name.as_str(),
                        "GEMMQ_JOB_ID"
                            | "GEMMQ_OUT"
                            | "GEMMQ_SHUTDOWN_TIMEOUT"
                            | "GEMMQ_METRICS_ADDR"
                    ),
                    "the {p} service forces {name}={v}; pass it through (`{name}:`) so the config file applies"
                );
            }
        }
    }
}

#[test]
fn producer_and_collector_agree_on_the_job() {
    let c = compose();
    let job = |p: &str| environment(service(&c, p))["GEMMQ_JOB_ID"].clone();
    let producer = job("producer").expect("the producer sets GEMMQ_JOB_ID");
    assert!(producer.starts_with("${GEMMQ_JOB_ID"), "{producer}");
    assert_eq!(job("collector"), Some(producer));
    assert!(
        read(".env.example")
            .lines()
            .any(|l| l.starts_with("GEMMQ_JOB_ID="))
    );
}

#[test]
fn the_collector_writes_to_out_on_the_host() {
    let c = compose();
    let collector = service(&c, "collector");
    let out = environment(collector)["GEMMQ_OUT"]
        .clone()
        .expect("the collector sets GEMMQ_OUT to the mount's path");
    let mount = volumes(collector)
        .into_iter()
        .find(|(_, target, _)| *target == out)
        .unwrap_or_else(|| panic!("nothing is mounted at GEMMQ_OUT={out}"));
    assert!(
        mount.0 == "./out" || mount.0 == "./out/",
        "the collector's output should be the bind mount ./out, is {}",
        mount.0
    );
    assert!(!mount.2, "./out must be writable");
    // Whoever writes there runs as the host user (not root), so the files are the user's.
    let user = collector
        .get("user")
        .map(string)
        .expect("the collector sets user");
    assert!(user.starts_with("${HOST_UID"), "{user}");
    // The directory exists in a fresh clone, so Docker does not create it as root.
    assert!(root().join("out/.gitkeep").exists());
}

#[test]
fn config_is_mounted_read_only_where_the_programs_read_it() {
    let instructions = dockerfile();
    let last_from = instructions
        .iter()
        .rposition(|(op, _)| op == "FROM")
        .unwrap();
    let workdir = instructions[last_from..]
        .iter()
        .rev()
        .find(|(op, _)| op == "WORKDIR")
        .map(|(_, dir)| dir.trim_end_matches('/').to_string())
        .expect("the runtime stage sets WORKDIR");
    // The programs read config/gemmq.toml relative to their working directory.
    assert!(read("gemmq/src/config.rs").contains("\"config/gemmq.toml\""));
    let c = compose();
    for p in PROGRAMS {
        let svc = service(&c, p);
        if let Some(dir) = svc.get("working_dir") {
            assert_eq!(string(dir), workdir);
        }
        let config = volumes(svc)
            .into_iter()
            .find(|(src, _, _)| src.trim_end_matches('/') == "./config")
            .unwrap_or_else(|| panic!("{p} should mount ./config"));
        assert_eq!(
            config.1,
            format!("{workdir}/config"),
            "{p} mounts config/ at"
        );
        assert!(config.2, "{p} should mount config/ read-only");
    }
    assert!(root().join("config/demo.toml").exists());
}

#[test]
fn the_broker_keeps_its_data_in_a_named_volume() {
    let c = compose();
    let named: BTreeSet<String> = c
        .get("volumes")
        .and_then(Value::as_mapping)
        .map(|m| m.keys().map(string).collect())
        .unwrap_or_default();
    let data = volumes(service(&c, "rabbitmq"))
        .into_iter()
        .find(|(_, target, _)| target == "/var/lib/rabbitmq")
        .expect("rabbitmq mounts /var/lib/rabbitmq");
    assert!(named.contains(&data.0), "{} is not a named volume", data.0);
    // The node name, and so where its data is, follows the host name.
    assert!(service(&c, "rabbitmq").get("hostname").is_some());
}

#[test]
fn consumers_get_time_to_finish_when_stopped() {
    let c = compose();
    let consumer = service(&c, "consumer");
    let grace = consumer
        .get("stop_grace_period")
        .map(string)
        .expect("the consumer sets stop_grace_period");
    let grace = humantime::parse_duration(&grace).expect("stop_grace_period is a duration");
    let timeout = environment(consumer)["GEMMQ_SHUTDOWN_TIMEOUT"]
        .clone()
        .expect("the consumer sets GEMMQ_SHUTDOWN_TIMEOUT");
    // ${GEMMQ_SHUTDOWN_TIMEOUT:-30s} → 30s
    let default = timeout
        .split_once(":-")
        .map(|(_, d)| d.trim_end_matches('}').to_string())
        .unwrap_or(timeout.clone());
    let timeout = humantime::parse_duration(&default).expect("a shutdown timeout");
    assert!(
        grace >= timeout + Duration::from_secs(5),
        "stop_grace_period {grace:?} should exceed GEMMQ_SHUTDOWN_TIMEOUT {timeout:?} with room to return tasks"
    );
    // Signals reach the programs whatever their pid.
    for p in PROGRAMS {
        assert_eq!(
            service(&c, p).get("init").and_then(Value::as_bool),
            Some(true),
            "{p}"
        );
    }
}

#[test]
fn the_image_is_multi_stage_cached_and_runs_as_non_root() {
    let instructions = dockerfile();
    let images = base_images(&instructions);
    assert!(
        images.len() >= 2,
        "the Dockerfile should be multi-stage: {images:?}"
    );
    let rust = images
        .iter()
        .find_map(|i| i.strip_prefix("rust:"))
        .expect("a stage builds with the official rust image");
    let minor: u32 = rust
        .strip_prefix("1.")
        .and_then(|v| v.split(['.', '-']).next())
        .and_then(|m| m.parse().ok())
        .unwrap_or_else(|| panic!("rust:{rust} should pin a 1.x version"));
    assert!(
        minor >= 89,
        "rust:{rust}: the workspace needs Rust 1.89 or later"
    );
    let last_from = instructions
        .iter()
        .rposition(|(op, _)| op == "FROM")
        .unwrap();
    let user = instructions[last_from..]
        .iter()
        .rev()
        .find(|(op, _)| op == "USER")
        .map(|(_, u)| u.clone())
        .expect("the runtime stage has a USER line");
    let name = user.split(':').next().unwrap();
    assert!(name != "root" && name != "0", "USER {user} is root");

    // Dependencies are built in their own layer, before the sources are copied in.
    let pos = |pred: &dyn Fn(&(String, String)) -> bool| instructions.iter().position(pred);
    let cook = pos(&|(op, r)| op == "RUN" && r.contains("cargo chef cook"))
        .expect("a cargo chef cook layer caches the dependencies");
    let sources = instructions
        .iter()
        .enumerate()
        .skip(cook)
        .find(|(_, (op, r))| op == "COPY" && r.starts_with(". "))
        .map(|(i, _)| i)
        .expect("the sources are copied after the dependencies are built");
    let build = pos(&|(op, r)| op == "RUN" && r.contains("cargo build")).unwrap();
    assert!(cook < sources && sources < build);

    let ignore = read(".dockerignore");
    for entry in ["target", "out", ".git"] {
        assert!(
            ignore.lines().any(|l| l.trim().trim_matches('/') == entry),
            ".dockerignore should leave out {entry}"
        );
    }
}

#[test]
fn run_local_uses_the_same_variables() {
    let vars = program_variables();
    let all: BTreeSet<&String> = vars.values().flatten().collect();
    let script = read("scripts/run-local.sh");
    let named = variable_names(&script);
    assert!(named.contains("GEMMQ_JOB_ID") && named.contains("GEMMQ_OUT"));
    for name in &named {
        assert!(
            all.contains(name),
            "scripts/run-local.sh names {name}, which no program reads"
        );
    }
}

/// docker-compose.cluster.yml, with its merge keys applied.
fn cluster_compose() -> Value {
    let mut v: Value = serde_yaml_ng::from_str(&read("docker-compose.cluster.yml"))
        .expect("docker-compose.cluster.yml is valid YAML");
    v.apply_merge()
        .expect("the merge keys of docker-compose.cluster.yml apply");
    v
}

#[test]
fn the_cluster_file_adds_two_nodes_that_join_the_first_and_gives_every_program_all_three() {
    let c = cluster_compose();
    let conf = read("config/rabbitmq-cluster.conf");
    for node in ["rabbitmq", "rabbitmq2", "rabbitmq3"] {
        let svc = service(&c, node);
        assert!(
            conf.contains(&format!("= rabbit@{node}")),
            "config/rabbitmq-cluster.conf does not list rabbit@{node}"
        );
        let mounts = volumes(svc);
        assert!(
            mounts
                .iter()
                .any(|(src, target, ro)| src == "./config/rabbitmq-cluster.conf"
                    && target.starts_with("/etc/rabbitmq/conf.d/")
                    && *ro),
            "{node} must read the cluster configuration: {mounts:?}"
        );
        let env = environment(svc);
        assert!(
            env.get("RABBITMQ_COOKIE")
                .and_then(|v| v.as_deref())
                .is_some_and(|v| v.contains(":?")),
            "{node}: the cookie must come from .env, required"
        );
    }
    // Every node but the first has a fixed host name: node names are rabbit@<host name>.
    for node in ["rabbitmq2", "rabbitmq3"] {
        assert_eq!(string(&service(&c, node)["hostname"]), node);
    }
    for program in ["producer", "consumer", "collector"] {
        let url = environment(service(&c, program))
            .remove("AMQP_URL")
            .flatten()
            .unwrap_or_else(|| panic!("{program} gets no AMQP_URL"));
        let hosts: Vec<&str> = url
            .split(',')
            .map(|u| u.rsplit_once('@').map_or(u, |(_, h)| h))
            .collect();
        assert_eq!(
            hosts,
            [
                "rabbitmq:5672/%2f",
                "rabbitmq2:5672/%2f",
                "rabbitmq3:5672/%2f"
            ],
            "{program}"
        );
    }
}
