//! Differential tests on valid streams: our decoders against third-party crates used as
//! oracles (never by the decoders: PROTOCOLS.md lists how they fail on invalid input).
//! - HPACK: loona-hpack encodes header lists, or random valid blocks are generated (Huffman,
//!   size updates, every literal kind); loona-hpack's decoder and ours must agree, and ours
//!   joined mid-way must agree on every field it reports as known.
//! - Postgres: postgres-protocol's frontend encoders write the client's stream, its backend
//!   parser reads the server's; our calls must carry the same statements, row counts and
//!   SQLSTATEs, and count every byte.
//! - HTTP/1: httparse reads generated messages whole; our exchanges, fed in random reads,
//!   must carry the same method, path, status and header values.

mod common;

use bakeoff_protocol::{
    Call, Decoder, Http1Exchange,
    hpack::{HpackDecoder, STATIC_TABLE},
    http1::Side,
    postgres::PostgresExchange,
    sql,
};
use bytes::BytesMut;
use common::*;
use fallible_iterator::FallibleIterator as _;
use postgres_protocol::message::backend::Message;
use proptest::prelude::*;

// ----- HPACK -----

/// Header names: some static-table names (indexed names), some new.
const NAMES: &[&str] = &[
    ":method",
    ":path",
    ":status",
    ":authority",
    "content-type",
    "user-agent",
    "grpc-status",
    "x-request-id",
    "x-custom",
    "traceparent",
];

fn header_list() -> impl Strategy<Value = Vec<(String, String)>> {
    prop::collection::vec(
        (prop::sample::select(NAMES), "[ -~]{0,24}").prop_map(|(n, v)| (n.to_string(), v)),
        0..8,
    )
}

fn ours(d: &mut HpackDecoder, block: &[u8]) -> Option<Vec<(Option<String>, Option<String>)>> {
    d.decode_block(block).ok().map(|h| {
        h.into_iter()
            .map(|h| (h.name.map(|n| n.into_owned()), h.value))
            .collect()
    })
}

fn known(list: &[(Vec<u8>, Vec<u8>)]) -> Vec<(Option<String>, Option<String>)> {
    list.iter()
        .map(|(n, v)| {
            (
                Some(String::from_utf8_lossy(n).into_owned()),
                Some(String::from_utf8_lossy(v).into_owned()),
            )
        })
        .collect()
}

/// One field representation of a generated block.
#[derive(Clone, Debug)]
enum Rep {
    Indexed(u32),
    /// Literal: kind (0 incremental, 1 without indexing, 2 never indexed), name (an index or
    /// a string), value, Huffman for the strings.
    Literal(u8, Result<u32, String>, String, bool),
}

fn rep() -> impl Strategy<Value = Rep> {
    // Mostly the static table, some dynamic entries, a few past the table (invalid).
    let index = prop_oneof![12 => 1u32..62, 2 => 62u32..66, 1 => 66u32..70];
    prop_oneof![
        index.clone().prop_map(Rep::Indexed),
        (
            0u8..3,
            prop_oneof![
                index.prop_map(Ok),
                prop::sample::select(NAMES).prop_map(|n| Err(n.to_string()))
            ],
            "[ -~]{0,30}",
            any::<bool>()
        )
            .prop_map(|(k, n, v, h)| Rep::Literal(k, n, v, h)),
    ]
}

fn encode(size_update: Option<u16>, reps: &[Rep]) -> Vec<u8> {
    let mut b = Vec::new();
    if let Some(s) = size_update {
        hpack_int(&mut b, 5, 0x20, u64::from(s % 4097));
    }
    for r in reps {
        match r {
            Rep::Indexed(i) => hpack_int(&mut b, 7, 0x80, u64::from(*i)),
            Rep::Literal(kind, name, value, huffman) => {
                let (n, flags) = match kind {
                    0 => (6, 0x40),
                    1 => (4, 0x00),
                    _ => (4, 0x10),
                };
                match name {
                    Ok(i) => hpack_int(&mut b, n, flags, u64::from(*i)),
                    Err(s) => {
                        hpack_int(&mut b, n, flags, 0);
                        hpack_str(&mut b, s.as_bytes(), *huffman);
                    }
                }
                hpack_str(&mut b, value.as_bytes(), *huffman);
            }
        }
    }
    b
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Header lists encoded by loona-hpack decode the same with ours and loona's, and
    /// give back the lists.
    #[test]
    fn hpack_loona_encoded_lists(lists in prop::collection::vec(header_list(), 1..6)) {
        let mut enc = loona_hpack::Encoder::new();
        let mut theirs = loona_hpack::Decoder::new();
        let mut mine = HpackDecoder::new(true);
        for list in &lists {
            let block = enc.encode(list.iter().map(|(n, v)| (n.as_bytes(), v.as_bytes())));
            let expected = theirs.decode(&block).expect("loona decodes its own encoding");
            prop_assert_eq!(ours(&mut mine, &block), Some(known(&expected)));
            let input: Vec<_> = list.iter().map(|(n, v)| (Some(n.clone()), Some(v.clone()))).collect();
            prop_assert_eq!(known(&expected), input);
        }
        prop_assert!(mine.is_synced());
    }

    /// Random valid blocks (any representation, Huffman, size updates): wherever loona-hpack
    /// decodes a block, ours from the start decodes the same; ours joined at block `join`
    /// reports each field as loona's or as unknown, never a different value.
    #[test]
    fn hpack_random_blocks_agree(
        blocks in prop::collection::vec(
            (prop::option::weighted(0.2, any::<u16>()), prop::collection::vec(rep(), 0..8)),
            1..8,
        ),
        join in 0usize..8,
    ) {
        let mut theirs = loona_hpack::Decoder::new();
        let mut mine = HpackDecoder::new(true);
        let mut late = HpackDecoder::new(false);
        for (i, (update, reps)) in blocks.iter().enumerate() {
            let block = encode(*update, reps);
            let Ok(expected) = theirs.decode(&block) else {
                // An index past the table: not a valid stream from here on.
                break;
            };
            let expected = known(&expected);
            let got = ours(&mut mine, &block);
            prop_assert_eq!(got.as_ref(), Some(&expected), "block {}", i);
            if i >= join {
                let fields = ours(&mut late, &block);
                prop_assert!(fields.is_some(), "mid-way decoder failed on block {}", i);
                let fields = fields.unwrap_or_default();
                prop_assert_eq!(fields.len(), expected.len());
                for (got, want) in fields.iter().zip(&expected) {
                    prop_assert!(got.0.is_none() || got.0 == want.0, "{:?} vs {:?}", got, want);
                    prop_assert!(got.1.is_none() || got.1 == want.1, "{:?} vs {:?}", got, want);
                }
            }
        }
    }
}

/// The generated blocks of `hpack_random_blocks_agree` are mostly valid (else it would
/// compare little).
#[test]
fn hpack_random_blocks_are_mostly_valid() {
    use proptest::strategy::ValueTree as _;
    let mut runner = proptest::test_runner::TestRunner::deterministic();
    let strategy = (
        prop::option::weighted(0.2, any::<u16>()),
        prop::collection::vec(rep(), 1..8),
    );
    let mut valid = 0;
    for _ in 0..200 {
        let (update, reps) = strategy.new_tree(&mut runner).expect("a value").current();
        valid += usize::from(
            loona_hpack::Decoder::new()
                .decode(&encode(update, &reps))
                .is_ok(),
        );
    }
    assert!(valid >= 50, "{valid} of 200 first blocks valid");
}

#[test]
fn hpack_static_table_matches_loona() {
    // Every static entry, as an indexed field.
    let mut block = Vec::new();
    for i in 1..=STATIC_TABLE.len() as u64 {
        hpack_int(&mut block, 7, 0x80, i);
    }
    let theirs = loona_hpack::Decoder::new()
        .decode(&block)
        .expect("static table");
    let mine = ours(&mut HpackDecoder::new(true), &block);
    assert_eq!(mine, Some(known(&theirs)));
}

// ----- Postgres -----

/// A generated statement and the server's answer to it.
#[derive(Clone, Debug)]
struct Stmt {
    sql: String,
    extended: bool,
    /// Rows of a SELECT, or `Err(SQLSTATE)`.
    answer: Result<u32, String>,
}

fn stmt() -> impl Strategy<Value = Stmt> {
    let sql = prop_oneof![
        (1u32..100000).prop_map(|n| format!("SELECT name FROM items WHERE id = {n}")),
        ("[a-z]{1,8}", 0u32..50)
            .prop_map(|(s, n)| format!("UPDATE items SET name = '{s}' WHERE stock > {n}")),
        prop::collection::vec(1u32..9, 1..6).prop_map(|v| format!(
            "SELECT * FROM t WHERE id IN ({})",
            v.iter().map(u32::to_string).collect::<Vec<_>>().join(", ")
        )),
    ];
    let answer = prop_oneof![
        4 => (0u32..5).prop_map(Ok),
        1 => prop::sample::select(&["22012", "23505", "42P01", "40001"][..]).prop_map(|c| Err(c.to_string())),
    ];
    (sql, any::<bool>(), answer).prop_map(|(sql, extended, answer)| Stmt {
        sql,
        extended,
        answer,
    })
}

/// The client's and the server's messages for one statement.
fn exchange(s: &Stmt, n: usize) -> (Vec<u8>, Vec<u8>) {
    let req = if s.extended {
        let name = format!("s{n}");
        [
            pg_parse(&name, &s.sql),
            pg_bind("", &name, &[]),
            pg_execute("", 0),
            pg_sync(),
        ]
        .concat()
    } else {
        pg_query(&s.sql)
    };
    let mut resp = Vec::new();
    if s.extended {
        resp.extend(pg_msg(b'1', &[]));
        resp.extend(pg_msg(b'2', &[]));
    }
    match &s.answer {
        Ok(rows) => {
            if s.sql.starts_with("SELECT") {
                if !s.extended {
                    resp.extend(pg_row_description(&["name"]));
                }
                for r in 0..*rows {
                    resp.extend(pg_data_row(&[format!("row{r}").as_bytes()]));
                }
                resp.extend(pg_command_complete(&format!("SELECT {rows}")));
            } else {
                resp.extend(pg_command_complete(&format!("UPDATE {rows}")));
            }
        }
        Err(code) => resp.extend(pg_error(code, "failed")),
    }
    resp.extend(pg_ready(b'I'));
    (req, resp)
}

/// What postgres-protocol reads from a server stream: per statement, the row count of its
/// CommandComplete tag or the SQLSTATE of its ErrorResponse.
fn oracle_answers(stream: &[u8]) -> Vec<Result<u64, String>> {
    let mut buf = BytesMut::from(stream);
    let mut out = Vec::new();
    while let Some(m) = Message::parse(&mut buf).expect("a valid server stream") {
        match m {
            Message::CommandComplete(c) => {
                let tag = c.tag().expect("tag").to_string();
                let rows = tag.rsplit(' ').next().and_then(|r| r.parse().ok());
                out.push(Ok(rows.expect("a row count")));
            }
            Message::ErrorResponse(e) => {
                let mut fields = e.fields();
                let mut code = String::new();
                while let Some(f) = fields.next().expect("error fields") {
                    if f.type_() == b'C' {
                        code = String::from_utf8_lossy(f.value_bytes()).into_owned();
                    }
                }
                out.push(Err(code));
            }
            _ => {}
        }
    }
    out
}

fn attr<'a>(c: &'a Call, k: &str) -> Option<&'a str> {
    c.attributes
        .iter()
        .find(|(a, _)| a == k)
        .map(|(_, v)| v.as_str())
}

/// Feeds `data` as reads cut at `cuts` (fractions of 1000).
fn feed(
    d: &mut dyn Decoder,
    side: Side,
    data: &[u8],
    cuts: &[u16],
    ts: &mut u64,
    done: &mut Vec<Call>,
) {
    let mut points: Vec<usize> = cuts
        .iter()
        .map(|c| usize::from(*c) * data.len() / 1000)
        .collect();
    points.extend([0, data.len()]);
    points.sort_unstable();
    points.dedup();
    for w in points.windows(2) {
        *ts += 1;
        let piece = &data[w[0]..w[1]];
        d.on_bytes(side, *ts, piece, piece.len() as u64, done, &mut Vec::new());
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Simple and extended queries, answered with rows or errors, fed in random reads: one
    /// call per statement with its normalized text, the row count and SQLSTATE the oracle
    /// reads, and every byte of both streams counted.
    #[test]
    fn postgres_against_postgres_protocol(
        stmts in prop::collection::vec(stmt(), 1..8),
        cuts in prop::collection::vec(0u16..1000, 0..4),
    ) {
        let mut d = PostgresExchange::new(false);
        let mut done = Vec::new();
        let mut ts = 0;
        let (startup, hello) = (pg_startup("alice", "shop"), pg_server_hello());
        feed(&mut d, Side::Request, &startup, &cuts, &mut ts, &mut done);
        feed(&mut d, Side::Response, &hello, &cuts, &mut ts, &mut done);
        let (mut sent, mut answered) = (0u64, 0u64);
        let mut server = Vec::new();
        for (n, s) in stmts.iter().enumerate() {
            let (req, resp) = exchange(s, n);
            feed(&mut d, Side::Request, &req, &cuts, &mut ts, &mut done);
            feed(&mut d, Side::Response, &resp, &cuts, &mut ts, &mut done);
            sent += req.len() as u64;
            answered += resp.len() as u64;
            server.extend(resp);
        }
        let unanswered = d.close(false, &mut done);
        prop_assert!(unanswered.is_empty(), "{:?}", unanswered);
        prop_assert_eq!(done.len(), stmts.len());
        let oracle = oracle_answers(&server);
        prop_assert_eq!(oracle.len(), stmts.len());
        for ((call, s), want) in done.iter().zip(&stmts).zip(&oracle) {
            prop_assert_eq!(&call.path, &sql::normalize(&s.sql));
            match want {
                Ok(rows) => {
                    let got = attr(call, "db.rows").and_then(|r| r.parse::<u64>().ok());
                    prop_assert_eq!(got, Some(*rows), "{:?}", call);
                    prop_assert!(call.error.is_none());
                }
                Err(code) => {
                    prop_assert_eq!(attr(call, "db.sqlstate"), Some(code.as_str()));
                    prop_assert!(call.error.as_deref().is_some_and(|e| e.starts_with(code.as_str())));
                }
            }
        }
        // The startup and its answer belong to no call; every other byte to one.
        let req: u64 = done.iter().map(|c| c.request_bytes).sum();
        let resp: u64 = done.iter().map(|c| c.response_bytes).sum();
        prop_assert_eq!(req, sent);
        prop_assert_eq!(resp, answered);
    }
}

// ----- HTTP/1 -----

fn token() -> impl Strategy<Value = String> {
    "[a-z][a-z0-9-]{0,12}"
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Generated requests and responses, fed in random reads: each exchange carries what
    /// httparse reads from the whole messages.
    #[test]
    fn http1_against_httparse(
        msgs in prop::collection::vec(
            (
                prop::sample::select(&["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"][..]),
                "/[a-zA-Z0-9/._~%?=&-]{0,40}",
                prop::collection::btree_map(token(), "[!-~][ -~]{0,30}[!-~]", 0..5),
                prop::option::of("[!-~]{1,20}"),
                prop::option::of("[!-~]{1,20}"),
                prop::sample::select(&[200u16, 201, 301, 400, 404, 500, 503][..]),
                0usize..64,
                0usize..64,
            ),
            1..6,
        ),
        cuts in prop::collection::vec(0u16..1000, 0..6),
    ) {
        let mut d = Http1Exchange::new();
        let mut done = Vec::new();
        let mut ts = 0;
        let mut expected = Vec::new();
        for (method, path, headers, request_id, agent, status, req_body, resp_body) in &msgs {
            let mut h: Vec<(&str, &str)> = headers
                .iter()
                .filter(|(k, _)| !matches!(k.as_str(), "content-length" | "transfer-encoding" | "x-request-id" | "user-agent" | "connection" | "upgrade"))
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect();
            if let Some(id) = request_id {
                h.push(("X-Request-Id", id));
            }
            if let Some(a) = agent {
                h.push(("User-Agent", a));
            }
            let request = http1_request(method, path, &h, &vec![b'q'; *req_body]);
            let response = http1_response(*status, &h, &vec![b's'; *resp_body]);
            // The oracle: httparse on the whole messages.
            let mut hs = [httparse::EMPTY_HEADER; 16];
            let mut req = httparse::Request::new(&mut hs);
            prop_assert!(req.parse(&request).is_ok_and(|s| s.is_complete()));
            let value = |hs: &[httparse::Header<'_>], name: &str| {
                hs.iter()
                    .find(|x| x.name.eq_ignore_ascii_case(name))
                    .map(|x| String::from_utf8_lossy(x.value).into_owned())
            };
            let want = (
                req.method.map(str::to_string),
                req.path.map(str::to_string),
                value(req.headers, "x-request-id"),
                value(req.headers, "user-agent"),
            );
            let mut hs = [httparse::EMPTY_HEADER; 16];
            let mut resp = httparse::Response::new(&mut hs);
            prop_assert!(resp.parse(&response).is_ok_and(|s| s.is_complete()));
            expected.push((want, resp.code, request.len() as u64, response.len() as u64));
            feed(&mut d, Side::Request, &request, &cuts, &mut ts, &mut done);
            feed(&mut d, Side::Response, &response, &cuts, &mut ts, &mut done);
        }
        prop_assert!(d.close(false, &mut done).is_empty());
        prop_assert_eq!(done.len(), expected.len());
        for (call, (want, code, req_len, resp_len)) in done.iter().zip(&expected) {
            let got = (
                Some(call.method.clone()),
                Some(call.path.clone()),
                call.request_id.clone(),
                call.user_agent.clone(),
            );
            prop_assert_eq!(&got, want);
            prop_assert_eq!(call.status, *code);
            prop_assert_eq!((call.request_bytes, call.response_bytes), (*req_len, *resp_len));
        }
    }
}
