//! `SyncPath`: the one type through which every path enters the system. A `SyncPath` is relative,
//! `/`-separated, UTF-8 in NFC, has no empty, `.` or `..` components, no NUL, no backslash, no
//! component longer than 255 bytes, is at most 4096 bytes long and 256 components deep, and never
//! lies under the reserved `.shoal` directory. Parsing is total: bad input is a typed error, never a panic.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use unicode_normalization::{IsNormalized, UnicodeNormalization, is_nfc_quick};

/// Longest allowed component, in bytes (the common file-system limit, NAME_MAX).
pub const MAX_COMPONENT_BYTES: usize = 255;
/// Longest allowed path, in bytes (PATH_MAX on Linux).
pub const MAX_PATH_BYTES: usize = 4096;
/// Most components in a path. Real trees stay far below it; without a bound a 4096-byte path can
/// nest 2048 directories, and every check that walks a path's ancestors pays for each level.
pub const MAX_DEPTH: usize = 256;
/// The reserved top-level directory that holds the agent's marker and temp files.
pub const RESERVED_DIR: &str = ".shoal";

/// Why a string is not a valid `SyncPath`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("path is empty")]
    Empty,
    #[error("path is absolute")]
    Absolute,
    #[error("path has an empty component (a doubled or trailing '/')")]
    EmptyComponent,
    #[error("path has a '.' or '..' component")]
    DotComponent,
    #[error("path contains a NUL byte")]
    Nul,
    #[error("path contains a backslash")]
    Backslash,
    #[error("path component is longer than {MAX_COMPONENT_BYTES} bytes")]
    ComponentTooLong,
    #[error("path is longer than {MAX_PATH_BYTES} bytes")]
    TooLong,
    #[error("path is nested deeper than {MAX_DEPTH} levels")]
    TooDeep,
    #[error("path lies under the reserved '.shoal' directory")]
    Reserved,
    #[error("path is not valid UTF-8")]
    NotUtf8,
}

/// A validated, normalized path relative to a sync root.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SyncPath(String);

impl SyncPath {
    /// Validates `s` and normalizes it to NFC.
    pub fn parse(s: &str) -> Result<Self, PathError> {
        if s.is_empty() {
            return Err(PathError::Empty);
        }
        if s.starts_with('/') {
            return Err(PathError::Absolute);
        }
        if s.contains('\0') {
            return Err(PathError::Nul);
        }
        if s.contains('\\') {
            return Err(PathError::Backslash);
        }
        // Bound the work before normalizing: NFC can grow a string, but never by more than 3x.
        if s.len() > MAX_PATH_BYTES * 3 {
            return Err(PathError::TooLong);
        }
        // Most paths are ASCII or already NFC (every path this side wrote or received was
        // normalized): those are taken as they are, without building a copy character by
        // character.
        let normalized: String =
            if s.is_ascii() || is_nfc_quick(s.chars()) == IsNormalized::Yes { s.to_owned() } else { s.nfc().collect() };
        if normalized.len() > MAX_PATH_BYTES {
            return Err(PathError::TooLong);
        }
        for (i, comp) in normalized.split('/').enumerate() {
            if i == MAX_DEPTH {
                return Err(PathError::TooDeep);
            }
            if comp.is_empty() {
                return Err(PathError::EmptyComponent);
            }
            if comp == "." || comp == ".." {
                return Err(PathError::DotComponent);
            }
            if comp.len() > MAX_COMPONENT_BYTES {
                return Err(PathError::ComponentTooLong);
            }
            if i == 0 && comp == RESERVED_DIR {
                return Err(PathError::Reserved);
            }
        }
        Ok(SyncPath(normalized))
    }

    /// Builds a `SyncPath` from a path relative to a sync root, as read from the local disk.
    pub fn from_relative(p: &std::path::Path) -> Result<Self, PathError> {
        let mut s = String::new();
        for comp in p.components() {
            match comp {
                std::path::Component::Normal(c) => {
                    let c = c.to_str().ok_or(PathError::NotUtf8)?;
                    if !s.is_empty() {
                        s.push('/');
                    }
                    s.push_str(c);
                }
                std::path::Component::CurDir | std::path::Component::ParentDir => {
                    return Err(PathError::DotComponent);
                }
                _ => return Err(PathError::Absolute),
            }
        }
        Self::parse(&s)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The path's components, never empty.
    pub fn components(&self) -> impl Iterator<Item = &str> {
        self.0.split('/')
    }

    /// The last component.
    pub fn file_name(&self) -> &str {
        self.0.rsplit('/').next().unwrap_or(&self.0)
    }

    /// The parent path, or `None` at the top level.
    pub fn parent(&self) -> Option<SyncPath> {
        self.0.rfind('/').map(|i| SyncPath(self.0[..i].to_string()))
    }

    /// Number of components.
    pub fn depth(&self) -> usize {
        self.0.bytes().filter(|&b| b == b'/').count() + 1
    }

    /// `true` if `self` is `other` or lies under it.
    pub fn starts_with(&self, other: &SyncPath) -> bool {
        self.0 == other.0 || (self.0.starts_with(&other.0) && self.0.as_bytes().get(other.0.len()) == Some(&b'/'))
    }

    /// `self` with its last component replaced by `name`, validated again.
    pub fn with_file_name(&self, name: &str) -> Result<SyncPath, PathError> {
        match self.parent() {
            Some(p) => SyncPath::parse(&format!("{}/{name}", p.0)),
            None => SyncPath::parse(name),
        }
    }

    /// Joins this path under `root` for local disk access. Because every component is a normal
    /// name, the result always lies under `root`.
    pub fn to_local(&self, root: &std::path::Path) -> std::path::PathBuf {
        let mut p = root.to_path_buf();
        for c in self.components() {
            p.push(c);
        }
        p
    }
}

impl fmt::Display for SyncPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl SyncPath {
    /// The path for human output (terminals, logs): control characters and characters that
    /// reorder or hide text, which are legal in names, are shown as escapes (`\x1b`, `\r`,
    /// `\u{9b}`, `\u{202e}`) instead of being sent raw. Names
    /// cannot hold a backslash, so an escape is never ambiguous. Machine output uses the path.
    pub fn escaped(&self) -> Escaped<'_> {
        Escaped(&self.0)
    }
}

/// `true` for the invisible formatting characters that change how the text around them reads on
/// a screen: bidirectional overrides, embeddings, isolates and marks (U+202E turns
/// `txt.exe` into what looks like `exe.txt`), zero-width characters and the byte-order mark.
pub fn hides_text(c: char) -> bool {
    matches!(c, '\u{061C}' | '\u{200B}'..='\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2060}'..='\u{2064}' | '\u{2066}'..='\u{206F}' | '\u{FEFF}')
}

/// Text with its control characters, and the characters that reorder or hide text
/// ([`hides_text`]), escaped when displayed; see [`SyncPath::escaped`].
#[derive(Debug, Clone, Copy)]
pub struct Escaped<'a>(pub &'a str);

impl fmt::Display for Escaped<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for c in self.0.chars() {
            if c.is_control() {
                write!(f, "{}", c.escape_debug())?;
            } else if hides_text(c) {
                write!(f, "\\u{{{:x}}}", u32::from(c))?;
            } else {
                fmt::Write::write_char(f, c)?;
            }
        }
        Ok(())
    }
}

/// Like [`Escaped`], but line breaks stay: for a multi-line message (a parser's error quoting the
/// offending line) whose parts that name files were escaped where they were put in.
#[derive(Debug, Clone, Copy)]
pub struct EscapedText<'a>(pub &'a str);

impl fmt::Display for EscapedText<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, line) in self.0.split('\n').enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{}", Escaped(line))?;
        }
        Ok(())
    }
}

impl fmt::Debug for SyncPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

impl std::str::FromStr for SyncPath {
    type Err = PathError;
    fn from_str(s: &str) -> Result<Self, PathError> {
        SyncPath::parse(s)
    }
}

impl Serialize for SyncPath {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for SyncPath {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        // The "invalid path" prefix lets servers answer with the `invalid_path` error code.
        SyncPath::parse(&s).map_err(|e| serde::de::Error::custom(format!("invalid path {s:?}: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn check(s: &str, want: Result<&str, PathError>) {
        assert_eq!(SyncPath::parse(s).as_ref().map(|p| p.as_str()), want.as_deref(), "{s:?}");
    }

    #[test]
    fn escaped_shows_control_characters() {
        let p = SyncPath::parse("a\x1b[31mred\x07/b\r\u{9b}é\t").unwrap();
        assert_eq!(p.escaped().to_string(), "a\\u{1b}[31mred\\u{7}/b\\r\\u{9b}é\\t");
        assert_eq!(SyncPath::parse("plain é").unwrap().escaped().to_string(), "plain é");
        // A right-to-left override would make `report\u{202e}fdp.exe` read as `reportexe.pdf`.
        let p = SyncPath::parse("report\u{202e}fdp.exe\u{200b}").unwrap();
        assert_eq!(p.escaped().to_string(), "report\\u{202e}fdp.exe\\u{200b}");
        assert!(!hides_text('א') && !hides_text('é') && hides_text('\u{2067}'));
        assert_eq!(EscapedText("line 1\n  | a\x1b[31m\n").to_string(), "line 1\n  | a\\u{1b}[31m\n");
    }

    #[test]
    fn rules() {
        check("a", Ok("a"));
        check("a/b c/d.txt", Ok("a/b c/d.txt"));
        check("", Err(PathError::Empty));
        check("/etc/passwd", Err(PathError::Absolute));
        check("a//b", Err(PathError::EmptyComponent));
        check("a/", Err(PathError::EmptyComponent));
        check("a/../b", Err(PathError::DotComponent));
        check("./a", Err(PathError::DotComponent));
        check("..", Err(PathError::DotComponent));
        check("a\0b", Err(PathError::Nul));
        check("a\\..\\b", Err(PathError::Backslash));
        check(".shoal/tmp/x", Err(PathError::Reserved));
        check(".shoal", Err(PathError::Reserved));
        check("x/.shoal", Ok("x/.shoal"));
        check(".shoalrc", Ok(".shoalrc"));
        check(&"a".repeat(256), Err(PathError::ComponentTooLong));
        check(&"a".repeat(255), Ok(&"a".repeat(255)));
        let long = vec!["a".repeat(200); 21].join("/");
        check(&long, Err(PathError::TooLong));
    }

    #[test]
    fn normalizes_to_nfc() {
        // "é" as e + combining acute (NFD, as macOS writes it) becomes the single code point.
        let p = SyncPath::parse("cafe\u{301}.txt").unwrap();
        assert_eq!(p.as_str(), "caf\u{e9}.txt");
        assert_eq!(p, SyncPath::parse("caf\u{e9}.txt").unwrap());
        // Already NFC, and a mix whose quick check cannot say (Hangul jamo compose): as NFC.
        assert_eq!(SyncPath::parse("d/\u{e9}t\u{e9}").unwrap().as_str(), "d/\u{e9}t\u{e9}");
        assert_eq!(SyncPath::parse("\u{1100}\u{1161}").unwrap().as_str(), "\u{ac00}");
        assert_eq!(SyncPath::parse("a\u{308}/o\u{308}").unwrap().as_str(), "\u{e4}/\u{f6}");
    }

    #[test]
    fn helpers() {
        let p = SyncPath::parse("a/b/c.txt").unwrap();
        assert_eq!(p.file_name(), "c.txt");
        assert_eq!(p.parent().unwrap().as_str(), "a/b");
        assert_eq!(p.depth(), 3);
        assert!(p.starts_with(&SyncPath::parse("a/b").unwrap()));
        assert!(!p.starts_with(&SyncPath::parse("a/bc").unwrap()));
        assert_eq!(p.with_file_name("d").unwrap().as_str(), "a/b/d");
        assert!(SyncPath::parse("x").unwrap().parent().is_none());
        assert!(serde_json::from_str::<SyncPath>("\"../x\"").is_err());
    }

    proptest! {
        #[test]
        fn parse_never_panics_and_never_escapes(s in "\\PC{0,64}|[a./\\\\\0]{0,16}") {
            if let Ok(p) = SyncPath::parse(&s) {
                let root = std::path::Path::new("/root/sync");
                let local = p.to_local(root);
                prop_assert!(local.starts_with(root));
                prop_assert!(local.components().count() > root.components().count());
                for c in local.components().skip(root.components().count()) {
                    prop_assert!(matches!(c, std::path::Component::Normal(_)), "{local:?}");
                }
                // Parsing yields NFC and is idempotent.
                prop_assert_eq!(p.as_str(), s.nfc().collect::<String>());
                prop_assert_eq!(SyncPath::parse(p.as_str()).unwrap(), p.clone());
                prop_assert_eq!(SyncPath::from_relative(std::path::Path::new(p.as_str())).unwrap(), p);
            }
        }
    }
}
