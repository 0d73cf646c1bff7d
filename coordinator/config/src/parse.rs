//! From TOML text to a validated [`Config`], with every error located by line, column and
//! field path.
//!
//! The text is parsed once into toml's spanned document tree. Each top-level section, and
//! each entry of an array section, is deserialized on its own, so one bad `[[builders]]`
//! entry does not hide errors in the next. Semantic checks (`validate.rs`) run only when
//! every entry deserialized, because a host type that failed to parse would otherwise
//! surface again as "unknown host type" at each builder that names it. Their field paths
//! are located by walking the same tree.

use std::ops::Range;

use serde::de::DeserializeOwned;
use toml::Spanned;
use toml::de::{DeTable, DeValue, ValueDeserializer};

use crate::connections::ConnectionsConfig;
use crate::error::{ConfigError, ConfigErrors, ErrorKind, FieldPath, Location, Segment};
use crate::limits::Limits;
use crate::model::{Config, CoordinatorConfig, SandboxConfig};
use crate::validate::{self, Issue};

type Node<'i> = Spanned<DeValue<'i>>;

const SECTIONS: &str = "coordinator, host_types, builders, repos, limits, sandbox, connections, notifications, artifacts, access";

/// Parses and validates `text`, naming it `source_name` in errors.
pub(crate) fn parse(text: &str, source_name: &str) -> Result<Config, ConfigErrors> {
    let located = |span: Option<Range<usize>>, path: FieldPath, kind: ErrorKind| ConfigError {
        source_name: source_name.to_owned(),
        location: span.map(|s| Location::of_offset(text, s.start)),
        path,
        kind,
    };

    let (root, syntax) = DeTable::parse_recoverable(text);
    if !syntax.is_empty() {
        let errors = syntax
            .into_iter()
            .map(|e| {
                located(
                    // toml reports its recursion limit without a position (found by fuzzing).
                    Some(e.span().unwrap_or_else(|| deepest_nesting(text))),
                    FieldPath::root(),
                    ErrorKind::Parse(e.message().to_owned()),
                )
            })
            .collect();
        return Err(sorted(errors));
    }
    let root: Node<'_> = Spanned::new(root.span(), DeValue::Table(root.into_inner()));

    let mut errors = Vec::new();
    let mut unknown = Vec::new();
    let mut config = Config::default();
    let mut structural = |path: FieldPath, node: &Node<'_>, e: toml::de::Error| {
        // Errors from nested values carry their own span; point into the entry otherwise.
        let span = e.span().unwrap_or_else(|| node.span());
        let mut full = path;
        full.0.extend(path_at(node, span.start));
        errors.push(located(
            Some(span),
            full,
            ErrorKind::Parse(e.message().to_owned()),
        ));
    };
    if let DeValue::Table(table) = root.get_ref() {
        for (key, node) in table.iter() {
            let name: &str = key.get_ref();
            let path = FieldPath::root().key(name);
            match name {
                "coordinator" => match from_node::<CoordinatorConfig>(node) {
                    Ok(c) => config.coordinator = c,
                    Err(e) => structural(path, node, e),
                },
                "host_types" => each(node, path, &mut config.host_types, &mut structural),
                "builders" => each(node, path, &mut config.builders, &mut structural),
                "repos" => each(node, path, &mut config.repos, &mut structural),
                "notifications" => each(node, path, &mut config.notifications, &mut structural),
                "limits" => match from_node::<Limits>(node) {
                    Ok(l) => config.limits = l,
                    Err(e) => structural(path, node, e),
                },
                "sandbox" => match from_node::<SandboxConfig>(node) {
                    Ok(s) => config.sandbox = s,
                    Err(e) => structural(path, node, e),
                },
                "connections" => match from_node::<ConnectionsConfig>(node) {
                    Ok(c) => config.connections = c,
                    Err(e) => structural(path, node, e),
                },
                "artifacts" => match from_node::<crate::artifacts::ArtifactsConfig>(node) {
                    Ok(a) => config.artifacts = a,
                    Err(e) => structural(path, node, e),
                },
                "access" => match from_node::<crate::access::AccessConfig>(node) {
                    Ok(a) => config.access = a,
                    Err(e) => structural(path, node, e),
                },
                _ => unknown.push(located(
                    Some(key.span()),
                    path,
                    ErrorKind::Parse(format!(
                        "unknown section `{name}`, expected one of {SECTIONS}"
                    )),
                )),
            }
        }
    }
    errors.extend(unknown);
    if !errors.is_empty() {
        return Err(sorted(errors));
    }

    let issues = validate::check(&config);
    if issues.is_empty() {
        return Ok(config);
    }
    let errors = issues
        .into_iter()
        .map(|Issue { path, kind }| located(Some(span_of(&root, &path)), path, kind))
        .collect();
    Err(sorted(errors))
}

/// Wraps validation issues of a config that has no source text.
pub(crate) fn unlocated(issues: Vec<Issue>, source_name: &str) -> ConfigErrors {
    ConfigErrors {
        errors: issues
            .into_iter()
            .map(|Issue { path, kind }| ConfigError {
                source_name: source_name.to_owned(),
                location: None,
                path,
                kind,
            })
            .collect(),
    }
}

/// The line with the most nesting characters (`[`, `{`, `.`): where a parser that gave up on
/// depth without saying where most likely did.
fn deepest_nesting(text: &str) -> Range<usize> {
    let mut best = (0, 0..0);
    let mut start = 0;
    for line in text.split_inclusive('\n') {
        let depth = line
            .bytes()
            .filter(|b| matches!(b, b'[' | b'{' | b'.'))
            .count();
        if depth > best.0 {
            best = (depth, start..start + line.len());
        }
        start += line.len();
    }
    best.1
}

fn sorted(mut errors: Vec<ConfigError>) -> ConfigErrors {
    errors.sort_by_key(|e| e.location.map(|l| (l.line, l.column)));
    // The recovering parser can report one mistake twice.
    errors.dedup();
    ConfigErrors { errors }
}

fn from_node<T: DeserializeOwned>(node: &Node<'_>) -> Result<T, toml::de::Error> {
    T::deserialize(ValueDeserializer::from(node.clone()))
}

/// Deserializes each entry of an array section, reporting every entry that fails.
fn each<T: DeserializeOwned>(
    node: &Node<'_>,
    path: FieldPath,
    into: &mut Vec<T>,
    report: &mut impl FnMut(FieldPath, &Node<'_>, toml::de::Error),
) {
    let DeValue::Array(items) = node.get_ref() else {
        // Let serde word the type error the usual way.
        if let Err(e) = from_node::<Vec<toml::Value>>(node) {
            report(path, node, e);
        }
        return;
    };
    for (i, item) in items.iter().enumerate() {
        match from_node::<T>(item) {
            Ok(v) => into.push(v),
            Err(e) => report(path.index(i), item, e),
        }
    }
}

/// The path, below `node`, of the innermost key or value whose span holds `offset`.
/// Searches the whole subtree: a `[table]` header's span covers only the header, not the
/// fields written under it.
fn path_at(node: &Node<'_>, offset: usize) -> Vec<Segment> {
    find_path(node, offset).unwrap_or_default()
}

fn find_path(node: &Node<'_>, offset: usize) -> Option<Vec<Segment>> {
    let children: Vec<(Segment, Option<Range<usize>>, &Node<'_>)> = match node.get_ref() {
        DeValue::Table(t) => t
            .iter()
            .map(|(k, v)| (Segment::Key(k.get_ref().to_string()), Some(k.span()), v))
            .collect(),
        DeValue::Array(a) => a
            .iter()
            .enumerate()
            .map(|(i, v)| (Segment::Index(i), None, v))
            .collect(),
        _ => return None,
    };
    for (seg, key_span, child) in children {
        let here = key_span.is_some_and(|s| s.contains(&offset)) || child.span().contains(&offset);
        let below = find_path(child, offset);
        if here || below.is_some() {
            let mut path = vec![seg];
            path.extend(below.unwrap_or_default());
            return Some(path);
        }
    }
    None
}

/// The span that best shows `path`: its key when the field is written, else the nearest
/// written ancestor (a defaulted field points at its table).
fn span_of(root: &Node<'_>, path: &FieldPath) -> Range<usize> {
    let mut cur = root;
    let mut best = root.span();
    for seg in &path.0 {
        let next = match (seg, cur.get_ref()) {
            (Segment::Key(k), DeValue::Table(t)) => t
                .iter()
                .find(|(key, _)| key.get_ref().as_ref() == k.as_str())
                .map(|(key, v)| (key.span(), v)),
            (Segment::Index(i), DeValue::Array(a)) => a.get(*i).map(|v| (v.span(), v)),
            _ => None,
        };
        match next {
            Some((span, v)) => {
                best = span;
                cur = v;
            }
            None => break,
        }
    }
    best
}
