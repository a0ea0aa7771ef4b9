//! Whether `mkfs.erofs`' rebuild mode (1.8) gives a stack the tree overlayfs gives it.
//!
//! Rebuild mode loads the layers top first. A path's topmost entry wins; when it is a
//! directory that is not opaque, the directories of that path in *every* lower layer are
//! merged into it. Overlayfs stops going down at the first lower layer whose directory is
//! opaque, and at a layer where the path is not a directory (a whiteout, a file) or is hidden
//! by an opaque or removed parent. Where a stop lies below the topmost directory and above
//! another layer's directory, rebuild mode brings back what overlayfs hides.
//!
//! The layer recipe avoids the common case (a directory removed, then made again by a later
//! layer: that layer marks it opaque, see [`crate::layer::normalize::Normalizer::opaque_new_dirs`]).
//! What is left — a directory made opaque by one layer and then added to by a later one — is
//! found here, before mkfs runs, from each layer's own directories and the stack's directories
//! (the `.own` and `.dirs` sidecars), and refused.

use crate::layer::dirindex::DirIndex;
use crate::layer::owndirs::OwnDirs;

/// A directory rebuild mode would merge with more layers than overlayfs does. Layers are
/// numbered from 0 (the base).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unmergeable {
    pub path: Vec<u8>,
    /// The topmost layer with the directory.
    pub top: usize,
    /// The layer where overlayfs stops (its directory is opaque, or the path was removed
    /// above it).
    pub stop: usize,
    /// A layer below the stop with the directory, whose entries would come back.
    pub below: usize,
}

/// The first directory (in path order) of the stack that rebuild mode would merge wrongly.
/// `views[i]`: the stack's directories up to layer `i`; `own[i]`: layer `i`'s own.
pub fn unmergeable(views: &[DirIndex], own: &[OwnDirs]) -> Option<Unmergeable> {
    assert_eq!(views.len(), own.len(), "one view and one own tree per layer");
    let top_view = views.last()?;
    for (path, _) in top_view.iter() {
        let with: Vec<usize> = (0..own.len()).filter(|&i| own[i].get(path).is_some()).collect();
        let Some((&top, lower)) = with.split_last() else { continue };
        if own[top].get(path) == Some(true) {
            continue; // opaque on top: rebuild mode takes that layer alone, as overlayfs does
        }
        // Down from the top, as overlayfs goes: on to the next lower layer with the directory
        // only while the current one is not opaque and the path stayed a directory between.
        let mut upper = top;
        for &j in lower.iter().rev() {
            let goes_on = own[upper].get(path) == Some(false) && views[upper - 1].get(path).is_some();
            if !goes_on {
                return Some(Unmergeable { path: path.to_vec(), top, stop: upper, below: j });
            }
            upper = j;
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layer::dirindex::DirMeta;

    /// A layer's own directories, `(dir, opaque)`.
    type Dirs<'a> = &'a [(&'a str, bool)];
    /// Whiteouts: `(layer, dir)`.
    type Removed<'a> = &'a [(usize, &'a str)];

    /// The views applying `layers` gives, for these cases (a layer's opaque directory drops
    /// the lower subdirectories; `removed` directories go with theirs), and the own trees.
    fn stack(layers: &[Dirs<'_>], removed: Removed<'_>) -> (Vec<DirIndex>, Vec<OwnDirs>) {
        let mut views = Vec::new();
        let mut own = Vec::new();
        let mut view = DirIndex::default();
        for (i, dirs) in layers.iter().enumerate() {
            let mut o = OwnDirs::default();
            o.insert(Vec::new(), false);
            view.insert(Vec::new(), DirMeta::fallback());
            for (d, opaque) in dirs.iter() {
                if *opaque {
                    let prefix = format!("{d}/");
                    view.retain(|k| !k.starts_with(prefix.as_bytes()));
                }
                o.insert(d.as_bytes().to_vec(), *opaque);
                view.insert(d.as_bytes().to_vec(), DirMeta::fallback());
            }
            for (_, d) in removed.iter().filter(|(l, _)| *l == i) {
                let prefix = format!("{d}/");
                view.retain(|k| k != d.as_bytes() && !k.starts_with(prefix.as_bytes()));
            }
            views.push(view.clone());
            own.push(o);
        }
        (views, own)
    }

    #[test]
    fn stacks_rebuild_mode_merges_as_overlayfs_does() {
        let cases: &[(&[Dirs<'_>], Removed<'_>)] = &[
            (&[&[("a", false)], &[("a", false)], &[("a", false)]], &[]), // plain merge
            (&[&[("a", false)], &[("a", true)]], &[]),                   // opaque on top
            (&[&[("a", false)], &[], &[("a", true)]], &[(1, "a")]),      // removed, made again opaque
            (&[&[("a", false)], &[]], &[(1, "a")]),                      // removed for good
            (&[&[("a", false)], &[("b", false)]], &[]),                  // untouched
        ];
        for (layers, removed) in cases {
            let (views, own) = stack(layers, removed);
            assert_eq!(unmergeable(&views, &own), None, "{layers:?} {removed:?}");
        }
    }

    #[test]
    fn stacks_rebuild_mode_would_bring_hidden_entries_back() {
        let (views, own) = stack(&[&[("o", false)], &[("o", true)], &[("o", false)]], &[]);
        assert_eq!(
            unmergeable(&views, &own),
            Some(Unmergeable { path: b"o".to_vec(), top: 2, stop: 1, below: 0 })
        );
        // Removed, then made again without the marker (a layer of an older recipe).
        let (views, own) = stack(&[&[("g", false)], &[], &[("g", false)]], &[(1, "g")]);
        assert_eq!(
            unmergeable(&views, &own),
            Some(Unmergeable { path: b"g".to_vec(), top: 2, stop: 2, below: 0 })
        );
        // The parent made opaque: its subdirectory is hidden below too.
        let (views, own) =
            stack(&[&[("p", false), ("p/c", false)], &[("p", true)], &[("p", false), ("p/c", false)]], &[]);
        assert_eq!(unmergeable(&views, &own).map(|u| u.path), Some(b"p".to_vec()));
    }
}
