//! Benchmarks the policy hot path: `Policy::compile` at 10, 1,000 and 100,000
//! host rules, and `Policy::decide` on a hit-heavy and a miss-heavy stream of
//! 1,024 destinations against those three policies and the embedded Azure ML
//! profile. Two references run on the same streams in the same process: a
//! naive `HashSet` suffix walk (allocating) and an aho-corasick automaton.
//!
//! Before each (policy, stream) pair is measured, the set-up asserts that
//! `decide`, the naive walk and aho-corasick all allow exactly the number of
//! destinations the stream was generated to contain, so a broken matcher fails
//! the bench instead of looking faster.
//!
//! Run: `cargo bench --bench policy` (one case:
//! `cargo bench --bench policy -- decide/100k/miss`). `cargo test --bench policy`
//! runs every case once as a smoke test.
//!
//! Bench ids: `{decide,naive,ahocorasick}/{azureml,10,1k,100k}/{hit,miss}`,
//! throughput in decisions (one iteration = the whole 1,024-entry stream);
//! `compile/{10,1k,100k}` from the config text (every rule located, as a
//! user's config is).

use std::collections::HashSet;
use std::hint::black_box;
use std::time::{Duration, Instant};

use aho_corasick::{AhoCorasick, MatchKind};
use criterion::{Criterion, SamplingMode, Throughput, criterion_group, criterion_main};
use portcullis::config::{Action, Config, Protocol, Source};
use portcullis::policy::{CompileInput, Dest, Policy, RuleState, Target, Verdict};

/// Destinations per stream.
const STREAM_LEN: usize = 1024;
/// Share of allowed destinations in the hit-heavy / miss-heavy stream, in percent.
const HIT_PERCENT: u64 = 90;
const MISS_PERCENT: u64 = 10;
/// Ports no host rule of any benched policy allows.
const WRONG_PORTS: [u16; 4] = [22, 25, 8080, 8443];

const LABELS: [&str; 24] = [
    "api",
    "cdn",
    "files",
    "login",
    "static",
    "www",
    "auth",
    "data",
    "storage",
    "graph",
    "update",
    "download",
    "telemetry",
    "events",
    "assets",
    "media",
    "portal",
    "registry",
    "mirror",
    "pkg",
    "edge",
    "blob",
    "gateway",
    "status",
];
const SLD_HEAD: [&str; 20] = [
    "contoso",
    "fabrikam",
    "northwind",
    "adatum",
    "tailspin",
    "woodgrove",
    "litware",
    "proseware",
    "wingtip",
    "coho",
    "lucerne",
    "margie",
    "alpine",
    "humongous",
    "wideworld",
    "trey",
    "fourthcoffee",
    "blueyonder",
    "relecloud",
    "munson",
];
const SLD_TAIL: [&str; 10] = [
    "", "labs", "cloud", "data", "works", "soft", "tech", "media", "systems", "hub",
];
const TLDS: [&str; 7] = ["com", "net", "org", "io", "ms", "windows.net", "azure.com"];
/// Real names that none of the synthetic policies allow.
const REAL_WORLD: [&str; 8] = [
    "www.google.com",
    "github.com",
    "registry.npmjs.org",
    "login.live.com",
    "s3.amazonaws.com",
    "example.com",
    "files.pythonhosted.org",
    "api.openai.com",
];

/// Tiny deterministic PRNG (xorshift64).
struct XorShift(u64);

impl XorShift {
    fn new(seed: u64) -> XorShift {
        XorShift(seed | 1)
    }

    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn percent(&mut self) -> u64 {
        self.next() % 100
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

/// Registrable domain number `j`: distinct for every `j`. Bases are never a
/// label-boundary suffix of each other (no second-level word is `windows` or `azure`).
fn base_domain(j: usize) -> String {
    let head = SLD_HEAD[j % SLD_HEAD.len()];
    let tail = SLD_TAIL[(j / SLD_HEAD.len()) % SLD_TAIL.len()];
    let per_tld = SLD_HEAD.len() * SLD_TAIL.len();
    let tld = TLDS[(j / per_tld) % TLDS.len()];
    let n = j / (per_tld * TLDS.len());
    if n == 0 {
        format!("{head}{tail}.{tld}")
    } else {
        format!("{head}{tail}{n}.{tld}")
    }
}

/// First base number never used by a synthetic rule.
const UNCLAIMED_BASE: usize = 1_000_000;

/// What a policy allows on 443 (names, lowercase, no trailing dot), plus names
/// it is known not to allow.
struct Universe {
    exact: Vec<String>,
    /// Wildcard suffixes, without the `*.`.
    wild: Vec<String>,
    /// Extra candidate names for the "unknown" misses (e.g. disabled scenarios).
    extra_unknown: Vec<String>,
    /// For policies with overlapping patterns: the expected verdict is taken
    /// from a linear scan over the patterns instead of from construction.
    overlapping: bool,
}

impl Universe {
    /// The reference semantics, by brute force: exact name, or a name with one
    /// or more labels before a wildcard suffix, on port 443.
    fn spec_allows(&self, name: &str, port: u16) -> bool {
        port == 443
            && (self.exact.iter().any(|e| e == name)
                || self.wild.iter().any(|s| {
                    name.len() > s.len() + 1
                        && name.ends_with(s.as_str())
                        && name.as_bytes()[name.len() - s.len() - 1] == b'.'
                }))
    }
}

/// A synthetic policy: `n` rules, one pattern each, on port 443.
struct Synthetic {
    label: &'static str,
    source: Source,
    config: Config,
    policy: Policy,
    universe: Universe,
}

/// Takes the current base of a run of patterns sharing one base (2-6 each), or starts a new one.
fn shared_base(slot: &mut Option<(String, usize)>, next: &mut usize, rng: &mut XorShift) -> String {
    if slot.as_ref().is_none_or(|(_, left)| *left == 0) {
        *slot = Some((base_domain(*next), 2 + rng.below(5)));
        *next += 1;
    }
    let (base, left) = slot.as_mut().expect("set above");
    *left -= 1;
    base.clone()
}

/// ~60% exact names, ~40% wildcards (half `*.base`, half `*.label.base`).
/// Each base domain is used by one kind only (exact names, one `*.base`, or
/// `*.label.base` patterns), so no pattern overlaps another: a name's verdict
/// is known from how it was built.
fn synthetic_patterns(n: usize) -> (Vec<String>, Universe) {
    let mut rng = XorShift::new(0x9e37_79b9_7f4a_7c15 ^ n as u64);
    let mut seen = HashSet::new();
    let mut patterns = Vec::with_capacity(n);
    let mut universe = Universe {
        exact: Vec::new(),
        wild: Vec::new(),
        extra_unknown: Vec::new(),
        overlapping: false,
    };
    let mut next_base = 0usize;
    let mut exact_slot = None;
    let mut wild_slot = None;
    while patterns.len() < n {
        if rng.percent() < 60 {
            let base = shared_base(&mut exact_slot, &mut next_base, &mut rng);
            let name = if rng.percent() < 10 {
                base
            } else {
                format!("{}.{base}", rng.pick(&LABELS))
            };
            if seen.insert(name.clone()) {
                patterns.push(name.clone());
                universe.exact.push(name);
            }
        } else {
            let suffix = if rng.percent() < 50 {
                next_base += 1;
                base_domain(next_base - 1)
            } else {
                let base = shared_base(&mut wild_slot, &mut next_base, &mut rng);
                format!("{}.{base}", rng.pick(&LABELS))
            };
            if seen.insert(format!("*.{suffix}")) {
                patterns.push(format!("*.{suffix}"));
                universe.wild.push(suffix);
            }
        }
    }
    assert!(next_base < UNCLAIMED_BASE);
    (patterns, universe)
}

fn synthetic(n: usize, label: &'static str) -> Synthetic {
    let (patterns, universe) = synthetic_patterns(n);
    let mut text = String::with_capacity(64 * n + 64);
    text.push_str("[policy]\nprofile = \"none\"\n");
    for (i, p) in patterns.iter().enumerate() {
        text.push_str(&format!(
            "\n[[rule]]\nname = \"r{i}\"\nhosts = [\"{p}\"]\nports = [443]\n"
        ));
    }
    let source = Source {
        name: format!("bench-{label}.toml"),
        text,
    };
    let config = Config::parse(&source).expect("synthetic config parses");
    let policy = compile(&config, &source);
    assert_eq!(policy.rules().len(), n);
    Synthetic {
        label,
        source,
        config,
        policy,
        universe,
    }
}

fn compile(config: &Config, source: &Source) -> Policy {
    match Policy::compile(config, source, &CompileInput::default()) {
        Ok((policy, diags)) => {
            // Synthetic patterns are disjoint, so there is nothing to lint.
            if config.policy.profile.get_ref() == "none" {
                assert!(diags.is_empty(), "unexpected diagnostics: {diags:#?}");
            }
            policy
        }
        Err(diags) => panic!("{} does not compile: {diags:#?}", source.name),
    }
}

/// The embedded Azure ML profile with its default scenarios (`basic` needs
/// `<vnet>` as well as `<region>` and `<storage>` to compile).
fn azureml() -> (Policy, Universe) {
    let source = Source {
        name: "bench-azureml.toml".into(),
        text: "[policy]\nprofile = \"azureml\"\n\n[vars]\nregion = \"westus2\"\nstorage = \"mlstore\"\nacr = \"mlacr\"\nvnet = \"10.0.0.0/16\"\n"
            .into(),
    };
    let config = Config::parse(&source).expect("azureml config parses");
    let policy = compile(&config, &source);
    // What the compiled rule list says is allowed on 443/tcp (hosts after
    // placeholder substitution), and the names of inactive rules as misses.
    let mut universe = Universe {
        exact: Vec::new(),
        wild: Vec::new(),
        extra_unknown: Vec::new(),
        overlapping: true,
    };
    for rule in policy.rules() {
        let on_443 = rule.ports.iter().any(|&(lo, hi)| lo <= 443 && 443 <= hi)
            && matches!(rule.protocol, Protocol::Tcp | Protocol::Any);
        let allows = rule.state == RuleState::Active && rule.action == Action::Allow && on_443;
        for host in rule.hosts.iter().filter(|h| !h.contains('<')) {
            match (allows, host.strip_prefix("*.")) {
                (true, Some(suffix)) => universe.wild.push(suffix.to_string()),
                (true, None) => universe.exact.push(host.clone()),
                (false, Some(suffix)) => universe.extra_unknown.push(format!("node1.{suffix}")),
                (false, None) => universe.extra_unknown.push(host.clone()),
            }
        }
    }
    universe.exact.sort();
    universe.exact.dedup();
    universe.wild.sort();
    universe.wild.dedup();
    assert!(universe.exact.len() >= 10 && universe.wild.len() >= 15);
    assert!(!universe.extra_unknown.is_empty());
    (policy, universe)
}

struct Stream {
    kind: &'static str,
    dests: Vec<(String, u16)>,
    expected_allowed: usize,
}

/// A name under `suffix` with 1-3 more labels.
fn under(suffix: &str, rng: &mut XorShift) -> String {
    let mut name = String::new();
    for _ in 0..1 + rng.below(3) {
        if rng.percent() < 50 {
            let label: &str = LABELS[rng.below(LABELS.len())];
            name.push_str(label);
        } else {
            name.push_str(&format!("n{}", rng.below(1000)));
        }
        name.push('.');
    }
    name.push_str(suffix);
    name
}

/// A destination that should be allowed (`true`) or denied (`false`), as a
/// lowercase name without trailing dot.
fn candidate(u: &Universe, rng: &mut XorShift, allow: bool) -> (String, u16) {
    let allowed_name = |rng: &mut XorShift| {
        if rng.percent() < 50 {
            rng.pick(&u.exact).clone()
        } else {
            let suffix: &String = rng.pick(&u.wild);
            under(suffix, rng)
        }
    };
    if allow {
        return (allowed_name(rng), 443);
    }
    match rng.below(4) {
        // Unknown: an unclaimed base, a real-world name, or an inactive rule's name.
        0 => {
            let r = rng.percent();
            let name = if r < 50 || (r >= 75 && u.extra_unknown.is_empty()) {
                let base = base_domain(UNCLAIMED_BASE + rng.below(1_000_000));
                format!("{}.{base}", rng.pick(&LABELS))
            } else if r < 75 {
                rng.pick(&REAL_WORLD).to_string()
            } else {
                rng.pick(&u.extra_unknown).clone()
            };
            (name, 443)
        }
        // Look-alike: `evil` glued to an allowed name or suffix.
        1 => {
            let target = if rng.percent() < 50 {
                rng.pick(&u.exact)
            } else {
                rng.pick(&u.wild)
            };
            (format!("evil{target}"), 443)
        }
        // The apex of a wildcard.
        2 => (rng.pick(&u.wild).clone(), 443),
        // An allowed name on a port no rule allows.
        _ => (allowed_name(rng), *rng.pick(&WRONG_PORTS)),
    }
}

/// Mixed case sometimes, a trailing dot sometimes.
fn decorate(name: String, rng: &mut XorShift) -> String {
    let mut name = match rng.percent() {
        0..10 => name.to_ascii_uppercase(),
        10..25 => name
            .split('.')
            .map(|label| {
                let mut l = label.to_string();
                l[..1].make_ascii_uppercase();
                l
            })
            .collect::<Vec<_>>()
            .join("."),
        _ => name,
    };
    if rng.percent() < 15 {
        name.push('.');
    }
    name
}

fn stream(u: &Universe, kind: &'static str, allow_percent: u64, seed: u64) -> Stream {
    let mut rng = XorShift::new(seed);
    let mut dests = Vec::with_capacity(STREAM_LEN);
    let mut expected_allowed = 0;
    while dests.len() < STREAM_LEN {
        let allow = rng.percent() < allow_percent;
        let (name, port) = candidate(u, &mut rng, allow);
        // Where patterns overlap (the real profile: `anaconda.com` is both an
        // apex and an exact name), keep only candidates whose brute-force
        // verdict is the intended one.
        if u.overlapping && u.spec_allows(&name, port) != allow {
            continue;
        }
        expected_allowed += usize::from(allow);
        dests.push((decorate(name, &mut rng), port));
    }
    Stream {
        kind,
        dests,
        expected_allowed,
    }
}

/// Naive reference: owned lowercase copy, then a `HashSet` probe per suffix.
struct Naive {
    exact: HashSet<String>,
    wild: HashSet<String>,
}

impl Naive {
    fn new(u: &Universe) -> Naive {
        Naive {
            exact: u.exact.iter().cloned().collect(),
            wild: u.wild.iter().cloned().collect(),
        }
    }

    fn allows(&self, host: &str, port: u16) -> bool {
        let mut name = host.to_ascii_lowercase();
        if name.ends_with('.') {
            name.pop();
        }
        let found = self.exact.contains(&name)
            || name
                .match_indices('.')
                .any(|(i, _)| self.wild.contains(&name[i + 1..]));
        found && port == 443
    }
}

/// Aho-corasick reference: `\0name\x01` and `.suffix\x01` patterns, leftmost-longest.
struct AcRef {
    ac: AhoCorasick,
}

impl AcRef {
    fn new(u: &Universe) -> AcRef {
        let exact = u.exact.iter().map(|n| format!("\0{n}\x01"));
        let wild = u.wild.iter().map(|s| format!(".{s}\x01"));
        let patterns: Vec<String> = exact.chain(wild).collect();
        let ac = AhoCorasick::builder()
            .match_kind(MatchKind::LeftmostLongest)
            .build(&patterns)
            .expect("aho-corasick builds");
        AcRef { ac }
    }

    fn allows(&self, host: &str, port: u16) -> bool {
        let name = host.as_bytes();
        let name = name.strip_suffix(b".").unwrap_or(name);
        if name.len() > 253 {
            return false;
        }
        let mut buf = [0u8; 256];
        for (dst, &b) in buf[1..].iter_mut().zip(name) {
            *dst = b.to_ascii_lowercase();
        }
        buf[name.len() + 1] = 1;
        self.ac.find(&buf[..name.len() + 2]).is_some() && port == 443
    }
}

fn dest(host: &str, port: u16) -> Dest<'_> {
    Dest {
        target: Target::Name(host),
        port,
        proto: Protocol::Tcp,
    }
}

/// `compile/<size>`: from the config text, as `portcullis check` does it.
fn bench_compile(c: &mut Criterion, policies: &[Synthetic]) {
    {
        let mut group = c.benchmark_group("compile");
        for p in policies {
            let source = &p.source;
            let start = Instant::now();
            let (policy, _) = Policy::compile(&p.config, source, &CompileInput::default())
                .expect("compiled once already");
            let once = start.elapsed();
            assert_eq!(policy.rules().len(), p.config.rules.len());
            group.throughput(Throughput::Elements(p.config.rules.len() as u64));
            if once > Duration::from_millis(5) {
                group
                    .sample_size(10)
                    .sampling_mode(SamplingMode::Flat)
                    .warm_up_time(once.min(Duration::from_millis(500)))
                    .measurement_time((once * 11).max(Duration::from_millis(1500)));
            } else {
                group
                    .sample_size(50)
                    .sampling_mode(SamplingMode::Auto)
                    .warm_up_time(Duration::from_millis(300))
                    .measurement_time(Duration::from_millis(1500));
            }
            group.bench_function(p.label, |b| {
                b.iter_with_large_drop(|| {
                    Policy::compile(black_box(&p.config), source, &CompileInput::default())
                })
            });
        }
        group.finish();
    }
}

/// Asserts all three matchers agree with the stream, then benches them side by side.
fn bench_decide(c: &mut Criterion, label: &str, policy: &Policy, u: &Universe) {
    let naive = Naive::new(u);
    let ac = AcRef::new(u);
    for (kind, percent, seed) in [
        ("hit", HIT_PERCENT, 0x1234_5678),
        ("miss", MISS_PERCENT, 0x8765_4321),
    ] {
        let s = stream(
            u,
            kind,
            percent,
            seed ^ label.bytes().fold(0, |h, b| h * 31 + u64::from(b)),
        );
        let decided = s
            .dests
            .iter()
            .filter(|(h, p)| policy.decide(&dest(h, *p)).verdict == Verdict::Allow)
            .count();
        let id = format!("{label}/{}", s.kind);
        assert_eq!(decided, s.expected_allowed, "decide on {id}");
        let by_naive = s.dests.iter().filter(|(h, p)| naive.allows(h, *p)).count();
        assert_eq!(by_naive, s.expected_allowed, "naive on {id}");
        let by_ac = s.dests.iter().filter(|(h, p)| ac.allows(h, *p)).count();
        assert_eq!(by_ac, s.expected_allowed, "aho-corasick on {id}");
        let (lo, hi) = (
            STREAM_LEN * percent as usize / 100 - 60,
            STREAM_LEN * percent as usize / 100 + 60,
        );
        assert!(
            (lo..=hi).contains(&s.expected_allowed),
            "{id}: {} allowed",
            s.expected_allowed
        );

        let dests = s.dests.as_slice();
        paired(&id, dests, policy, &naive);
        run(c, "decide", &id, dests, |h, p| {
            black_box(policy.decide(&dest(h, p)));
        });
        run(c, "naive", &id, dests, |h, p| {
            black_box(naive.allows(h, p));
        });
        run(c, "ahocorasick", &id, dests, |h, p| {
            black_box(ac.allows(h, p));
        });
    }
}

/// Rounds of the paired comparison (a few in `cargo test` mode).
fn paired_rounds() -> usize {
    if std::env::args().any(|a| a == "--bench") {
        400
    } else {
        3
    }
}

/// `decide` and the naive reference on the same stream in alternating
/// rounds, so both see the same machine: the shared 2-core host drifts by
/// tens of percent between criterion's back-to-back groups. Prints, per
/// decision, the fastest round (the least disturbed) and the median round
/// of each, and their ratios.
fn paired(id: &str, dests: &[(String, u16)], policy: &Policy, naive: &Naive) {
    let rounds = paired_rounds();
    let per = |start: Instant| start.elapsed().as_secs_f64() * 1e9 / dests.len() as f64;
    let (mut ours, mut theirs) = (Vec::with_capacity(rounds), Vec::with_capacity(rounds));
    for _ in 0..rounds {
        let start = Instant::now();
        for (h, p) in black_box(dests) {
            black_box(policy.decide(&dest(h, *p)));
        }
        ours.push(per(start));
        let start = Instant::now();
        for (h, p) in black_box(dests) {
            black_box(naive.allows(h, *p));
        }
        theirs.push(per(start));
    }
    ours.sort_by(f64::total_cmp);
    theirs.sort_by(f64::total_cmp);
    let (min, med) = (|v: &[f64]| v[0], |v: &[f64]| v[v.len() / 2]);
    println!(
        "paired {id}: decide {:.1} ns (median {:.1}), naive {:.1} ns (median {:.1}): {:.1}x (median {:.1}x), {:.1} M decisions/s/core",
        min(&ours),
        med(&ours),
        min(&theirs),
        med(&theirs),
        min(&theirs) / min(&ours),
        med(&theirs) / med(&ours),
        1e3 / med(&ours),
    );
}

/// One bench: `f` on every destination of the stream per iteration.
fn run(c: &mut Criterion, group: &str, id: &str, dests: &[(String, u16)], f: impl Fn(&str, u16)) {
    let mut group = c.benchmark_group(group);
    group
        .throughput(Throughput::Elements(dests.len() as u64))
        .sample_size(50)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_millis(1200));
    group.bench_function(id, |b| {
        b.iter(|| {
            for (host, port) in black_box(dests) {
                f(host, *port);
            }
        })
    });
    group.finish();
}

fn benches(c: &mut Criterion) {
    let policies = [
        synthetic(10, "10"),
        synthetic(1_000, "1k"),
        synthetic(100_000, "100k"),
    ];
    bench_compile(c, &policies);
    let (aml, aml_universe) = azureml();
    bench_decide(c, "azureml", &aml, &aml_universe);
    for p in &policies {
        bench_decide(c, p.label, &p.policy, &p.universe);
    }
}

criterion_group! {
    name = policy;
    // Plots and 100k bootstrap resamples cost about a second per bench; the
    // whole run stays around a minute and a half.
    config = Criterion::default().without_plots().nresamples(20_000);
    targets = benches
}
criterion_main!(policy);
