//! Key locations for errors: a toml error's byte offset → the key in TOML terms (`relay.port_min`,
//! `users[1].name`), with the line and column.

use std::fmt;

use serde::de::{self, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

use super::ConfigError;

/// Turns a toml error into a [`ConfigError`]: the key it points at (when the text parses as TOML
/// at all) and the message with its line and column.
pub(super) fn toml_error(text: &str, error: &toml::de::Error) -> ConfigError {
    let message = error
        .message()
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("; ");
    let Some(at) = error.span().map(|s| s.start) else {
        return ConfigError::new("config", message);
    };
    let before = text.get(..at).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    let key = toml::from_str::<Node>(text)
        .ok()
        .and_then(|root| {
            let mut path = String::new();
            root.find(text, at, &mut path);
            (!path.is_empty()).then_some(path)
        })
        .unwrap_or_else(|| "config".into());
    ConfigError::new(key, format!("{message} (line {line}, column {column})"))
}

/// A TOML document reduced to its shape and the byte spans of its values: just enough to name
/// the key at the offset a toml error points to. Dotted keys (`relay.port_min = 1`) make tables
/// without spans, which `toml::Spanned` refuses; the whole parse then fails and the error is
/// reported against `config`, still with its line and column.
enum Node {
    Table(Vec<(String, toml::Spanned<Node>)>),
    Array(Vec<toml::Spanned<Node>>),
    Leaf,
}

impl Node {
    /// Appends to `path` the key (`relay.port_min`, `users[1].name`) whose key or value holds byte
    /// `at` of `text`; an unknown-key error points at the key, any other at the value.
    fn find(&self, text: &str, at: usize, path: &mut String) {
        match self {
            Node::Table(entries) => {
                let push = |path: &mut String, key: &str| {
                    if !path.is_empty() {
                        path.push('.');
                    }
                    path.push_str(key);
                };
                if let Some((key, value)) = entries.iter().find(|(_, v)| v.span().contains(&at)) {
                    push(path, key);
                    // A header's span (`[[users]]`) is its table's; if the error is at the
                    // header's own key, that key is the answer.
                    if !text.get(at..).is_some_and(|t| t.starts_with(key.as_str())) {
                        value.get_ref().find(text, at, path);
                    }
                } else if let Some((key, _)) = entries
                    .iter()
                    // A key and its value share a line, the key first.
                    .filter(|(_, v)| {
                        text.get(at..v.span().start)
                            .is_some_and(|between| !between.contains('\n'))
                    })
                    .min_by_key(|(_, v)| v.span().start)
                {
                    push(path, key);
                }
            }
            Node::Array(items) => {
                if let Some((i, item)) = items
                    .iter()
                    .enumerate()
                    .find(|(_, v)| v.span().contains(&at))
                {
                    path.push_str(&format!("[{i}]"));
                    item.get_ref().find(text, at, path);
                }
            }
            Node::Leaf => {}
        }
    }
}

impl<'de> de::Deserialize<'de> for Node {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(NodeVisitor)
    }
}

struct NodeVisitor;

impl<'de> Visitor<'de> for NodeVisitor {
    type Value = Node;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any TOML value")
    }

    fn visit_bool<E>(self, _: bool) -> Result<Node, E> {
        Ok(Node::Leaf)
    }

    fn visit_i64<E>(self, _: i64) -> Result<Node, E> {
        Ok(Node::Leaf)
    }

    fn visit_u64<E>(self, _: u64) -> Result<Node, E> {
        Ok(Node::Leaf)
    }

    fn visit_f64<E>(self, _: f64) -> Result<Node, E> {
        Ok(Node::Leaf)
    }

    fn visit_str<E>(self, _: &str) -> Result<Node, E> {
        Ok(Node::Leaf)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Node, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element()? {
            items.push(item);
        }
        Ok(Node::Array(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Node, A::Error> {
        let mut entries = Vec::new();
        while let Some(key) = map.next_key::<String>()? {
            // toml hands a datetime to `deserialize_any` as a one-entry map with a private key.
            if key.starts_with("$__toml_private") {
                map.next_value::<IgnoredAny>()?;
                return Ok(Node::Leaf);
            }
            entries.push((key, map.next_value()?));
        }
        Ok(Node::Table(entries))
    }
}
