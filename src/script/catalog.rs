//! The handlers a bucket can be created with: the stock handlers embedded in the binary,
//! plus `NAME.lua` files from the handlers directory (a file with a stock handler's name
//! overrides it).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::{instance::compile, ScriptError};

/// Largest handler file read (1 MiB).
pub const MAX_HANDLER_FILE: u64 = 1024 * 1024;

const STOCK: [(&str, &str); 5] = [
    ("counter", include_str!("../../handlers/counter.lua")),
    ("unique", include_str!("../../handlers/unique.lua")),
    ("stats", include_str!("../../handlers/stats.lua")),
    ("list", include_str!("../../handlers/list.lua")),
    ("latest", include_str!("../../handlers/latest.lua")),
];

/// Where a handler's source came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// Embedded in the binary.
    Stock,
    /// Read from this file.
    File(PathBuf),
}

/// One handler's Lua source.
#[derive(Debug)]
pub struct HandlerSource {
    /// Handler name (the file stem).
    pub name: String,
    /// Lua source text.
    pub source: String,
    /// Where it came from.
    pub origin: Origin,
}

/// All handlers known to the daemon, by name.
#[derive(Debug, Clone, Default)]
pub struct HandlerCatalog {
    handlers: BTreeMap<String, Arc<HandlerSource>>,
}

/// The embedded source of stock handler `name`.
pub(crate) fn stock_source(name: &str) -> Option<&'static str> {
    STOCK.iter().find(|(n, _)| *n == name).map(|(_, s)| *s)
}

/// Whether `name` may name a handler: 1 to 64 of `A-Z a-z 0-9 _ -`.
pub fn valid_handler_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

impl HandlerCatalog {
    /// The stock handlers only.
    pub fn stock() -> Self {
        let handlers = STOCK
            .iter()
            .map(|(name, source)| {
                let h = HandlerSource {
                    name: (*name).to_owned(),
                    source: (*source).to_owned(),
                    origin: Origin::Stock,
                };
                ((*name).to_owned(), Arc::new(h))
            })
            .collect();
        HandlerCatalog { handlers }
    }

    /// The stock handlers plus every loadable `*.lua` file in `dir`. Files that cannot be
    /// used (bad name, too large, not UTF-8, syntax error, wrong shape) are skipped and
    /// described in the returned warnings; the daemon logs them.
    ///
    /// # Errors
    /// The directory exists but cannot be read.
    pub fn with_dir(dir: &Path) -> std::io::Result<(Self, Vec<String>)> {
        let mut catalog = HandlerCatalog::stock();
        let mut warnings = Vec::new();
        let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "lua"))
            .collect();
        paths.sort();
        for path in paths {
            match load_file(&path) {
                Ok(h) => {
                    catalog.handlers.insert(h.name.clone(), Arc::new(h));
                }
                Err(why) => {
                    warnings.push(format!("skipping handler file {}: {why}", path.display()))
                }
            }
        }
        Ok((catalog, warnings))
    }

    /// The handler called `name`.
    pub fn get(&self, name: &str) -> Option<Arc<HandlerSource>> {
        self.handlers.get(name).cloned()
    }

    /// All handlers, sorted by name.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<HandlerSource>> {
        self.handlers.values()
    }
}

fn load_file(path: &Path) -> Result<HandlerSource, String> {
    let name = path
        .file_stem()
        .and_then(|s| s.to_str())
        .filter(|s| valid_handler_name(s))
        .ok_or("the file name must be NAME.lua with NAME of 1-64 characters A-Z a-z 0-9 _ -")?;
    let meta = std::fs::metadata(path).map_err(|e| e.to_string())?;
    if meta.len() > MAX_HANDLER_FILE {
        return Err(format!("larger than {MAX_HANDLER_FILE} bytes"));
    }
    let source = std::fs::read_to_string(path).map_err(|e| e.to_string())?;
    let h = HandlerSource {
        name: name.to_owned(),
        source,
        origin: Origin::File(path.to_owned()),
    };
    compile(&h).map_err(|e| match e {
        ScriptError::Load { message, .. } => message,
        other => other.to_string(),
    })?;
    Ok(h)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_stock_handler_compiles() {
        for h in HandlerCatalog::stock().iter() {
            compile(h).unwrap_or_else(|e| panic!("{}: {e}", h.name));
        }
    }

    #[test]
    fn directory_files_add_and_override_and_bad_ones_are_skipped() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ok = "local H = {} function H.send() end function H.view() return 1 end function H.dump() return 1 end return H";
        std::fs::write(dir.path().join("mine.lua"), ok).expect("write");
        std::fs::write(dir.path().join("counter.lua"), ok).expect("write");
        std::fs::write(dir.path().join("broken.lua"), "return {").expect("write");
        std::fs::write(dir.path().join("noshape.lua"), "return 1").expect("write");
        let (catalog, warnings) = HandlerCatalog::with_dir(dir.path()).expect("read dir");
        assert!(catalog.get("mine").is_some());
        let counter = catalog.get("counter").expect("counter");
        assert!(matches!(counter.origin, Origin::File(_)));
        assert!(catalog.get("broken").is_none() && catalog.get("noshape").is_none());
        assert_eq!(warnings.len(), 2, "{warnings:?}");
        assert!(catalog.get("stats").is_some());
    }
}
