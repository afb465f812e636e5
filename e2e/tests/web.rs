//! The collector's live page (`--web`): its event stream read over HTTP, and the page itself in
//! a real browser (headless Chromium through chromedriver, when installed).

mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::time::Duration;

use common::{Env, Proc};

const MINUTE: Duration = Duration::from_secs(60);

/// A collector of `job` serving its page on a port of its own choosing; the page's URL.
async fn collector_with_page(env: &Env, job: &str) -> (Proc, String) {
    let collector = env.spawn(
        "gemmq-collector",
        "collector",
        &["--job-id", job, "--out", job, "--web", "127.0.0.1:0"],
    );
    let url = collector.logged_url("live page of the job").await;
    (collector, url)
}

/// Every event of the stream at `url`, (name, data), until the `done` event.
fn read_events(url: &str) -> Vec<(String, String)> {
    let body = ureq::get(&format!("{url}events"))
        .call()
        .expect("the event stream answers")
        .into_body();
    let mut events = Vec::new();
    let (mut name, mut data) = (String::new(), String::new());
    for line in BufReader::new(body.into_reader()).lines() {
        let line = line.expect("the stream reads");
        if let Some(n) = line.strip_prefix("event: ").or(line.strip_prefix("event:")) {
            name = n.trim().to_string();
        } else if let Some(d) = line.strip_prefix("data: ").or(line.strip_prefix("data:")) {
            data.push_str(d.trim());
        } else if line.is_empty() && !name.is_empty() {
            let done = name == "done";
            events.push((std::mem::take(&mut name), std::mem::take(&mut data)));
            if done {
                break;
            }
        }
    }
    events
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_event_stream_holds_every_task_exactly_once_from_snapshot_to_done() {
    let mut env = Env::new("web-events");
    let job = "webevents";
    let receipt = gemmq_producer::run(&env.producer(job, (256, 32, 256), 32))
        .await
        .unwrap();
    let (mut collector, url) = collector_with_page(&env, job).await;
    let page = ureq::get(&url)
        .call()
        .unwrap()
        .into_body()
        .read_to_string()
        .unwrap();
    assert!(
        page.contains("<canvas") && page.contains("EventSource"),
        "{page}"
    );
    assert!(
        !page.contains("http://") && !page.contains("https://"),
        "no CDN: the page works offline"
    );
    let mut w = env.consumer("w1");
    // 64 tasks of 100 ms: the stream is read mid-job, some tasks in its snapshot and the rest
    // as events.
    w.delay = "100ms".parse().unwrap();
    env.spawn_consumer(w);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let reader = tokio::task::spawn_blocking(move || read_events(&url));
    let events = tokio::time::timeout(MINUTE, reader)
        .await
        .expect("the stream ends with the job")
        .unwrap();
    assert_eq!(collector.wait(MINUTE).await, Some(0), "{}", collector.log());

    let (first, data) = &events[0];
    assert_eq!(first, "snapshot");
    let snapshot: serde_json::Value = serde_json::from_str(data).unwrap();
    assert_eq!(snapshot["job"]["tasks"], receipt.tasks);
    let key = |t: &serde_json::Value| {
        let at = |i: usize| t[i].as_u64().unwrap();
        (at(0), at(1), at(2))
    };
    let mut seen: HashMap<(u64, u64, u64), usize> = HashMap::new();
    for t in snapshot["tasks"].as_array().unwrap() {
        *seen.entry(key(t)).or_default() += 1;
    }
    let in_snapshot = seen.len() as u64;
    for (name, data) in &events[1..] {
        if name == "task" {
            *seen
                .entry(key(&serde_json::from_str(data).unwrap()))
                .or_default() += 1;
        }
    }
    assert!(
        in_snapshot < receipt.tasks,
        "the stream was read mid-job ({in_snapshot} in the snapshot)"
    );
    assert_eq!(seen.len() as u64, receipt.tasks, "every task appears");
    assert!(seen.values().all(|&n| n == 1), "each once: {seen:?}");
    assert_eq!(
        events.last().unwrap(),
        &("done".to_string(), "\"complete\"".to_string())
    );
    env.stop_consumers().await;
    env.cleanup(&[job]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_live_page_address_in_use_is_a_clear_error() {
    let env = Env::new("web-inuse");
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    gemmq_producer::run(&env.producer("webinuse", (32, 16, 32), 16))
        .await
        .unwrap();
    let mut collector = env.spawn(
        "gemmq-collector",
        "collector",
        &["--job-id", "webinuse", "--out", "webinuse", "--web", &addr],
    );
    assert_eq!(collector.wait(MINUTE).await, Some(1), "{}", collector.log());
    assert!(
        collector.log().contains("cannot serve the live page on"),
        "{}",
        collector.log()
    );
}

/// A WebDriver session on headless Chromium, through chromedriver (plain HTTP and JSON).
struct Browser {
    driver: std::process::Child,
    base: String,
    session: String,
}

impl Browser {
    /// `None` (with a message) where Chromium or chromedriver is not installed.
    fn start() -> Option<Browser> {
        let found = |p: &str| std::path::Path::new(p).exists();
        if !(found("/usr/bin/chromedriver") && found("/usr/bin/chromium")) {
            eprintln!(
                "skipped: no /usr/bin/chromium and /usr/bin/chromedriver (apt-get install chromium chromium-driver)"
            );
            return None;
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let driver = std::process::Command::new("/usr/bin/chromedriver")
            .arg(format!("--port={port}"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("chromedriver starts");
        let base = format!("http://127.0.0.1:{port}");
        let caps = serde_json::json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {"binary": "/usr/bin/chromium",
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1280,1100"]}
        }}});
        let started = std::time::Instant::now();
        let session = loop {
            match ureq::post(&format!("{base}/session")).send_json(&caps) {
                Ok(r) => {
                    let v: serde_json::Value = r.into_body().read_json().unwrap();
                    break v["value"]["sessionId"].as_str().unwrap().to_string();
                }
                Err(e) => {
                    assert!(
                        started.elapsed() < MINUTE,
                        "chromedriver did not answer: {e}"
                    );
                    std::thread::sleep(Duration::from_millis(200));
                }
            }
        };
        Some(Browser {
            driver,
            base,
            session,
        })
    }

    fn call(&self, path: &str, body: serde_json::Value) -> serde_json::Value {
        let url = format!("{}/session/{}/{path}", self.base, self.session);
        let v: serde_json::Value = ureq::post(&url)
            .send_json(&body)
            .unwrap_or_else(|e| panic!("WebDriver {path}: {e}"))
            .into_body()
            .read_json()
            .unwrap();
        v["value"].clone()
    }

    fn open(&self, url: &str) {
        self.call("url", serde_json::json!({ "url": url }));
    }

    /// Tiles filled, tiles in all, and the state the page shows.
    fn map(&self) -> (u64, u64, String) {
        let v = self.call(
            "execute/sync",
            serde_json::json!({"script": "const m = document.getElementById('map'); return [m.dataset.filled, m.dataset.total, document.getElementById('state').className];", "args": []}),
        );
        let n = |i: usize| v[i].as_str().unwrap_or("0").parse().unwrap_or(0);
        (n(0), n(1), v[2].as_str().unwrap_or("").to_string())
    }

    fn screenshot(&self, to: &std::path::Path) {
        let url = format!("{}/session/{}/screenshot", self.base, self.session);
        let v: serde_json::Value = ureq::get(&url)
            .call()
            .unwrap()
            .into_body()
            .read_json()
            .unwrap();
        use base64::Engine;
        let png = base64::engine::general_purpose::STANDARD
            .decode(v["value"].as_str().unwrap())
            .unwrap();
        std::fs::write(to, png).unwrap();
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = ureq::delete(&format!("{}/session/{}", self.base, self.session)).call();
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn in_a_real_browser_a_64_by_64_map_fills_in_as_the_job_runs_and_is_whole_at_the_end() {
    let Some(browser) = tokio::task::spawn_blocking(Browser::start).await.unwrap() else {
        return;
    };
    let mut env = Env::new("web-browser");
    let job = "webbrowser";
    // 64×64 tiles of 16, grouped 64 to a task message: 4,096 tiles, each drawn as it comes.
    gemmq_producer::run(&env.producer(job, (1024, 32, 1024), 16))
        .await
        .unwrap();
    let (mut collector, url) = collector_with_page(&env, job).await;
    for (id, failure_rate) in [("worker-1", 0.0), ("worker-2", 0.15)] {
        let mut w = env.consumer(id);
        w.delay = "3ms".parse().unwrap();
        w.failure_rate = failure_rate;
        env.spawn_consumer(w);
    }
    let browser = std::sync::Arc::new(browser);
    let b = browser.clone();
    let mid = tokio::task::spawn_blocking(move || {
        b.open(&url);
        let started = std::time::Instant::now();
        loop {
            let (filled, total, state) = b.map();
            if filled > 0 {
                return (filled, total, state);
            }
            assert!(started.elapsed() < MINUTE, "no tile drawn ({state})");
            std::thread::sleep(Duration::from_millis(100));
        }
    })
    .await
    .unwrap();
    assert_eq!(mid.1, 4096, "a 64×64 map");
    assert!(
        mid.0 < mid.1,
        "loaded mid-job: part of the map filled, the rest empty ({mid:?})"
    );
    assert_eq!(mid.2, "collecting");

    assert_eq!(collector.wait(MINUTE).await, Some(0), "{}", collector.log());
    let b = browser.clone();
    let end = tokio::task::spawn_blocking(move || {
        let started = std::time::Instant::now();
        loop {
            let now = b.map();
            if now.2 == "complete" || started.elapsed() > Duration::from_secs(10) {
                return now;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    })
    .await
    .unwrap();
    assert_eq!(
        end,
        (4096, 4096, "complete".to_string()),
        "the whole map, and the job done"
    );
    if let Ok(to) = std::env::var("GEMMQ_SCREENSHOT_TO") {
        browser.screenshot(std::path::Path::new(&to));
    }
    env.stop_consumers().await;
    env.cleanup(&[job]).await;
}
