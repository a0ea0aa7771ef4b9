//! Target platform (`os/arch[/variant]`) and its match against image index entries.

use std::fmt;
use std::str::FromStr;

/// A platform as `--platform` spells it: `linux/amd64`, `linux/arm64/v8`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Platform {
    /// `linux`.
    pub os: String,
    /// The OCI architecture: `amd64`, `arm64`, …
    pub arch: String,
    /// The architecture's variant, e.g. `v8`.
    pub variant: Option<String>,
}

/// A `--platform` that is not `os/arch[/variant]`.
#[derive(Debug, thiserror::Error)]
#[error("invalid platform {0:?}: expected os/arch[/variant], e.g. linux/amd64")]
pub struct InvalidPlatform(pub String);

impl Platform {
    /// The platform this process runs on, in OCI spelling.
    pub fn host() -> Self {
        let arch = match std::env::consts::ARCH {
            "x86_64" => "amd64",
            "aarch64" => "arm64",
            "x86" => "386",
            "powerpc64" => "ppc64le",
            other => other,
        };
        Platform { os: "linux".into(), arch: arch.into(), variant: None }
    }

    /// True when an index entry with these fields can run here. A missing variant on either
    /// side matches any variant; arm64's default variant `v8` equals no variant.
    pub fn matches(&self, os: &str, arch: &str, variant: Option<&str>) -> bool {
        let norm = |v: Option<&str>| match (arch, v) {
            ("arm64", Some("v8")) => None,
            (_, v) => v.map(str::to_owned),
        };
        self.os == os
            && self.arch == arch
            && match (norm(self.variant.as_deref()), norm(variant)) {
                (Some(want), Some(have)) => want == have,
                _ => true,
            }
    }
}

impl FromStr for Platform {
    type Err = InvalidPlatform;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let parts: Vec<&str> = s.split('/').collect();
        match parts.as_slice() {
            [os, arch] if !os.is_empty() && !arch.is_empty() => {
                Ok(Platform { os: os.to_string(), arch: arch.to_string(), variant: None })
            }
            [os, arch, variant] if !os.is_empty() && !arch.is_empty() && !variant.is_empty() => {
                Ok(Platform {
                    os: os.to_string(),
                    arch: arch.to_string(),
                    variant: Some(variant.to_string()),
                })
            }
            _ => Err(InvalidPlatform(s.to_string())),
        }
    }
}

impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.os, self.arch)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints() {
        for s in ["linux/amd64", "linux/arm/v7"] {
            assert_eq!(s.parse::<Platform>().unwrap().to_string(), s);
        }
        for bad in ["", "linux", "linux/", "/amd64", "a/b/c/d"] {
            assert!(bad.parse::<Platform>().is_err(), "{bad}");
        }
    }

    #[test]
    fn matching_table() {
        let cases = [
            ("linux/amd64", ("linux", "amd64", None), true),
            ("linux/amd64", ("linux", "arm64", None), false),
            ("linux/amd64", ("windows", "amd64", None), false),
            ("linux/arm/v7", ("linux", "arm", Some("v6")), false),
            ("linux/arm/v7", ("linux", "arm", Some("v7")), true),
            ("linux/arm", ("linux", "arm", Some("v7")), true),
            ("linux/arm64/v8", ("linux", "arm64", None), true),
        ];
        for (want, (os, arch, variant), expected) in cases {
            let p: Platform = want.parse().unwrap();
            assert_eq!(p.matches(os, arch, variant), expected, "{want} vs {os}/{arch}/{variant:?}");
        }
    }
}
