//! Fuzz target bodies: one function per entry point that takes untrusted bytes, with the
//! properties that must hold for every input.
//!
//! There is one copy of each body. The `cargo fuzz` targets in `fuzz/` (nightly features,
//! libFuzzer) call them, and so does the stable regression test `tests/fuzz_regressions.rs`,
//! which runs every target over its committed corpus (`fuzz/corpus/<target>/`), its generated
//! seeds and a few thousand deterministic mutations of them, so CI exercises the same entry
//! points on every run. A body panics (assert) when a property fails; anything else it returns.
//!
//! Many inputs carry structure (a sequence of frames, a query and an answer): the bodies read
//! them with [`Input`], which never fails (a short input reads as zeros and empty records), so
//! every byte string is a valid input and the fuzzer's mutations stay meaningful.
//!
//! The link target builds a whole [`crate::link::Link`]. It must never make a connection
//! outside this machine, whatever the input: see [`link`] for how that is ruled out.

pub mod config;
pub mod control;
pub mod dns;
pub mod link;
pub mod secrets;
pub mod tls;

/// One fuzz target: its name (the file in `fuzz/fuzz_targets/` and the corpus directory), its
/// body, and the seeds its corpus starts from.
pub struct Target {
    pub name: &'static str,
    pub run: fn(&[u8]),
    pub seeds: fn() -> Vec<Vec<u8>>,
    /// The largest input worth generating (libFuzzer's `-max_len`).
    pub max_len: usize,
}

/// Every target.
pub const TARGETS: &[Target] = &[
    Target {
        name: "classify",
        run: link::classify,
        seeds: link::classify_seeds,
        max_len: 2048,
    },
    Target {
        name: "fragments",
        run: link::fragments,
        seeds: link::fragments_seeds,
        max_len: 8192,
    },
    Target {
        name: "link",
        run: link::link,
        seeds: link::link_seeds,
        max_len: 8192,
    },
    Target {
        name: "dhcp",
        run: link::dhcp,
        seeds: link::dhcp_seeds,
        max_len: 1024,
    },
    Target {
        name: "dns_query",
        run: dns::query,
        seeds: dns::query_seeds,
        max_len: 2048,
    },
    Target {
        name: "dns_answer",
        run: dns::answer,
        seeds: dns::answer_seeds,
        max_len: 4096,
    },
    Target {
        name: "dns_tcp_framer",
        run: dns::tcp_framer,
        seeds: dns::tcp_framer_seeds,
        max_len: 4096,
    },
    Target {
        name: "sni",
        run: tls::sni,
        seeds: tls::sni_seeds,
        max_len: 4096,
    },
    Target {
        name: "secrets_http",
        run: secrets::http,
        seeds: secrets::http_seeds,
        max_len: 4096,
    },
    Target {
        name: "secrets_raw",
        run: secrets::raw,
        seeds: secrets::raw_seeds,
        max_len: 1024,
    },
    Target {
        name: "vhost_user",
        run: control::vhost_user,
        seeds: control::vhost_user_seeds,
        max_len: 4096,
    },
    Target {
        name: "config",
        run: config::config,
        seeds: config::config_seeds,
        max_len: 4096,
    },
    Target {
        name: "cli",
        run: config::cli,
        seeds: config::cli_seeds,
        max_len: 512,
    },
];

/// The target called `name`.
pub fn target(name: &str) -> Option<&'static Target> {
    TARGETS.iter().find(|t| t.name == name)
}

/// Runs the body of the target called `name` on `data` (what the `cargo fuzz` targets do).
pub fn run(name: &str, data: &[u8]) {
    match target(name) {
        Some(t) => (t.run)(data),
        None => panic!("no fuzz target {name}"),
    }
}

/// A reader over fuzz input that never fails: past the end it reads zeros and empty slices.
pub struct Input<'a> {
    rest: &'a [u8],
}

impl<'a> Input<'a> {
    pub fn new(data: &'a [u8]) -> Self {
        Input { rest: data }
    }

    pub fn is_empty(&self) -> bool {
        self.rest.is_empty()
    }

    /// The next byte, 0 past the end.
    pub fn byte(&mut self) -> u8 {
        self.bytes(1).first().copied().unwrap_or(0)
    }

    /// The next two bytes (big-endian), 0 past the end.
    pub fn u16(&mut self) -> u16 {
        let hi = self.byte();
        let lo = self.byte();
        u16::from_be_bytes([hi, lo])
    }

    /// Up to `n` bytes.
    pub fn bytes(&mut self, n: usize) -> &'a [u8] {
        let (head, tail) = self.rest.split_at(n.min(self.rest.len()));
        self.rest = tail;
        head
    }

    /// A record: a 16-bit big-endian length, then that many bytes (fewer at the end).
    pub fn record(&mut self) -> &'a [u8] {
        let len = usize::from(self.u16());
        self.bytes(len)
    }

    /// Everything left.
    pub fn rest(&mut self) -> &'a [u8] {
        self.bytes(self.rest.len())
    }
}

/// Appends `data` as an [`Input::record`] (for building seeds).
pub fn push_record(out: &mut Vec<u8>, data: &[u8]) {
    let len = u16::try_from(data.len()).unwrap_or(u16::MAX);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&data[..usize::from(len)]);
}

/// A small deterministic generator (SplitMix64) for the regression inputs.
pub struct SplitMix(u64);

impl SplitMix {
    pub fn new(seed: u64) -> Self {
        SplitMix(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number below `n` (0 when `n` is 0).
    pub fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next_u64() % n as u64) as usize
        }
    }
}

/// `count` deterministic inputs for `target`: mutations of its seeds (bit flips, byte changes,
/// cuts, insertions, splices), some pure noise, all at most `max_len` bytes. The same target
/// and count always give the same inputs.
pub fn pseudo_random_inputs(target: &Target, count: usize) -> Vec<Vec<u8>> {
    let seeds = (target.seeds)();
    let name_hash = target.name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    let mut rng = SplitMix::new(name_hash);
    let mut out = Vec::with_capacity(count);
    for _ in 0..count {
        let mut input = if seeds.is_empty() || rng.below(8) == 0 {
            let len = rng.below(target.max_len.min(512) + 1);
            (0..len).map(|_| rng.next_u64() as u8).collect()
        } else {
            seeds[rng.below(seeds.len())].clone()
        };
        let mutations = 1 + rng.below(4);
        for _ in 0..mutations {
            mutate(&mut input, &seeds, &mut rng);
        }
        input.truncate(target.max_len);
        out.push(input);
    }
    out
}

fn mutate(input: &mut Vec<u8>, seeds: &[Vec<u8>], rng: &mut SplitMix) {
    match rng.below(7) {
        0 | 1 if !input.is_empty() => {
            let i = rng.below(input.len());
            input[i] ^= 1 << rng.below(8);
        }
        2 if !input.is_empty() => {
            let i = rng.below(input.len());
            input[i] = [0, 0xff, 0x7f, 0x80, 1, rng.next_u64() as u8][rng.below(6)];
        }
        3 if !input.is_empty() => {
            let cut = rng.below(input.len());
            input.truncate(cut);
        }
        4 => {
            let at = rng.below(input.len() + 1);
            let n = 1 + rng.below(8);
            let bytes: Vec<u8> = (0..n).map(|_| rng.next_u64() as u8).collect();
            input.splice(at..at, bytes);
        }
        5 if !input.is_empty() => {
            let at = rng.below(input.len());
            let n = (1 + rng.below(16)).min(input.len() - at);
            input.drain(at..at + n);
        }
        6 if !seeds.is_empty() => {
            let other = &seeds[rng.below(seeds.len())];
            let at = rng.below(input.len() + 1);
            let from = rng.below(other.len() + 1);
            input.truncate(at);
            input.extend_from_slice(&other[from..]);
        }
        _ => input.push(rng.next_u64() as u8),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn input_reads_zeros_and_short_records_past_the_end() {
        let mut input = Input::new(&[0, 3, b'a', b'b']);
        assert_eq!(input.record(), b"ab");
        assert!(input.is_empty());
        assert_eq!(input.byte(), 0);
        assert_eq!(input.u16(), 0);
        assert_eq!(input.record(), b"");
    }

    #[test]
    fn records_round_trip() {
        let mut out = Vec::new();
        push_record(&mut out, b"hello");
        push_record(&mut out, b"");
        let mut input = Input::new(&out);
        assert_eq!(input.record(), b"hello");
        assert_eq!(input.record(), b"");
        assert!(input.is_empty());
    }

    #[test]
    fn pseudo_random_inputs_are_deterministic_and_bounded() {
        let t = target("cli").unwrap();
        let a = pseudo_random_inputs(t, 50);
        assert_eq!(a, pseudo_random_inputs(t, 50));
        assert!(a.iter().all(|i| i.len() <= t.max_len));
        assert!(a.iter().collect::<std::collections::HashSet<_>>().len() > 40);
    }
}
