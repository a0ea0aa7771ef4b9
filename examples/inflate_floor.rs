//! The physical floor of a conversion, for `make bench`: every gzip layer given on the command
//! line read, its compressed bytes hashed, inflated with zlib-rs as vmrootfs inflates it (its
//! gunzip, which leaves the CRC-32 to the diff ID) and its uncompressed bytes hashed — nothing
//! written, `THREADS` layers at a time (default 2). Prints each layer's digests.
//!
//! With `WRITE_TO=DIR`, also what any converter that stores a blob and records its digest must
//! do at least: the uncompressed bytes written to a file in DIR, hashed a third time as they
//! are written (the blob digest; a converter whose blob begins with a header it writes last
//! must hash after instead), and made durable (fdatasync) — the floor with an output.
//!
//! usage: cargo run --release --example inflate_floor -- LAYER.tar.gz…

use std::io::Read;

use sha2::{Digest, Sha256};

/// Reads `r` to its end, hashing what passes (the compressed bytes of a layer).
struct Hashing<R> {
    inner: R,
    hash: Sha256,
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hash.update(&buf[..n]);
        Ok(n)
    }
}

fn floor(path: &str, out: Option<std::path::PathBuf>) -> std::io::Result<String> {
    let file = fs_err::File::open(path)?;
    let mut compressed =
        std::io::BufReader::with_capacity(1 << 20, Hashing { inner: file, hash: Sha256::new() });
    let mut uncompressed = Sha256::new();
    let mut written = out.map(|p| fs_err::File::create(p).map(|f| (f, Sha256::new()))).transpose()?;
    let mut gz = vmrootfs::fuzzing::Gunzip::new(&mut compressed);
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = gz.read(&mut buf)?;
        if n == 0 {
            break;
        }
        uncompressed.update(&buf[..n]);
        if let Some((file, hash)) = &mut written {
            std::io::Write::write_all(file, &buf[..n])?;
            hash.update(&buf[..n]);
        }
    }
    drop(gz);
    if let Some((file, hash)) = written {
        file.sync_data()?;
        std::hint::black_box(hash.finalize());
    }
    // The rest of the file after the gzip members (none in a well-formed layer) counts too.
    std::io::copy(&mut compressed, &mut std::io::sink())?;
    let compressed = compressed.into_inner().hash;
    Ok(format!("{path} {} {}", hex::encode(compressed.finalize()), hex::encode(uncompressed.finalize())))
}

fn main() -> std::io::Result<()> {
    let paths: Vec<String> = std::env::args().skip(1).collect();
    let threads: usize = std::env::var("THREADS").ok().and_then(|t| t.parse().ok()).unwrap_or(2);
    let write_to = std::env::var_os("WRITE_TO").map(std::path::PathBuf::from);
    let next = std::sync::atomic::AtomicUsize::new(0);
    let results = std::sync::Mutex::new(vec![None; paths.len()]);
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let Some(p) = paths.get(i) else { break };
                    let out = write_to.as_ref().map(|d| d.join(i.to_string()));
                    let r = floor(p, out).map_err(|e| e.to_string());
                    results.lock().expect("no panics hold it")[i] = Some(r);
                }
            });
        }
    });
    for r in results.into_inner().expect("no panics hold it").into_iter().flatten() {
        match r {
            Ok(line) => println!("{line}"),
            Err(e) => {
                eprintln!("inflate_floor: {e}");
                std::process::exit(1);
            }
        }
    }
    Ok(())
}
