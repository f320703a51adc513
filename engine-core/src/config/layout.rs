//! How many servers and slots one GPU runs: `--servers-per-gpu` and `--slots`, each a number or
//! `auto`. The slots are the requests in flight on the GPU, split evenly over its servers.
//!
//! Why several servers: llama-server's one main loop applies a request's grammar to every slot in
//! turn on one CPU thread, so under the schema's grammar one server of 16 slots kept an H200 busy a
//! third of the time; four servers of four slots kept it busy 88 % of the time and described 1.5×
//! the frames (BENCHMARKS.md, "one H200"). Without a grammar one loop keeps up (the GPU 73 % busy),
//! and a split only makes the GPU's batches smaller: one server of 16 slots answered 1.7× the
//! requests of four of four. More servers is not always better either: each holds a copy of the
//! weights, its own CUDA context and compute buffers, and a server with one or two slots decodes
//! batches too small to be efficient (8×2 and 16×1 lost to 4×4). So `auto` picks, where requests
//! carry a grammar ([`Budget::grammar`]; otherwise one), the most servers that
//! - the host's cores can run (each server's main loop is a thread; [`CORES_PER_SERVER`] each),
//! - the slots can feed ([`MIN_SLOTS_PER_SERVER`] each), and
//! - the free VRAM holds: a copy of the weights and a [`MARGIN_MIB`] margin per server, and one KV
//!   cache per slot.
//!
//! With both `auto`, the slots are then the most that fit beside those copies (at most
//! [`MAX_AUTO_SLOTS`]).

/// The most slots `auto` picks: past 16 requests at once, llama-server's batches gain little and
/// each request waits longer for its image to be encoded (measured on H200, BENCHMARKS.md).
pub const MAX_AUTO_SLOTS: u32 = 16;

/// VRAM kept free beyond the weights and the KV cache: llama.cpp's compute buffers (the language
/// model's and the vision encoder's), the CUDA context, and other processes' growth.
pub const MARGIN_MIB: u64 = 1536;

/// A count given as a number, or left to the engine to choose (`auto`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Count {
    /// This many.
    Fixed(u32),
    /// The engine chooses, from the model, the GPU's free VRAM, the host's cores and whether
    /// requests carry a grammar.
    Auto,
}

impl std::str::FromStr for Count {
    type Err = String;

    /// `auto`, or a whole number of at least 1.
    fn from_str(text: &str) -> Result<Count, String> {
        match text.trim() {
            "auto" => Ok(Count::Auto),
            n => match n.parse::<u32>() {
                Ok(0) => Err("0: it must be at least 1, or auto".into()),
                Ok(n) => Ok(Count::Fixed(n)),
                Err(_) => Err(format!("{n:?} is neither a whole number nor auto")),
            },
        }
    }
}

impl std::fmt::Display for Count {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Count::Fixed(n) => write!(f, "{n}"),
            Count::Auto => f.write_str("auto"),
        }
    }
}

/// The fewest slots `auto` gives each server: a smaller batch decodes far below a batch of 16.
pub const MIN_SLOTS_PER_SERVER: u32 = 4;

/// The host's cores `auto` counts per server: its main loop, and the rest of its CPU work.
pub const CORES_PER_SERVER: u32 = 2;

/// What one GPU offers and what one server costs on it, in MiB: what the choice is made from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
    /// The GPU's free VRAM.
    pub free_mib: u64,
    /// One copy of the weights (the model and its projector).
    pub weights_mib: u64,
    /// One slot's KV cache; `None` where the model's header does not say.
    pub slot_mib: Option<u64>,
    /// The host's cores this GPU's servers share.
    pub cores: u32,
    /// Whether requests carry a grammar, which each server's one main loop applies to its slots
    /// in turn: only then does `auto` run more than one server.
    pub grammar: bool,
}

impl Budget {
    /// What `servers` servers with `slots` slots in all need: each server's weights and margin,
    /// and every slot's cache (unknown caches count as nothing).
    pub fn need_mib(&self, servers: u32, slots: u32) -> u64 {
        u64::from(servers) * (self.weights_mib + MARGIN_MIB)
            + u64::from(slots) * self.slot_mib.unwrap_or(0)
    }

    /// The slots whose caches fit beside `servers` copies of the weights (0 when none does;
    /// `u32::MAX` when a slot's cache is unknown).
    fn slots_beside(&self, servers: u32) -> u32 {
        let room = self.free_mib.saturating_sub(self.need_mib(servers, 0));
        match self.slot_mib {
            Some(slot) => u32::try_from(room / slot.max(1)).unwrap_or(u32::MAX),
            None => u32::MAX,
        }
    }

    /// The most servers worth running: as many as the cores run under a grammar, else one.
    fn most_servers(&self) -> u32 {
        if self.grammar {
            (self.cores / CORES_PER_SERVER).max(1)
        } else {
            1
        }
    }
}

/// One GPU's servers and slots, and what `auto` chose and why (empty where nothing was chosen).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Layout {
    /// Servers on the GPU.
    pub servers: u32,
    /// Requests in flight on the GPU, over all its servers.
    pub slots: u32,
    /// What they need, in MiB ([`Budget::need_mib`]).
    pub need_mib: u64,
    /// Whether that fits in the free VRAM.
    pub fits: bool,
    /// The numbers behind an `auto` choice, for a person; empty if nothing was `auto`.
    pub why: String,
}

/// The servers and slots of one GPU (see the module). A fixed count is kept as given (the slots
/// are raised to the servers, one each at least); `auto` never picks more than fits, except at its
/// floor (one server, or one slot per server), where [`Layout::fits`] says whether the GPU can take
/// it at all.
pub fn choose_layout(budget: &Budget, servers: Count, slots: Count) -> Layout {
    let most = budget.most_servers();
    let (servers_n, slots_n) = match (servers, slots) {
        (Count::Fixed(n), Count::Fixed(s)) => (n.max(1), s.max(n).max(1)),
        (Count::Auto, Count::Fixed(s)) => {
            let s = s.max(1);
            let most = most.min((s / MIN_SLOTS_PER_SERVER).max(1));
            let n = (1..=most)
                .rev()
                .find(|&n| budget.need_mib(n, s) <= budget.free_mib)
                .unwrap_or(1);
            (n, s)
        }
        (Count::Fixed(n), Count::Auto) => {
            let n = n.max(1);
            (n, budget.slots_beside(n).clamp(n, MAX_AUTO_SLOTS.max(n)))
        }
        (Count::Auto, Count::Auto) => (1..=most)
            .rev()
            .map(|n| (n, budget.slots_beside(n).min(MAX_AUTO_SLOTS)))
            .find(|&(n, s)| s >= if n == 1 { 1 } else { n * MIN_SLOTS_PER_SERVER })
            .unwrap_or((1, 1)),
    };
    let need_mib = budget.need_mib(servers_n, slots_n);
    let fits = need_mib <= budget.free_mib;
    let why = match (servers, slots) {
        (Count::Fixed(_), Count::Fixed(_)) => String::new(),
        (_, Count::Fixed(_)) => explain(budget, servers_n, slots_n, need_mib, fits, most, true),
        (_, Count::Auto) => {
            let chosen = servers == Count::Auto;
            let mut why = explain(budget, servers_n, slots_n, need_mib, fits, most, chosen);
            let room = budget.slots_beside(servers_n);
            if room > MAX_AUTO_SLOTS && room != u32::MAX {
                why.push_str(&format!(
                    "; {room} slots would fit, and auto takes at most {MAX_AUTO_SLOTS}"
                ));
            }
            why
        }
    };
    Layout {
        servers: servers_n,
        slots: slots_n,
        need_mib,
        fits,
        why,
    }
}

/// The numbers behind a choice, for a person; `servers_chosen` where `auto` chose the servers.
fn explain(
    budget: &Budget,
    servers: u32,
    slots: u32,
    need: u64,
    fits: bool,
    most: u32,
    servers_chosen: bool,
) -> String {
    let cache = budget
        .slot_mib
        .map_or("an unknown KV cache".to_string(), |s| {
            format!("{s} MiB of KV cache")
        });
    let verdict = if fits {
        String::new()
    } else {
        ", more than is free: not even this fits".to_string()
    };
    // Why this many servers, where the engine chose them.
    let servers_why = match (servers_chosen, budget.grammar) {
        (false, _) => String::new(),
        (true, true) => format!(
            "; {} run at most {} (each keeps at least {MIN_SLOTS_PER_SERVER} slots where it can)",
            counted(budget.cores, "core"),
            counted(most, "server"),
        ),
        (true, false) => "; without a grammar one server's loop keeps up, and more would only \
                          shrink the GPU's batches"
            .to_string(),
    };
    format!(
        "{} MiB free: {} × ({} MiB of weights + a {MARGIN_MIB} MiB margin) + {} × {cache} = \
         {need} MiB{verdict}{servers_why}",
        budget.free_mib,
        counted(servers, "server"),
        budget.weights_mib,
        counted(slots, "slot"),
    )
}

/// `n` things, in the singular or the plural.
pub fn counted(n: u32, thing: &str) -> String {
    if n == 1 {
        format!("1 {thing}")
    } else {
        format!("{n} {thing}s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// LLaVA-1.5-7B Q4_K_M and its projector: 4488 MiB of weights, 1024 MiB per slot of 2048 tokens.
    fn llava(free_mib: u64, cores: u32) -> Budget {
        Budget {
            free_mib,
            weights_mib: 4488,
            slot_mib: Some(1024),
            cores,
            grammar: true,
        }
    }

    #[test]
    fn an_h200_gets_four_servers_of_four_slots_and_small_gpus_one_server() {
        let h200 = choose_layout(&llava(139_000, 16), Count::Auto, Count::Auto);
        assert_eq!((h200.servers, h200.slots), (4, 16), "{}", h200.why);
        assert!(h200.fits);
        // All but 8 GiB held: one server, and the slots that fit beside it (2).
        let small = choose_layout(&llava(8192, 16), Count::Auto, Count::Auto);
        assert_eq!((small.servers, small.slots), (1, 2), "{}", small.why);
        let twelve = choose_layout(&llava(12_288, 16), Count::Auto, Count::Auto);
        assert_eq!((twelve.servers, twelve.slots), (1, 6), "{}", twelve.why);
        // Two cores run one server, whatever the GPU.
        let ci = choose_layout(&llava(139_000, 2), Count::Auto, Count::Fixed(16));
        assert_eq!(ci.servers, 1);
        // Not even one server fits: said, with the numbers.
        let tiny = choose_layout(&llava(4096, 16), Count::Auto, Count::Auto);
        assert!(
            !tiny.fits && tiny.why.contains("not even this fits"),
            "{}",
            tiny.why
        );
        assert!(
            h200.why
                .starts_with("139000 MiB free: 4 servers × (4488 MiB"),
            "{}",
            h200.why
        );
        assert!(
            small.why.contains("1 server × (") && small.why.contains("+ 2 slots ×"),
            "{}",
            small.why
        );
    }

    #[test]
    fn without_a_grammar_auto_runs_one_server_with_every_slot() {
        let budget = Budget {
            grammar: false,
            ..llava(139_000, 16)
        };
        let both = choose_layout(&budget, Count::Auto, Count::Auto);
        assert_eq!((both.servers, both.slots), (1, 16), "{}", both.why);
        assert!(both.why.contains("without a grammar"), "{}", both.why);
        let servers = choose_layout(&budget, Count::Auto, Count::Fixed(32));
        assert_eq!((servers.servers, servers.slots), (1, 32));
        // A fixed count stands, and the choice of slots does not argue with it.
        let fixed = choose_layout(&budget, Count::Fixed(4), Count::Auto);
        assert_eq!((fixed.servers, fixed.slots), (4, 16));
        assert!(
            !fixed.why.contains("grammar") && !fixed.why.contains("run at most"),
            "{}",
            fixed.why
        );
    }

    #[test]
    fn fixed_counts_are_kept_and_say_nothing() {
        let layout = choose_layout(&llava(139_000, 16), Count::Fixed(2), Count::Fixed(8));
        assert_eq!(
            (layout.servers, layout.slots, layout.why.as_str()),
            (2, 8, "")
        );
        assert_eq!(layout.need_mib, 2 * (4488 + MARGIN_MIB) + 8 * 1024);
        // Each server gets a slot at least.
        let layout = choose_layout(&llava(139_000, 16), Count::Fixed(4), Count::Fixed(2));
        assert_eq!(layout.slots, 4);
    }

    proptest! {
        #[test]
        fn auto_never_overcommits_and_keeps_each_server_busy(
            free_mib in 0u64..300_000,
            weights_mib in 1u64..50_000,
            slot_mib in 1u64..4096,
            cores in 1u32..128,
            fixed_slots in proptest::option::of(1u32..64),
            fixed_servers in proptest::option::of(1u32..8),
            grammar in any::<bool>(),
        ) {
            let budget = Budget { free_mib, weights_mib, slot_mib: Some(slot_mib), cores, grammar };
            let servers = fixed_servers.map_or(Count::Auto, Count::Fixed);
            let slots = fixed_slots.map_or(Count::Auto, Count::Fixed);
            let layout = choose_layout(&budget, servers, slots);
            prop_assert!(layout.servers >= 1 && layout.slots >= layout.servers);
            prop_assert_eq!(layout.fits, layout.need_mib <= free_mib);
            if let Some(n) = fixed_servers { prop_assert_eq!(layout.servers, n); }
            if let Some(s) = fixed_slots { prop_assert_eq!(layout.slots, s.max(layout.servers)); }
            if servers == Count::Auto {
                // Within the cores, and more than one server only where each has its share.
                prop_assert!(layout.servers <= (cores / CORES_PER_SERVER).max(1));
                prop_assert!(grammar || layout.servers == 1);
                if layout.servers > 1 {
                    prop_assert!(layout.fits);
                    prop_assert!(layout.slots >= layout.servers * MIN_SLOTS_PER_SERVER);
                }
            }
            if slots == Count::Auto {
                prop_assert!(layout.slots <= MAX_AUTO_SLOTS.max(layout.servers));
                // Beyond its floor, auto's slots fit.
                if layout.slots > layout.servers { prop_assert!(layout.fits); }
            }
        }
    }
}
