//! Seeded random simulation of a pool under migrations, triggers, crashes,
//! control-link failures, connection resets, drains (the drained server then
//! exits) and replayed Migrates.
//!
//! `MIGRATORY_SIM_SEEDS=N` sets how many seeds each configuration runs
//! (default 10,000 in total across the configurations below);
//! `MIGRATORY_SIM_SEED=S` replays one seed with its trace printed.

mod sim;

use sim::{AppKind, Faults, Outcome, World, WorldConfig};

fn config(seed: u64) -> WorldConfig {
    // The seed picks the configuration, so one number replays a run.
    let app = if seed % 2 == 0 {
        AppKind::File
    } else {
        AppKind::Transform
    };
    let mut cfg = WorldConfig::new(seed, app);
    cfg.random = true;
    cfg.eager = seed % 4 >= 2;
    cfg.servers = 3 + (seed % 3) as usize / 2;
    cfg.up_len = 2_000 + (seed % 7) as usize * 1_500;
    cfg.down_len = 3_000 + (seed % 5) as usize * 2_500;
    cfg.max_steps = 60_000;
    cfg.faults = Faults {
        migrate: 30_000,
        push: 10_000,
        pull: 10_000,
        crash: if seed % 8 == 7 { 0 } else { 400 },
        restart: 2_000,
        link_break: 800,
        conn_reset: 800,
        replay: 2_000,
        // A third of the seeds drain servers (their servers report loads).
        drain: if seed % 3 == 1 { 5_000 } else { 0 },
    };
    cfg
}

fn run_seed(seed: u64) -> Outcome {
    let mut w = World::new(config(seed));
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| w.run()));
    match result {
        Ok(o) => {
            // A replayed seed shows its trace however it ended.
            if std::env::var("MIGRATORY_SIM_SEED").is_ok() {
                for line in &w.trace {
                    eprintln!("{line}");
                }
            }
            o
        }
        Err(e) => {
            let msg = e
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            if std::env::var("MIGRATORY_SIM_SEED").is_ok() {
                for line in &w.trace {
                    eprintln!("{line}");
                }
            }
            panic!("seed {seed} failed: {msg}\nreplay with: MIGRATORY_SIM_SEED={seed} cargo test -p migratory-proto --test simulation -- --nocapture");
        }
    }
}

#[test]
fn random_seeds_keep_every_invariant() {
    if let Ok(s) = std::env::var("MIGRATORY_SIM_SEED") {
        let seed: u64 = s.parse().expect("MIGRATORY_SIM_SEED is a number");
        println!("seed {seed}: {:?}", run_seed(seed));
        return;
    }
    let n: u64 = std::env::var("MIGRATORY_SIM_SEEDS")
        .ok()
        .map(|s| s.parse().expect("MIGRATORY_SIM_SEEDS is a number"))
        .unwrap_or(10_000);
    let (mut done, mut lost, mut migrations) = (0u64, 0u64, 0u64);
    let (mut drained, mut lost_drained, mut shutdown) = (0u64, 0u64, 0u64);
    let (mut catch_ups, mut gaps, mut held, mut cut_offs) = (0u64, 0u64, 0u64, 0u64);
    for seed in 0..n {
        match run_seed(seed) {
            Outcome::Completed {
                migrations: m,
                drains,
                catch_ups: c,
                gaps_filled: g,
                gaps_held: h,
                cut_offs: k,
            } => {
                cut_offs += u64::from(k);
                held += u64::from(h);
                done += 1;
                migrations += u64::from(m);
                catch_ups += u64::from(c);
                gaps += u64::from(g);
                drained += u64::from(drains > 0);
            }
            Outcome::FailedClosed { error, drains } => {
                lost += 1;
                drained += u64::from(drains > 0);
                lost_drained += u64::from(drains > 0);
                shutdown += u64::from(error.contains("shut down"));
            }
        }
    }
    println!(
        "{n} seeds: {done} completed ({migrations} migrations), {lost} lost cleanly after \
         crashes or drains; {drained} runs drained a server ({lost_drained} of them lost the \
         session, {shutdown} with the server's Shutdown); {catch_ups} migrations resumed \
         beyond what the client held, {gaps} gaps fetched for it ({held} for a state request held while \
         the client was away), {cut_offs} times a completed run's client was cut off from \
         its new server while it caught up"
    );
    // The loaded-migration paths must be exercised, not only allowed.
    assert!(catch_ups > n / 20, "too few catch-ups: {catch_ups}");
    assert!(gaps > held, "no gap was ever fetched after a Missing");
    assert!(held > 0, "no gap was ever fetched for a held state request");
    assert!(cut_offs > 0, "no session survived a cut-off");
    assert!(done > n / 2, "most runs must complete: {done} of {n}");
}
