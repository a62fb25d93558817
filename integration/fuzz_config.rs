//! Property tests of the composition loader (`Composition::parse`): no input
//! makes it panic, every rejection is an `Err` that names the file and says
//! what is wrong, and every composition from a small grammar of valid files
//! is accepted with the tiers it defines.

use proptest::prelude::*;
use proptest::sample::Index;
use strata::composition::{Composition, ConfigError, Registry};

use crate::harness::fuzz_config;

const FILE: &str = "fuzz.toml";

fn parse(src: &str) -> Result<Composition, ConfigError> {
    Composition::parse(src, FILE, &Registry::default())
}

/// What every rejection must look like: located in our file, on a line
/// that exists, with a message that says something.
fn check_error(src: &str, e: &ConfigError) {
    assert_eq!(e.file, FILE, "{e}");
    assert!(!e.message.trim().is_empty(), "empty message for {src:?}");
    if let Some(line) = e.line {
        let lines = src.split('\n').count();
        assert!(
            (1..=lines).contains(&line),
            "line {line} of a {lines}-line file: {e}"
        );
    }
    let shown = e.to_string();
    assert!(shown.starts_with(FILE), "{shown}");
    assert!(shown.contains(&e.message), "{shown}");
}

/// Parses `src`; a rejection must be well-formed, an acceptance must serve
/// a `root` and describe it.
fn parse_checked(src: &str) {
    match parse(src) {
        Err(e) => check_error(src, &e),
        Ok(c) => {
            assert!(c.tiers.contains_key("root"), "accepted without root: {src}");
            assert!(c.describe().starts_with("root: "), "{}", c.describe());
        }
    }
}

/// Pieces of composition files, so random sequences of them get past the
/// TOML tokenizer far more often than random characters do.
fn toml_token() -> impl Strategy<Value = String> {
    let fixed = prop::sample::select(vec![
        "[blobservices.root]",
        "[blobservices.a]",
        "[blobservices]",
        "[[blobservices.root]]",
        "[server]",
        "[directoryservices.x]",
        "type = ",
        "\"memory\"",
        "\"disk\"",
        "\"tiers\"",
        "\"grpc\"",
        "\"race\"",
        "\"shard\"",
        "\"combined\"",
        "\"objectstore\"",
        "max_size = ",
        "path = ",
        "url = ",
        "tiers = ",
        "members = ",
        "near = ",
        "far = ",
        "timeout = ",
        "listen = ",
        "weights = ",
        "\"1GiB\"",
        "\"-5MiB\"",
        "\"99999999999999999999 EiB\"",
        "\"5s\"",
        "\"grpc+http://127.0.0.1:1\"",
        "\"memory://\"",
        "[\"a\", \"root\"]",
        "[]",
        "{ }",
        "18446744073709551616",
        "-1",
        "1e308",
        "nan",
        "true",
        "=",
        "[",
        "]",
        "{",
        "}",
        ",",
        ".",
        "\"",
        "'",
        "#",
        "\n",
        "\n",
        "\n",
        " ",
        "\u{0}",
        "\u{feff}",
        "é",
    ])
    .prop_map(str::to_owned);
    prop_oneof![
        8 => fixed,
        1 => "[a-z_.\\[\\]=\" ]{0,12}",
        1 => any::<String>().prop_map(|s| s.chars().take(8).collect()),
    ]
}

fn tomlish_text() -> impl Strategy<Value = String> {
    prop::collection::vec(toml_token(), 0..48).prop_map(|t| t.concat())
}

/// A TOML value, mostly of the wrong type or shape for wherever it lands.
fn toml_value() -> impl Strategy<Value = String> {
    let fixed = prop::sample::select(vec![
        "\"memory\"",
        "\"root\"",
        "\"a\"",
        "\"1GiB\"",
        "\"0\"",
        "\"12 parsecs\"",
        "\"-1GiB\"",
        "\"18446744073709551616B\"",
        "\"1.5GB\"",
        "\"5s\"",
        "\"-5s\"",
        "\"9999999999999999999999999h\"",
        "\"sync\"",
        "\"sometimes\"",
        "\"grpc+http://127.0.0.1:9\"",
        "\"grpc+http://\"",
        "\"grpc+unix:relative\"",
        "\"grpc+ftp://x\"",
        "\"memory://\"",
        "\"memory://x\"",
        "\"objectstore+file:///tmp/x\"",
        "\"objectstore+nope://\"",
        "\"file:///\"",
        "\"::::\"",
        "\"0777\"",
        "\"9999\"",
        "0",
        "-1",
        "18446744073709551615",
        "1.5",
        "-0.0",
        "inf",
        "nan",
        "true",
        "1979-05-27T07:32:00Z",
        "[]",
        "[\"root\"]",
        "[\"a\", \"a\"]",
        "[\"a\", \"b\", \"memory://\"]",
        "[1, 2]",
        "[0.0, -1.0]",
        "[\"nope\"]",
        "{}",
        "{ a = 1 }",
        "[[1], {}]",
    ])
    .prop_map(str::to_owned);
    prop_oneof![
        6 => fixed,
        1 => any::<String>().prop_map(|s| toml::Value::String(s).to_string()),
        1 => any::<i64>().prop_map(|n| n.to_string()),
    ]
}

const NAMES: &[&str] = &["root", "a", "b", "c", "memory://", "x.y", "", "ROOT"];
const KINDS: &[&str] = &[
    "memory",
    "disk",
    "grpc",
    "objectstore",
    "tiers",
    "combined",
    "race",
    "shard",
    "memry",
    "",
];
const FIELDS: &[&str] = &[
    "max_size",
    "path",
    "url",
    "protocol",
    "spool_dir",
    "object_store_url",
    "object_store_options",
    "avg_chunk_size",
    "upload_concurrency",
    "read_ahead",
    "tiers",
    "fill",
    "write_to",
    "fill_to",
    "fill_queue",
    "near",
    "far",
    "members",
    "hedge_after",
    "weights",
    "timeout",
    "type",
    "colour",
];
const SERVER_FIELDS: &[&str] = &[
    "listen",
    "max_message_size",
    "max_inline_size",
    "read_only",
    "socket_mode",
    "colour",
];

/// One `[blobservices.NAME]` table: a name, maybe a type (maybe not a
/// string), and fields with values of any type.
fn tier_table() -> impl Strategy<Value = String> {
    (
        prop::sample::select(NAMES),
        prop_oneof![
            6 => prop::sample::select(KINDS).prop_map(|k| format!("type = \"{k}\"\n")),
            1 => Just(String::new()),
            1 => toml_value().prop_map(|v| format!("type = {v}\n")),
        ],
        prop::collection::vec((prop::sample::select(FIELDS), toml_value()), 0..5),
    )
        .prop_map(|(name, ty, fields)| {
            let mut s = format!("[blobservices.{}]\n{ty}", toml_key(name));
            // A duplicate key is a TOML error of its own; skip repeats so
            // the kinds' own checks are reached too.
            let mut seen = Vec::new();
            for (field, value) in fields {
                let second_type = field == "type" && !ty.is_empty();
                if !seen.contains(&field) && !second_type {
                    seen.push(field);
                    s.push_str(&format!("{field} = {value}\n"));
                }
            }
            s
        })
}

fn server_table() -> impl Strategy<Value = String> {
    prop::collection::vec((prop::sample::select(SERVER_FIELDS), toml_value()), 0..3).prop_map(
        |fields| {
            let mut s = "[server]\n".to_owned();
            let mut seen = Vec::new();
            for (field, value) in fields {
                if !seen.contains(&field) {
                    seen.push(field);
                    s.push_str(&format!("{field} = {value}\n"));
                }
            }
            s
        },
    )
}

/// A table key, quoted unless it is a bare key.
fn toml_key(name: &str) -> String {
    if !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        name.to_owned()
    } else {
        toml::Value::String(name.to_owned()).to_string()
    }
}

fn structured_wrong() -> impl Strategy<Value = String> {
    (
        prop::collection::vec(tier_table(), 0..5),
        prop::option::of(server_table()),
    )
        .prop_map(|(tables, server)| {
            // Repeated table headers are a TOML error; keep the first of
            // each name so most files get as far as the kinds.
            let mut out = String::new();
            let mut seen = Vec::new();
            for t in tables {
                let header = t.lines().next().unwrap_or_default().to_owned();
                if !seen.contains(&header) {
                    seen.push(header);
                    out.push_str(&t);
                }
            }
            if let Some(s) = server {
                out.push_str(&s);
            }
            out
        })
}

proptest! {
    #![proptest_config(fuzz_config(512))]

    #[test]
    fn arbitrary_text_never_panics(src in any::<String>()) {
        parse_checked(&src);
    }

    #[test]
    fn tomlish_text_never_panics(src in tomlish_text()) {
        parse_checked(&src);
    }

    #[test]
    fn wrong_configs_are_errors_with_a_message(src in structured_wrong()) {
        parse_checked(&src);
    }
}

/// The leaf kinds of the valid grammar.
fn leaf(choice: u8, n: usize) -> String {
    const SIZES: &[&str] = &["\"1KiB\"", "\"64MiB\"", "\"1 GiB\"", "\"1.5GB\"", "4096"];
    let size = SIZES[usize::from(choice) / 4 % SIZES.len()];
    match choice % 4 {
        0 => format!("type = \"memory\"\nmax_size = {size}\n"),
        1 => {
            format!("type = \"disk\"\npath = \"/nonexistent/strata-fuzz/{n}\"\nmax_size = {size}\n")
        }
        2 => format!(
            "type = \"grpc\"\nurl = \"grpc+http://127.0.0.1:{}\"\nprotocol = \"{}\"\n",
            1000 + n,
            if choice % 8 < 4 { "snix" } else { "tvix" }
        ),
        _ => "type = \"objectstore\"\nobject_store_url = \"memory:///\"\n".to_owned(),
    }
}

/// A composition from the grammar: tier `i` only refers to tiers after it
/// (or to the anonymous `memory://`), so there are no cycles; the last tier
/// is a leaf; `root` is tier 0.
fn valid_composition(
    shapes: &[(u8, u8, Index, u8)],
    timeouts: &[Option<u16>],
) -> (String, Vec<String>) {
    let n = shapes.len();
    let name = |i: usize| {
        if i == 0 {
            "root".to_owned()
        } else {
            format!("t{i}")
        }
    };
    let mut out = String::from("[server]\nlisten = [\"127.0.0.1:0\"]\n\n");
    let mut names = Vec::new();
    for (i, &(kind, extra, start, leaf_choice)) in shapes.iter().enumerate() {
        let later: Vec<String> = (i + 1..n).map(name).collect();
        // Distinct references: a run of later tiers from a chosen start.
        let pick = |count: usize| -> Vec<String> {
            let s = start.index(later.len().max(1));
            (0..count)
                .map(|k| later[(s + k) % later.len()].clone())
                .collect()
        };
        let quoted = |v: &[String]| {
            v.iter()
                .map(|r| format!("\"{r}\""))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let count = (1 + usize::from(extra) % 3).min(later.len());
        let body = match kind % 5 {
            0 if count >= 1 => {
                let mut refs = pick(count);
                if extra % 4 == 3 {
                    refs.push("memory://".to_owned());
                }
                let fill = ["sync", "async", "off"][usize::from(extra) % 3];
                format!(
                    "type = \"tiers\"\ntiers = [{}]\nfill = \"{fill}\"\n",
                    quoted(&refs)
                )
            }
            1 if later.len() >= 2 => {
                let refs = pick(2);
                format!(
                    "type = \"combined\"\nnear = \"{}\"\nfar = \"{}\"\n",
                    refs[0], refs[1]
                )
            }
            2 if later.len() >= 2 => {
                let refs = pick(count.max(2));
                let hedge = if extra % 2 == 0 {
                    "hedge_after = \"20ms\"\n"
                } else {
                    ""
                };
                format!("type = \"race\"\nmembers = [{}]\n{hedge}", quoted(&refs))
            }
            3 if count >= 1 => {
                let refs = pick(count);
                let weights = (0..refs.len())
                    .map(|k| format!("{}.5", k + 1))
                    .collect::<Vec<_>>()
                    .join(", ");
                format!(
                    "type = \"shard\"\nmembers = [{}]\nweights = [{weights}]\n",
                    quoted(&refs)
                )
            }
            _ => leaf(leaf_choice, i),
        };
        let timeout = timeouts
            .get(i)
            .copied()
            .flatten()
            .map(|ms| format!("timeout = \"{}ms\"\n", u32::from(ms) + 1))
            .unwrap_or_default();
        out.push_str(&format!("[blobservices.{}]\n{body}{timeout}\n", name(i)));
        names.push(name(i));
    }
    (out, names)
}

proptest! {
    #![proptest_config(fuzz_config(256))]

    #[test]
    fn grammar_generated_compositions_parse(
        shapes in prop::collection::vec((any::<u8>(), any::<u8>(), any::<Index>(), any::<u8>()), 1..7),
        timeouts in prop::collection::vec(prop::option::of(any::<u16>()), 0..7),
    ) {
        let (src, names) = valid_composition(&shapes, &timeouts);
        let c = match parse(&src) {
            Ok(c) => c,
            Err(e) => panic!("rejected: {e}\n{src}"),
        };
        for (i, name) in names.iter().enumerate() {
            let spec = &c.tiers[name];
            let header = format!("[blobservices.{name}]\ntype = \"{}\"", spec.kind);
            prop_assert!(src.contains(&header), "{name} parsed as {}:\n{src}", spec.kind);
            prop_assert_eq!(
                spec.timeout.is_some(),
                timeouts.get(i).copied().flatten().is_some(),
                "timeout of {}", name
            );
        }
        prop_assert!(c.describe().starts_with("root: "));
    }
}
