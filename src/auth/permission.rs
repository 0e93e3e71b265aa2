//! Permissions, grants and the glob patterns they apply to.

use serde::{Deserialize, Serialize};

/// What a grant allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Permission {
    /// SEND to matching buckets.
    Send,
    /// VIEW and bucket INFO of matching buckets.
    View,
    /// DUMP matching buckets.
    Dump,
    /// SUBSCRIBE to matching buckets' flush outputs.
    Subscribe,
    /// CREATE and DROP matching buckets.
    Create,
    /// Users and grants; implies every other permission on every bucket. Granted on `*` only.
    Admin,
}

impl Permission {
    /// Every permission.
    pub const ALL: [Permission; 6] = [
        Permission::Send,
        Permission::View,
        Permission::Dump,
        Permission::Subscribe,
        Permission::Create,
        Permission::Admin,
    ];

    /// The name used on the wire and in the CLI.
    pub fn name(self) -> &'static str {
        match self {
            Permission::Send => "send",
            Permission::View => "view",
            Permission::Dump => "dump",
            Permission::Subscribe => "subscribe",
            Permission::Create => "create",
            Permission::Admin => "admin",
        }
    }

    /// The permission called `name`.
    pub fn parse(name: &str) -> Option<Permission> {
        Permission::ALL.into_iter().find(|p| p.name() == name)
    }
}

impl std::fmt::Display for Permission {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// One grant: a permission on the buckets whose names match a pattern.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Grant {
    /// What is allowed.
    pub permission: Permission,
    /// A glob over bucket names: `*` matches any run of characters (also none).
    pub pattern: String,
}

/// Whether `pattern` is a valid grant pattern: 1 to 255 of the bucket-name characters
/// and `*`.
pub fn valid_pattern(pattern: &str) -> bool {
    (1..=255).contains(&pattern.len())
        && pattern
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b':' | b'*'))
}

/// Whether `name` matches the glob `pattern` (only `*` is special). Linear time: the
/// classic greedy match with one backtrack point, so no pattern can blow up.
pub fn glob_match(pattern: &str, name: &str) -> bool {
    let (p, n) = (pattern.as_bytes(), name.as_bytes());
    let (mut pi, mut ni) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ni < n.len() {
        if pi < p.len() && p[pi] == b'*' {
            star = Some((pi, ni));
            pi += 1;
        } else if pi < p.len() && p[pi] == n[ni] {
            pi += 1;
            ni += 1;
        } else if let Some((sp, sn)) = star {
            pi = sp + 1;
            ni = sn + 1;
            star = Some((sp, sn + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&b| b == b'*')
}

/// Whether `grants` allow `permission` on `bucket` (`None`: on no particular bucket).
pub fn allows(grants: &[Grant], permission: Permission, bucket: Option<&str>) -> bool {
    grants.iter().any(|g| {
        g.permission == Permission::Admin
            || (g.permission == permission && bucket.is_none_or(|b| glob_match(&g.pattern, b)))
    })
}

/// Whether `grants` allow anything at all on `bucket` (LIST shows such buckets).
pub fn sees(grants: &[Grant], bucket: &str) -> bool {
    grants
        .iter()
        .any(|g| g.permission == Permission::Admin || glob_match(&g.pattern, bucket))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        for (p, n, want) in [
            ("*", "anything", true),
            ("*", "", true),
            ("clicks.*", "clicks.home", true),
            ("clicks.*", "clicks.", true),
            ("clicks.*", "clicks", false),
            ("clicks.*", "orders", false),
            ("*.home", "clicks.home", true),
            ("a*b*c", "aXXbYYc", true),
            ("a*b*c", "aXXbYY", false),
            ("exact", "exact", true),
            ("exact", "exactly", false),
        ] {
            assert_eq!(glob_match(p, n), want, "{p} ~ {n}");
        }
        // Linear even for adversarial patterns.
        let name = "a".repeat(10_000);
        assert!(!glob_match(&format!("{}b", "*a".repeat(100)), &name));
    }

    #[test]
    fn admin_implies_everything() {
        let grants = [Grant {
            permission: Permission::Admin,
            pattern: "*".into(),
        }];
        for p in Permission::ALL {
            assert!(allows(&grants, p, Some("x")));
        }
        let writer = [Grant {
            permission: Permission::Send,
            pattern: "clicks.*".into(),
        }];
        assert!(allows(&writer, Permission::Send, Some("clicks.home")));
        assert!(!allows(&writer, Permission::Send, Some("orders")));
        assert!(!allows(&writer, Permission::View, Some("clicks.home")));
        assert!(!allows(&writer, Permission::Admin, None));
    }
}
