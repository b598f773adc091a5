//! `vllm serve` flags tpuserve does not implement: a user's existing command line must still
//! start, so every flag of vLLM 0.32.0 is accepted. vLLM 0.32.0 is the version the GKE
//! sample's `vllm/vllm-tpu:latest` image runs (the newest `vllm-tpu` release); the list was
//! read from its `vllm/engine/arg_utils.py` and `vllm/entrypoints/launchers/cli_args.py`.
//!
//! Each flag of the table is either ignored (it cannot apply here: GPU-only, multi-node,
//! kernel tuning...) and then logged once at start-up with the reason, or refused by name
//! (exit 2) when a user would rely on it for correct answers (LoRA, tool or reasoning
//! parsers, custom Python code...) — never a silent no-op. Flags tpuserve implements are
//! `ServeArgs` fields. The command line is also normalised as vLLM's FlexibleArgumentParser
//! does (`--a_b`, `-tp 8`, `-O3`, `--x.key value`) before clap sees it.

use std::ffi::OsString;

use clap::parser::ValueSource;
use clap::{Arg, ArgAction, ArgMatches, Command};

mod table;
mod types;
pub use table::VLLM_FLAGS;
pub use types::VALUE_TYPES;

/// How the flag takes its value, as vLLM's argparse defines it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `store_true`: `--x`.
    Switch,
    /// `BooleanOptionalAction`: `--x` and `--no-x`.
    Bool,
    /// One value.
    Value,
    /// `nargs="+"`: one or more values.
    List,
    /// `nargs="?"`: `--x` alone or `--x VALUE`.
    OptValue,
}

/// What an ignored flag's value must be, as vLLM's argparse converts it: a wrong one is
/// argparse's error (exit 2) there, so it is here too.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ValueType {
    /// Any string.
    Str,
    /// Python's `int()`.
    Int,
    /// vLLM's `human_readable_int` (`1k`, `2M`, `1G`…).
    HumanInt,
    /// Python's `float()`.
    Float,
    /// `json.loads` (or a config dataclass read from JSON).
    Json,
    /// One of these, exactly.
    Choices(&'static [&'static str]),
}

/// Python's `int()` of a string: surrounding whitespace, a sign, digits with single
/// underscores between them.
fn python_int(s: &str) -> bool {
    let t = s.trim();
    let t = t.strip_prefix(['+', '-']).unwrap_or(t);
    !t.is_empty()
        && !t.starts_with('_')
        && !t.ends_with('_')
        && !t.contains("__")
        && t.chars().all(|c| c.is_ascii_digit() || c == '_')
}

/// Python's `float()`: what Rust's parser takes (inf, nan, exponents), plus whitespace and
/// underscores between digits.
fn python_float(s: &str) -> bool {
    let t = s.trim();
    !t.starts_with('_') && !t.ends_with('_') && t.replace('_', "").parse::<f64>().is_ok()
}

impl ValueType {
    /// argparse's message for `v` (after `argument --flag: `), or `None` when it takes it.
    pub fn check(self, v: &str, optional: bool) -> Option<String> {
        if optional && (v.is_empty() || v == "None") {
            return None;
        }
        let ok = match self {
            ValueType::Str => true,
            ValueType::Int => python_int(v),
            ValueType::HumanInt => crate::cli::human_readable_int(v).is_ok() || python_int(v),
            ValueType::Float => python_float(v),
            ValueType::Json => serde_json::from_str::<serde_json::Value>(v).is_ok(),
            ValueType::Choices(c) => c.contains(&v),
        };
        if ok {
            return None;
        }
        Some(match self {
            ValueType::Int => format!("invalid int value: '{v}'"),
            ValueType::HumanInt => format!("invalid human-readable int value: '{v}'"),
            ValueType::Float => format!("invalid float value: '{v}'"),
            ValueType::Json => format!("invalid JSON value: '{v}'"),
            ValueType::Choices(c) => format!(
                "invalid choice: '{v}' (choose from {})",
                c.iter()
                    .map(|c| format!("'{c}'"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            ValueType::Str => unreachable!("a string is always taken"),
        })
    }
}

/// The value type of table flag `name` (`None`: a switch, or a refused flag).
pub fn value_type(name: &str) -> Option<(ValueType, bool)> {
    VALUE_TYPES
        .iter()
        .find(|(n, _, _)| *n == name)
        .map(|&(_, t, o)| (t, o))
}

/// What tpuserve does with the flag.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum What {
    /// Accepted and logged as ignored, with the reason.
    Ignored(&'static str),
    /// Refused with the reason, unless its value is one of the listed ones (what tpuserve does
    /// anyway) or it is the `--no-` form; those are logged as ignored.
    Refused(&'static str, &'static [&'static str]),
}

#[derive(Debug)]
pub struct VllmFlag {
    /// Long name without the dashes.
    pub name: &'static str,
    /// The `--no-` form of a `Bool` flag ("" otherwise).
    pub no_name: &'static str,
    /// vLLM's other spellings (`-tp`, `-q`, ...).
    pub aliases: &'static [&'static str],
    pub kind: Kind,
    pub what: What,
}

/// A table flag found on the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Given {
    /// As vLLM spells it: `--x` or `--no-x`.
    pub flag: String,
    pub value: Option<String>,
    /// Refused (else ignored).
    pub refused: bool,
    pub reason: &'static str,
    /// argparse's error for a value vLLM would not take (its type or choices).
    pub invalid: Option<String>,
}

impl Given {
    /// The start-up log line of an ignored flag (its name once, then the reason).
    pub fn ignored_line(&self) -> String {
        format!(
            "ignoring vLLM flag {}: {} (accepted so vLLM command lines start)",
            self.flag, self.reason
        )
    }

    /// argparse's one-line error for a value of the wrong type (exit 2, as vLLM).
    pub fn invalid_line(&self) -> Option<String> {
        self.invalid
            .as_ref()
            .map(|why| format!("argument {}: {why}", self.flag))
    }

    /// The usage error of a refused flag.
    pub fn refused_line(&self) -> String {
        match &self.value {
            Some(v) => format!(
                "{} {v} is not supported by tpuserve: {}",
                self.flag, self.reason
            ),
            None => format!(
                "{} is not supported by tpuserve: {}",
                self.flag, self.reason
            ),
        }
    }
}

const IGNORED_HEADING: &str = "vLLM flags accepted without effect (each is logged at start-up)";
const REFUSED_HEADING: &str = "vLLM flags refused (exit 2)";

/// Adds the table's flags to the `serve` command (listed by `--help` under their own
/// headings).
pub fn augment(mut cmd: Command) -> Command {
    for f in VLLM_FLAGS {
        let (help, heading) = match f.what {
            What::Ignored(r) => (format!("Ignored: {r}."), IGNORED_HEADING),
            What::Refused(r, []) => (format!("Refused: {r}."), REFUSED_HEADING),
            What::Refused(r, ok) => (
                format!("Refused unless {}: {r}.", ok.join(" | ")),
                REFUSED_HEADING,
            ),
        };
        let help = if f.no_name.is_empty() {
            help
        } else {
            format!("{help} (also --{})", f.no_name)
        };
        let arg = Arg::new(f.name)
            .long(f.name)
            .help(help)
            .help_heading(heading);
        let arg = match f.kind {
            Kind::Switch | Kind::Bool => arg.action(ArgAction::SetTrue),
            Kind::Value => arg
                .action(ArgAction::Set)
                .num_args(1)
                .allow_negative_numbers(true),
            Kind::List => arg
                .action(ArgAction::Set)
                .num_args(1..)
                .allow_negative_numbers(true),
            Kind::OptValue => arg
                .action(ArgAction::Set)
                .num_args(0..=1)
                .default_missing_value("true"),
        };
        cmd = cmd.arg(arg);
        if !f.no_name.is_empty() {
            cmd = cmd.arg(
                Arg::new(f.no_name)
                    .long(f.no_name)
                    .action(ArgAction::SetTrue)
                    .hide(true),
            );
        }
    }
    // argparse keeps the last of a repeated flag; clap would refuse the repetition.
    cmd.args_override_self(true)
}

/// The table flags given on the command line, in table order.
pub fn given(m: &ArgMatches) -> Vec<Given> {
    let mut out = Vec::new();
    for f in VLLM_FLAGS {
        for (id, positive) in [(f.name, true), (f.no_name, false)] {
            if id.is_empty() || m.value_source(id) != Some(ValueSource::CommandLine) {
                continue;
            }
            let values: Vec<String> = match f.kind {
                Kind::Switch | Kind::Bool => Vec::new(),
                _ => m
                    .get_raw(id)
                    .into_iter()
                    .flatten()
                    .map(|v| v.to_string_lossy().into_owned())
                    .collect(),
            };
            let value = (!values.is_empty()).then(|| values.join(" "));
            // `nargs="?"` given alone is `true`, not a value to convert.
            let invalid = match (f.kind, value_type(f.name)) {
                (Kind::Value | Kind::List, Some((ty, optional))) if positive => {
                    values.iter().find_map(|v| ty.check(v, optional))
                }
                _ => None,
            };
            let (refused, reason) = match f.what {
                What::Ignored(r) => (false, r),
                What::Refused(r, ok) => {
                    let neutral =
                        !positive || value.as_deref().is_some_and(|v| ok.contains(&v.trim()));
                    (!neutral, r)
                }
            };
            out.push(Given {
                flag: format!("--{id}"),
                value,
                refused,
                reason,
                invalid,
            });
        }
    }
    out
}

/// Boolean flags tpuserve implements whose `--no-` form vLLM also accepts (the last of
/// `--x` / `--no-x` wins, as argparse's BooleanOptionalAction).
const IMPLEMENTED_BOOLS: &[&str] = &[
    "enable-log-requests",
    "trust-request-chat-template",
    "enable-server-load-tracking",
    "enable-tokenizer-info-endpoint",
    "enable-prompt-tokens-details",
    "enable-force-include-usage",
    "return-tokens-as-token-ids",
    "allow-credentials",
    "enable-auto-tool-choice",
    "exclude-tools-when-tool-choice-none",
];

/// Short spellings of flags tpuserve implements.
const IMPLEMENTED_ALIASES: &[(&str, &str)] =
    &[("-tp", "--tensor-parallel-size"), ("-q", "--quantization")];

/// The long flag a vLLM short spelling stands for.
fn alias_target(short: &str) -> Option<String> {
    if let Some((_, long)) = IMPLEMENTED_ALIASES.iter().find(|(s, _)| *s == short) {
        return Some((*long).to_string());
    }
    VLLM_FLAGS
        .iter()
        .find(|f| f.aliases.contains(&short))
        .map(|f| format!("--{}", f.name))
}

/// Rewrites a `tpuserve serve ...` command line as vLLM's FlexibleArgumentParser reads it:
/// underscores in flag names become dashes, vLLM's short spellings (`-tp`, `-dp`, `-q`...)
/// their long flags, `-O3` / `-O 3` `--optimization-level 3`, `--x.a.b v` one `--x` JSON
/// object, and `--no-x` of a boolean tpuserve implements clears an earlier `--x`. Other
/// subcommands are left as they are.
pub fn normalize_args(args: Vec<OsString>) -> Vec<OsString> {
    if args.get(1).and_then(|a| a.to_str()) != Some("serve") {
        return args;
    }
    let mut out: Vec<OsString> = args[..2].to_vec();
    let mut dotted: Vec<(String, serde_json::Value)> = Vec::new();
    let mut rest = args[2..].iter().peekable();
    while let Some(arg) = rest.next() {
        let Some(s) = arg.to_str() else {
            out.push(arg.clone());
            continue;
        };
        if let Some(body) = s.strip_prefix("--") {
            let (name, value) = match body.split_once('=') {
                Some((n, v)) => (n, Some(v)),
                None => (body, None),
            };
            // Only the flag's own name, up to a `.`, has its underscores turned into dashes
            // (JSON keys after it keep theirs).
            let name = match name.split_once('.') {
                Some((base, path)) => format!("{}.{path}", base.replace('_', "-")),
                None => name.replace('_', "-"),
            };
            if let Some((base, path)) = name.split_once('.') {
                // `--compilation-config.mode 3`: a key of the JSON object flag `--x`.
                let value = match value {
                    Some(v) => v.to_string(),
                    None => match rest.peek().and_then(|v| v.to_str()) {
                        Some(v) if !v.starts_with("--") => {
                            let v = v.to_string();
                            rest.next();
                            v
                        }
                        _ => "true".into(),
                    },
                };
                let v = serde_json::from_str(&value).unwrap_or(serde_json::Value::String(value));
                let at = match dotted.iter().position(|(b, _)| b == base) {
                    Some(i) => i,
                    None => {
                        dotted.push((base.to_string(), serde_json::json!({})));
                        dotted.len() - 1
                    }
                };
                insert_path(&mut dotted[at].1, path, v);
                continue;
            }
            if let Some(pos) = name.strip_prefix("no-") {
                if IMPLEMENTED_BOOLS.contains(&pos) {
                    let flag = format!("--{pos}");
                    out.retain(|a| a.to_str() != Some(flag.as_str()));
                    continue;
                }
            }
            out.push(match value {
                Some(v) => format!("--{name}={v}").into(),
                None => format!("--{name}").into(),
            });
            continue;
        }
        if let Some(level) = s.strip_prefix("-O") {
            let level = level.strip_prefix('=').unwrap_or(level);
            if !level.is_empty() {
                out.push("--optimization-level".into());
                out.push(level.into());
                continue;
            }
            if rest
                .peek()
                .and_then(|v| v.to_str())
                .is_some_and(|v| matches!(v, "0" | "1" | "2" | "3"))
            {
                out.push("--optimization-level".into());
                continue;
            }
        }
        if s.starts_with('-') && s.len() > 1 {
            let (short, value) = match s.split_once('=') {
                Some((n, v)) => (n, Some(v)),
                None => (s, None),
            };
            if let Some(long) = alias_target(short) {
                out.push(match value {
                    Some(v) => format!("{long}={v}").into(),
                    None => long.into(),
                });
                continue;
            }
        }
        out.push(arg.clone());
    }
    for (base, obj) in dotted {
        out.push(format!("--{base}={obj}").into());
    }
    out
}

/// Sets `a.b.c` in a JSON object (intermediate objects created, a non-object replaced).
fn insert_path(obj: &mut serde_json::Value, path: &str, v: serde_json::Value) {
    let mut cur = obj;
    let mut keys = path.split('.').peekable();
    while let Some(k) = keys.next() {
        if !cur.is_object() {
            *cur = serde_json::json!({});
        }
        let Some(map) = cur.as_object_mut() else {
            return;
        };
        if keys.peek().is_none() {
            map.insert(k.to_string(), v);
            return;
        }
        cur = map
            .entry(k.to_string())
            .or_insert_with(|| serde_json::json!({}));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn norm(args: &[&str]) -> Vec<String> {
        let mut v = vec!["tpuserve".to_string(), "serve".to_string()];
        v.extend(args.iter().map(|s| s.to_string()));
        normalize_args(v.into_iter().map(OsString::from).collect())
            .into_iter()
            .skip(2)
            .map(|s| s.into_string().unwrap())
            .collect()
    }

    #[test]
    fn normalises_as_vllm() {
        assert_eq!(norm(&["--max_model_len=64"]), ["--max-model-len=64"]);
        assert_eq!(norm(&["-tp", "8"]), ["--tensor-parallel-size", "8"]);
        assert_eq!(norm(&["-dp=2"]), ["--data-parallel-size=2"]);
        assert_eq!(norm(&["-O3"]), ["--optimization-level", "3"]);
        assert_eq!(norm(&["-O", "2"]), ["--optimization-level", "2"]);
        assert_eq!(
            norm(&[
                "--compilation_config.mode",
                "3",
                "--compilation-config.a_b.c=x"
            ]),
            [r#"--compilation-config={"mode":3,"a_b":{"c":"x"}}"#]
        );
        assert_eq!(
            norm(&["--allow-credentials", "--no-allow-credentials"]),
            Vec::<String>::new()
        );
        assert_eq!(
            norm(&["MODEL", "-q", "fp8"]),
            ["MODEL", "--quantization", "fp8"]
        );
    }

    #[test]
    fn other_subcommands_untouched() {
        let v: Vec<OsString> = ["tpuserve", "bench", "-n", "3"].map(OsString::from).into();
        assert_eq!(normalize_args(v.clone()), v);
    }

    fn parse(args: &[&str]) -> Result<Vec<Given>, clap::Error> {
        use clap::Args;
        let cmd = augment(crate::cli::ServeArgs::augment_args(Command::new("serve")));
        let m = cmd.try_get_matches_from(std::iter::once("serve").chain(args.iter().copied()))?;
        Ok(given(&m))
    }

    #[test]
    fn serve_command_with_the_table_is_consistent() {
        use clap::Args;
        // clap's own checks (duplicate names or ids panic here; debug builds only)...
        let own = crate::cli::ServeArgs::augment_args(Command::new("serve"));
        augment(own.clone()).debug_assert();
        // ...so the clash that matters is also checked directly: no table flag is one of
        // ServeArgs' own.
        let longs: Vec<&str> = own
            .get_arguments()
            .flat_map(|a| {
                a.get_long()
                    .into_iter()
                    .chain(a.get_all_aliases().into_iter().flatten())
            })
            .collect();
        for f in VLLM_FLAGS {
            for n in [f.name, f.no_name] {
                assert!(
                    !longs.contains(&n),
                    "--{n} is both a table flag and a ServeArgs flag"
                );
            }
        }
    }

    #[test]
    fn given_flags_and_their_outcome() {
        let g = parse(&[
            "m",
            "--no-enable-lora",
            "--max-loras",
            "2",
            "--lora-target-modules",
            "q",
            "k",
            "--runner",
            "generate",
            "--enforce-eager",
            "--port",
            "1",
        ])
        .unwrap();
        let names: Vec<(&str, Option<&str>, bool)> = g
            .iter()
            .map(|g| (g.flag.as_str(), g.value.as_deref(), g.refused))
            .collect();
        assert_eq!(
            names,
            [
                ("--runner", Some("generate"), false),
                ("--enforce-eager", None, false),
                ("--no-enable-lora", None, false),
                ("--max-loras", Some("2"), false),
                ("--lora-target-modules", Some("q k"), false),
            ]
        );
        let g = parse(&["--enable-lora"]).unwrap();
        assert!(g[0].refused && g[0].refused_line().starts_with("--enable-lora is not"));
        assert!(parse(&["--runner", "pooling"]).unwrap()[0].refused);
        // Repeated flags: the last wins, as argparse.
        assert_eq!(
            parse(&["--max-loras", "1", "--max-loras", "3"]).unwrap()[0]
                .value
                .as_deref(),
            Some("3")
        );
    }

    #[test]
    fn every_ignored_value_flag_has_vllms_value_type() {
        for f in VLLM_FLAGS {
            let valued = matches!(f.kind, Kind::Value | Kind::List);
            let ignored = matches!(f.what, What::Ignored(_));
            assert_eq!(
                value_type(f.name).is_some(),
                valued && ignored,
                "--{}: a value type exactly for ignored value flags",
                f.name
            );
        }
        for (n, ..) in VALUE_TYPES {
            assert!(
                VLLM_FLAGS.iter().any(|f| f.name == *n),
                "--{n} is not in the table"
            );
        }
    }

    #[test]
    fn bad_values_are_argparse_errors() {
        let line = |args: &[&str]| parse(args).unwrap()[0].invalid_line();
        assert_eq!(
            line(&["--max-log-len", "abc"]).as_deref(),
            Some("argument --max-log-len: invalid int value: 'abc'")
        );
        assert!(line(&["--uvicorn-log-level", "loud"])
            .is_some_and(|l| l.contains("invalid choice: 'loud' (choose from 'critical'")));
        assert!(line(&["--watermark", "x"]).is_some());
        assert!(line(&["--compilation-config", "{x"]).is_some());
        assert!(line(&["--numa-bind-nodes", "0", "x"]).is_some());
        for ok in [
            &["--max-log-len", "None"][..],
            &["--max-log-len", " -1_000 "],
            &["--watermark", "1e-2"],
            &["--max-num-scheduled-tokens", "1G"],
            &["--compilation-config", "{\"mode\": 3}"],
            &["--custom-histogram-buckets", "0.5"],
            &["--cohere-format", "anything"],
            &["--max-lora-rank", "16"],
        ] {
            assert_eq!(line(ok), None, "{ok:?}");
        }
        // Refused flags keep their own message; --no- forms take no value.
        assert_eq!(line(&["--runner", "pooling"]), None);
    }

    #[test]
    fn table_names_are_unique() {
        let mut names: Vec<&str> = VLLM_FLAGS
            .iter()
            .flat_map(|f| [f.name, f.no_name])
            .filter(|n| !n.is_empty())
            .collect();
        let n = names.len();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), n);
    }
}
