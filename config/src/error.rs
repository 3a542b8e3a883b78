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

    /// A TOML syntax or type error, located by the parser's span, in the entry `key` when
    /// one holds the span.
    pub(crate) fn from_toml(
        e: &toml::de::Error,
        text: &str,
        path: &Path,
        key: Option<String>,
    ) -> ConfigError {
        let line = e.span().map(|span| line_of(text, span.start));
        let mut message = in_words(e.message().trim());
        // The parser names no key for a repeated one: its line does.
        if message == "duplicate key" {
            let named = line
                .and_then(|line| text.lines().nth(line - 1))
                .and_then(|source| source.split_once('='))
                .map(|(name, _)| name.trim())
                .filter(|name| !name.is_empty());
            if let Some(name) = named {
                message = format!("duplicate key `{name}`: a key may be given once per table");
            }
        }
        ConfigError {
            file: path.to_owned(),
            line,
            key,
            message,
        }
    }
}

/// A deserializer's message with Rust's type names (`expected usize`) in a sysadmin's words.
fn in_words(message: &str) -> String {
    const NAMES: [(&str, &str); 10] = [
        ("expected usize", "expected a whole number"),
        ("expected u64", "expected a whole number"),
        ("expected u32", "expected a whole number"),
        ("expected u16", "expected a whole number from 0 to 65535"),
        ("expected u8", "expected a whole number from 0 to 255"),
        ("expected i64", "expected a whole number"),
        ("expected i32", "expected a whole number"),
        ("expected f64", "expected a number"),
        ("expected f32", "expected a number"),
        ("expected a sequence", "expected a list (`[...]`)"),
    ];
    let mut words = message.to_owned();
    for (rust, plain) in NAMES {
        // Whole words only: `expected u8` is not to touch `expected u8x`.
        if let Some(at) = words.find(rust) {
            let end = at + rust.len();
            if !words[end..].starts_with(|c: char| c.is_ascii_alphanumeric()) {
                words.replace_range(at..end, plain);
            }
        }
    }
    words
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

    /// Whether the file sets key `name` in `[[app]]` table `index` itself (as opposed to the
    /// key taking its default).
    pub(crate) fn app_sets(&self, index: usize, name: &str) -> bool {
        self.doc
            .as_ref()
            .and_then(|doc| doc.get("app"))
            .and_then(|apps| apps.as_array_of_tables())
            .and_then(|apps| apps.get(index))
            .is_some_and(|app| app.contains_key(name))
    }

    fn span_of(&self, key: &str) -> Option<usize> {
        let mut table = self.doc.as_ref()?.as_item().as_table_like()?;
        let mut best = None;
        for segment in key.split('.') {
            let (name, index) = match segment.split_once('[') {
                Some((name, rest)) => (name, rest.trim_end_matches(']').parse::<usize>().ok()),
                None => (segment, None),
            };
            let Some((k, item)) = table.get_key_value(name) else {
                break;
            };
            best = k.span().map(|s| s.start).or(best);
            let next = match (index, item) {
                // `app[2]`: an array-of-tables entry, addressed as a table below.
                (Some(i), toml_edit::Item::ArrayOfTables(tables)) => {
                    let Some(entry) = tables.get(i) else { break };
                    best = entry.span().map(|s| s.start).or(best);
                    Some(entry as &dyn toml_edit::TableLike)
                }
                // `listen[1]`: an element of an inline array.
                (Some(i), item) => {
                    let element = item.as_array().and_then(|a| a.get(i));
                    return element.and_then(|v| v.span()).map(|s| s.start).or(best);
                }
                (None, item) => item.as_table_like(),
            };
            match next {
                Some(next) => table = next,
                None => break,
            }
        }
        best
    }
}

/// The `key = value` entry of `text` that holds byte `offset`: its key path (`app[0].threads`)
/// and its bytes, from the key to the end of the value. An inline table or array counts as
/// one entry. `None` for an offset in no entry (a table header) or a text that does not parse.
pub(crate) fn entry_at(text: &str, offset: usize) -> Option<(String, std::ops::Range<usize>)> {
    let doc = toml_edit::Document::parse(text).ok()?;
    entry_in(doc.as_table(), "", offset)
}

fn entry_in(
    table: &dyn toml_edit::TableLike,
    prefix: &str,
    offset: usize,
) -> Option<(String, std::ops::Range<usize>)> {
    for (key, item) in table.iter() {
        let path = if prefix.is_empty() {
            key.to_owned()
        } else {
            format!("{prefix}.{key}")
        };
        match item {
            toml_edit::Item::Value(value) => {
                let start = table.key(key).and_then(|k| k.span()).map(|s| s.start);
                if let (Some(start), Some(end)) = (start, value.span().map(|s| s.end)) {
                    if (start..end).contains(&offset) {
                        return Some((path, start..end));
                    }
                }
            }
            toml_edit::Item::Table(inner) => {
                if let Some(found) = entry_in(inner, &path, offset) {
                    return Some(found);
                }
            }
            toml_edit::Item::ArrayOfTables(tables) => {
                for (i, inner) in tables.iter().enumerate() {
                    if let Some(found) = entry_in(inner, &format!("{path}[{i}]"), offset) {
                        return Some(found);
                    }
                }
            }
            toml_edit::Item::None => {}
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rust_type_names_become_words_and_a_repeated_key_is_named() {
        assert_eq!(
            in_words("invalid type: string \"four\", expected usize"),
            "invalid type: string \"four\", expected a whole number"
        );
        assert_eq!(in_words("expected u8x"), "expected u8x");
        let text = "[[app]]\nname = \"a\"\nprocesses = 2\nprocesses = 3\n";
        let e = toml::from_str::<toml::Table>(text).unwrap_err();
        let error = ConfigError::from_toml(&e, text, Path::new("p.toml"), None);
        assert_eq!(error.line, Some(4));
        assert!(
            error.message.starts_with("duplicate key `processes`"),
            "{}",
            error.message
        );
    }
}
