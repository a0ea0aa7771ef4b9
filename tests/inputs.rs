//! Input as other tools write it: `docker-archive` spellings and platforms, tar archives that
//! GNU tar, bsdtar and Go read (long names with a NUL inside, numeric fields of NULs), and the
//! CLI writing into a pipe its reader closed.

mod fixture;

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::{Command, Stdio};

use fixture::*;

fn build_json(store: &Path, args: &[&str]) -> (bool, serde_json::Value, String) {
    let (ok, out, err) = run(vmrootfs(store).arg("build").args(args).arg("--json"));
    (ok, serde_json::from_str(&out).unwrap_or_default(), err)
}

/// A one-layer `docker-archive` at `path`, made by skopeo from an image for `arch` whose file
/// `hello` holds `arch`, tagged `reference`.
fn docker_archive(path: &Path, reference: &str, arch: &str) {
    let layout = scratch("da-layout");
    oci_layout_arch(layout.path(), "t", &[Layer::gzip(&[file("hello", arch)])], arch);
    let (ok, _, err) = run(Command::new("skopeo").args([
        "copy",
        "-q",
        &format!("oci:{}:t", layout.path().display()),
        &format!("docker-archive:{}:{reference}", path.display()),
    ]));
    assert!(ok, "skopeo copy to docker-archive:{}:{reference}: {err}", path.display());
}

/// The file `hello` of a one-layer build result.
fn hello_of(result: &serde_json::Value) -> String {
    let stack = MountedStack::mount(&lowers_of(result));
    std::fs::read_to_string(stack.root().join("hello")).unwrap()
}

#[test]
fn docker_archive_reference_may_hold_slashes_and_colons() {
    let dir = scratch("da-ref");
    // The path has a colon too (skopeo cannot write there: renamed after): the path is the
    // longest prefix before a `:` that is a file.
    let archive = dir.path().join("x:1.tar");
    docker_archive(&dir.path().join("x.tar"), "lab/base:v1", "amd64");
    std::fs::rename(dir.path().join("x.tar"), &archive).unwrap();
    for reference in ["lab/base:v1", "docker.io/lab/base:v1"] {
        let spec = format!("docker-archive:{}:{reference}", archive.display());
        let (ok, r, err) = build_json(&dir.path().join("s"), &[&spec, "--platform", "linux/amd64"]);
        assert!(ok, "{spec}: {err}");
        assert_eq!(hello_of(&r), "amd64");
    }
    let spec = format!("docker-archive:{}:lab/base:v2", archive.display());
    let (ok, _, err) = build_json(&dir.path().join("s"), &[&spec, "--platform", "linux/amd64"]);
    assert!(!ok, "a tag the archive lacks");
    assert!(err.contains("no image named \"lab/base:v2\"") && err.contains("lab/base:v1"), "{err}");

    // The README's example, `docker-archive:app.tar:app:latest`, and `app` for `app:latest`.
    let app = dir.path().join("app.tar");
    docker_archive(&app, "app:latest", "amd64");
    for reference in ["app:latest", "app"] {
        let spec = format!("docker-archive:{}:{reference}", app.display());
        let (ok, r, err) = build_json(&dir.path().join("s"), &[&spec, "--platform", "linux/amd64"]);
        assert!(ok, "{spec}: {err}");
        assert_eq!(hello_of(&r), "amd64");
    }
}

#[test]
fn docker_archive_of_another_platform_needs_that_platform() {
    let dir = scratch("da-platform");
    let archive = dir.path().join("arm.tar");
    docker_archive(&archive, "lab/arm:1", "arm64");
    let spec = format!("docker-archive:{}", archive.display());
    let (ok, _, err) = build_json(&dir.path().join("s"), &[&spec, "--platform", "linux/amd64"]);
    assert!(!ok, "an arm64 image built for linux/amd64");
    assert!(
        err.contains("linux/arm64") && err.contains("linux/amd64") && err.contains("--platform"),
        "{err}"
    );
    let (ok, r, err) = build_json(&dir.path().join("s"), &[&spec, "--platform", "linux/arm64"]);
    assert!(ok, "{err}");
    assert_eq!(r["platform"], "linux/arm64");
    assert_eq!(hello_of(&r), "arm64");
}

/// A single-manifest OCI layout (no index to choose from) is held to `--platform` as a docker
/// archive is; the error says which platform to ask for.
#[test]
fn an_oci_layout_of_another_platform_needs_that_platform() {
    let dir = scratch("oci-platform");
    let layout = dir.path().join("layout");
    oci_layout_arch(&layout, "t", &[Layer::gzip(&[file("hello", "arm64")])], "arm64");
    let spec = format!("oci:{}:t", layout.display());
    let (ok, _, err) = build_json(&dir.path().join("s"), &[&spec, "--platform", "linux/amd64"]);
    assert!(!ok, "an arm64 image built for linux/amd64");
    assert!(
        err.contains("holds an image for linux/arm64, not linux/amd64") && err.contains("--platform"),
        "{err}"
    );
    let (ok, r, err) = build_json(&dir.path().join("s"), &[&spec, "--platform", "linux/arm64"]);
    assert!(ok, "{err}");
    assert_eq!(r["platform"], "linux/arm64");
}

/// Builds a one-layer layout of `entries` with `fs` and mounts the result.
fn build_and_mount(name: &str, entries: &[Entry], fs: &str) -> (tempfile::TempDir, MountedStack) {
    let dir = scratch(name);
    let layout = dir.path().join("layout");
    oci_layout(&layout, "t", &[Layer::gzip(entries)]);
    let (ok, r, err) =
        build_json(&dir.path().join("s"), &[&format!("oci:{}:t", layout.display()), "--fs", fs]);
    assert!(ok, "{fs}: {err}");
    let stack = MountedStack::mount(&lowers_of(&r));
    (dir, stack)
}

#[test]
fn gnu_long_names_end_at_their_first_nul() {
    let long = format!("{}/{}", "d".repeat(60), "f".repeat(60));
    let target = "t".repeat(120);
    let junk = |s: &str| [s.as_bytes(), b"\0junk after the NUL"].concat();
    let entries = [
        dir(&"d".repeat(60), 0o755),
        Entry::File { path: junk(&long), mode: 0o644, data: b"long".to_vec(), mtime: 1 },
        Entry::Symlink { path: b"sym".to_vec(), target: junk(&target) },
        Entry::Hardlink { path: b"hard".to_vec(), target: junk(&long) },
        // Later entries name the file as the other readers do, without what follows the NUL.
        Entry::Hardlink { path: b"hard2".to_vec(), target: long.clone().into_bytes() },
    ];
    // ext4 from the normalized stream is still being written: erofs only for now.
    let fs = "erofs";
    let (_dir, stack) = build_and_mount("nul-longname", &entries, fs);
    let root = stack.root();
    let names: Vec<_> = std::fs::read_dir(root).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(names.len(), 4, "{fs}: {names:?}");
    assert_eq!(std::fs::read_to_string(root.join(&long)).unwrap(), "long", "{fs}");
    assert_eq!(std::fs::read_link(root.join("sym")).unwrap().to_str().unwrap(), target, "{fs}");
    let ino = |p: &str| std::fs::metadata(root.join(p)).unwrap().ino();
    assert_eq!((ino("hard"), ino("hard2")), (ino(&long), ino(&long)), "{fs}");
}

#[test]
fn numeric_fields_of_nuls_read_as_zero() {
    let mut h = tar::Header::new_gnu();
    h.set_path("zeros").unwrap();
    h.set_entry_type(tar::EntryType::Regular);
    h.set_mode(0o640);
    h.set_size(3);
    let old = h.as_old_mut();
    old.uid.fill(0);
    old.gid.fill(0);
    old.mtime.fill(0);
    let fs = "erofs";
    let (_dir, stack) = build_and_mount("nul-numbers", &[raw_entry(h.clone(), b"abc")], fs);
    let path = stack.root().join("zeros");
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "abc", "{fs}");
    let meta = std::fs::metadata(&path).unwrap();
    assert_eq!((meta.uid(), meta.gid(), meta.mtime(), meta.mode() & 0o7777), (0, 0, 0, 0o640), "{fs}");
}

/// `vmrootfs ls --json | head -c1`: the reader goes away; that is no error.
#[test]
fn a_closed_stdout_is_a_quiet_success() {
    let dir = scratch("pipe");
    let store = dir.path().join("s");
    let layout = dir.path().join("layout");
    oci_layout(&layout, "t", &[Layer::gzip(&[file("f", "x")])]);
    let (ok, _, err) = build_json(&store, &[&format!("oci:{}:t", layout.display())]);
    assert!(ok, "{err}");
    for args in
        [&["ls", "--json"][..], &["ls"], &["inspect", "--json", &format!("oci:{}:t", layout.display())]]
    {
        // The read end is closed before the child starts: its first write fails with EPIPE.
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        let out = vmrootfs(&store).args(args).stdout(writer).stderr(Stdio::piped()).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{args:?}: {:?} {stderr}", out.status);
        assert!(stderr.is_empty(), "{args:?}: nothing on stderr: {stderr}");
    }
}

/// A layer's own `lost+found` is its content and stays, in both filesystems; no ext4 image
/// gets one otherwise (mke2fs would add it, and it would show in the merged root).
#[test]
fn lost_and_found_is_there_only_when_the_layer_has_it() {
    for fs in ["erofs", "ext4"] {
        let own = [dir("lost+found", 0o700), file("hello", "x")];
        let (_dir, stack) = build_and_mount(&format!("lf-own-{fs}"), &own, fs);
        let m = std::fs::metadata(stack.root().join("lost+found"));
        assert!(m.as_ref().is_ok_and(|m| m.is_dir() && m.mode() & 0o7777 == 0o700), "{fs}: kept: {m:?}");
        drop(stack);
        let (_dir, stack) = build_and_mount(&format!("lf-none-{fs}"), &[file("hello", "x")], fs);
        assert!(!stack.root().join("lost+found").exists(), "{fs}: no lost+found of its own");
    }
}

/// PAX records are read by their length, as GNU tar and Go read them: a binary xattr value
/// may hold newline bytes (`security.capability` with cap_dac_override and cap_fowner has
/// 0x0A in its permitted word), and text in a value that looks like a record is part of the
/// value — a `linkpath` hidden there does not retarget the link.
#[test]
fn pax_values_may_hold_newlines_and_hide_no_records() {
    let cap: [u8; 20] = [0, 0, 0, 2, 0x0A, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    let smuggled = b"x\n22 linkpath=/etc/evil\n";
    let entries = [
        Entry::PaxFile {
            path: b"capped".to_vec(),
            data: b"x".to_vec(),
            pax: vec![("SCHILY.xattr.security.capability".into(), cap.to_vec())],
        },
        pax_symlink("link", "harmless", &[("SCHILY.xattr.trusted.note", smuggled)]),
    ];
    for fs in ["erofs", "ext4"] {
        let (_dir, stack) = build_and_mount(&format!("pax-newline-{fs}"), &entries, fs);
        let root = stack.root();
        assert_eq!(xattr(&root.join("capped"), "security.capability").expect("the xattr"), cap, "{fs}");
        assert_eq!(std::fs::read_link(root.join("link")).unwrap(), Path::new("harmless"), "{fs}");
        assert_eq!(xattr(&root.join("link"), "trusted.note").expect("the xattr"), smuggled, "{fs}");
    }
}

/// A v7 header (no magic): `flag` '\0' (old regular file) or '1' (hardlink), claiming `size`
/// bytes.
fn v7_header(path: &str, flag: u8, size: u64, link: &str) -> tar::Header {
    let mut h = tar::Header::new_old();
    let old = h.as_old_mut();
    old.name[..path.len()].copy_from_slice(path.as_bytes());
    old.linkname[..link.len()].copy_from_slice(link.as_bytes());
    old.linkflag = [flag];
    h.set_mode(0o755);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(1_600_000_000);
    h.set_size(size);
    h
}

/// Old archivers' forms, read as GNU tar, bsdtar and Go read them: a v7 directory is an old
/// regular-file header whose name ends in `/`, with no data whatever size it claims; a v7
/// hardlink claiming a size has no data either. Where tar readers disagree whether such an
/// entry has data (a PAX hardlink claiming a size), the entry is refused, naming it.
#[test]
fn v7_directories_and_hardlinks_claiming_a_size_carry_no_data() {
    let entries = [
        raw_entry(v7_header("d1/", 0, 1, ""), b""),
        raw_entry(v7_header("d2/", 0, 1, ""), b""),
        raw_entry(v7_header("d2/f", 0, 2, ""), b"hi"),
        raw_entry(v7_header("d2/h", b'1', 2, "d2/f"), b""),
        raw_entry(v7_header("after", 0, 2, ""), b"ok"),
    ];
    for fs in ["erofs", "ext4"] {
        let (_dir, stack) = build_and_mount(&format!("v7-{fs}"), &entries, fs);
        let root = stack.root();
        assert!(root.join("d1").is_dir() && root.join("d2").is_dir(), "{fs}: both directories");
        assert_eq!(std::fs::read_to_string(root.join("d2/f")).unwrap(), "hi", "{fs}");
        let ino = |p: &str| std::fs::metadata(root.join(p)).unwrap().ino();
        assert_eq!(ino("d2/h"), ino("d2/f"), "{fs}: the hardlink");
        assert_eq!(std::fs::read_to_string(root.join("after")).unwrap(), "ok", "{fs}");
    }
    // A PAX hardlink claiming 2 bytes: bsdtar reads data there, GNU tar and Go do not.
    let mut b = tar::Builder::new(Vec::new());
    b.append_pax_extensions([("mtime", &b"1600000000"[..])]).unwrap();
    let mut h = tar::Header::new_ustar();
    h.set_entry_type(tar::EntryType::Link);
    h.set_mode(0o644);
    h.set_size(2);
    h.set_link_name("f").unwrap();
    h.set_path("h").unwrap();
    h.set_cksum();
    b.append(&h, &b"xx"[..]).unwrap();
    let dir = scratch("v7-pax-link");
    let layout = dir.path().join("layout");
    oci_layout(&layout, "t", &[Layer::gzip(&[file("f", "data"), Entry::Raw(b.get_ref().clone())])]);
    let (ok, _, err) = build_json(&dir.path().join("s"), &[&format!("oci:{}:t", layout.display())]);
    assert!(!ok, "readers disagree on its data: refused");
    assert!(err.contains("entry \"h\"") && err.contains("2 bytes"), "{err}");
}

/// A GNU volume label (`tar -V LABEL`, a `V` header whose numeric fields are all NULs) names
/// the archive, not a file: GNU tar extracts the rest, and so does a conversion.
#[test]
fn a_gnu_volume_label_is_skipped() {
    let dir = scratch("volume-label");
    let src = dir.path().join("src");
    std::fs::create_dir(&src).unwrap();
    std::fs::write(src.join("f"), "hi").unwrap();
    let tar = dir.path().join("v.tar");
    let ok = Command::new("tar")
        .args(["--format=gnu", "--owner=0", "--group=0", "-V", "MYLABEL", "-cf"])
        .arg(&tar)
        .arg("-C")
        .arg(&src)
        .arg("f")
        .status()
        .unwrap()
        .success();
    assert!(ok, "GNU tar failed");
    let layout = dir.path().join("layout");
    oci_layout(&layout, "t", &[Layer::from_tar(&std::fs::read(&tar).unwrap())]);
    for fs in ["erofs", "ext4"] {
        let (ok, r, err) = build_json(
            &dir.path().join(format!("s-{fs}")),
            &[&format!("oci:{}:t", layout.display()), "--fs", fs],
        );
        assert!(ok, "{fs}: {err}");
        let stack = MountedStack::mount(&lowers_of(&r));
        let names: Vec<_> =
            std::fs::read_dir(stack.root()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, ["f"], "{fs}: the label is no file");
        assert_eq!(std::fs::read_to_string(stack.root().join("f")).unwrap(), "hi", "{fs}");
    }
}
