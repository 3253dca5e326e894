//! SQL text as an event path: literals replaced, comments and layout dropped, so that one
//! statement shape is one path whatever values it ran with.
//!
//! The input is what the probe captured: possibly cut anywhere (inside a string, a comment, a
//! UTF-8 sequence), possibly not SQL at all. So this is a small tolerant tokenizer of our own,
//! not a parser: `pg_query` needs complete statements (and libclang to build), `sqlparser`
//! rejects truncated strings and comments. Every function here is total: any `&str` gives a
//! result, in time linear in the input (which is bounded by [`MAX_INPUT`]).

/// Longest normalized text, in bytes; longer statements end in ` ...`.
pub const MAX_LEN: usize = 1024;
/// Input bytes looked at: a statement longer than this is normalized as if cut there.
pub const MAX_INPUT: usize = 64 * 1024;
/// What stands for every literal (number, string, dollar-quoted string).
pub const PLACEHOLDER: &str = "$?";
/// Marks a statement the capture cut: what follows it was not seen.
pub const CUT_MARK: &str = "…";
/// Marks a normalized text cut at [`MAX_LEN`], and collapsed repeated `VALUES` rows.
const MORE: &str = "...";

/// Kinds of token the lexer tells apart.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// An unquoted word: keyword or identifier.
    Word,
    /// `"quoted identifier"` (kept as written, even unterminated).
    QuotedIdent,
    /// Any string literal: `'..'`, `E'..'`, `B'..'`, `X'..'`, `N'..'`, `U&'..'`, `$tag$..$tag$`.
    Str,
    /// A numeric literal.
    Num,
    /// `$1`: a bind parameter, kept.
    Param,
    /// `$?`: a literal already replaced (so normalizing twice changes nothing).
    Placeholder,
    /// A run of operator characters.
    Op,
    /// One of `( ) [ ] , ; . :` or `::`.
    Punct,
    /// Anything else, one character (or a run of dots).
    Other,
}

#[derive(Clone, Copy, Debug)]
struct Tok<'a> {
    kind: Kind,
    text: &'a str,
    /// Byte offset of the token in the input.
    start: usize,
}

/// Splits SQL text into significant tokens (whitespace and comments are skipped).
struct Lexer<'a> {
    s: &'a str,
    b: &'a [u8],
    i: usize,
}

fn is_ident_start(c: u8) -> bool {
    c.is_ascii_alphabetic() || c == b'_' || c >= 0x80
}

fn is_ident_char(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'_' || c == b'$' || c >= 0x80
}

fn is_op_char(c: u8) -> bool {
    matches!(
        c,
        b'+' | b'-'
            | b'*'
            | b'/'
            | b'<'
            | b'>'
            | b'='
            | b'~'
            | b'!'
            | b'@'
            | b'#'
            | b'%'
            | b'^'
            | b'&'
            | b'|'
            | b'`'
            | b'?'
    )
}

impl<'a> Lexer<'a> {
    fn new(s: &'a str) -> Self {
        // Cut at a char boundary at most MAX_INPUT bytes in.
        let mut end = s.len().min(MAX_INPUT);
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        let s = &s[..end];
        Self {
            s,
            b: s.as_bytes(),
            i: 0,
        }
    }

    fn peek(&self, k: usize) -> u8 {
        self.b.get(self.i + k).copied().unwrap_or(0)
    }

    /// Skips to after the closing `quote` of a quoted run starting at `self.i` (the opening
    /// quote); a doubled quote is an escaped one, and with `backslash` so is `\` + any byte.
    /// Unterminated: to the end.
    fn quoted(&mut self, quote: u8, backslash: bool) {
        self.i += 1;
        while self.i < self.b.len() {
            let c = self.b[self.i];
            if backslash && c == b'\\' {
                self.i += 2;
            } else if c == quote {
                if self.peek(1) == quote {
                    self.i += 2;
                } else {
                    self.i += 1;
                    return;
                }
            } else {
                self.i += 1;
            }
        }
        self.i = self.b.len();
    }

    /// A dollar-quote opening tag at `self.i` (`$$` or `$tag$`): its length.
    fn dollar_tag(&self) -> Option<usize> {
        let rest = &self.b[self.i + 1..];
        if rest.first() == Some(&b'$') {
            return Some(2);
        }
        if !rest.first().is_some_and(|&c| is_ident_start(c)) {
            return None;
        }
        let n = rest
            .iter()
            .position(|&c| !(is_ident_char(c) && c != b'$'))?;
        (rest[n] == b'$').then_some(n + 2)
    }

    fn number(&mut self) {
        let b = self.b;
        let digits = |i: &mut usize, ok: fn(u8) -> bool| {
            while *i < b.len() && (ok(b[*i]) || b[*i] == b'_') {
                *i += 1;
            }
        };
        let mut i = self.i;
        if b[i] == b'0' && matches!(self.peek(1), b'x' | b'X' | b'o' | b'O' | b'b' | b'B') {
            i += 2;
            digits(&mut i, |c| c.is_ascii_hexdigit());
            self.i = i;
            return;
        }
        digits(&mut i, |c| c.is_ascii_digit());
        if i < b.len() && b[i] == b'.' && b.get(i + 1) != Some(&b'.') {
            i += 1;
            digits(&mut i, |c| c.is_ascii_digit());
        }
        if i < b.len() && (b[i] == b'e' || b[i] == b'E') {
            let mut j = i + 1;
            if j < b.len() && (b[j] == b'+' || b[j] == b'-') {
                j += 1;
            }
            if j < b.len() && b[j].is_ascii_digit() {
                i = j;
                digits(&mut i, |c| c.is_ascii_digit());
            }
        }
        self.i = i;
    }

    fn operator(&mut self) {
        let start = self.i;
        let mut i = self.i;
        while i < self.b.len() && is_op_char(self.b[i]) {
            // A comment start ends the operator.
            if i > start
                && ((self.b[i] == b'-' && self.b.get(i + 1) == Some(&b'-'))
                    || (self.b[i] == b'/' && self.b.get(i + 1) == Some(&b'*')))
            {
                break;
            }
            i += 1;
        }
        // Postgres: a multi-character operator cannot end in `+` or `-` unless it holds one
        // of `~ ! @ # % ^ & | \` ?` (so `=-1` is `=` then `-1`).
        let op = &self.b[start..i];
        if op.len() > 1 && !op.iter().any(|c| b"~!@#%^&|`?".contains(c)) {
            while i > start + 1 && matches!(self.b[i - 1], b'+' | b'-') {
                i -= 1;
            }
        }
        self.i = i;
    }
}

impl<'a> Iterator for Lexer<'a> {
    type Item = Tok<'a>;

    fn next(&mut self) -> Option<Tok<'a>> {
        loop {
            let c = *self.b.get(self.i)?;
            let start = self.i;
            let kind = match c {
                b' ' | b'\t' | b'\n' | b'\r' | 0x0b | 0x0c => {
                    self.i += 1;
                    continue;
                }
                b'-' if self.peek(1) == b'-' => {
                    self.i = self.b[self.i..]
                        .iter()
                        .position(|&c| c == b'\n')
                        .map_or(self.b.len(), |n| self.i + n + 1);
                    continue;
                }
                b'/' if self.peek(1) == b'*' => {
                    let mut depth = 0usize;
                    while self.i < self.b.len() {
                        if self.b[self.i] == b'/' && self.peek(1) == b'*' {
                            depth += 1;
                            self.i += 2;
                        } else if self.b[self.i] == b'*' && self.peek(1) == b'/' {
                            depth -= 1;
                            self.i += 2;
                            if depth == 0 {
                                break;
                            }
                        } else {
                            self.i += 1;
                        }
                    }
                    self.i = self.i.min(self.b.len());
                    continue;
                }
                b'\'' => {
                    self.quoted(b'\'', false);
                    Kind::Str
                }
                b'"' => {
                    self.quoted(b'"', false);
                    Kind::QuotedIdent
                }
                b'e' | b'E' if self.peek(1) == b'\'' => {
                    self.i += 1;
                    self.quoted(b'\'', true);
                    Kind::Str
                }
                b'b' | b'B' | b'x' | b'X' | b'n' | b'N' if self.peek(1) == b'\'' => {
                    self.i += 1;
                    self.quoted(b'\'', false);
                    Kind::Str
                }
                b'u' | b'U' if self.peek(1) == b'&' && matches!(self.peek(2), b'\'' | b'"') => {
                    self.i += 2;
                    let q = self.b[self.i];
                    self.quoted(q, false);
                    if q == b'\'' {
                        Kind::Str
                    } else {
                        Kind::QuotedIdent
                    }
                }
                b'$' if self.peek(1).is_ascii_digit() => {
                    self.i += 1;
                    while self.peek(0).is_ascii_digit() {
                        self.i += 1;
                    }
                    Kind::Param
                }
                b'$' if self.peek(1) == b'?' => {
                    self.i += 2;
                    Kind::Placeholder
                }
                b'$' => match self.dollar_tag() {
                    Some(n) => {
                        let tag = &self.b[self.i..self.i + n];
                        let body = self.i + n;
                        self.i = self.b[body..]
                            .windows(n)
                            .position(|w| w == tag)
                            .map_or(self.b.len(), |p| body + p + n);
                        Kind::Str
                    }
                    None => {
                        self.i += 1;
                        Kind::Other
                    }
                },
                b'0'..=b'9' => {
                    self.number();
                    Kind::Num
                }
                b'.' if self.peek(1).is_ascii_digit() => {
                    self.number();
                    Kind::Num
                }
                b'.' if self.peek(1) == b'.' => {
                    while self.peek(0) == b'.' {
                        self.i += 1;
                    }
                    Kind::Other
                }
                b':' if self.peek(1) == b':' => {
                    self.i += 2;
                    Kind::Punct
                }
                b'(' | b')' | b'[' | b']' | b',' | b';' | b'.' | b':' => {
                    self.i += 1;
                    Kind::Punct
                }
                c if is_ident_start(c) => {
                    while self.i < self.b.len() && is_ident_char(self.b[self.i]) {
                        self.i += 1;
                    }
                    Kind::Word
                }
                c if is_op_char(c) => {
                    self.operator();
                    Kind::Op
                }
                _ => {
                    // One whole character (ASCII here: bytes >= 0x80 start words).
                    self.i += 1;
                    Kind::Other
                }
            };
            // Every stop above is after an ASCII byte, at the end, or after a run of
            // bytes >= 0x80 that ends before an ASCII byte: always a char boundary.
            let end = self.i.min(self.b.len());
            self.i = end;
            let text = self.s.get(start..end).unwrap_or_default();
            return Some(Tok { kind, text, start });
        }
    }
}

/// Words written in upper case in the output: SQL's reserved words and the verbs of common
/// statements. Non-reserved words that are often column names (`name`, `type`, `level`,
/// `read`) are left as written. Sorted, for binary search.
const KEYWORDS: &[&str] = &[
    "ABORT",
    "ALL",
    "ALTER",
    "ANALYZE",
    "AND",
    "ANY",
    "ARRAY",
    "AS",
    "ASC",
    "ASYMMETRIC",
    "ATOMIC",
    "BEGIN",
    "BETWEEN",
    "BOTH",
    "BY",
    "CALL",
    "CASCADE",
    "CASE",
    "CAST",
    "CHECK",
    "CLOSE",
    "COLLATE",
    "COLUMN",
    "COMMIT",
    "COMMITTED",
    "CONCURRENTLY",
    "CONFLICT",
    "CONSTRAINT",
    "COPY",
    "CREATE",
    "CROSS",
    "CURRENT_DATE",
    "CURRENT_TIME",
    "CURRENT_TIMESTAMP",
    "CURRENT_USER",
    "CURSOR",
    "DEALLOCATE",
    "DECLARE",
    "DEFAULT",
    "DEFERRABLE",
    "DELETE",
    "DESC",
    "DISCARD",
    "DISTINCT",
    "DO",
    "DROP",
    "ELSE",
    "END",
    "EXCEPT",
    "EXECUTE",
    "EXISTS",
    "EXPLAIN",
    "FALSE",
    "FETCH",
    "FOR",
    "FOREIGN",
    "FROM",
    "FULL",
    "GRANT",
    "GROUP",
    "HAVING",
    "ILIKE",
    "IN",
    "INDEX",
    "INNER",
    "INSERT",
    "INTERSECT",
    "INTO",
    "IS",
    "ISNULL",
    "ISOLATION",
    "JOIN",
    "LATERAL",
    "LEADING",
    "LEFT",
    "LIKE",
    "LIMIT",
    "LISTEN",
    "LOCALTIME",
    "LOCALTIMESTAMP",
    "LOCK",
    "MATCHED",
    "MERGE",
    "NATURAL",
    "NOT",
    "NOTHING",
    "NOTIFY",
    "NOTNULL",
    "NOWAIT",
    "NULL",
    "OFFSET",
    "ON",
    "ONLY",
    "OR",
    "ORDER",
    "OUTER",
    "OVER",
    "OVERLAPS",
    "PARTITION",
    "PLACING",
    "PREPARE",
    "PRIMARY",
    "RECURSIVE",
    "REFERENCES",
    "RELEASE",
    "REPEATABLE",
    "RESET",
    "RETURNING",
    "REVOKE",
    "RIGHT",
    "ROLLBACK",
    "SAVEPOINT",
    "SELECT",
    "SERIALIZABLE",
    "SESSION_USER",
    "SET",
    "SHOW",
    "SIMILAR",
    "SOME",
    "START",
    "SYMMETRIC",
    "TABLE",
    "THEN",
    "TO",
    "TRAILING",
    "TRANSACTION",
    "TRUE",
    "TRUNCATE",
    "UNCOMMITTED",
    "UNION",
    "UNIQUE",
    "UNLISTEN",
    "UPDATE",
    "USING",
    "VACUUM",
    "VALUES",
    "VARIADIC",
    "VERBOSE",
    "WHEN",
    "WHERE",
    "WINDOW",
    "WITH",
];

/// A word of at most 16 bytes as one integer, upper-cased: words hold no NUL, so distinct
/// words give distinct keys (integer compares are what makes keyword lookup cheap).
fn word_key(word: &[u8]) -> Option<u128> {
    if word.len() > 16 {
        return None;
    }
    Some(
        word.iter()
            .fold(0u128, |k, &b| (k << 8) | u128::from(b.to_ascii_uppercase())),
    )
}

/// [`KEYWORDS`] by [`word_key`], sorted (built once).
fn keyword_table() -> &'static [(u128, &'static str)] {
    static TABLE: std::sync::OnceLock<Vec<(u128, &'static str)>> = std::sync::OnceLock::new();
    TABLE.get_or_init(|| {
        let mut t: Vec<(u128, &'static str)> = KEYWORDS
            .iter()
            .filter_map(|k| word_key(k.as_bytes()).map(|key| (key, *k)))
            .collect();
        t.sort_unstable();
        t
    })
}

/// The upper-case keyword `word` is, if it is one.
fn keyword(word: &str) -> Option<&'static str> {
    match word_key(word.as_bytes()) {
        Some(key) => {
            let t = keyword_table();
            t.binary_search_by_key(&key, |e| e.0).ok().map(|i| t[i].1)
        }
        None => KEYWORDS
            .iter()
            .find(|k| k.len() > 16 && k.eq_ignore_ascii_case(word))
            .copied(),
    }
}

/// A token of the normalized text.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct NTok<'a> {
    kind: NKind,
    text: &'a str,
    /// Which punctuation (its byte; [`CAST`] for `::`) or keyword ([`KW_IN`]...), so that
    /// tests on tokens are integer compares.
    code: u8,
}

/// `code` of `::`.
const CAST: u8 = 0x80;
/// `code`s of the keywords the list collapsing looks for.
const KW_IN: u8 = 1;
const KW_ARRAY: u8 = 2;
const KW_VALUES: u8 = 3;

impl<'a> NTok<'a> {
    fn new(kind: NKind, text: &'a str) -> Self {
        let code = match kind {
            NKind::Punct if text == "::" => CAST,
            NKind::Punct => text.as_bytes().first().copied().unwrap_or(0),
            NKind::Keyword => match text {
                "IN" => KW_IN,
                "ARRAY" => KW_ARRAY,
                "VALUES" => KW_VALUES,
                _ => 0,
            },
            _ => 0,
        };
        Self { kind, text, code }
    }

    fn punct(&self, c: u8) -> bool {
        self.kind == NKind::Punct && self.code == c
    }

    fn kw(&self, c: u8) -> bool {
        self.kind == NKind::Keyword && self.code == c
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum NKind {
    Keyword,
    Ident,
    Placeholder,
    Param,
    Op,
    Punct,
    Other,
}

impl NTok<'_> {
    /// A value: what a following `-` is binary after, and what `(`/`[` attach to.
    fn operand(&self) -> bool {
        matches!(self.kind, NKind::Ident | NKind::Placeholder | NKind::Param)
            || (self.kind == NKind::Punct && matches!(self.code, b')' | b']'))
    }

    fn literal_like(&self) -> bool {
        matches!(self.kind, NKind::Placeholder | NKind::Param)
    }
}

/// Whether a space goes between `prev` and `cur` in the output. Only token kinds decide, so
/// the output lexes back to the same tokens and renders the same (idempotence).
fn needs_space(prev: &NTok<'_>, cur: &NTok<'_>) -> bool {
    // Dots or colons that would lex as one token (`....`, `::`) when written together.
    let (last, first) = (
        prev.text.as_bytes().last().copied(),
        cur.text.as_bytes().first().copied(),
    );
    if last == first && matches!(first, Some(b'.' | b':')) {
        return true;
    }
    if cur.kind == NKind::Punct
        && matches!(cur.code, b',' | b')' | b']' | b';' | b'.' | CAST | b':')
    {
        return false;
    }
    if prev.kind == NKind::Punct && matches!(prev.code, b'(' | b'[' | b'.' | CAST | b':') {
        return false;
    }
    if cur.punct(b'(') {
        return !matches!(prev.kind, NKind::Ident);
    }
    if cur.punct(b'[') {
        return !prev.operand();
    }
    true
}

/// Maps lexed tokens to normalized ones: literals to `$?` (a sign before a number is part of
/// it), keywords upper-cased.
fn to_ntoks<'a>(sql: &'a str) -> Vec<NTok<'a>> {
    let toks: Vec<Tok<'a>> = Lexer::new(sql).collect();
    let mut out: Vec<NTok<'a>> = Vec::with_capacity(toks.len());
    for (i, t) in toks.iter().enumerate() {
        let n = match t.kind {
            Kind::Str | Kind::Num | Kind::Placeholder => PLACEHOLDER_TOK,
            Kind::Op
                if matches!(t.text, "-" | "+")
                    && toks.get(i + 1).is_some_and(|n| n.kind == Kind::Num)
                    && toks.get(i + 2).is_none_or(|n| n.text != "::")
                    && !out.last().is_some_and(|p| p.operand()) =>
            {
                // Unary sign of a number: part of the literal, as Postgres folds it (not
                // before a cast, which binds tighter: `-1::int` is `-(1::int)`).
                continue;
            }
            Kind::Word => match keyword(t.text) {
                Some(k) => NTok::new(NKind::Keyword, k),
                None => NTok::new(NKind::Ident, t.text),
            },
            Kind::QuotedIdent => NTok::new(NKind::Ident, t.text),
            Kind::Param => NTok::new(NKind::Param, t.text),
            Kind::Op => NTok::new(NKind::Op, t.text),
            Kind::Punct => NTok::new(NKind::Punct, t.text),
            Kind::Other => NTok::new(NKind::Other, t.text),
        };
        out.push(n);
    }
    out
}

/// End (exclusive) of a list `open elem, elem, ... close` at `i` whose elements are all
/// literals or parameters, and whether it closes (a list cut at the end of the input does
/// not).
fn literal_list(t: &[NTok<'_>], i: usize, open: u8, close: u8) -> Option<(usize, bool)> {
    if !t.get(i)?.punct(open) {
        return None;
    }
    let mut j = i + 1;
    loop {
        let Some(elem) = t.get(j) else {
            return (j > i + 1).then_some((j, false));
        };
        if !elem.literal_like() {
            return None;
        }
        j += 1;
        let Some(sep) = t.get(j) else {
            return Some((j, false));
        };
        if sep.punct(close) {
            return Some((j + 1, true));
        }
        if !sep.punct(b',') {
            return None;
        }
        j += 1;
    }
}

const PLACEHOLDER_TOK: NTok<'static> = NTok {
    kind: NKind::Placeholder,
    text: PLACEHOLDER,
    code: 0,
};
const MORE_TOK: NTok<'static> = NTok {
    kind: NKind::Other,
    text: MORE,
    code: 0,
};
const COMMA_TOK: NTok<'static> = NTok {
    kind: NKind::Punct,
    text: ",",
    code: b',',
};

/// Collapses lists whose length varies with the data: `IN (1, 2, 3)` and `ARRAY[1, 2]` become
/// one placeholder, and a run of equal `VALUES` rows becomes the first row and `, ...`.
///
/// Lists first, then rows, and rows are looked into (a `VALUES` or `IN` inside a row is
/// collapsed as anywhere else): so a text normalizes the same whether or not a row around it
/// is still closed, as after the cut at [`MAX_LEN`] (idempotence; fuzzing found both).
fn collapse<'a>(t: Vec<NTok<'a>>) -> Vec<NTok<'a>> {
    collapse_rows(collapse_lists(t))
}

/// `IN (...)` and `ARRAY[...]` lists of literals or parameters to one placeholder.
fn collapse_lists<'a>(t: Vec<NTok<'a>>) -> Vec<NTok<'a>> {
    let mut out = Vec::with_capacity(t.len());
    let mut i = 0;
    while i < t.len() {
        let tok = t[i];
        out.push(tok);
        i += 1;
        let list = if tok.kw(KW_IN) {
            literal_list(&t, i, b'(', b')').map(|(end, closed)| (end, closed, "(", ")"))
        } else if tok.kw(KW_ARRAY) {
            literal_list(&t, i, b'[', b']').map(|(end, closed)| (end, closed, "[", "]"))
        } else {
            None
        };
        if let Some((end, closed, open, close)) = list {
            out.push(NTok::new(NKind::Punct, open));
            out.push(PLACEHOLDER_TOK);
            if closed {
                out.push(NTok::new(NKind::Punct, close));
            }
            i = end;
        }
    }
    out
}

/// Runs of equal `VALUES` rows to the first row and `, ...`. Rows are found with the
/// parentheses matched once; a row is compared with the row before as it will be written
/// (the `VALUES` inside rows are collapsed first: the last `VALUES` is done first). Rows
/// nested in rows are compared once per level: linear unless `VALUES` rows nest deeply.
fn collapse_rows<'a>(t: Vec<NTok<'a>>) -> Vec<NTok<'a>> {
    if !t.iter().any(|tok| tok.kw(KW_VALUES)) {
        return t;
    }
    // End (exclusive) of the group each `(` opens, when it closes.
    let mut group_end = vec![None; t.len()];
    let mut open = Vec::new();
    for (j, tok) in t.iter().enumerate() {
        if tok.punct(b'(') {
            open.push(j);
        } else if tok.punct(b')')
            && let Some(o) = open.pop()
        {
            group_end[o] = Some(j + 1);
        }
    }
    let row_at = |j: usize| group_end.get(j).copied().flatten();
    // Tokens dropped, and where `, ...` goes (after the token at that index).
    let mut dropped = vec![false; t.len()];
    let mut more_after = vec![false; t.len()];
    for i in (0..t.len()).rev() {
        if !t[i].kw(KW_VALUES) {
            continue;
        }
        let Some(mut end) = row_at(i + 1) else {
            continue;
        };
        let mut prev = i + 1..end;
        let mut kept_end = end;
        let mut run = false;
        loop {
            if !t.get(end).is_some_and(|c| c.punct(b',')) {
                break;
            }
            // (Not the last token: that is the mark of the cut at `MAX_LEN`.)
            if end + 2 < t.len() && t[end + 1].text == MORE {
                // Rows collapsed before (normalized text normalized again): the run goes
                // on, and its mark is written again where the run ends.
                dropped[end] = true;
                dropped[end + 1] = true;
                run = true;
                end += 2;
                continue;
            }
            let Some(next_end) = row_at(end + 1) else {
                break;
            };
            let row = end + 1..next_end;
            let written = |r: std::ops::Range<usize>| {
                r.filter(|&j| !dropped[j]).flat_map(|j| {
                    let more = more_after[j].then_some([COMMA_TOK, MORE_TOK]);
                    std::iter::once(t[j]).chain(more.into_iter().flatten())
                })
            };
            // `prev` is the last row kept (a dropped row equals it, and is written as nothing).
            if written(row.clone()).eq(written(prev.clone())) {
                dropped[end..next_end].fill(true);
                run = true;
            } else {
                if run {
                    more_after[kept_end - 1] = true;
                    run = false;
                }
                kept_end = next_end;
                prev = row;
            }
            end = next_end;
        }
        if run {
            more_after[kept_end - 1] = true;
        }
    }
    let mut out = Vec::with_capacity(t.len());
    for (j, tok) in t.into_iter().enumerate() {
        if !dropped[j] {
            out.push(tok);
            if more_after[j] {
                out.push(COMMA_TOK);
                out.push(MORE_TOK);
            }
        }
    }
    out
}

/// Renders normalized tokens, at most [`MAX_LEN`] bytes then ` ...`.
fn render(t: &[NTok<'_>]) -> String {
    let mut out = String::with_capacity(
        t.iter()
            .map(|t| t.text.len() + 1)
            .sum::<usize>()
            .min(MAX_LEN + 8),
    );
    let mut prev: Option<NTok<'_>> = None;
    for tok in t {
        let space = prev.is_some_and(|p| needs_space(&p, tok));
        if out.len() + usize::from(space) + tok.text.len() > MAX_LEN {
            if prev.is_some_and(|p| needs_space(&p, &MORE_TOK)) {
                out.push(' ');
            }
            out.push_str(MORE);
            return out;
        }
        if space {
            out.push(' ');
        }
        out.push_str(tok.text);
        prev = Some(*tok);
    }
    out
}

/// The statement with every literal replaced by `$?` (a sign before a number included), `IN`
/// and `ARRAY[...]` lists of literals or parameters collapsed to one `$?`, runs of equal
/// `VALUES` rows collapsed to the first and `, ...`, comments removed, whitespace collapsed,
/// keywords upper-cased, identifiers (quoted ones too) and `$n` parameters kept as written; at
/// most [`MAX_LEN`] bytes then ` ...`. Never panics, and `normalize(normalize(s)) ==
/// normalize(s)`.
pub fn normalize(sql: &str) -> String {
    // Final semicolons go first: a list they ended (`ARRAY[1,;`) must collapse as it does
    // once they are gone, the second time.
    render(&collapse(without_final_semicolons(to_ntoks(sql))))
}

/// A statement ends where its text ends: `SELECT 1;` (as pgbench prepares it) and `SELECT 1`
/// (one statement of a multi-statement query) are one endpoint.
fn without_final_semicolons(mut t: Vec<NTok<'_>>) -> Vec<NTok<'_>> {
    while t.last().is_some_and(|tok| tok.text == ";") {
        t.pop();
    }
    t
}

/// Like [`normalize`] for a statement the capture cut: ends with ` …`. A string, comment or
/// quoted identifier left open by the cut still normalizes (a string to `$?`).
pub fn normalize_cut(sql: &str) -> String {
    let mut t = collapse(without_final_semicolons(to_ntoks(sql)));
    t.push(NTok::new(NKind::Other, CUT_MARK));
    render(&t)
}

/// Statement verbs [`statement_kind`] reports, and what each first word maps to.
const KINDS: &[(&str, &str)] = &[
    ("ABORT", "ROLLBACK"),
    ("ALTER", "ALTER"),
    ("ANALYZE", "ANALYZE"),
    ("BEGIN", "BEGIN"),
    ("CALL", "CALL"),
    ("CHECKPOINT", "CHECKPOINT"),
    ("CLOSE", "CLOSE"),
    ("CLUSTER", "CLUSTER"),
    ("COMMENT", "COMMENT"),
    ("COMMIT", "COMMIT"),
    ("COPY", "COPY"),
    ("CREATE", "CREATE"),
    ("DEALLOCATE", "DEALLOCATE"),
    ("DECLARE", "DECLARE"),
    ("DELETE", "DELETE"),
    ("DISCARD", "DISCARD"),
    ("DO", "DO"),
    ("DROP", "DROP"),
    ("END", "COMMIT"),
    ("EXECUTE", "EXECUTE"),
    ("EXPLAIN", "EXPLAIN"),
    ("FETCH", "FETCH"),
    ("GRANT", "GRANT"),
    ("INSERT", "INSERT"),
    ("LISTEN", "LISTEN"),
    ("LOCK", "LOCK"),
    ("MERGE", "MERGE"),
    ("MOVE", "MOVE"),
    ("NOTIFY", "NOTIFY"),
    ("PREPARE", "PREPARE"),
    ("REFRESH", "REFRESH"),
    ("REINDEX", "REINDEX"),
    ("RELEASE", "RELEASE"),
    ("RESET", "RESET"),
    ("REVOKE", "REVOKE"),
    ("ROLLBACK", "ROLLBACK"),
    ("SAVEPOINT", "SAVEPOINT"),
    ("SELECT", "SELECT"),
    ("SET", "SET"),
    ("SHOW", "SHOW"),
    ("START", "BEGIN"),
    ("TABLE", "SELECT"),
    ("TRUNCATE", "TRUNCATE"),
    ("UNLISTEN", "UNLISTEN"),
    ("UPDATE", "UPDATE"),
    ("VACUUM", "VACUUM"),
    ("VALUES", "SELECT"),
    ("WITH", "WITH"),
];

fn kind_of_word(word: &str) -> Option<&'static str> {
    KINDS
        .iter()
        .find(|(w, _)| w.eq_ignore_ascii_case(word))
        .map(|(_, k)| *k)
}

/// What the statement does, from its first word: `SELECT`, `INSERT`, `UPDATE`, `DELETE`,
/// `MERGE`, `BEGIN` (also `START TRANSACTION`), `COMMIT` (also `END`), `ROLLBACK`, `COPY`,
/// `CREATE`, ... or `OTHER`. A `WITH` query is the kind of its main statement; `VALUES` and
/// `TABLE` are `SELECT`s.
pub fn statement_kind(sql: &str) -> &'static str {
    let mut toks = Lexer::new(sql).filter(|t| !(t.kind == Kind::Punct && t.text == "("));
    let Some(first) = toks.next() else {
        return "OTHER";
    };
    if first.kind != Kind::Word {
        return "OTHER";
    }
    match kind_of_word(first.text) {
        Some("WITH") => {
            // The main statement: the first verb outside the parenthesized CTE bodies.
            let mut depth = 0i64;
            for t in Lexer::new(sql).skip_while(|t| t.kind != Kind::Word) {
                match (t.kind, t.text) {
                    (Kind::Punct, "(") => depth += 1,
                    (Kind::Punct, ")") => depth -= 1,
                    (Kind::Word, w) if depth <= 0 => {
                        if let Some(k @ ("SELECT" | "INSERT" | "UPDATE" | "DELETE" | "MERGE")) =
                            kind_of_word(w)
                        {
                            return k;
                        }
                    }
                    _ => {}
                }
            }
            "SELECT"
        }
        Some(k) => k,
        None => "OTHER",
    }
}

/// The statements of a simple-query string, as the server runs them: split at top-level `;`
/// (not inside strings, comments, dollar quotes, parentheses or a `BEGIN ATOMIC ... END`
/// body), without empty ones. A string with no statement at all gives one empty statement
/// (the server answers it with EmptyQueryResponse).
pub fn split_statements(sql: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut start: Option<usize> = None;
    let mut end = 0usize;
    let mut depth = 0i64;
    let mut atomic = 0usize;
    let mut case = 0usize;
    let mut prev_begin = false;
    let lexer = Lexer::new(sql);
    let limit = lexer.s.len();
    for t in lexer {
        let is_word = |w: &str| t.kind == Kind::Word && t.text.eq_ignore_ascii_case(w);
        if t.kind == Kind::Punct && t.text == ";" && depth <= 0 && atomic == 0 {
            if let Some(s) = start.take() {
                out.push(sql.get(s..end).unwrap_or_default());
            }
            prev_begin = false;
            continue;
        }
        match t.kind {
            Kind::Punct if t.text == "(" => depth += 1,
            Kind::Punct if t.text == ")" => depth -= 1,
            _ => {}
        }
        if prev_begin && is_word("ATOMIC") {
            atomic += 1;
        } else if atomic > 0 && is_word("CASE") {
            case += 1;
        } else if atomic > 0 && is_word("END") {
            if case > 0 {
                case -= 1;
            } else {
                atomic -= 1;
            }
        }
        prev_begin = is_word("BEGIN");
        start.get_or_insert(t.start);
        end = t.start + t.text.len();
    }
    if let Some(s) = start {
        // The last statement runs to the end of what was looked at (a trailing comment
        // included: it may be cut).
        out.push(sql.get(s..limit).unwrap_or_default().trim_end());
    }
    if out.is_empty() {
        out.push("");
    }
    out
}

/// The W3C `traceparent` a sqlcommenter-style comment carries (`/*traceparent='00-…-01'*/`),
/// read before comments are dropped.
pub fn traceparent(sql: &str) -> Option<&str> {
    const KEY: &str = "traceparent='";
    let at = sql.find(KEY)? + KEY.len();
    let value = sql.get(at..at + 55)?;
    let ok = value.bytes().enumerate().all(|(i, c)| match i {
        2 | 35 | 52 => c == b'-',
        _ => c.is_ascii_hexdigit(),
    }) && sql.as_bytes().get(at + 55) == Some(&b'\'');
    ok.then_some(value)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn literals_become_placeholders() {
        assert_eq!(
            normalize("select * from users where id = 42 and name = 'bob''s' and x > -1.5e3"),
            "SELECT * FROM users WHERE id = $? AND name = $? AND x > $?"
        );
        assert_eq!(
            normalize("SELECT E'a\\'b', B'101', X'ff', U&'d\\0061t', $$x;y$$, $f$ $$ $f$, 0x1F"),
            "SELECT $?, $?, $?, $?, $?, $?, $?"
        );
        assert_eq!(
            normalize("select a - 1, -2, b*-3"),
            "SELECT a - $?, $?, b * $?"
        );
        assert_eq!(normalize("SELECT '1'::int, now()"), "SELECT $?::int, now()");
        assert_eq!(
            normalize("SELECT -1::int, x + -2"),
            "SELECT - $?::int, x + $?"
        );
    }

    #[test]
    fn parameters_identifiers_and_keywords() {
        assert_eq!(
            normalize("select \"User Name\", MyCol from \"S\".\"T\" where a=$1 and b = $2"),
            "SELECT \"User Name\", MyCol FROM \"S\".\"T\" WHERE a = $1 AND b = $2"
        );
        assert_eq!(
            normalize("select true, null, t.* from t"),
            "SELECT TRUE, NULL, t.* FROM t"
        );
        assert_eq!(
            normalize("insert into t (a, b) values (1, 'x') returning id"),
            "INSERT INTO t(a, b) VALUES ($?, $?) RETURNING id"
        );
    }

    #[test]
    fn comments_and_whitespace() {
        assert_eq!(
            normalize("  /* hint /* nested */ */ SELECT\n\t1 -- trailing\n  FROM   t  "),
            "SELECT $? FROM t"
        );
    }

    #[test]
    fn lists_collapse() {
        assert_eq!(
            normalize(
                "select * from t where id in (1, 2, 3) and x in ($1,$2) and y = any(array[1,2])"
            ),
            "SELECT * FROM t WHERE id IN ($?) AND x IN ($?) AND y = ANY (ARRAY [$?])"
        );
        assert_eq!(
            normalize("select * from t where id in (select id from u)"),
            "SELECT * FROM t WHERE id IN (SELECT id FROM u)"
        );
        assert_eq!(
            normalize("insert into t values (1, 'a'), (2, 'b'), (3, now())"),
            "INSERT INTO t VALUES ($?, $?), ..., ($?, now())"
        );
        assert_eq!(
            normalize("insert into t values ($1, $2), ($3, $4)"),
            "INSERT INTO t VALUES ($1, $2), ($3, $4)"
        );
    }

    #[test]
    fn long_statements_are_bounded() {
        let sql = format!("SELECT {} FROM t", vec!["col"; 1000].join(", "));
        let n = normalize(&sql);
        assert!(n.len() <= MAX_LEN + 4, "{}", n.len());
        assert!(n.ends_with(" ..."), "{n}");
        assert_eq!(normalize(&n), n);
    }

    #[test]
    fn cut_statements_normalize() {
        assert_eq!(
            normalize_cut("SELECT * FROM t WHERE a = 'secr"),
            "SELECT * FROM t WHERE a = $? …"
        );
        assert_eq!(normalize_cut("SELECT 1 /* unterminated"), "SELECT $? …");
        assert_eq!(normalize_cut("SELECT \"unterm"), "SELECT \"unterm …");
        assert_eq!(
            normalize_cut("SELECT 1 WHERE a IN (1, 2, 3"),
            "SELECT $? WHERE a IN ($? …"
        );
        assert_eq!(
            normalize_cut("SELECT 1 WHERE a IN (1, 2,"),
            "SELECT $? WHERE a IN ($? …"
        );
        let n = normalize_cut("SELECT $body$ never ends");
        assert_eq!(n, "SELECT $? …");
        assert_eq!(normalize(&n), n);
    }

    #[test]
    fn kinds() {
        for (sql, kind) in [
            ("select 1", "SELECT"),
            ("  (SELECT 1) UNION (SELECT 2)", "SELECT"),
            ("/* c */ insert into t values (1)", "INSERT"),
            ("with x as (select 1) update t set a = 1", "UPDATE"),
            (
                "WITH RECURSIVE r(n) AS (SELECT 1 UNION SELECT n+1 FROM r) SELECT * FROM r",
                "SELECT",
            ),
            ("start transaction", "BEGIN"),
            ("end", "COMMIT"),
            ("values (1)", "SELECT"),
            ("vacuum", "VACUUM"),
            ("frobnicate", "OTHER"),
            ("", "OTHER"),
            ("'x'", "OTHER"),
        ] {
            assert_eq!(statement_kind(sql), kind, "{sql}");
        }
    }

    #[test]
    fn splitting() {
        assert_eq!(
            split_statements("select 1; select ';' ; ; -- x\n select $$;$$;"),
            vec!["select 1", "select ';'", "select $$;$$"]
        );
        assert_eq!(split_statements("  ;  "), vec![""]);
        assert_eq!(split_statements(""), vec![""]);
        assert_eq!(
            split_statements(
                "CREATE FUNCTION f() RETURNS int LANGUAGE sql BEGIN ATOMIC SELECT 1; SELECT CASE WHEN true THEN 1 END; END; SELECT 2"
            )
            .len(),
            2
        );
        assert_eq!(
            split_statements("select 'cut; here"),
            vec!["select 'cut; here"]
        );
    }

    #[test]
    fn sqlcommenter_traceparent() {
        let tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        let sql = format!("SELECT 1 /*traceparent='{tp}',tracestate='x'*/");
        assert_eq!(traceparent(&sql), Some(tp));
        assert_eq!(traceparent("SELECT 1 /*traceparent='00-zz'*/"), None);
    }

    /// Found by fuzzing (fuzz/regressions/sql/values-nested): a `VALUES` row holding another
    /// `VALUES` list after a collapsed run normalized differently the second time.
    #[test]
    fn collapsed_values_rows_normalize_again_to_themselves() {
        for s in [
            "INSERT INTO t b) VALUES (1, 'x'), (2, 'y'), ((a, b) VALUES (1, 'x'), (2, 'y'), (3! 'zU&') RETUR b)  id",
            "VALUES (1), (2), (VALUES (3), (4))",
            "VALUES (1), (2), (3 IN (1, 2)), (4)",
            // Also found by fuzzing (fuzz/regressions/sql/array-before-semicolon).
            "y[4,;;;a3)nay[ array[4,;",
            "SELECT ARRAY[1, 2,;",
            // fuzz/regressions/sql/values-row-past-the-cut: a row closing after MAX_LEN.
            &format!("VALUES (x IN (1, 2), {} 1)", "y, ".repeat(400)),
            "VALUES ((VALUES (1), (1))), ((VALUES (1), ...))",
            "INSERT INTO t (a, b) VALUES (1, 'x'), (2, 'y'), (3, 'z') RETURNING id",
        ] {
            let once = normalize(s);
            assert_eq!(normalize(&once), once, "{s}");
        }
        // A collapsed run, a comma, then the cut at MAX_LEN (fuzz/regressions/sql/
        // values-run-at-the-cut): the cut's mark is not a run's.
        for n in 480..530 {
            let s = format!(
                "SELECT {} VALUES (1), (1), x, y, z",
                "a, ".repeat(n / 3 + 170)
            );
            let once = normalize(&s);
            assert_eq!(normalize(&once), once, "{n}");
            let s = format!("{} VALUES (1), (1), x, y", "a ".repeat(n));
            let once = normalize(&s);
            assert_eq!(normalize(&once), once, "{n}");
        }
        // Rows are still collapsed, also inside rows.
        assert_eq!(
            normalize("INSERT INTO t (a, b) VALUES (1, 'x'), (2, 'y'), (3, 'z') RETURNING id"),
            "INSERT INTO t(a, b) VALUES ($?, $?), ... RETURNING id"
        );
        assert_eq!(
            normalize("VALUES (1), (2), (VALUES (3), (4)), (5), (x IN (1, 2))"),
            "VALUES ($?), ..., (VALUES ($?), ...), ($?), (x IN ($?))"
        );
    }

    proptest! {
        #[test]
        fn normalize_is_total_and_idempotent(s in any::<String>()) {
            let n = normalize(&s);
            prop_assert!(n.len() <= MAX_LEN + 4);
            prop_assert_eq!(normalize(&n), n.clone());
            let c = normalize_cut(&s);
            prop_assert_eq!(normalize(&c), c);
            let _ = statement_kind(&s);
            let _ = split_statements(&s);
        }

        #[test]
        fn sql_like_text_is_idempotent(
            parts in prop::collection::vec(prop::sample::select(vec![
                "SELECT", "select", "from", "t", "\"Q\"", "(", ")", ",", "1", "-", "2.5", "'s'",
                "'it''s'", "E'\\n'", "$1", "$?", "in", "values", "array", "[", "]", "::", "int",
                ";", ".", "*", "=", "<>", "--c\n", "/*x*/", "$$d$$", " ", "\n", "…", "...", "x$y",
                "->>", "+", "NULL", "e", "'", "\"", "$a$", ":",
            ]), 0..60)
        ) {
            let s: String = parts.concat();
            let n = normalize(&s);
            prop_assert_eq!(normalize(&n), n.clone(), "input {:?}", s);
        }
    }
}
