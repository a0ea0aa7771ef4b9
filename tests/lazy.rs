//! Lazy start (issue 19): layers read from a real registry on loopback by verified chunks,
//! through the library (no VM: fast) and, in one boot test, through `run --lazy` (QEMU reads
//! the lowers over NBD). Faults come from a proxy in the test that flips, cuts or stalls the
//! registry's answers.

mod fixture;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fixture::registry::Registry;
use fixture::*;
use vmrootfs::lazy::{self, BlockSource, CHUNK};
use vmrootfs::{Platform, RegistryOptions, Store};

/// The busybox image built with `--verity` into a store of its own and pushed (uncompressed,
/// with its trees) to a new loopback registry as `lab/bb:v1`.
struct Pushed {
    dir: tempfile::TempDir,
    registry: Registry,
    /// The stored record of the source store (`inspect --json`).
    record: serde_json::Value,
}

impl Pushed {
    fn new(name: &str) -> Pushed {
        let dir = scratch(name);
        let store = dir.path().join("source");
        let demo = Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/busybox.oci.tar");
        let spec = format!("oci-archive:{}:busybox", demo.display());
        let (ok, _, err) = run(cli(&store).args(["-q", "build", &spec, "--tag", "bb", "--verity"]));
        assert!(ok, "build: {err}");
        let registry = Registry::start(None);
        let (ok, _, err) =
            run(cli(&store).args(["-q", "push", "bb", &format!("{}/lab/bb:v1", registry.addr)]));
        assert!(ok, "push: {err}");
        let (ok, out, err) = run(cli(&store).args(["inspect", "bb", "--json"]));
        assert!(ok, "inspect: {err}");
        Pushed { dir, registry, record: serde_json::from_str(&out).unwrap() }
    }

    /// The stored blob of lower `i` in the source store.
    fn blob(&self, i: usize) -> Vec<u8> {
        std::fs::read(self.record["lowers"][i]["path"].as_str().unwrap()).unwrap()
    }

    /// A new empty store.
    fn store(&self, name: &str) -> (PathBuf, Store) {
        let path = self.dir.path().join(name);
        (path.clone(), Store::open(&path).unwrap())
    }

    /// Blob GETs in the registry's access log: (status, count).
    fn blob_gets(&self) -> Vec<String> {
        let log = std::fs::read_to_string(&self.registry.log).unwrap();
        log.lines()
            .filter(|l| l.contains("\"GET /v2/lab/bb/blobs/"))
            .filter_map(|l| {
                l.split("HTTP/1.1\" ").nth(1).and_then(|s| s.split(' ').next()).map(str::to_string)
            })
            .collect()
    }
}

/// A stall is a second without 1 KiB in these tests (see `a_cut_or_stalled_chunk…`).
fn setup() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    // SAFETY: every test calls this before anything reads the environment; the first call
    // sets it while the others wait.
    ONCE.call_once(|| unsafe { std::env::set_var("VMROOTFS_STALL_TIMEOUT", "1s") });
}

/// The vmrootfs binary with a store, with the usual stall timeout (a push of a large blob
/// waits longer than a second for the registry's answer).
fn cli(store: &Path) -> std::process::Command {
    let mut c = vmrootfs(store);
    c.env_remove("VMROOTFS_STALL_TIMEOUT");
    c
}

fn open(reference: &str, store: &Store) -> Result<lazy::LazyImage, lazy::LazyError> {
    lazy::open(store, reference, &RegistryOptions::default(), &Platform::host())
}

/// `e` and its causes, one after another.
fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        text += &format!(": {c}");
        cause = c.source();
    }
    text
}

/// Reads all of `source`, 64 KiB at a time.
fn read_all(source: &dyn BlockSource) -> Vec<u8> {
    let mut out = vec![0u8; source.len() as usize];
    for (i, piece) in out.chunks_mut(64 << 10).enumerate() {
        source.read_at(piece, i as u64 * (64 << 10)).unwrap();
    }
    out
}

#[test]
fn lazy_reads_are_verified_ranges_and_completion_stores_the_pulled_bytes() {
    setup();
    let pushed = Pushed::new("lazy-core");
    let reference = format!("{}/lab/bb:v1", pushed.registry.addr);
    let (store_dir, store) = pushed.store("lazy");
    let before = pushed.blob_gets().len();
    let image = open(&reference, &store).unwrap();
    let sources = image.sources();
    assert_eq!(sources.len(), pushed.record["lowers"].as_array().unwrap().len());
    // Opening fetched the trees only: one range request per layer.
    assert_eq!(image.fetched_bytes(), 0);
    let blob = pushed.blob(0);
    assert_eq!(sources[0].len(), blob.len() as u64);
    assert!(blob.len() as u64 > 2 * CHUNK, "the test wants a blob of several chunks: {}", blob.len());
    // One block in the second chunk: that chunk alone arrives.
    let mut block = vec![0u8; 4096];
    sources[0].read_at(&mut block, CHUNK + 8192).unwrap();
    assert_eq!(block, blob[(CHUNK + 8192) as usize..(CHUNK + 8192 + 4096) as usize]);
    assert_eq!(image.fetched_bytes(), CHUNK);
    let gets = pushed.blob_gets()[before..].to_vec();
    assert!(!gets.is_empty() && gets.iter().all(|s| s == "206"), "only range requests: {gets:?}");
    // Everything reads as the stored blob.
    assert_eq!(read_all(&*sources[0]), blob);
    let log = image.fetch_log();
    assert!(log.iter().all(|f| f.cause == lazy::Cause::Read), "{log:?}");
    drop(sources);
    let built = image.complete(&store, Some("bb"), &vmrootfs::progress::Reporter::new()).unwrap();
    for (i, lower) in built.record.lowers.iter().enumerate() {
        let want = &pushed.record["lowers"][i];
        assert_eq!(lower.blob_sha256, want["blob_sha256"].as_str().unwrap());
        assert_eq!(std::fs::read(&lower.path).unwrap(), pushed.blob(i), "lower {i} is the pulled bytes");
        let v = lower.verity.as_ref().expect("its tree is stored too");
        assert_eq!(v.root_digest.to_string(), want["verity"]["root_digest"].as_str().unwrap());
    }
    let gets = pushed.blob_gets()[before..].to_vec();
    assert!(gets.iter().all(|s| s == "206"), "completion reads ranges too: {gets:?}");
    // The caches went with publication: gc finds nothing of them.
    assert!(std::fs::read_dir(store_dir.join("lazy")).unwrap().next().is_none(), "caches removed");
    let (ok, out, err) = run(cli(&store_dir).args(["gc", "--json"]));
    assert!(ok, "gc: {err}");
    let gc: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!((gc["layers"].as_u64(), gc["lazy"].as_u64()), (Some(0), Some(0)), "{gc}");
    let (ok, _, err) = run(cli(&store_dir).args(["verify", "bb"]));
    assert!(ok, "verify: {err}");
}

#[test]
fn lazy_refuses_images_it_cannot_check_or_read_by_range() {
    setup();
    let pushed = Pushed::new("lazy-refuse");
    let (_, store) = pushed.store("lazy");
    let source = pushed.dir.path().join("source");
    let addr = &pushed.registry.addr;
    let (ok, _, err) = run(cli(&source).args(["-q", "push", "bb", &format!("{addr}/lab/bb:zstd"), "--zstd"]));
    assert!(ok, "push --zstd: {err}");
    let e = open(&format!("{addr}/lab/bb:zstd"), &store).err().expect("zstd refused").to_string();
    assert!(e.contains("zstd-compressed") && e.contains("without --zstd"), "{e}");
    let demo = Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/busybox.oci.tar");
    let plain = pushed.dir.path().join("plain");
    let spec = format!("oci-archive:{}:busybox", demo.display());
    assert!(run(cli(&plain).args(["-q", "build", &spec, "--tag", "bb"])).0);
    assert!(run(cli(&plain).args(["-q", "push", "bb", &format!("{addr}/lab/bb:plain")])).0);
    let e = open(&format!("{addr}/lab/bb:plain"), &store).err().expect("no verity refused").to_string();
    assert!(e.contains("no dm-verity tree") && e.contains("--verity"), "{e}");
}

/// What the proxy does to the registry's answer to a range request beginning at `start`.
#[derive(Clone, Copy, Debug)]
enum Fault {
    /// Flips body byte `at` of every such answer.
    Flip { start: u64, at: usize },
    /// Sends the first `after` body bytes of the first such answer, then closes.
    Cut { start: u64, after: usize },
    /// Sends the first `after` body bytes of the first such answer, then sends nothing more
    /// for `stall`, then closes.
    Stall { start: u64, after: usize, stall: Duration },
}

/// An HTTP proxy in front of the registry (one request per connection) that applies `fault`;
/// logs the Range of every request.
struct Proxy {
    addr: String,
    ranges: Arc<Mutex<Vec<String>>>,
}

impl Proxy {
    fn start(upstream: &str, fault: Fault) -> Proxy {
        Proxy::start_for(upstream, fault, "")
    }

    /// A proxy whose fault applies only to requests whose path holds `layer`.
    fn start_for(upstream: &str, fault: Fault, layer: &str) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let ranges = Arc::new(Mutex::new(Vec::new()));
        let (upstream, log, layer) = (upstream.to_string(), ranges.clone(), layer.to_string());
        let fired = Arc::new(Mutex::new(false));
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { break };
                let (upstream, log, fired, layer) =
                    (upstream.clone(), log.clone(), fired.clone(), layer.clone());
                std::thread::spawn(move || {
                    let _ = forward(conn, &upstream, fault, &layer, &log, &fired);
                });
            }
        });
        Proxy { addr, ranges }
    }

    fn ranges(&self) -> Vec<String> {
        self.ranges.lock().unwrap().clone()
    }
}

fn header_end(bytes: &[u8]) -> Option<usize> {
    bytes.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 4)
}

/// One request: forwarded with `Connection: close`, the answer read whole, the fault applied.
fn forward(
    mut client: TcpStream,
    upstream: &str,
    fault: Fault,
    layer: &str,
    log: &Mutex<Vec<String>>,
    fired: &Mutex<bool>,
) -> std::io::Result<()> {
    let mut request = Vec::new();
    let mut buf = [0u8; 4096];
    while header_end(&request).is_none() {
        let n = client.read(&mut buf)?;
        if n == 0 {
            return Ok(());
        }
        request.extend_from_slice(&buf[..n]);
    }
    let head = String::from_utf8_lossy(&request[..header_end(&request).unwrap()]).into_owned();
    let mut lines: Vec<&str> = head
        .split("\r\n")
        .filter(|l| !l.is_empty() && !l.to_ascii_lowercase().starts_with("connection:"))
        .collect();
    lines.push("Connection: close");
    let range = lines
        .iter()
        .find_map(|l| l.to_ascii_lowercase().strip_prefix("range: bytes=").map(str::to_string))
        .unwrap_or_default();
    log.lock().unwrap().push(range.clone());
    let mut up = TcpStream::connect(upstream)?;
    up.write_all(format!("{}\r\n\r\n", lines.join("\r\n")).as_bytes())?;
    let mut answer = Vec::new();
    up.read_to_end(&mut answer)?;
    let body_at = header_end(&answer).unwrap_or(answer.len());
    // Only the first request of a whole chunk, not its resumption.
    let matches = |s: u64| {
        range == format!("{s}-{}", s + CHUNK - 1)
            && answer.starts_with(b"HTTP/1.1 206")
            && head.contains(layer)
    };
    match fault {
        Fault::Flip { start: s, at } if matches(s) && body_at + at < answer.len() => {
            answer[body_at + at] ^= 0x40;
        }
        Fault::Cut { start: s, after } | Fault::Stall { start: s, after, .. } if matches(s) => {
            let mut once = fired.lock().unwrap();
            if !*once {
                *once = true;
                drop(once);
                client.write_all(&answer[..body_at + after])?;
                if let Fault::Stall { stall, .. } = fault {
                    std::thread::sleep(stall);
                }
                return Ok(());
            }
        }
        _ => {}
    }
    client.write_all(&answer)
}

#[test]
fn a_flipped_byte_is_never_served_nor_cached() {
    setup();
    let pushed = Pushed::new("lazy-flip");
    let proxy = Proxy::start(&pushed.registry.addr, Fault::Flip { start: CHUNK, at: 4096 * 3 + 100 });
    let (store_dir, store) = pushed.store("lazy");
    let image = open(&format!("{}/lab/bb:v1", proxy.addr), &store).unwrap();
    let sources = image.sources();
    let mut block = vec![0u8; 4096];
    sources[0].read_at(&mut block, 0).expect("chunk 0 is served unchanged");
    let e = sources[0].read_at(&mut block, CHUNK).expect_err("chunk 1 has a flipped byte");
    assert_eq!(e.kind(), std::io::ErrorKind::InvalidData, "{e}");
    let text = chain(&e);
    // The pushed layer is `blob ‖ tree`: its digest is the tree record's sha256.
    let hex = pushed.record["lowers"][0]["verity"]["sha256"].as_str().unwrap();
    assert!(
        text.contains(&format!("sha256:{hex}")) && text.contains(&format!("block {}", CHUNK / 4096 + 3)),
        "{text}"
    );
    assert_eq!(image.corrupt_layers().len(), 1);
    assert_eq!(image.corrupt_layers()[0].0, 0);
    // Nothing of chunk 1 is in the cache: its bytes are a hole, its mark 0.
    let cache_dir = store_dir.join("lazy").join(hex);
    let cache = std::fs::read(cache_dir.join("blob")).unwrap();
    assert!(cache[CHUNK as usize..2 * CHUNK as usize].iter().all(|b| *b == 0), "unverified bytes cached");
    assert_eq!(&std::fs::read(cache_dir.join("present")).unwrap()[..2], &[1, 0]);
    drop(sources);
    let e = image.complete(&store, None, &vmrootfs::progress::Reporter::new()).expect_err("not published");
    assert!(chain(&e).contains("does not match its dm-verity hash"), "{e}");
    let (ok, out, _) = run(cli(&store_dir).args(["ls", "--json"]));
    assert!(ok && out.trim() == "[]", "nothing recorded: {out}");
}

#[test]
fn a_cut_or_stalled_chunk_resumes_with_the_right_bytes() {
    setup();
    let pushed = Pushed::new("lazy-cut");
    let blob = pushed.blob(0);
    for fault in [
        Fault::Cut { start: 0, after: 100_000 },
        Fault::Stall { start: CHUNK, after: 50_000, stall: Duration::from_secs(3) },
    ] {
        let proxy = Proxy::start(&pushed.registry.addr, fault);
        let (_, store) = pushed.store(&format!("lazy-{}", matches!(fault, Fault::Cut { .. })));
        let image = open(&format!("{}/lab/bb:v1", proxy.addr), &store).unwrap();
        let source = image.sources().remove(0);
        assert_eq!(read_all(&*source), blob, "{fault:?}");
        let ranges = proxy.ranges();
        let (resumed_from, end) = match fault {
            Fault::Cut { start, after } | Fault::Stall { start, after, .. } => {
                (start + after as u64, start + CHUNK - 1)
            }
            Fault::Flip { .. } => unreachable!(),
        };
        assert!(
            ranges.contains(&format!("{resumed_from}-{end}")),
            "{fault:?} resumed where it broke: {ranges:?}"
        );
    }
}

/// The child of [`a_killed_reader_leaves_a_cache_the_next_run_resumes`]: reads chunks 0 and 2
/// lazily, then waits to be killed.
#[test]
fn killed_reader_child() {
    let (Ok(reference), Ok(store)) = (std::env::var("LAZY_CHILD_REF"), std::env::var("LAZY_CHILD_STORE"))
    else {
        return; // run by the parent test only
    };
    setup();
    let store = Store::open(&store).unwrap();
    let image = open(&reference, &store).unwrap();
    let source = image.sources().remove(0);
    let mut block = vec![0u8; 4096];
    source.read_at(&mut block, 0).unwrap();
    source.read_at(&mut block, 2 * CHUNK).unwrap();
    println!("read");
    std::io::stdout().flush().unwrap();
    std::thread::sleep(Duration::from_secs(600));
}

#[test]
fn a_killed_reader_leaves_a_cache_the_next_run_resumes() {
    setup();
    let pushed = Pushed::new("lazy-kill");
    let reference = format!("{}/lab/bb:v1", pushed.registry.addr);
    let (store_dir, store) = pushed.store("lazy");
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "killed_reader_child", "--nocapture", "--test-threads=1"])
        .env("LAZY_CHILD_REF", &reference)
        .env("LAZY_CHILD_STORE", &store_dir)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    while !line.contains("read") {
        line.clear();
        assert!(std::io::BufRead::read_line(&mut out, &mut line).unwrap() > 0, "the child ended early");
    }
    child.kill().unwrap();
    child.wait().unwrap();
    // The next open resumes: chunks 0 and 2 are present, proved again, not fetched again.
    let image = open(&reference, &store).unwrap();
    let source = image.sources().remove(0);
    let mut block = vec![0u8; 4096];
    source.read_at(&mut block, 0).unwrap();
    source.read_at(&mut block, 2 * CHUNK).unwrap();
    assert_eq!(image.fetched_bytes(), 0, "resumed chunks are not fetched again");
    assert_eq!(read_all(&*source), pushed.blob(0));
    drop(source);
    let built = image.complete(&store, Some("bb"), &vmrootfs::progress::Reporter::new()).unwrap();
    assert_eq!(
        built.record.lowers[0].blob_sha256,
        pushed.record["lowers"][0]["blob_sha256"].as_str().unwrap()
    );
    let (ok, _, err) = run(cli(&store_dir).args(["verify", "bb"]));
    assert!(ok, "verify: {err}");
    let (ok, out, err) = run(cli(&store_dir).args(["gc", "--json"]));
    assert!(ok, "gc: {err}");
    let gc: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        (gc["layers"].as_u64(), gc["lazy"].as_u64(), gc["tmp"].as_u64()),
        (Some(0), Some(0), Some(0)),
        "{gc}"
    );
}

#[test]
fn a_killed_reader_leaves_a_cache_gc_removes() {
    setup();
    let pushed = Pushed::new("lazy-gc");
    let reference = format!("{}/lab/bb:v1", pushed.registry.addr);
    let (store_dir, store) = pushed.store("lazy");
    let image = open(&reference, &store).unwrap();
    let mut block = vec![0u8; 4096];
    image.sources()[0].read_at(&mut block, 0).unwrap();
    let layers = image.sources().len();
    // Dropped without completing: the caches stay, as a killed run leaves them.
    drop(image);
    let (ok, out, err) = run(cli(&store_dir).args(["gc", "--json"]));
    assert!(ok, "gc: {err}");
    let gc: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(gc["lazy"].as_u64(), Some(layers as u64), "{gc}");
    assert!(std::fs::read_dir(store_dir.join("lazy")).unwrap().next().is_none());
}

/// Blob GETs of the registry's access log from line `from` on: (digest, status) per request.
fn blob_requests(log: &Path, from: usize) -> Vec<(String, String)> {
    let text = std::fs::read_to_string(log).unwrap();
    text.lines()
        .filter(|l| l.contains("/blobs/sha256:") && l.contains("HTTP/1.1\" "))
        .skip(from)
        .filter_map(|l| {
            let digest = l.split("/blobs/").nth(1)?.split(' ').next()?.to_string();
            let status = l.split("HTTP/1.1\" ").nth(1)?.split(' ').next()?.to_string();
            Some((digest, status))
        })
        .collect()
}

#[test]
fn boot_lazy_real_image_then_a_flipped_byte_names_the_lower() {
    setup();
    let dir = scratch("lazy-boot");
    let source = dir.path().join("source");
    let spec = format!("oci:{}/oci:test", image().display());
    let (ok, _, err) = run(cli(&source).args(["-q", "build", &spec, "--tag", "deb", "--verity"]));
    assert!(ok, "build: {err}");
    let registry = Registry::start(None);
    let reference = format!("{}/lab/deb:v1", registry.addr);
    let (ok, _, err) = run(cli(&source).args(["-q", "push", "deb", &reference]));
    assert!(ok, "push: {err}");
    let gets_before = blob_requests(&registry.log, 0).len();

    // 1. The real image, lazily, with the checks of tests/boot.rs.
    let store = dir.path().join("lazy");
    let fetch_log = dir.path().join("fetch.json");
    let out = cli(&store)
        .args(["run", "--lazy", &reference, "--timeout", "400", "--background-rate", "64K", "--fetch-log"])
        .arg(&fetch_log)
        .args(["--", "sh", "-c", PROBE])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "run --lazy exits with the command's status\n{stdout}\n{stderr}");
    for want in [
        "python 42",
        "suid 4755 root",
        "/edge/cap-true cap_net_raw=ep",
        "motd whited out",
        "opaque: only-this",
        "disks: 5", // four lowers and the trees
        "root: overlay",
    ] {
        assert!(stdout.lines().any(|l| l.trim() == want), "missing {want:?}:\n{stdout}\n{stderr}");
    }
    // Only ranges were asked for, and before the command exited less than all of the data.
    let requests = blob_requests(&registry.log, gets_before);
    assert!(requests.iter().all(|(_, s)| s == "206"), "only range requests: {requests:?}");
    let log: serde_json::Value = serde_json::from_slice(&std::fs::read(&fetch_log).unwrap()).unwrap();
    let (before, data) = (log["fetched_before_exit"].as_u64().unwrap(), log["data_bytes"].as_u64().unwrap());
    eprintln!("fetched before exit: {before} of {data} bytes");
    assert!(before > 0 && before < data / 2, "lazy: {before} of {data} bytes before the exit");
    // run exited when the command did: the rest is a detached completer's, which has not
    // recorded the image yet (it has most of 250 MB still to fetch).
    let completer = completer_pid(&stderr);
    let (ok, out, _) = run(cli(&store).args(["ls", "--json"]));
    assert!(ok && out.trim() == "[]", "recorded before run exited: {out}");
    // A second run meanwhile waits for the completion and boots the recorded image.
    let second = cli(&store)
        .args(["run", "--lazy", &reference, "--timeout", "400", "--", "sh", "-c", "echo second"])
        .output()
        .unwrap();
    let (out2, err2) = (String::from_utf8_lossy(&second.stdout), String::from_utf8_lossy(&second.stderr));
    assert!(second.status.success() && out2.trim() == "second", "second run: {out2}\n{err2}");
    assert!(!err2.contains("lazy:"), "the second run booted the recorded image, not lazily: {err2}");
    wait_gone(completer);
    let logs: Vec<_> =
        std::fs::read_dir(store.join("lazy")).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert!(logs.is_empty(), "the completer left its caches or log: {logs:?}");
    // The completion stored what a plain pull stores.
    let plain = dir.path().join("plain");
    let (ok, _, err) = run(cli(&plain).args(["-q", "build", &reference, "--tag", "deb"]));
    assert!(ok, "plain pull: {err}");
    let inspect = |store: &Path, tag: &str| -> serde_json::Value {
        let (ok, out, err) = run(vmrootfs(store).args(["inspect", tag, "--json"]));
        assert!(ok, "inspect: {err}");
        serde_json::from_str(&out).unwrap()
    };
    let (lazy_rec, plain_rec) = (inspect(&store, &reference), inspect(&plain, "deb"));
    let lazy_lowers = lowers_of(&lazy_rec);
    let plain_lowers = lowers_of(&plain_rec);
    assert_eq!(lazy_lowers.len(), 4);
    for i in 0..4 {
        assert_eq!(lazy_rec["lowers"][i]["blob_sha256"], plain_rec["lowers"][i]["blob_sha256"], "lower {i}");
        assert_eq!(lazy_rec["lowers"][i]["verity"], plain_rec["lowers"][i]["verity"], "lower {i}");
        assert!(
            std::fs::read(&lazy_lowers[i].0).unwrap() == std::fs::read(&plain_lowers[i].0).unwrap(),
            "lower {i}"
        );
    }
    let (ok, _, err) = run(cli(&store).args(["verify", &reference]));
    assert!(ok, "verify: {err}");

    // 2. A registry (proxy) flipping one byte of a chunk only `cat python3.11` reads.
    let stack = MountedStack::mount(&lowers_of(&inspect(&source, "deb"))[1..2]);
    let file = std::fs::read(stack.lower(0).join("usr/bin/python3.11")).unwrap();
    drop(stack);
    let block = &file[1 << 20..(1 << 20) + 4096];
    let blob = std::fs::read(&lazy_lowers[1].0).unwrap();
    let at =
        blob.chunks(4096).position(|c| c == block).expect("python3.11's block in the blob") as u64 * 4096;
    drop(blob);
    let layer = lazy_rec["lowers"][1]["verity"]["sha256"].as_str().unwrap().to_string();
    let chunk = at / CHUNK * CHUNK;
    let proxy = Proxy::start_for(
        &registry.addr,
        Fault::Flip { start: chunk, at: (at - chunk) as usize + 100 },
        &layer,
    );
    let flipped = dir.path().join("flipped");
    let reads = "cat /usr/bin/python3.11 > /dev/null; echo cat $?";
    let out = cli(&flipped)
        .args([
            "run",
            "--lazy",
            &format!("{}/lab/deb:v1", proxy.addr),
            "--timeout",
            "400",
            "--",
            "sh",
            "-c",
            reads,
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(125), "run of a corrupt registry fails\n{stdout}\n{stderr}");
    assert!(stdout.contains("cat 1"), "the guest's read fails: {stdout}\n{stderr}");
    let named = format!("lower 1 (layer sha256:{layer})");
    assert!(stderr.contains("dm-verity") && stderr.contains(&named), "run names the lower: {stderr}");
    for other in [0, 2, 3] {
        assert!(!stderr.contains(&format!("lower {other} (")), "only lower 1 is named: {stderr}");
    }
    // Nothing unverified in the cache: the flipped chunk is a hole, unmarked; nothing stored.
    let cache = flipped.join("lazy").join(&layer);
    let bytes = std::fs::read(cache.join("blob")).unwrap();
    assert!(
        bytes[chunk as usize..(chunk + CHUNK) as usize].iter().all(|b| *b == 0),
        "unverified bytes cached"
    );
    assert_eq!(std::fs::read(cache.join("present")).unwrap()[(chunk / CHUNK) as usize], 0);
    let (ok, out, _) = run(cli(&flipped).args(["ls", "--json"]));
    assert!(ok && out.trim() == "[]", "nothing recorded: {out}");
    let (ok, out, err) = run(cli(&flipped).args(["gc", "--json"]));
    assert!(ok, "gc: {err}");
    let gc: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!((gc["layers"].as_u64(), gc["lazy"].as_u64()), (Some(0), Some(4)), "{gc}");
}

#[test]
fn boot_lazy_killed_mid_fetch_then_rerun() {
    setup();
    let pushed = Pushed::new("lazy-boot-kill");
    let reference = format!("{}/lab/bb:v1", pushed.registry.addr);
    let store = pushed.dir.path().join("lazy");
    let from = blob_requests(&pushed.registry.log, 0).len();
    let mut cmd = cli(&store);
    cmd.args(["-q", "run", "--lazy", &reference, "--background-rate", "1K", "--", "sleep", "60"]);
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    let mut child = cmd.spawn().unwrap();
    // Killed (with its QEMU: the whole process group) once chunks have begun to arrive: the
    // trees are the first range of each layer.
    let layers = pushed.record["lowers"].as_array().unwrap().len();
    for _ in 0..600 {
        if blob_requests(&pushed.registry.log, from).len() > layers + 1 {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let pid = child.id().to_string();
    assert!(
        std::process::Command::new("kill")
            .args(["-KILL", "--", &format!("-{pid}")])
            .status()
            .unwrap()
            .success()
    );
    child.wait().unwrap();
    let cache = store.join("lazy");
    assert!(
        cache.exists() && std::fs::read_dir(&cache).unwrap().count() == layers,
        "the killed run's caches stay"
    );
    let (ok, out, _) = run(cli(&store).args(["ls", "--json"]));
    assert!(ok && out.trim() == "[]", "nothing recorded by the killed run: {out}");
    // The rerun resumes and completes before exiting (--wait): the command's status, the
    // pulled bytes, a clean gc.
    let out = cli(&store)
        .args(["run", "--lazy", &reference, "--wait", "--", "sh", "-c", "exit 5"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(5), "{}", String::from_utf8_lossy(&out.stderr));
    let (ok, out, err) = run(cli(&store).args(["inspect", &reference, "--json"]));
    assert!(ok, "inspect: {err}");
    let record: serde_json::Value = serde_json::from_str(&out).unwrap();
    for (i, (path, _)) in lowers_of(&record).iter().enumerate() {
        assert!(std::fs::read(path).unwrap() == pushed.blob(i), "lower {i} is the pushed blob");
    }
    let (ok, _, err) = run(cli(&store).args(["verify", &reference]));
    assert!(ok, "verify: {err}");
    let gc = |store: &Path| -> serde_json::Value {
        let (ok, out, err) = run(cli(store).args(["gc", "--json"]));
        assert!(ok, "gc: {err}");
        serde_json::from_str(&out).unwrap()
    };
    let first = gc(&store);
    assert_eq!((first["layers"].as_u64(), first["lazy"].as_u64()), (Some(0), Some(0)), "{first}");
    let second = gc(&store);
    for key in ["layers", "lazy", "tmp", "vm", "sources"] {
        assert_eq!(second[key].as_u64(), Some(0), "a second gc finds nothing: {second}");
    }
}

/// The pid of the detached completer `run --lazy` names on stderr.
fn completer_pid(stderr: &str) -> u32 {
    stderr
        .split("completing in the background (pid ")
        .nth(1)
        .and_then(|rest| rest.split(',').next())
        .and_then(|pid| pid.parse().ok())
        .unwrap_or_else(|| panic!("run names no completer: {stderr}"))
}

/// Waits (up to a minute) for the process `pid` to end.
fn wait_gone(pid: u32) {
    for _ in 0..600 {
        if !Path::new(&format!("/proc/{pid}")).exists() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("process {pid} is still running");
}

/// `build REF --lazy` records the image fetching only its dm-verity trees (ranges); it is
/// listed and inspected as lazy, gc keeps its caches, commands that need it stored say it is
/// lazy; `run TAG` boots it lazily, its completer stores the pushed bytes and the record
/// replaces the lazy one; `rm` of a lazy record removes its caches.
#[test]
fn build_lazy_records_and_run_boots_and_stores_it() {
    setup();
    let pushed = Pushed::new("lazy-build");
    let reference = format!("{}/lab/bb:v1", pushed.registry.addr);
    let store = pushed.dir.path().join("lazy");
    let layers = pushed.record["lowers"].as_array().unwrap().len();
    let from = blob_requests(&pushed.registry.log, 0).len();
    let (ok, out, err) = run(cli(&store).args(["build", &reference, "--lazy", "--tag", "bb", "--json"]));
    assert!(ok, "build --lazy: {err}");
    let lazy: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(lazy["tag"], "bb");
    // Pinned to the manifest the tag named then.
    let pinned = format!("{}/lab/bb@{}", pushed.registry.addr, lazy["manifest_digest"].as_str().unwrap());
    assert_eq!(lazy["source"].as_str().unwrap(), pinned, "{lazy}");
    assert_eq!(lazy["layers"].as_array().unwrap().len(), layers);
    // Of the layers only the trees were fetched: one range request each (and the config).
    let requests = blob_requests(&pushed.registry.log, from);
    assert!(requests.iter().all(|(_, status)| status == "206"), "{requests:?}");
    let of_layers = |r: &&(String, String)| {
        lazy["layers"].as_array().unwrap().iter().any(|l| l.as_str() == Some(r.0.as_str()))
    };
    assert_eq!(requests.iter().filter(of_layers).count(), layers, "{requests:?}");
    let (ok, out, _) = run(cli(&store).arg("ls"));
    assert!(ok && out.lines().any(|l| l.starts_with("bb ") && l.ends_with("lazy: not fetched")), "{out}");
    let (ok, out, _) = run(cli(&store).args(["ls", "--json"]));
    assert!(ok && out.trim() == "[]", "ls --json lists stored images only: {out}");
    let (ok, out, err) = run(cli(&store).args(["gc", "--json"]));
    assert!(ok, "gc: {err}");
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&out).unwrap()["lazy"],
        0,
        "gc keeps a lazy record's caches"
    );
    assert_eq!(std::fs::read_dir(store.join("lazy")).unwrap().count(), layers);
    let layout = pushed.dir.path().join("layout");
    let (ok, _, err) = run(cli(&store).args(["push", "bb", &format!("oci:{}", layout.display())]));
    assert!(!ok && err.contains("bb is recorded lazily"), "push of a lazy record: {err}");

    // run boots it lazily; its completer stores it and the record replaces the lazy one.
    let out = cli(&store).args(["run", "bb", "--", "sh", "-c", "echo lazily; exit 4"]).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(4), "{stderr}");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "lazily");
    let completer = completer_pid(&stderr);
    wait_gone(completer);
    let (ok, out, err) = run(cli(&store).args(["inspect", "bb", "--json"]));
    assert!(ok, "inspect: {err}");
    let record: serde_json::Value = serde_json::from_str(&out).unwrap();
    for (i, (path, _)) in lowers_of(&record).iter().enumerate() {
        assert!(std::fs::read(path).unwrap() == pushed.blob(i), "lower {i} is the pushed blob");
    }
    assert!(!store.join("lazy-images").join("bb.json").exists(), "the lazy record is gone");
    assert_eq!(std::fs::read_dir(store.join("lazy")).unwrap().count(), 0, "caches and log removed");
    let (ok, _, err) = run(cli(&store).args(["verify", "bb"]));
    assert!(ok, "verify: {err}");
    let (ok, out, err) = run(cli(&store).args(["build", &reference, "--lazy", "--tag", "bb"]));
    assert!(ok && out.contains("bb is stored already"), "{out}{err}");

    // rm forgets a lazy record with its caches.
    let (ok, _, err) = run(cli(&store).args(["build", &reference, "--lazy", "--tag", "other"]));
    assert!(ok, "build --lazy: {err}");
    assert_eq!(std::fs::read_dir(store.join("lazy")).unwrap().count(), layers);
    let (ok, _, err) = run(cli(&store).args(["rm", "other"]));
    assert!(ok, "rm: {err}");
    let (ok, _, err) = run(cli(&store).args(["inspect", "other"]));
    assert!(!ok && err.contains("no image tagged"), "{err}");
    assert_eq!(std::fs::read_dir(store.join("lazy")).unwrap().count(), 0, "rm removed the caches");
}
