//! A mutation fuzzer on stable Rust: seed layers (plain, gzip and zstd; whiteouts, opaque
//! markers, PAX records and sparse maps, long names, hardlinks, symlinks) are mutated at
//! random — header fields overwritten with edge values, bytes flipped, blocks cut, repeated
//! or spliced, compressed framing damaged — and each case goes through the real layer path
//! (`layer::stream`: decompression, digest checks, tar parsing, normalization) with the
//! normalized stream captured. Every case must end in time, without a panic, and either with
//! one clean error or with a normalized stream that is safe and well formed: relative paths
//! without `..`, every parent written as a directory before anything inside it, hardlinks
//! only to earlier files, no `.wh.` names left. Each such stream then goes through the ext4
//! and the EROFS writer, which must end without a panic, with an image or one clean error;
//! every `FSCK_EVERY`-th ext4 image must pass `e2fsck -fn`, and every EROFS image
//! `fsck.erofs --extract` of erofs-utils 1.8 and of Debian 12 (1.5).
//!
//! `make test` runs `FUZZ_CASES` cases (default 3000, a few seconds) and replays every case
//! saved under `tests/fuzz-regressions/`; `make fuzz` runs many more and saves failing cases
//! there (`FUZZ_SAVE=1`).

mod fixture;

use std::collections::HashSet;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::mpsc;
use std::time::Duration;

use fixture::*;
use vmrootfs::FsType;
use vmrootfs::fuzzing::{Backend, Digest, DirIndex, Normalizer, Output, sha256_of};

/// Longest a case may take (a debug build on a loaded 2-core machine included).
const CASE_TIMEOUT: Duration = Duration::from_secs(20);
const MAX_LAYER_BYTES: u64 = 64 << 20;
/// One ext4 image in this many made from a fuzzed stream is checked by e2fsck.
const FSCK_EVERY: usize = 8;

/// xorshift64*: deterministic, so a run is repeatable from its seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

fn seeds() -> Vec<Vec<u8>> {
    let pax = |path: &str, pax: &[(&str, &[u8])]| Entry::PaxFile {
        path: path.as_bytes().to_vec(),
        data: b"pax data".to_vec(),
        pax: pax.iter().map(|(k, v)| (k.to_string(), v.to_vec())).collect(),
    };
    let long = "d".repeat(120) + "/" + &"f".repeat(150);
    let trees: Vec<Vec<Entry>> = vec![
        vec![
            dir("etc", 0o755),
            file("etc/passwd", "root:x:0:0::/root:/bin/sh\n"),
            symlink("etc/link", "/etc/passwd"),
            hardlink("etc/hard", "etc/passwd"),
            file("etc/.wh.shadow", ""),
            file("opq/.wh..wh..opq", ""),
            file("usr/lib/implicit", "parents not listed"),
        ],
        vec![
            pax("x", &[("mtime", b"-1.5"), ("uid", b"3000000"), ("SCHILY.xattr.user.k", b"\x00\xff")]),
            pax("sp", &[("GNU.sparse.size", b"100"), ("GNU.sparse.map", b"10,8")]),
            file(&long, "long name"),
            symlink("s", &long),
            file(".wh.gone", ""),
            dir("gone", 0o700),
            file("gone/new", "n"),
        ],
    ];
    let mut out = Vec::new();
    for t in &trees {
        let tar = layer_tar(t);
        out.push(gzip(&tar));
        out.push(zstd::encode_all(&tar[..], 3).unwrap());
        out.push(tar);
    }
    out
}

/// Edge values for numeric and name fields.
const FIELD_VALUES: &[&[u8]] = &[
    b"\0\0\0\0\0\0\0\0",
    b"77777777777\0",
    b"\x80\0\0\x01\0\0\0\0",
    b"\xff\xff\xff\xff\xff\xff\xff\xff",
    b"../../../x\0",
    b"/abs/path\0",
    b".wh..wh..opq\0",
    b"a/.wh.b\0",
    b"        ",
    b"-1\0",
];

fn mutate(rng: &mut Rng, seeds: &[Vec<u8>]) -> Vec<u8> {
    let mut data = seeds[rng.below(seeds.len())].clone();
    for _ in 0..1 + rng.below(4) {
        if data.is_empty() {
            break;
        }
        let at = rng.below(data.len());
        match rng.below(7) {
            0 => data[at] ^= 1 << rng.below(8),
            1 => data[at] = rng.next() as u8,
            2 => {
                // A header field (tar blocks are 512 bytes; fields at these offsets).
                let block = at / 512 * 512;
                let field = [0usize, 100, 108, 116, 124, 136, 156, 157, 329, 337, 345][rng.below(11)];
                let v = FIELD_VALUES[rng.below(FIELD_VALUES.len())];
                let end = (block + field + v.len()).min(data.len());
                if block + field < end {
                    data[block + field..end].copy_from_slice(&v[..end - block - field]);
                }
            }
            3 => data.truncate(at),
            4 => {
                let block = at / 512 * 512;
                let chunk: Vec<u8> = data[block..(block + 512).min(data.len())].to_vec();
                data.splice(block..block, chunk);
            }
            5 => {
                let other = &seeds[rng.below(seeds.len())];
                let from = rng.below(other.len());
                data.splice(at..at, other[from..(from + 512).min(other.len())].iter().copied());
            }
            _ => data.extend(std::iter::repeat_n(0u8, 512 * rng.below(3))),
        }
        // Mostly make the touched header's checksum right again, so the case reaches the
        // parser and the normalizer instead of stopping at the checksum.
        let block = at / 512 * 512;
        if rng.below(4) != 0 && block + 512 <= data.len() && &data[block + 257..block + 262] == b"ustar" {
            data[block + 148..block + 156].fill(b' ');
            let sum: u32 = data[block..block + 512].iter().map(|&b| b as u32).sum();
            data[block + 148..block + 156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
        }
    }
    data
}

/// The layer bytes decompressed as vmrootfs would, for the diff_id (when they decompress).
fn diff_id_of(blob: &[u8]) -> oci_spec::image::Digest {
    let mut out = Vec::new();
    let ok = if blob.starts_with(&[0x1f, 0x8b]) {
        flate2::read::MultiGzDecoder::new(blob).read_to_end(&mut out).is_ok()
    } else if blob.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        zstd::stream::read::Decoder::new(blob).and_then(|mut d| d.read_to_end(&mut out)).is_ok()
    } else {
        out = blob.to_vec();
        true
    };
    sha256_of(if ok { &out } else { b"undecodable" })
}

/// Runs one case: `Ok(true)` when it gave a normalized stream that passed the checks,
/// `Ok(false)` for one clean error; `Err` says what went wrong with the case.
fn check_case(blob: Vec<u8>, fsck: bool) -> Result<bool, String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let diff_id = diff_id_of(&blob);
        let mut normalizer = Normalizer::tar(Vec::new(), MAX_LAYER_BYTES);
        let outcome = normalize(&blob, &diff_id, &mut normalizer).and_then(|()| {
            normalizer
                .finish(&DirIndex::default())
                .map(|(_, out)| out.into_inner())
                .map_err(|e| e.to_string())
        });
        let outcome = match outcome {
            Ok(stream) => check_stream(&stream)
                .and_then(|()| check_writer(FsType::Ext4, &blob, &diff_id, fsck))
                .and_then(|()| check_writer(FsType::Erofs, &blob, &diff_id, true))
                .map(|()| Some(stream)),
            Err(message) if message.trim().is_empty() => Err("an error without a message".into()),
            Err(_) => Ok(None),
        };
        let _ = tx.send(outcome);
    });
    match rx.recv_timeout(CASE_TIMEOUT) {
        Err(mpsc::RecvTimeoutError::Timeout) => Err(format!("no result within {CASE_TIMEOUT:?}")),
        Err(mpsc::RecvTimeoutError::Disconnected) => Err("panicked".into()),
        Ok(outcome) => outcome.map(|stream| stream.is_some()),
    }
}

/// Streams the layer `blob` into `normalizer`, as a build does.
fn normalize<O: Output>(blob: &[u8], diff_id: &Digest, normalizer: &mut Normalizer<O>) -> Result<(), String> {
    let cancel = AtomicBool::new(false);
    vmrootfs::fuzzing::stream(blob, None, None, diff_id, MAX_LAYER_BYTES, &cancel, &|_| {}, normalizer)
        .map_err(|e| format!("{:#}", anyhow::Error::new(e)))
}

/// The writer of `fs` given a layer that normalizes cleanly, as a build gives it: an image
/// (that the filesystem's checkers pass, when `fsck`) or one clean error.
fn check_writer(fs: FsType, blob: &[u8], diff_id: &Digest, fsck: bool) -> Result<(), String> {
    let dir = scratch(&format!("fuzz-{fs}"));
    let image = dir.path().join("image");
    let backend = Backend::detect(fs).map_err(|e| e.to_string())?;
    let mut making = backend.start(&sha256_of(blob), &image).map_err(|e| e.to_string())?;
    let mut normalizer = Normalizer::new(&mut making, MAX_LAYER_BYTES);
    let normalized = normalize(blob, diff_id, &mut normalizer)
        .and_then(|()| normalizer.finish(&DirIndex::default()).map(drop).map_err(|e| e.to_string()));
    let made = match normalized {
        Ok(()) => making.finish().map_err(|e| format!("{:#}", anyhow::Error::new(e))),
        Err(e) => Err(making.failure().map_or(e, |e| format!("{:#}", anyhow::Error::new(e)))),
    };
    match made {
        Err(message) if message.trim().is_empty() => Err(format!("{fs}: an error without a message")),
        Err(_) => Ok(()),
        Ok(()) if !fsck => Ok(()),
        Ok(()) => {
            let checkers: Vec<std::process::Command> = match fs {
                FsType::Ext4 => vec![std::process::Command::new("e2fsck")],
                FsType::Erofs => vec![
                    std::process::Command::new(fsck_erofs_18()),
                    std::process::Command::new(FSCK_EROFS_15),
                ],
            };
            for mut c in checkers {
                let arg = if fs == FsType::Ext4 { "-fn" } else { "--extract" };
                let (ok, out, err) = run(c.arg(arg).arg(&image));
                if !ok {
                    return Err(format!("{fs}: {:?} {arg} fails: {out}{err}", c.get_program()));
                }
            }
            Ok(())
        }
    }
}

/// The normalized stream is safe and well formed (see the module doc).
fn check_stream(stream: &[u8]) -> Result<(), String> {
    let mut dirs: HashSet<Vec<u8>> = HashSet::from([Vec::new()]);
    let mut files: HashSet<Vec<u8>> = HashSet::new();
    let mut archive = tar::Archive::new(stream);
    for entry in archive.entries().map_err(|e| format!("unreadable stream: {e}"))? {
        let entry = entry.map_err(|e| format!("unreadable entry: {e}"))?;
        let raw = entry.path_bytes().into_owned();
        let path = raw.strip_suffix(b"/").unwrap_or(&raw).to_vec();
        let path = if path == b"." { Vec::new() } else { path };
        let shown = String::from_utf8_lossy(&raw).into_owned();
        let parts: Vec<&[u8]> = path.split(|&b| b == b'/').collect();
        let bad_part = parts.iter().any(|p| *p == b".." || *p == b"." || p.is_empty());
        if path.starts_with(b"/") || (!path.is_empty() && bad_part) {
            return Err(format!("unsafe path {shown:?}"));
        }
        if parts.iter().any(|p| p.starts_with(b".wh.")) {
            return Err(format!("whiteout name left: {shown:?}"));
        }
        if !path.is_empty() {
            let parent = path.rsplitn(2, |&b| b == b'/').nth(1).unwrap_or(b"").to_vec();
            if !dirs.contains(&parent) {
                return Err(format!("{shown:?} comes before its parent directory"));
            }
        }
        match entry.header().entry_type() {
            tar::EntryType::Directory => {
                if files.contains(&path) {
                    return Err(format!("{shown:?} changes from a non-directory to a directory"));
                }
                dirs.insert(path);
            }
            tar::EntryType::Link => {
                let target = entry.link_name_bytes().unwrap_or_default().into_owned();
                if !files.contains(&target) {
                    return Err(format!(
                        "hardlink {shown:?} to {:?}, not an earlier file",
                        String::from_utf8_lossy(&target)
                    ));
                }
                files.insert(path);
            }
            _ => {
                if dirs.contains(&path) {
                    return Err(format!("{shown:?} changes from a directory to a non-directory"));
                }
                files.insert(path);
            }
        }
    }
    Ok(())
}

fn regressions_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fuzz-regressions")
}

#[test]
fn saved_regressions_replay_cleanly() {
    let Ok(dir) = std::fs::read_dir(regressions_dir()) else { return };
    let mut failures = Vec::new();
    for entry in dir {
        let path = entry.unwrap().path();
        if !path.file_name().is_some_and(|n| n.to_string_lossy().starts_with("case-")) {
            continue;
        }
        if let Err(why) = check_case(std::fs::read(&path).unwrap(), true) {
            failures.push(format!("{}: {why}", path.display()));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn mutated_layers_end_cleanly() {
    let cases: usize = std::env::var("FUZZ_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(3000);
    let seed: u64 = std::env::var("FUZZ_SEED").ok().and_then(|v| v.parse().ok()).unwrap_or(0x5eed_1234);
    let save = std::env::var_os("FUZZ_SAVE").is_some();
    let seeds = seeds();
    // The seeds themselves convert: the checks can pass.
    for s in &seeds {
        assert_eq!(check_case(s.clone(), true), Ok(true), "a seed layer converts");
    }
    let mut rng = Rng(seed | 1);
    let (mut failures, mut ok_streams) = (Vec::new(), 0usize);
    let started = std::time::Instant::now();
    for i in 0..cases {
        let blob = mutate(&mut rng, &seeds);
        match check_case(blob.clone(), i % FSCK_EVERY == 0) {
            Ok(true) => ok_streams += 1,
            Ok(false) => {}
            Err(why) => {
                let mut name = format!("case-{}", &sha256_of(&blob).digest()[..32]);
                if save {
                    std::fs::create_dir_all(regressions_dir()).unwrap();
                    let path = regressions_dir().join(&name);
                    std::fs::File::create(&path).unwrap().write_all(&blob).unwrap();
                    name = path.display().to_string();
                }
                failures.push(format!("case {i} ({name}): {why}"));
            }
        }
    }
    eprintln!(
        "fuzz: {cases} cases from seed {seed:#x} in {:.1}s: {ok_streams} normalized streams checked, {} failures",
        started.elapsed().as_secs_f64(),
        failures.len()
    );
    assert!(ok_streams > 0, "no case ended in a check, the harness checks nothing");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Gzip streams, mutated in their framing and their deflate data, inflate with vmrootfs's
/// gunzip exactly as with flate2's `MultiGzDecoder`: the same bytes when flate2 accepts, an
/// error when it refuses — except for a wrong CRC-32 of the data alone, which vmrootfs leaves
/// to the diff ID's SHA-256 (see `layer::gunzip`).
#[test]
fn mutated_gzip_inflates_as_flate2_does() {
    use vmrootfs::fuzzing::Gunzip;
    let cases: usize = std::env::var("FUZZ_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(3000) * 4;
    let mut rng = Rng(0x9a1b_2c3d | 1);
    let tar = layer_tar(&[dir("etc", 0o755), file("etc/passwd", &"root:x:0:0::/root:/bin/sh\n".repeat(40))]);
    let plain = gzip(&tar);
    let named = {
        let mut enc = flate2::GzBuilder::new()
            .filename("layer.tar")
            .comment("a comment")
            .extra(vec![7; 9])
            .write(Vec::new(), flate2::Compression::best());
        enc.write_all(&tar).unwrap();
        enc.finish().unwrap()
    };
    let seeds =
        [plain.clone(), named.clone(), [plain.clone(), named].concat(), [plain.clone(), plain].concat()];
    let inflate_ours = |b: &[u8]| {
        let mut out = Vec::new();
        Gunzip::new(b).read_to_end(&mut out).map(|_| out)
    };
    let inflate_flate2 = |b: &[u8]| {
        let mut out = Vec::new();
        flate2::bufread::MultiGzDecoder::new(b).read_to_end(&mut out).map(|_| out)
    };
    let (mut both_ok, mut both_refuse, mut crc_only, mut failures) = (0, 0, 0, Vec::new());
    for i in 0..cases {
        let seed = rng.below(seeds.len());
        let mut data = seeds[seed].clone();
        for _ in 0..1 + rng.below(3) {
            // Mostly the header and the trailers, where the framing is; anywhere otherwise.
            let at = match rng.below(4) {
                0 => rng.below(32.min(data.len())),
                1 => data.len() - 1 - rng.below(16.min(data.len())),
                _ => rng.below(data.len()),
            };
            match rng.below(6) {
                0 | 1 => data[at] ^= 1 << rng.below(8),
                2 => data[at] = rng.next() as u8,
                3 => data.truncate(at.max(1)),
                4 => data.extend(std::iter::repeat_n(rng.next() as u8, 1 + rng.below(12))),
                _ if data.len() > 3 => data[3] |= 1 << rng.below(8),
                _ => {}
            }
            if data.is_empty() {
                break;
            }
        }
        match (inflate_flate2(&data), inflate_ours(&data)) {
            (Ok(a), Ok(b)) if a == b => both_ok += 1,
            (Err(_), Err(_)) => both_refuse += 1,
            // flate2 says the same of a wrong CRC-32 and a wrong length (ISIZE): of a stream of
            // one member (the first two seeds), the length must be right.
            (Err(e), Ok(b))
                if e.to_string().contains("matching checksum")
                    && (seed > 1 || data[data.len() - 4..] == (b.len() as u32).to_le_bytes()) =>
            {
                crc_only += 1
            }
            (a, b) => failures.push(format!(
                "case {i} ({} bytes): flate2 {:?}, vmrootfs {:?}",
                data.len(),
                a.map(|o| o.len()),
                b.map(|o| o.len())
            )),
        }
    }
    eprintln!(
        "gzip fuzz: {cases} cases: {both_ok} inflated alike, {both_refuse} refused by both, {crc_only} with only a wrong CRC-32"
    );
    assert!(both_ok > 0 && both_refuse > 0 && crc_only > 0, "every outcome is reached");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
