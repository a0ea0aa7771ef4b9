//! `run --upper` and `commit` (issue 20) on the real Debian image, booted in QEMU: a guest
//! installs a tree into a persistent upper, a second guest sees it, `commit` makes it a layer
//! of a new image, and the new image's stack, mounted on the host, equals the base's
//! reference tree (`umoci unpack`) with the same changes made on the host, for EROFS and ext4;
//! a second commit over the first, likewise. Also: the upper is bound to its image and locked
//! while used, and a hostile commit guest (a crafted tar on the stream) gets a clean error or
//! a contained layer, never a write outside the store.

mod fixture;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use fixture::*;

/// A fixed mtime (ns) for everything the changes touch, so that the guest's tree and the one
/// made on the host can be compared whole.
const T: i64 = 1_600_000_000_123_456_789;

/// The first changes, made in the guest (python3 of the image) …
const CHANGES_1: &str = r#"
import os, shutil, stat
T = 1_600_000_000_123_456_789
os.makedirs('/opt/app')
shutil.copyfile('/usr/bin/true', '/opt/app/tool')
os.chmod('/opt/app/tool', 0o4755)
os.symlink('tool', '/opt/app/link')
with open('/opt/app/data', 'wb') as f: f.write(b'upper data\n')
os.link('/opt/app/data', '/opt/app/data-hl')
os.setxattr('/opt/app/data', 'user.note', b'\x00\xffnote')
os.setxattr('/opt/app/data', 'trusted.kept', b'yes')
os.mknod('/opt/app/null2', 0o640 | stat.S_IFCHR, os.makedev(1, 3))
os.chown('/opt/app/null2', 1000, 1000)
os.remove('/etc/issue')
shutil.rmtree('/etc/apt')
os.mkdir('/etc/apt'); os.chmod('/etc/apt', 0o755)
with open('/etc/apt/only', 'w') as f: f.write('replaced\n')
for p in ['/opt/app/tool', '/opt/app/data', '/opt/app/null2', '/etc/apt/only', '/opt/app', '/etc/apt', '/opt', '/etc']:
    os.utime(p, ns=(T, T))
os.utime('/opt/app/link', ns=(T, T), follow_symlinks=False)
"#;

/// … and on the host, over a copy of the base's reference tree.
fn changes_1(root: &Path) {
    let p = |s: &str| root.join(s);
    fs_err::create_dir_all(p("opt/app")).unwrap();
    fs_err::write(p("opt/app/tool"), fs_err::read(p("usr/bin/true")).unwrap()).unwrap();
    fs_err::set_permissions(p("opt/app/tool"), std::fs::Permissions::from_mode(0o4755)).unwrap();
    std::os::unix::fs::symlink("tool", p("opt/app/link")).unwrap();
    fs_err::write(p("opt/app/data"), b"upper data\n").unwrap();
    fs_err::hard_link(p("opt/app/data"), p("opt/app/data-hl")).unwrap();
    let flags = rustix::fs::XattrFlags::empty();
    rustix::fs::setxattr(p("opt/app/data"), "user.note", b"\x00\xffnote", flags).unwrap();
    rustix::fs::setxattr(p("opt/app/data"), "trusted.kept", b"yes", flags).unwrap();
    let mode = rustix::fs::Mode::from_raw_mode(0o640);
    let dev = rustix::fs::makedev(1, 3);
    rustix::fs::mknodat(
        rustix::fs::CWD,
        p("opt/app/null2"),
        rustix::fs::FileType::CharacterDevice,
        mode,
        dev,
    )
    .unwrap();
    std::os::unix::fs::lchown(p("opt/app/null2"), Some(1000), Some(1000)).unwrap();
    fs_err::remove_file(p("etc/issue")).unwrap();
    fs_err::remove_dir_all(p("etc/apt")).unwrap();
    fs_err::create_dir(p("etc/apt")).unwrap();
    fs_err::set_permissions(p("etc/apt"), std::fs::Permissions::from_mode(0o755)).unwrap();
    fs_err::write(p("etc/apt/only"), "replaced\n").unwrap();
    for f in
        ["opt/app/tool", "opt/app/data", "opt/app/null2", "etc/apt/only", "opt/app", "etc/apt", "opt", "etc"]
    {
        set_mtime(&p(f));
    }
    set_mtime(&p("opt/app/link"));
}

/// The second changes, over the first commit's image, in the guest …
const CHANGES_2: &str = r#"
import os
T = 1_600_000_000_123_456_789
os.remove('/opt/app/data-hl')
with open('/opt/app/second', 'w') as f: f.write('second commit\n')
os.chmod('/opt/app/second', 0o600)
for p in ['/opt/app/second', '/opt/app']:
    os.utime(p, ns=(T, T))
"#;

/// … and on the host.
fn changes_2(root: &Path) {
    let p = |s: &str| root.join(s);
    fs_err::remove_file(p("opt/app/data-hl")).unwrap();
    fs_err::write(p("opt/app/second"), "second commit\n").unwrap();
    fs_err::set_permissions(p("opt/app/second"), std::fs::Permissions::from_mode(0o600)).unwrap();
    set_mtime(&p("opt/app/second"));
    set_mtime(&p("opt/app"));
}

/// Sets the atime and mtime of `path` (not following a symlink) to [`T`].
fn set_mtime(path: &Path) {
    let ts = rustix::fs::Timestamps {
        last_access: rustix::fs::Timespec { tv_sec: T / 1_000_000_000, tv_nsec: T % 1_000_000_000 },
        last_modification: rustix::fs::Timespec { tv_sec: T / 1_000_000_000, tv_nsec: T % 1_000_000_000 },
    };
    rustix::fs::utimensat(rustix::fs::CWD, path, &ts, rustix::fs::AtFlags::SYMLINK_NOFOLLOW).unwrap();
}

/// What the second guest prints about the first one's changes.
const SEE_1: &str = "stat -c '%a %u %n' /opt/app/tool; cat /opt/app/data-hl /etc/apt/only; ls /etc/apt; \
                     test -e /etc/issue || echo issue gone; stat -c '%t,%T %u' /opt/app/null2; readlink /opt/app/link";
const SEEN_1: &str = "4755 0 /opt/app/tool\nupper data\nreplaced\nonly\nissue gone\n1,3 1000\ntool\n";

/// `vmrootfs run` of `tag` with `args`, which must succeed; its stdout.
fn run_ok(store: &Path, tag: &str, args: &[&str], command: &[&str]) -> String {
    let (ok, out, err) =
        run(vmrootfs(store).args(["-q", "run", tag, "--timeout", "300"]).args(args).arg("--").args(command));
    assert!(ok, "run {tag} {args:?}: {err}");
    out
}

/// `vmrootfs commit`, which must succeed; the new image's lowers.
fn commit_ok(store: &Path, upper: &Path, tag: &str) -> Vec<(PathBuf, String)> {
    let (ok, out, err) = run(vmrootfs(store).args(["-q", "commit", "--upper"]).arg(upper).args([
        "--tag",
        tag,
        "--message",
        "test",
        "--json",
    ]));
    assert!(ok, "commit to {tag}: {err}");
    lowers_of(&serde_json::from_str(&out).expect("commit --json prints JSON"))
}

/// A copy of the base image's reference tree (`umoci unpack` of its layout).
fn reference_copy(dir: &Path) -> PathBuf {
    let to = dir.join("expected");
    let (ok, _, err) = run(Command::new("cp").arg("-a").arg(image().join("reference/rootfs")).arg(&to));
    assert!(ok, "cp -a reference: {err}");
    to
}

fn assert_tree(expected: &Path, lowers: &[(PathBuf, String)], what: &str) {
    let stack = MountedStack::mount(lowers);
    let diffs = treediff::diff_trees(expected, stack.root());
    assert!(
        diffs.is_empty(),
        "{what}: {} differences from the expected tree:\n{}",
        diffs.len(),
        diffs.iter().take(40).cloned().collect::<Vec<_>>().join("\n")
    );
}

/// The whole story for one filesystem; with `merge`, the base is built `--merge` and the
/// second run boots its merged form over the same upper.
fn upper_commit_roundtrip(fs: &str, merge: bool) {
    let dir = scratch(&format!("upper-{fs}"));
    let store = dir.path().join("store");
    let mut build = vmrootfs(&store);
    build.args(["-q", "build", &format!("oci:{}/oci:test", image().display()), "--tag", "deb", "--fs", fs]);
    if merge {
        build.arg("--merge");
    }
    let (ok, _, err) = run(&mut build);
    assert!(ok, "build: {err}");
    let upper = dir.path().join("work.ext4");

    run_ok(&store, "deb", &["--upper", upper.to_str().unwrap()], &["python3", "-c", CHANGES_1]);
    // A 10 GiB nominal upper costs what was written.
    let m = fs_err::metadata(&upper).unwrap();
    assert_eq!(m.len(), 10 << 30);
    let used = std::os::unix::fs::MetadataExt::blocks(&m) * 512;
    assert!(used < 64 << 20, "a 10 GiB upper holding a few files uses {used} bytes");

    let mut second = vec!["--upper", upper.to_str().unwrap()];
    if merge {
        second.push("--merged");
    }
    let seen = run_ok(&store, "deb", &second, &["sh", "-c", SEE_1]);
    assert_eq!(seen, SEEN_1, "the second run sees the first one's changes");

    let lowers = commit_ok(&store, &upper, "deb-1");
    assert_eq!(lowers.len(), 5, "the base's four layers and the committed one");
    assert!(lowers.iter().all(|(_, f)| f == fs), "{lowers:?}");
    let expected = reference_copy(dir.path());
    changes_1(&expected);
    assert_tree(&expected, &lowers, "the first commit");

    // A second commit, over an upper of the first commit's image.
    let upper2 = dir.path().join("work2.ext4");
    run_ok(&store, "deb-1", &["--upper", upper2.to_str().unwrap()], &["python3", "-c", CHANGES_2]);
    let lowers2 = commit_ok(&store, &upper2, "deb-2");
    assert_eq!(lowers2[..5], lowers[..], "the first commit's layers, reused");
    assert_eq!(lowers2.len(), 6);
    changes_2(&expected);
    assert_tree(&expected, &lowers2, "the second commit");

    // The OCI form of the second commit, unpacked by umoci: the same tree.
    let pushed = dir.path().join("pushed");
    let (ok, _, err) = run(vmrootfs(&store).args([
        "-q",
        "push",
        "deb-2",
        &format!("oci:{}:t", pushed.display()),
        "--format",
        "oci",
    ]));
    assert!(ok, "push --format oci: {err}");
    let bundle = dir.path().join("bundle");
    let (ok, _, err) = run(Command::new("umoci")
        .args(["unpack", "--image"])
        .arg(format!("{}:t", pushed.display()))
        .arg(&bundle));
    assert!(ok, "umoci unpack: {err}");
    let diffs = treediff::diff_trees(&expected, &bundle.join("rootfs"));
    assert!(diffs.is_empty(), "umoci unpack of the OCI form differs:\n{}", diffs.join("\n"));

    let inspect = |tag: &str| -> serde_json::Value {
        serde_json::from_str(&run(vmrootfs(&store).args(["inspect", tag, "--json"])).1).unwrap()
    };
    let (base, committed) = (inspect("deb"), inspect("deb-2"));
    assert_eq!(committed["lowers"].as_array().unwrap().len(), 6);
    assert_eq!(committed["source"], base["source"], "the base's source is kept (push in OCI form reads it)");
}

#[test]
fn upper_and_commit_erofs_merged() {
    upper_commit_roundtrip("erofs", true);
}

#[test]
fn upper_and_commit_ext4() {
    upper_commit_roundtrip("ext4", false);
}

/// Makes a `#!/bin/sh` program that writes `tar` to stdout, run by the commit guest in place
/// of `vmrootfs guest-tar`: a guest whose stream is hostile.
fn hostile_guest(path: &Path, tar: &[u8]) {
    let b64 = registry::base64_encode(tar);
    let lines: Vec<&str> = b64.as_bytes().chunks(76).map(|c| std::str::from_utf8(c).unwrap()).collect();
    fs_err::write(path, format!("#!/bin/sh\nbase64 -d <<'EOF'\n{}\nEOF\n", lines.join("\n"))).unwrap();
}

/// An entry as `guest-tar --extents` writes a file: no data, its bytes named on the upper.
fn extents_file(path: &str, extents: &str, data: &str) -> Entry {
    Entry::PaxFile {
        path: path.as_bytes().to_vec(),
        data: data.as_bytes().to_vec(),
        pax: vec![("VMROOTFS.extents".into(), extents.as_bytes().to_vec())],
    }
}

/// A commit guest that writes a crafted tar (a symlink out of the root and a file through it,
/// hardlinks to host files, a whiteout name with `/`, `..` and absolute paths, extents outside
/// the upper) gets a clean
/// error naming the entry, or a layer that holds the entry inside its own tree: nothing is
/// written outside the store, no host file is read into the layer, nothing is recorded for a
/// refused one and the store's staging is left empty.
#[test]
fn a_hostile_commit_guest_gets_a_clean_error_or_a_contained_layer() {
    let (dir, store) = busybox_store("upper-hostile");
    let upper = dir.path().join("up.ext4");
    run_ok(
        &store,
        "bb",
        &["--upper", upper.to_str().unwrap(), "--upper-size", "128M"],
        &["sh", "-c", "true"],
    );
    let outside = dir.path().join("outside");
    fs_err::create_dir(&outside).unwrap();
    fs_err::write(outside.join("secret"), "host secret\n").unwrap();
    let o = outside.display().to_string();
    let up = format!("{}{o}", "../".repeat(12));
    let cases: Vec<(&str, Vec<Entry>)> = vec![
        (
            "a symlink out of the root, then a file through it",
            vec![symlink("evil", &o), file("evil/pwned", "x")],
        ),
        (
            "a relative symlink up and out, then a file through it",
            vec![symlink("up", &up), file("up/pwned", "x")],
        ),
        ("a hardlink to a host file", vec![hardlink("hl", &format!("{o}/secret"))]),
        ("a hardlink up and out", vec![hardlink("hl", &format!("{up}/secret"))]),
        ("a whiteout name with a slash", vec![fixture::dir("etc", 0o755), file("etc/.wh.x/y", "")]),
        ("a path up and out", vec![file(&format!("{up}/dotdot"), "x")]),
        ("an absolute path", vec![file(&format!("{o}/abs"), "x")]),
        // Extent references (what `guest-tar --extents` writes): the host reads only the upper.
        ("extents past the upper's end", vec![extents_file("big", "4096 0:1099511627776:4096", "")]),
        ("extents of the upper's own first block", vec![extents_file("sb", "4096 0:0:4096", "")]),
        ("extents on an entry with data", vec![extents_file("data", "3 0:0:3", "abc")]),
    ];
    for (i, (what, entries)) in cases.iter().enumerate() {
        let program = dir.path().join(format!("hostile-{i}.sh"));
        hostile_guest(&program, &layer_tar(entries));
        let tag = format!("hostile-{i}");
        let (ok, out, err) = run(vmrootfs(&store)
            .args(["-q", "commit", "--upper"])
            .arg(&upper)
            .args(["--tag", &tag, "--json", "--guest-binary"])
            .arg(&program));
        if ok {
            let stack = MountedStack::mount(&lowers_of(&serde_json::from_str(&out).unwrap()));
            for e in walkdir::WalkDir::new(stack.root()).follow_links(false) {
                let e = e.unwrap();
                if e.file_type().is_file() {
                    let data = fs_err::read(e.path()).unwrap();
                    assert!(
                        !String::from_utf8_lossy(&data).contains("host secret"),
                        "{what}: {:?} holds a host file",
                        e.path()
                    );
                }
            }
            eprintln!("{what}: committed, contained");
        } else {
            let (rc, _, _) = run(vmrootfs(&store).args(["inspect", &tag]));
            assert!(!rc, "{what}: a failed commit recorded {tag}");
            assert!(err.contains("error: "), "{what}: {err}");
            eprintln!("{what}: refused: {}", err.lines().last().unwrap_or_default());
        }
        let mut left: Vec<_> = fs_err::read_dir(&outside).unwrap().map(|e| e.unwrap().file_name()).collect();
        left.sort();
        assert_eq!(left, ["secret"], "{what}: written outside the store");
        assert_eq!(fs_err::read_to_string(outside.join("secret")).unwrap(), "host secret\n");
        assert!(!Path::new("/dotdot").exists() && !Path::new("/pwned").exists());
        let tmp: Vec<_> = fs_err::read_dir(store.join("tmp")).unwrap().collect();
        assert!(tmp.is_empty(), "{what}: staging left behind: {tmp:?}");
    }
}

/// An upper is bound to the image it was made over: another image is refused naming both,
/// and so is a commit whose base tag now names another image; a held upper (another run or
/// commit has its lock) is refused at once; a file that is not an upper is refused.
#[test]
fn an_upper_is_bound_to_its_image_and_locked_while_used() {
    let (dir, store) = busybox_store("upper-bound");
    let layout = dir.path().join("other");
    oci_layout(&layout, "t", &[Layer::gzip(&[fixture::dir("bin", 0o755), file("bin/x", "x")])]);
    let (ok, _, err) =
        run(vmrootfs(&store).args(["-q", "build", &format!("oci:{}:t", layout.display()), "--tag", "other"]));
    assert!(ok, "build other: {err}");
    let upper = dir.path().join("up.ext4");
    let up = upper.to_str().unwrap();
    run_ok(&store, "bb", &["--upper", up, "--upper-size", "128M"], &["sh", "-c", "echo kept > /kept"]);

    let (ok, _, err) = run(vmrootfs(&store).args(["run", "other", "--upper", up, "--", "true"]));
    assert!(!ok);
    assert!(err.contains("was made over bb") && err.contains("not over other"), "{err}");

    // Held by someone else (as a running guest holds it): refused at once, for run and commit.
    let held = fs_err::File::open(&upper).unwrap();
    rustix::fs::flock(&held, rustix::fs::FlockOperation::NonBlockingLockExclusive).unwrap();
    let (ok, _, err) = run(vmrootfs(&store).args(["run", "bb", "--upper", up, "--", "true"]));
    assert!(!ok && err.contains("is in use by another vmrootfs run or commit"), "{err}");
    let (ok, _, err) = run(vmrootfs(&store).args(["commit", "--upper", up, "--tag", "c"]));
    assert!(!ok && err.contains("is in use by another vmrootfs run or commit"), "{err}");
    drop(held);

    // The tag it was made over now names another image.
    let (ok, _, err) =
        run(vmrootfs(&store).args(["-q", "build", &format!("oci:{}:t", layout.display()), "--tag", "bb"]));
    assert!(ok, "retag: {err}");
    let (ok, _, err) = run(vmrootfs(&store).args(["commit", "--upper", up, "--tag", "c"]));
    assert!(!ok && err.contains("now names the image of config"), "{err}");
    let (ok, _, _) = run(vmrootfs(&store).args(["inspect", "c"]));
    assert!(!ok, "nothing recorded");

    // A file that is not an upper.
    let stray = dir.path().join("stray.img");
    fs_err::write(&stray, b"not an upper").unwrap();
    let (ok, _, err) = run(vmrootfs(&store).args(["run", "bb", "--upper"]).arg(&stray).args(["--", "true"]));
    assert!(!ok && err.contains("is not a vmrootfs upper"), "{err}");
    assert_eq!(fs_err::read(&stray).unwrap(), b"not an upper", "left as it was");
}
