//! config/gemmq.toml documents every key with its built-in default. The defaults live in the code
//! (each program's `Settings::resolve`); this holds the file to them, so the two cannot drift.

use std::path::{Path, PathBuf};

use gemmq::config::{BrokerOptions, ConfigFile};

fn documented() -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/gemmq.toml");
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The file with every `# key = value` line uncommented, except values that name no default
/// (`<host>-<pid>`, `...`) and examples (the line says "no default"); and the keys left out.
fn uncommented(text: &str) -> (String, Vec<String>) {
    let (mut out, mut left_out) = (String::new(), Vec::new());
    for line in text.lines() {
        if line.starts_with('[') {
            out.push_str(line);
            out.push('\n');
            continue;
        }
        let Some((key, rest)) = line.strip_prefix("# ").and_then(|l| l.split_once(" = ")) else {
            continue;
        };
        if !key.chars().all(|c| c.is_ascii_lowercase() || c == '-') {
            continue;
        }
        // The value: a quoted string, or a bare word up to the comment.
        let value = match rest.strip_prefix('"') {
            Some(q) => format!("\"{}\"", q.split('"').next().unwrap_or_default()),
            None => rest
                .split_whitespace()
                .next()
                .unwrap_or_default()
                .to_string(),
        };
        if value.contains('<') || value.contains("...") || rest.contains("no default") {
            left_out.push(key.to_string());
            continue;
        }
        out.push_str(&format!("{key} = {value}\n"));
    }
    (out, left_out)
}

/// Each program's settings from `file` and nothing else, as their Debug text. Ids that are
/// made up when not given (the producer's job id) are fixed, so both sides can be compared.
fn settings(file: &ConfigFile) -> Vec<String> {
    let broker = file
        .section::<BrokerOptions>("broker")
        .unwrap()
        .resolve()
        .expect("the broker settings resolve");
    let producer = gemmq_producer::Settings::resolve(
        gemmq_producer::ProducerOptions {
            job_id: Some("job".into()),
            ..Default::default()
        },
        file,
        broker.clone(),
    )
    .expect("the producer settings resolve");
    let consumer = gemmq_consumer::Settings::resolve(Default::default(), file, broker.clone())
        .expect("the consumer settings resolve");
    let collector = gemmq_collector::Settings::resolve(Default::default(), file, broker.clone())
        .expect("the collector settings resolve");
    vec![
        format!("{broker:?}"),
        format!("{producer:?}"),
        format!("{consumer:?}"),
        format!("{collector:?}"),
    ]
}

#[test]
fn every_value_config_gemmq_toml_shows_is_the_default_the_programs_use() {
    let (text, left_out) = uncommented(&documented());
    assert!(
        text.lines().filter(|l| l.contains(" = ")).count() >= 25,
        "most keys have a value to check:\n{text}"
    );
    // Ids, input files, the management URL (producer and collector), the TLS files, the
    // consumer's modelled compute, the collector's live page and both metrics addresses (all
    // off) have no default to show.
    assert!(left_out.len() <= 15, "left out: {left_out:?}");
    let file = ConfigFile::parse(&text, PathBuf::from("config/gemmq.toml"))
        .expect("config/gemmq.toml uncommented is a valid config file");
    let defaults = settings(&ConfigFile::default());
    for (documented, default) in settings(&file).iter().zip(&defaults) {
        assert_eq!(
            documented, default,
            "config/gemmq.toml shows a value that is not the default"
        );
    }
}
