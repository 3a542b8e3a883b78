//! Config errors that name the file, the line and the key.

use std::fmt;
use std::path::{Path, PathBuf};

/// One problem with a config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The file the problem is in.
    pub file: PathBuf,
    /// 1-based line of the offending key, when it could be located.
    pub line: Option<usize>,
    /// The dotted key path (`app[1].mount`), when the problem belongs to a key.
    pub key: Option<String>,
    /// What is wrong, in words.
    pub message: String,
}

impl ConfigError {
    /// A problem with the file as a whole (unreadable, for instance).
    pub fn file(path: &Path, message: String) -> ConfigError {
        ConfigError {
            file: path.to_owned(),
            line: None,
            key: None,
            message,
        }
    }

    /// A TOML syntax or type error, located by the parser's span.
    pub(crate) fn from_toml(e: toml::de::Error, text: &str, path: &Path) -> ConfigError {
        ConfigError {
            file: path.to_owned(),
            line: e.span().map(|span| line_of(text, span.start)),
            key: None,
            message: e.message().trim().to_owned(),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        if let Some(key) = &self.key {
            write!(f, ": {key}")?;
        }
        write!(f, ": {}", self.message)
    }
}

/// Every problem found in one config, in file order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl ConfigErrors {
    /// Wraps one error.
    pub fn single(error: ConfigError) -> ConfigErrors {
        ConfigErrors(vec![error])
    }
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

fn line_of(text: &str, offset: usize) -> usize {
    text.as_bytes()[..offset.min(text.len())]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

/// Finds the line of a key path such as `app[2].mount` in the original text.
pub(crate) struct Locator<'a> {
    text: &'a str,
    path: &'a Path,
    doc: Option<toml_edit::Document<&'a str>>,
}

impl<'a> Locator<'a> {
    pub(crate) fn new(text: &'a str, path: &'a Path) -> Locator<'a> {
        Locator {
            text,
            path,
            doc: toml_edit::Document::parse(text).ok(),
        }
    }

    /// An error for `key`, pointing at the deepest part of the path present in the file
    /// (the table of a key that was left at its default).
    pub(crate) fn error(&self, key: &str, message: String) -> ConfigError {
        ConfigError {
            file: self.path.to_owned(),
            line: self.span_of(key).map(|start| line_of(self.text, start)),
            key: Some(key.to_owned()),
            message,
        }
    }

    fn span_of(&self, key: &str) -> Option<usize> {
        let doc = self.doc.as_ref()?;
        let mut item: &toml_edit::Item = doc.as_item();
        let mut best = None;
        for segment in key.split('.') {
            let (name, index) = match segment.split_once('[') {
                Some((name, rest)) => (name, rest.trim_end_matches(']').parse::<usize>().ok()),
                None => (segment, None),
            };
            let table = item.as_table_like()?;
            let (k, child) = table.get_key_value(name)?;
            best = k.span().map(|s| s.start).or(best);
            item = child;
            if let Some(i) = index {
                return match item {
                    toml_edit::Item::ArrayOfTables(tables) => {
                        let t = tables.get(i)?;
                        best = t.span().map(|s| s.start).or(best);
                        // An array-of-tables entry is addressed as a table below.
                        self.span_in_table(t, key, best)
                    }
                    toml_edit::Item::Value(toml_edit::Value::Array(values)) => {
                        values.get(i)?.span().map(|s| s.start).or(best)
                    }
                    _ => best,
                };
            }
            best = item.span().map(|s| s.start).or(best);
        }
        best
    }

    /// The rest of `key` after its `[i]` part, looked up inside table `t`.
    fn span_in_table(&self, t: &toml_edit::Table, key: &str, best: Option<usize>) -> Option<usize> {
        let rest = key.split_once("].").map(|(_, rest)| rest);
        let Some(rest) = rest else { return best };
        let (name, index) = match rest.split_once('[') {
            Some((name, idx)) => (name, idx.trim_end_matches(']').parse::<usize>().ok()),
            None => (rest, None),
        };
        let Some((k, item)) = t.get_key_value(name) else {
            return best;
        };
        if let (Some(i), Some(array)) = (index, item.as_array()) {
            if let Some(span) = array.get(i).and_then(|v| v.span()) {
                return Some(span.start);
            }
        }
        k.span().map(|s| s.start).or(best)
    }
}
