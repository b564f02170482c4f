//! Compile diagnostics: errors and warnings with where they were written.
//!
//! In: messages from `compile` and `lint`, with the config path and byte
//! span they concern. Out: [`Diagnostic`]s that print as
//! `file:line:col: error: rules[3].hosts[1]: message`. It never decides
//! whether a config is usable; `compile` does, from their severities.

use std::fmt;
use std::ops::Range;

use crate::config::{LineIndex, Location, Source};

/// Whether a compiled item came out of the config or a lint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    /// The config cannot be used.
    Error,
    /// Usable, but probably not what was meant.
    Warning,
}

/// One compile error or warning, with where it was written.
#[derive(Debug, Clone)]
pub struct Diagnostic {
    /// Error or warning.
    pub severity: Severity,
    /// Where, when known.
    pub location: Option<Location>,
    /// Config path, e.g. `rules[3].hosts[1]`.
    pub path: String,
    /// What is wrong and, where possible, how to fix it.
    pub message: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(loc) = &self.location {
            write!(f, "{loc}: ")?;
        }
        let sev = match self.severity {
            Severity::Error => "error",
            Severity::Warning => "warning",
        };
        if self.path.is_empty() {
            write!(f, "{sev}: {}", self.message)
        } else {
            write!(f, "{sev}: {}: {}", self.path, self.message)
        }
    }
}

/// Collects diagnostics during compile.
pub(super) struct Diags<'s> {
    /// Everything found so far, in order.
    pub(super) list: Vec<Diagnostic>,
    sources: Vec<&'s Source>,
    lines: Vec<LineIndex>,
}

impl<'s> Diags<'s> {
    /// A collector for a config (`sources[0]`), its profile (`sources[1]`)
    /// and the files it includes (the rest).
    pub(super) fn new(sources: Vec<&'s Source>) -> Diags<'s> {
        let lines = sources.iter().map(|s| LineIndex::new(&s.text)).collect();
        Diags {
            list: Vec::new(),
            sources,
            lines,
        }
    }

    /// Whether any error was found after the first `since` diagnostics.
    pub(super) fn errors_since(&self, since: usize) -> bool {
        self.list[since..]
            .iter()
            .any(|x| x.severity == Severity::Error)
    }

    /// Whether any error was found.
    pub(super) fn has_errors(&self) -> bool {
        self.errors_since(0)
    }

    /// An error at `span` of source `src` (a zero span: no location).
    pub(super) fn error(
        &mut self,
        src: usize,
        span: Option<&Range<usize>>,
        path: String,
        message: String,
    ) {
        self.push(Severity::Error, src, span, path, message);
    }

    /// A warning at `span` of source `src`.
    pub(super) fn warn(
        &mut self,
        src: usize,
        span: Option<&Range<usize>>,
        path: String,
        message: String,
    ) {
        self.push(Severity::Warning, src, span, path, message);
    }

    /// A warning about a compiled rule, located where the rule was written.
    pub(super) fn warn_at(&mut self, origin: &Location, message: String) {
        self.list.push(Diagnostic {
            severity: Severity::Warning,
            location: Some(origin.clone()),
            path: String::new(),
            message,
        });
    }

    /// File, line and column of `span` in source `src`.
    pub(super) fn locate(&self, src: usize, span: &Range<usize>) -> Location {
        self.lines[src].locate(&self.sources[src].name, span)
    }

    fn push(
        &mut self,
        severity: Severity,
        src: usize,
        span: Option<&Range<usize>>,
        path: String,
        message: String,
    ) {
        let location = span
            .filter(|s| !(s.start == 0 && s.end == 0))
            .map(|s| self.locate(src, s));
        self.list.push(Diagnostic {
            severity,
            location,
            path,
            message,
        });
    }
}
